"""Kubeflow Pipelines components: one module per stage, each a thin shell over `apr.<stage>`.

Lightweight Python components (`@dsl.component`): KFP serializes each function into the
pipeline YAML and runs it in the stage's image, which holds the `apr` package and kfp
(`install_kfp_package=False`: nothing is installed at run time), so the same components run
under `kfp.local`'s SubprocessRunner in this environment.
"""

from apr.k8s import SGLANG_IMAGE, TRAIN_IMAGE  # noqa: F401  (re-exported for the components)

APR_IMAGE = "ghcr.io/apr-on-kubernetes/apr:0.1.0"
