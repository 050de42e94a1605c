"""Kubeflow Pipelines components: one module per stage, each a thin typed shell over
`apr.stages.<stage>.run`, and beside each its compiled spec (`<stage>.yaml`), which another
team can reuse in its own pipeline with `kfp.components.load_component_from_file`.

Lightweight Python components (`@dsl.component`): KFP embeds each function's source in the
compiled YAML and runs it as its own file in the stage's image, so only `apr` must be
importable there (`install_kfp_package=False`: nothing is installed at run time). The same
components run under `kfp.local`'s SubprocessRunner in this environment.
"""
