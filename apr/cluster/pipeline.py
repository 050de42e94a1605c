"""Compile, submit and run locally the Kubeflow pipeline defined in `pipelines/apr_pipeline.py`.

    apr pipeline compile                 pipelines/apr_pipeline.yaml and components/<stage>.yaml
    apr pipeline submit --host URL       runs it (registered with --register) through kfp.Client
    apr pipeline run --local             the same DAG through kfp.local on this machine

The pipeline and its components live at the repository's top level (where Kubeflow users look
for them), not in the package: the images need only `apr`. So these commands work from a
checkout (an editable install, or the current directory).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from apr.cluster.progress import ANSI, TaskProgress
from apr.config import InputError

log = logging.getLogger(__name__)
STAGES = ("datagen", "datagen_merge", "sft", "grpo", "evaluate", "compare", "publish")


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


# What a value given as text must become for each KFP parameter type (the API refuses a
# string where it declared a number, a flag or a list).
_KINDS = {"STRING": (str,), "NUMBER_INTEGER": (int,), "NUMBER_DOUBLE": (int, float),
          "BOOLEAN": (bool,), "LIST": (list,), "STRUCT": (dict,)}


def parameter_types(package: str | Path) -> dict[str, str]:
    """The pipeline's parameters and their KFP types, as its compiled YAML declares them."""
    import yaml

    try:  # the pipeline spec, then (kfp-kubernetes) its platform spec
        spec = next(yaml.safe_load_all(Path(package).read_text()))
        parameters = spec["root"]["inputDefinitions"]["parameters"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"--package {package} is not a compiled pipeline ({reason}): run "
                         "`apr pipeline compile`") from None
    return {name: p["parameterType"] for name, p in parameters.items()}


def typed_arguments(pairs: list[str], types: dict[str, str]) -> dict:
    """`NAME=VALUE` pairs as the values their parameters declare: a string parameter takes
    the text as it is (`model_version=1.0` stays "1.0"); any other reads it as YAML
    (`grpo_timeout_s=3600`, `replace_model=true`, `sft_overrides=[max_steps=10]`)."""
    import yaml

    arguments = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals:
            raise InputError(f"--arg {pair!r}: give NAME=VALUE, e.g. --arg preset=gpu-small")
        if name not in types:
            raise InputError(f"--arg {name}: the pipeline has no such parameter; it has "
                             f"{', '.join(sorted(types))}")
        kind = types[name]
        if kind == "STRING":
            arguments[name] = text
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = None
        if not isinstance(value, _KINDS.get(kind, (object,))) or (
                isinstance(value, bool) and kind != "BOOLEAN"):
            raise InputError(f"--arg {name}={text}: the pipeline declares it {kind}; give "
                             f"{_EXAMPLES.get(kind, 'a value of that type')}")
        arguments[name] = value
    return arguments


_EXAMPLES = {"NUMBER_INTEGER": "an integer", "NUMBER_DOUBLE": "a number, e.g. 3600",
             "BOOLEAN": "true or false", "LIST": "a YAML list, e.g. [max_steps=10]",
             "STRUCT": "a YAML mapping"}


@dataclass(frozen=True)
class Submission:
    """Where and how `apr pipeline submit` sends the compiled pipeline."""

    host: str
    arguments: list[str] = field(default_factory=list)  # NAME=VALUE, typed by the package
    experiment: str = "apr"
    run_name: str | None = None
    namespace: str | None = None  # a multi-user Kubeflow profile
    token: str | None = None  # a bearer token for the API (multi-user Kubeflow)
    register: str | None = None  # also register the package as a pipeline of this name
    version: str | None = None  # the registered version's name (default: a timestamp)
    package: str | Path | None = None


def submit(submission: Submission):
    """Run the compiled pipeline; with `register`, first upload it as a pipeline (or a new
    version of it) so it is listed in the UI, and run that version."""
    import kfp

    if submission.version and not submission.register:
        raise InputError(f"--version {submission.version} names a registered version: add "
                         "--register NAME (the pipeline it is a version of)")
    package = Path(submission.package or repository_root() / definition().COMPILED)
    arguments = typed_arguments(submission.arguments, parameter_types(package))
    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": noise
        warnings.simplefilter("ignore", FutureWarning)
        client = kfp.Client(host=submission.host, existing_token=submission.token,
                            namespace=submission.namespace or "kubeflow")
    if submission.register is None:
        return client.create_run_from_pipeline_package(
            str(package), arguments=arguments, experiment_name=submission.experiment,
            run_name=submission.run_name, namespace=submission.namespace)
    pipeline_id = client.get_pipeline_id(submission.register)
    if pipeline_id is None:  # a new pipeline, with the package as its first version
        pipeline_id = client.upload_pipeline(str(package), pipeline_name=submission.register,
                                             namespace=submission.namespace).pipeline_id
        version = client.list_pipeline_versions(pipeline_id).pipeline_versions[0]
    else:
        version = client.upload_pipeline_version(
            str(package), pipeline_id=pipeline_id,
            pipeline_version_name=submission.version or time.strftime("v%Y%m%d-%H%M%S"))
    experiment = client.create_experiment(submission.experiment, namespace=submission.namespace)
    return client.run_pipeline(
        experiment_id=experiment.experiment_id,
        job_name=submission.run_name or f"{submission.register} {version.display_name}",
        params=arguments, pipeline_id=pipeline_id, version_id=version.pipeline_version_id)


class PipelineFailed(RuntimeError):
    """A task of the local run failed; its own log says why."""


@contextmanager
def _kfp_records_to(progress: TaskProgress | None):
    """kfp.local's own records that reach this process's log handlers (it logs through the
    root logger; outside a task, e.g. "Cleaned up workspace", its handler is not there) go to
    the run's log file with the rest, not to the terminal."""
    if progress is None:
        yield
        return

    def to_log(record: logging.LogRecord) -> bool:
        if f"{os.sep}kfp{os.sep}" not in record.pathname:
            return True
        progress.log.write(record.getMessage() + "\n")
        return False

    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(to_log)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(to_log)


def display_names(spec) -> dict[str, str]:
    """kfp.local's task key -> the name the UI shows, for the tasks of every DAG (a
    ParallelFor's tasks live in a DAG of their own)."""
    dags = [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]
    return {key: task.task_info.name for dag in dags for key, task in dag.tasks.items()}


def run_local(workdir: str | Path, preset: str = "local", store: str | None = None,
              overrides: dict[str, list[str]] | None = None, verbose: bool = False,
              datagen_pods: int = 1) -> dict:
    """The whole DAG through kfp.local's SubprocessRunner in this Python environment. Unless
    `verbose`, the terminal gets a line per task and the tasks' logs go to pipeline.log."""
    from kfp import local

    module = definition()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / "pipeline-root"), raise_on_error=True)
    overrides = overrides or {}
    started = time.perf_counter()
    log_path = workdir / "pipeline.log"
    run = module.build(cluster=False)
    names = display_names(run.pipeline_spec)
    with open(log_path, "w") if not verbose else nullcontext() as log_file:
        progress = None if verbose else TaskProgress(log_file, sys.stdout, names)
        if progress:
            print(f"pipeline ({preset} preset), one line per task; their logs: {log_path}",
                  flush=True)
        try:
            with redirect_stdout(progress) if progress else nullcontext(), \
                    _kfp_records_to(progress), warnings.catch_warnings():
                # "custom or non-Python base image ... consider the DockerRunner": the images
                # are the project's own, and this environment is the one they install
                warnings.filterwarnings("ignore", "You may be attemping", RuntimeWarning)
                # "settings ['display_name'] have no effect in the current local runner": the
                # names are for the UI; the progress lines print them
                warnings.filterwarnings("ignore", ".*have no effect in the current local runner",
                                        UserWarning)
                run(preset=preset, store=str(store or workdir / "store"), s3_endpoint="",
                    datagen_overrides=overrides.get("datagen", []),
                    sft_overrides=overrides.get("sft", []),
                    grpo_overrides=overrides.get("grpo", []),
                    evaluate_overrides=overrides.get("evaluate", []), datagen_pods=datagen_pods)
        except RuntimeError as e:  # kfp.local's report: the failed task, coloured
            if type(e).__module__.startswith("apr."):
                raise
            plain = ANSI.sub("", str(e)).strip().splitlines()[-1]
            if progress is None:
                raise PipelineFailed(f"{plain} (its log is above)") from None
            if progress.failed is None:  # kfp.local failed before any task ended
                raise PipelineFailed(f"{plain}: the whole log is in {log_path}") from None
            log.error("task %s failed; the last lines of its log:\n%s", progress.failed,
                      "\n".join(progress.failed_tail))
            raise PipelineFailed(f"{plain}: its last lines are above, the whole log is in "
                                 f"{log_path}") from None
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
    log.debug("local run: %s", json.dumps(summary))
    return summary
