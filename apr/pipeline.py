"""The Kubeflow pipeline: datagen, then SFT(APR) -> GRPO -> evaluate(APR) and the SoS+
baseline SFT(SoS+) -> evaluate(SoS+), the comparison report, and publication of the APR model
(after GRPO) for the serving chart.

    apr pipeline compile                 writes pipelines/apr_pipeline.yaml (upload it in the UI)
    apr pipeline submit --host URL       uploads and runs it through kfp.Client
    apr pipeline run --local             the same DAG through kfp.local on this machine

In the cluster the GRPO step is a CPU launcher of a Kubernetes Job (the trainer with SGLang as
a native sidecar, `apr/k8s.py`); locally it trains in the step with `apr engine serve` as its
rollout server.
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's real types.
import json
import sys
import time
from pathlib import Path

from kfp import dsl

from apr.components import APR_IMAGE, SGLANG_IMAGE, TRAIN_IMAGE
from apr.components.compare import compare
from apr.components.datagen import datagen
from apr.components.evaluate import evaluate
from apr.components.grpo import grpo
from apr.components.publish import publish
from apr.components.sft import sft
from apr.k8s import S3_ENDPOINT, S3_SECRET

PIPELINE_NAME = "apr-countdown"
COMPILED = Path("pipelines") / "apr_pipeline.yaml"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by NVIDIA's GPU feature discovery


def _on_gpu(task: dsl.PipelineTask, image) -> dsl.PipelineTask:
    """One GPU on a GPU node (selector and toleration for its taint), and the CUDA image."""
    from kfp import kubernetes

    task.set_container_image(image)
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
    task.set_memory_request("16Gi").set_cpu_request("4")
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    return task


def _with_store_credentials(task: dsl.PipelineTask) -> dsl.PipelineTask:
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={
        "accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"})
    return task


def build(cluster: bool = True):
    """The pipeline function; `cluster=False` leaves out Kubernetes-only settings (kfp.local)."""

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Adaptive Parallel Reasoning on Countdown: APR against SoS+")
    def apr_pipeline(preset: str = "local", datagen_overrides: list = [],
                     sft_overrides: list = [], grpo_overrides: list = [],
                     evaluate_overrides: list = [],
                     store: str = "s3://apr-models", model_name: str = "apr-countdown",
                     model_version: str = "v1", s3_endpoint: str = S3_ENDPOINT,
                     image: str = APR_IMAGE, train_image: str = TRAIN_IMAGE,
                     sglang_image: str = SGLANG_IMAGE, namespace: str = "kubeflow",
                     grpo_timeout_s: float = 0.0):
        data = datagen(preset=preset, overrides=datagen_overrides).set_display_name("datagen")
        models = {}
        evaluations = {}
        for traces, label in (("apr", "APR"), ("sos", "SoS+")):
            trained = sft(preset=preset, traces=traces, overrides=sft_overrides,
                          data=data.outputs["data"]).set_display_name(f"SFT {label}")
            final = trained
            if traces == "apr":
                final = grpo(preset=preset, overrides=grpo_overrides,
                             launcher="job" if cluster else "local",
                             run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER if cluster else "local",
                             store=store, s3_endpoint=s3_endpoint, namespace=namespace,
                             train_image=train_image, sglang_image=sglang_image,
                             timeout_s=grpo_timeout_s, sft_model=trained.outputs["model"],
                             data=data.outputs["data"]).set_display_name("GRPO APR")
                if cluster:  # a CPU step: the GPUs are the Job's
                    final.set_container_image(image)
                    _with_store_credentials(final)
                    # A retry keeps the run id, so its Job resumes from the last checkpoint.
                    final.set_retry(num_retries=2, backoff_duration="60s")
            evaluated = evaluate(preset=preset, mode=traces, overrides=evaluate_overrides,
                                 model=final.outputs["model"], data=data.outputs["data"]
                                 ).set_display_name(f"evaluate {label}")
            if cluster:
                _on_gpu(trained, train_image)
                _on_gpu(evaluated, train_image)
            models[traces], evaluations[traces] = final, evaluated
        report = compare(apr_results=evaluations["apr"].outputs["results"],
                         sos_results=evaluations["sos"].outputs["results"]
                         ).set_display_name("APR vs SoS+ report")
        published = publish(model=models["apr"].outputs["model"], store=store, name=model_name,
                             version=model_version, s3_endpoint=s3_endpoint
                             ).set_display_name("publish model")
        published.after(report)
        if cluster:
            for task in (data, report, published):
                task.set_container_image(image)
            _with_store_credentials(published)

    return apr_pipeline


def compile_yaml(path: str | Path = COMPILED) -> Path:
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(cluster=True), str(path))
    return path


def submit(host: str, arguments: dict, experiment: str = "apr", path: str | Path = COMPILED):
    import kfp

    client = kfp.Client(host=host)
    return client.create_run_from_pipeline_package(str(path), arguments=arguments,
                                                   experiment_name=experiment)


def run_local(workdir: str | Path, preset: str = "local", store: str | None = None,
              overrides: dict[str, list[str]] | None = None) -> dict:
    """The whole DAG through kfp.local's SubprocessRunner in this Python environment."""
    from kfp import local

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / "pipeline-root"), raise_on_error=True)
    overrides = overrides or {}
    started = time.perf_counter()
    build(cluster=False)(
        preset=preset, store=str(store or workdir / "store"), s3_endpoint="",
        datagen_overrides=overrides.get("datagen", []), sft_overrides=overrides.get("sft", []),
        grpo_overrides=overrides.get("grpo", []), evaluate_overrides=overrides.get("evaluate", []))
    root = workdir / "pipeline-root"
    runs = sorted(root.glob(f"{PIPELINE_NAME}-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"kfp.local wrote no run under {root}")
    run_dir = runs[-1]
    reports = sorted(run_dir.glob("compare/comparison/report.md"))
    summary = {"run": str(run_dir), "seconds": round(time.perf_counter() - started, 1),
               "report": str(reports[0]) if reports else None,
               "metrics": str(reports[0].with_name("metrics.json")) if reports else None,
               "published": f"{store or workdir / 'store'}/models"}
    print(json.dumps(summary, indent=2), file=sys.stderr)
    return summary
