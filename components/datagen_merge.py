"""Component: `apr datagen-merge`."""

from typing import List

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def datagen_merge(parts: dsl.Input[List[dsl.Dataset]], data: dsl.Output[dsl.Dataset],
                  stats: dsl.Output[dsl.Metrics]):
    """The dataset the datagen parts make up, one artifact, with its stats as metrics."""
    import shutil

    from apr.stages import datagen_merge as stage

    shutil.rmtree(data.path, ignore_errors=True)  # KFP may create the path; merge wants it new
    summary = stage.merge([part.path for part in parts], data.path)
    for split, numbers in summary["splits"].items():
        if numbers.get("problems"):
            stats.log_metric(f"{split}_problems", numbers["problems"])
            stats.log_metric(f"{split}_apr_solve_rate", numbers["apr"]["solve_rate"])
            stats.log_metric(f"{split}_apr_children", numbers["apr"]["children_per_problem"])
            stats.log_metric(f"{split}_sos_solve_rate", numbers["sos"]["solve_rate"])
