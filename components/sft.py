"""Component: `apr sft` (APR or SoS+ traces)."""

from kfp import dsl

from apr.cluster.defaults import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def sft(preset: str, traces: str, overrides: list, data: dsl.Input[dsl.Dataset],
        model: dsl.Output[dsl.Model], metrics: dsl.Output[dsl.Metrics]):
    """Train from scratch on `traces` ("apr" or "sos"); the model directory is the artifact."""
    import os
    import shutil

    from apr.config import load
    from apr.stages import sft as stage

    config = load(stage.SFTConfig, preset, stage.SECTION,
                  [f"traces={traces}", *[str(o) for o in overrides]])
    run_dir = os.path.join(os.path.dirname(model.path) or ".", "sft-run")
    result = stage.run(config, data.path, run_dir, resume=True, progress=False)
    shutil.rmtree(model.path, ignore_errors=True)
    shutil.copytree(result.model_dir, model.path)
    model.metadata.update({"traces": traces, "shape": config.shape, "steps": result.steps})
    metrics.log_metric("steps", result.steps)
    metrics.log_metric("train_loss", round(result.final_train_loss, 5))
    metrics.log_metric("val_loss", round(result.val_loss, 5))
    metrics.log_metric("train_sequences", result.train_sequences)
    metrics.log_metric("dropped_sequences", result.dropped_sequences)
