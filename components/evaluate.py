"""Component: `apr evaluate`."""

from kfp import dsl

from apr.cluster.defaults import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(preset: str, mode: str, overrides: list, model: dsl.Input[dsl.Model],
             data: dsl.Input[dsl.Dataset], results: dsl.Output[dsl.Dataset],
             metrics: dsl.Output[dsl.Metrics], report: dsl.Output[dsl.Markdown]):
    """Decode the val split with `mode` ("apr" or "sos"); numbers to the KFP UI."""
    import shutil

    from apr.config import load
    from apr.stages import evaluate as stage

    config = load(stage.EvalConfig, preset, stage.SECTION,
                  [f"modes=[{mode}]", *[str(o) for o in overrides]])
    shutil.rmtree(results.path, ignore_errors=True)
    summary = stage.run(config, model.path, data.path, results.path, progress=False)
    for name, m in summary["settings"].items():
        metrics.log_metric(f"{name}_accuracy", m["accuracy"])
        metrics.log_metric(f"{name}_tokens_total_mean", m["tokens_total"].get("mean", 0))
        metrics.log_metric(f"{name}_tokens_sequential_mean", m["tokens_sequential"].get("mean", 0))
        metrics.log_metric(f"{name}_latency_s_mean", m["latency_s"].get("mean", 0))
        if "majority_accuracy" in m:
            metrics.log_metric(f"{name}_majority_accuracy", m["majority_accuracy"])
    shutil.copyfile(f"{results.path}/report.md", report.path)
