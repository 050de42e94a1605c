"""Component: `apr datagen`."""

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def datagen(preset: str, overrides: list, data: dsl.Output[dsl.Dataset],
            stats: dsl.Output[dsl.Metrics]):
    """Problems, SoS+ and APR traces and the tokenizer, written to the `data` artifact."""
    import shutil

    from apr.config import load
    from apr.stages import datagen as stage

    config = load(stage.DatagenConfig, preset, stage.SECTION, [str(o) for o in overrides])
    shutil.rmtree(data.path, ignore_errors=True)  # KFP may create the path; datagen wants it new
    summary = stage.run(config, data.path, progress=False)
    for split, numbers in summary["splits"].items():
        if numbers.get("problems"):
            stats.log_metric(f"{split}_problems", numbers["problems"])
            stats.log_metric(f"{split}_apr_solve_rate", numbers["apr"]["solve_rate"])
            stats.log_metric(f"{split}_apr_children", numbers["apr"]["children_per_problem"])
            stats.log_metric(f"{split}_sos_solve_rate", numbers["sos"]["solve_rate"])
