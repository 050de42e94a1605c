"""The Kubeflow pipeline: the committed YAML, its DAG and GPU settings, and a local run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from apr import storage
from apr.cluster import pipeline

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "apr_pipeline.yaml"
GPU_TASKS = {"sft", "sft-2", "evaluate", "evaluate-2"}


def test_committed_yaml_is_what_the_code_compiles(tmp_path):
    fresh = pipeline.compile_all(tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in fresh} == {
        "pipelines/apr_pipeline.yaml", *(f"components/{s}.yaml" for s in pipeline.STAGES)}
    for path in fresh:
        relative = path.relative_to(tmp_path)
        assert path.read_text() == (ROOT / relative).read_text(), \
            f"{relative} is stale: run `apr pipeline compile` and commit it"


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_each_component_spec_loads_for_reuse(stage, tmp_path):
    """Another team's pipeline can take any one stage from its compiled spec."""
    from kfp import compiler, components, dsl

    component = components.load_component_from_file(str(ROOT / "components" / f"{stage}.yaml"))
    assert component.name == stage
    if stage != "datagen":
        return

    @dsl.pipeline(name="reuse")
    def reuse():  # no parameters: this file's annotations are strings, which KFP cannot read
        component(preset="gpu-small", overrides=["problems.train_size=10"])

    compiler.Compiler().compile(reuse, str(tmp_path / "reuse.yaml"))
    spec = yaml.safe_load((tmp_path / "reuse.yaml").read_text())
    assert "apr.stages" in str(spec["deploymentSpec"])  # the stage's own code, embedded


def test_yaml_loads_back_through_kfp_with_the_whole_dag():
    from kfp import components

    component = components.load_component_from_file(str(COMMITTED))
    assert component.name == pipeline.definition().PIPELINE_NAME
    documents = list(yaml.safe_load_all(COMMITTED.read_text()))
    spec, platform = documents[0], documents[1]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"datagen", "sft", "sft-2", "grpo", "evaluate", "evaluate-2", "compare",
                          "publish"}

    def upstream(name):
        return set(tasks[name].get("dependentTasks", []))

    assert upstream("sft") == upstream("sft-2") == {"datagen"}
    assert upstream("grpo") == {"datagen", "sft"}  # GRPO starts from the APR SFT model
    assert upstream("evaluate") == {"datagen", "grpo"} and upstream("evaluate-2") == {"datagen", "sft-2"}
    assert upstream("compare") == {"evaluate", "evaluate-2"}
    assert upstream("publish") >= {"grpo", "compare"}  # the published model is the GRPO one
    assert tasks["grpo"]["retryPolicy"]["maxRetryCount"] == 2  # resumes from its checkpoint
    executors = spec["deploymentSpec"]["executors"]
    for task in GPU_TASKS:
        container = executors[tasks[task]["componentRef"]["name"].replace("comp-", "exec-")]["container"]
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert str(container["resources"]["accelerator"]["resourceCount"]) == "1"
        assert "train_image" in container["image"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task in GPU_TASKS:
        executor = k8s["exec-" + task]
        assert executor["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert executor["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    for task in ("publish", "grpo"):  # both write to the store
        secret = k8s["exec-" + task]["secretAsEnv"][0]
        assert secret["secretName"] == "mlpipeline-minio-artifact"
        assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID",
                                                            "AWS_SECRET_ACCESS_KEY"}
    launcher = executors["exec-grpo"]["container"]
    assert "accelerator" not in launcher.get("resources", {})  # the GPUs are the Job's
    assert tasks["grpo"]["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"] == "job"
    for name in ("preset", "store", "model_name", "model_version", "image", "train_image",
                 "sft_overrides", "grpo_overrides", "sglang_image", "namespace", "s3_endpoint"):
        assert name in spec["root"]["inputDefinitions"]["parameters"]


def test_components_install_nothing_at_run_time():
    documents = list(yaml.safe_load_all(COMMITTED.read_text()))
    for name, executor in documents[0]["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, name


def test_local_run_end_to_end(tmp_path):
    summary = pipeline.run_local(tmp_path, overrides={
        "datagen": ["problems.train_size=40", "problems.val_size=6", "problems.test_size=0",
                    "chunk_size=10", "shard_size=40", "workers=1"],
        "sft": ["max_steps=2", "context=1024", "tokens_per_batch=2048", "eval_sequences=8",
                "checkpoint_every=2", "eval_every=2"],
        "grpo": ["steps=1", "group_size=2", "prompts_per_step=2", "context=96",
                 "tokens_per_batch=2048", "val_problems=2"],
        "evaluate": ["max_problems=3", "context=64", "context_limits=[32,64]"]})
    report = Path(summary["report"])
    assert report.is_file() and "| apr |" in report.read_text() and "| sos |" in report.read_text()
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert set(metrics["settings"]) == {"apr", "sos"}
    assert (report.parent / "report.html").read_text().count("data:image/png;base64") == 3
    published = tmp_path / "store" / "models" / "apr-countdown" / "v1"
    assert storage.is_complete(published)
    assert (published / "model.safetensors").is_file()
    grpo_runs = list(Path(summary["run"]).glob("grpo/grpo-run/metrics.jsonl"))
    assert grpo_runs and '"weight_version": "0"' in grpo_runs[0].read_text()
