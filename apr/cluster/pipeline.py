"""Compile, submit and run locally the Kubeflow pipeline defined in `pipelines/apr_pipeline.py`.

    apr pipeline compile                 pipelines/apr_pipeline.yaml and components/<stage>.yaml
    apr pipeline submit --host URL       uploads and runs it through kfp.Client
    apr pipeline run --local             the same DAG through kfp.local on this machine

The pipeline and its components live at the repository's top level (where Kubeflow users look
for them), not in the package: the images need only `apr`. So these commands work from a
checkout (an editable install, or the current directory).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from types import ModuleType

from apr.config import InputError

log = logging.getLogger(__name__)
STAGES = ("datagen", "sft", "grpo", "evaluate", "compare", "publish")


def repository_root() -> Path:
    """The checkout holding `pipelines/` and `components/`: the package's parent, else cwd."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "pipelines" / "apr_pipeline.py").is_file():
            return root
    raise InputError("apr pipeline needs the repository checkout (pipelines/apr_pipeline.py): "
                     "run it from the repository root")


def definition() -> ModuleType:
    """`pipelines.apr_pipeline`, imported from the checkout."""
    root = str(repository_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.apr_pipeline")


def compile_all(root: str | Path | None = None) -> list[Path]:
    """The pipeline's YAML and each component's spec, written under `root` (the checkout)."""
    from kfp import compiler

    module = definition()
    root = Path(root) if root is not None else repository_root()
    written = []
    for stage in STAGES:
        path = root / "components" / f"{stage}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        component = getattr(importlib.import_module(f"components.{stage}"), stage)
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    written.append(module.compile_yaml(root / module.COMPILED))
    return written


def submit(host: str, arguments: dict, experiment: str = "apr", package: str | Path | None = None):
    import kfp

    package = package or repository_root() / definition().COMPILED
    client = kfp.Client(host=host)
    return client.create_run_from_pipeline_package(str(package), arguments=arguments,
                                                   experiment_name=experiment)


class PipelineFailed(RuntimeError):
    """A task of the local run failed; its own log says why."""


def check_configs(preset: str, overrides: dict[str, list[str]]) -> None:
    """Every stage's config, loaded as its task will load it: a bad preset or key is an
    InputError before any task runs."""
    from apr.config import load
    from apr.stages import CONFIGS

    for stage, (module_name, class_name) in CONFIGS.items():
        module = importlib.import_module(module_name)
        load(getattr(module, class_name), preset, module.SECTION, overrides.get(stage, []))


def run_local(workdir: str | Path, preset: str = "local", store: str | None = None,
              overrides: dict[str, list[str]] | None = None) -> dict:
    """The whole DAG through kfp.local's SubprocessRunner in this Python environment."""
    from kfp import local

    check_configs(preset, overrides or {})  # a typo fails here, not in a task minutes later
    module = definition()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / "pipeline-root"), raise_on_error=True)
    overrides = overrides or {}
    started = time.perf_counter()
    try:
        module.build(cluster=False)(
            preset=preset, store=str(store or workdir / "store"), s3_endpoint="",
            datagen_overrides=overrides.get("datagen", []), sft_overrides=overrides.get("sft", []),
            grpo_overrides=overrides.get("grpo", []),
            evaluate_overrides=overrides.get("evaluate", []))
    except RuntimeError as e:  # kfp.local's report: the failed task, coloured
        if type(e).__module__.startswith("apr."):
            raise
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[-1]
        raise PipelineFailed(f"{plain} (its log is above)") from None
    root = workdir / "pipeline-root"
    runs = sorted(root.glob(f"{module.PIPELINE_NAME}-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"kfp.local wrote no run under {root}")
    run_dir = runs[-1]
    reports = sorted(run_dir.glob("compare/comparison/report.md"))
    summary = {"run": str(run_dir), "seconds": round(time.perf_counter() - started, 1),
               "report": str(reports[0]) if reports else None,
               "metrics": str(reports[0].with_name("metrics.json")) if reports else None,
               "published": f"{store or workdir / 'store'}/models"}
    log.info("local run: %s", json.dumps(summary))
    return summary
