"""Component: the APR against SoS+ comparison report."""

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def compare(apr_results: dsl.Input[dsl.Dataset], sos_results: dsl.Input[dsl.Dataset],
            comparison: dsl.Output[dsl.Dataset], report: dsl.Output[dsl.HTML],
            summary: dsl.Output[dsl.Markdown]):
    """Tables and the paper's three curves for both models, as HTML (plots inline) and Markdown."""
    import shutil

    from apr.report import run_compare

    shutil.rmtree(comparison.path, ignore_errors=True)
    run_compare(apr_results.path, sos_results.path, comparison.path)
    shutil.copyfile(f"{comparison.path}/report.html", report.path)
    shutil.copyfile(f"{comparison.path}/report.md", summary.path)
