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
from pathlib import Path

from kfp import dsl

from apr.cluster.defaults import (
    APR_IMAGE,
    S3_ENDPOINT,
    S3_SECRET,
    S3_SECRET_KEYS,
    SGLANG_IMAGE,
    TRAIN_IMAGE,
)
from components.compare import compare
from components.datagen import datagen, datagen_plan
from components.datagen_merge import datagen_merge
from components.evaluate import evaluate
from components.grpo import grpo
from components.publish import publish
from components.sft import sft, sft_step_gpus

PIPELINE_NAME = "apr-countdown"
COMPILED = Path("pipelines") / "apr_pipeline.yaml"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by NVIDIA's GPU feature discovery
# A GPU step's pod ends after this (activeDeadlineSeconds): a hung step never holds its GPU
# for good. Generous, and a guess: the paper preset has not yet run on a GPU here.
GPU_STEP_DEADLINE_S = 72 * 3600


def _on_gpu(task: dsl.PipelineTask, image, gpus=1) -> dsl.PipelineTask:
    """`gpus` GPUs (a number or a pipeline parameter) on a GPU node (selector and toleration
    for its taint), and the CUDA image."""
    from kfp import kubernetes

    task.set_container_image(image)
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    task.set_memory_request("16Gi").set_cpu_request("4")
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.set_timeout(task, GPU_STEP_DEADLINE_S)
    return task


def _with_store_credentials(task: dsl.PipelineTask) -> dsl.PipelineTask:
    from kfp import kubernetes

    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    return task


def build(cluster: bool = True):
    """The pipeline function; `cluster=False` leaves out Kubernetes-only settings (kfp.local)."""

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Adaptive Parallel Reasoning on Countdown: APR against SoS+")
    def apr_pipeline(preset: str = "local", datagen_overrides: list = [],
                     sft_overrides: list = [], grpo_overrides: list = [],
                     evaluate_overrides: list = [],
                     store: str = "s3://apr-models", model_name: str = "apr-countdown",
                     model_version: str = "v1", replace_model: bool = False,
                     s3_endpoint: str = S3_ENDPOINT,
                     image: str = APR_IMAGE, train_image: str = TRAIN_IMAGE,
                     sglang_image: str = SGLANG_IMAGE, namespace: str = "kubeflow",
                     grpo_timeout_s: float = 0.0, datagen_pods: int = 1, sft_gpus: int = 1,
                     sft_nodes: int = 1):
        # The problems are drawn once; their traces are written by `datagen_pods` CPU pods
        # side by side, then joined.
        plan = datagen_plan(preset=preset, overrides=datagen_overrides, parts=datagen_pods
                            ).set_display_name("datagen plan")
        # kfp.local runs a loop's iterations in threads, and its per-task logging swaps the
        # root logger's handlers unsafely between threads: one at a time there.
        with dsl.ParallelFor(plan.outputs["Output"], name="datagen-parts",
                             parallelism=0 if cluster else 1) as part:
            written = datagen(preset=preset, overrides=datagen_overrides,
                              problems=plan.outputs["problems"], part=part
                              ).set_display_name("datagen part")
        data = datagen_merge(parts=dsl.Collected(written.outputs["data"])
                             ).set_display_name("datagen")
        # SFT on one node holds its GPUs; beyond one it only follows the TrainJob that does.
        step_gpus = sft_step_gpus(nodes=sft_nodes, gpus=sft_gpus).set_display_name("SFT GPUs")
        models = {}
        evaluations = {}
        for traces, label in (("apr", "APR"), ("sos", "SoS+")):
            trained = sft(preset=preset, traces=traces, overrides=sft_overrides, store=store,
                          s3_endpoint=s3_endpoint, data=data.outputs["data"], gpus=sft_gpus,
                          nodes=sft_nodes, namespace=namespace, image=train_image,
                          run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER if cluster else "local"
                          ).set_display_name(f"SFT {label}")
            final = trained
            if traces == "apr":
                final = grpo(preset=preset, overrides=grpo_overrides,
                             launcher="job" if cluster else "local",
                             run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER if cluster else "local",
                             store=store, s3_endpoint=s3_endpoint, namespace=namespace,
                             train_image=train_image, sglang_image=sglang_image,
                             timeout_s=grpo_timeout_s, sft_model=trained.outputs["model"],
                             data=data.outputs["data"]).set_display_name("GRPO APR")
                # Never from cache: the step launches a GPU Job and stages files in the store.
                final.set_caching_options(False)
                if cluster:  # a CPU step: the GPUs are the Job's
                    final.set_container_image(image)
                    _with_store_credentials(final)
                    # A retry keeps the run id, so its Job resumes from the last checkpoint.
                    final.set_retry(num_retries=2, backoff_duration="60s")
            evaluated = evaluate(preset=preset, mode=traces, overrides=evaluate_overrides,
                                 model=final.outputs["model"], data=data.outputs["data"]
                                 ).set_display_name(f"evaluate {label}")
            if cluster:
                _on_gpu(trained, train_image, step_gpus.output)
                trained.after(step_gpus)  # a resource field is no data edge: wait for it
                _on_gpu(evaluated, train_image)
                # A retry resumes from the checkpoints mirrored in the store.
                _with_store_credentials(trained)
                trained.set_retry(num_retries=2, backoff_duration="60s")
            models[traces], evaluations[traces] = final, evaluated
        report = compare(apr_results=evaluations["apr"].outputs["results"],
                         sos_results=evaluations["sos"].outputs["results"]
                         ).set_display_name("APR vs SoS+ report")
        published = publish(model=models["apr"].outputs["model"], store=store, name=model_name,
                             version=model_version, s3_endpoint=s3_endpoint,
                             replace=replace_model).set_display_name("publish model")
        # A side effect (the store's contents), never skipped as cached; the other steps are
        # functions of their inputs and may be taken from KFP's cache.
        published.set_caching_options(False)
        published.after(report)
        if cluster:
            for task in (plan, written, data, step_gpus, report, published):
                task.set_container_image(image)
            _with_store_credentials(published)

    return apr_pipeline


def compile_yaml(path: str | Path = COMPILED) -> Path:
    from kfp import compiler

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(cluster=True), str(path))
    return path


if __name__ == "__main__":  # python -m pipelines.apr_pipeline (from the repository root)
    print(compile_yaml())
