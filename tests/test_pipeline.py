"""The Kubeflow pipeline: the committed YAML, its DAG and GPU settings, and a local run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from apr import storage
from apr.cluster import pipeline
from apr.cluster.jobs import job_name
from apr.cluster.progress import TaskProgress
from apr.config import InputError

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
    assert component.name == stage.replace("_", "-")
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
    assert set(tasks) == {"datagen-plan", "for-loop-1", "datagen-merge", "sft-step-gpus", "sft",
                          "sft-2", "grpo", "evaluate", "evaluate-2", "compare", "publish"}

    def upstream(name):
        return set(tasks[name].get("dependentTasks", []))

    # datagen: a ParallelFor of parts over the plan's list, each solving the plan's problems,
    # joined into one dataset
    loop = tasks["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("datagen-plan-Output")
    [part] = spec["components"]["comp-for-loop-1"]["dag"]["tasks"].values()
    assert part["inputs"]["artifacts"]["problems"]["componentInputArtifact"] == (
        "pipelinechannel--datagen-plan-problems")
    assert upstream("for-loop-1") == {"datagen-plan"}
    assert upstream("datagen-merge") == {"for-loop-1"}
    assert upstream("sft") == upstream("sft-2") == {"datagen-merge", "sft-step-gpus"}
    assert upstream("grpo") == {"datagen-merge", "sft"}  # GRPO starts from the APR SFT model
    assert upstream("evaluate") == {"datagen-merge", "grpo"}
    assert upstream("evaluate-2") == {"datagen-merge", "sft-2"}
    assert upstream("compare") == {"evaluate", "evaluate-2"}
    assert upstream("publish") >= {"grpo", "compare"}  # the published model is the GRPO one
    for task in ("grpo", "sft", "sft-2"):  # each resumes from its checkpoint in the store
        assert tasks[task]["retryPolicy"]["maxRetryCount"] == 2
    executors = spec["deploymentSpec"]["executors"]
    for task in GPU_TASKS:
        container = executors[tasks[task]["componentRef"]["name"].replace("comp-", "exec-")]["container"]
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        count = str(container["resources"]["accelerator"]["resourceCount"])
        # SFT: its GPUs (torchrun over them), none when it only follows a TrainJob
        assert count == ("{{$.inputs.parameters['pipelinechannel--sft-step-gpus-Output']}}"
                         if task.startswith("sft") else "1")
        assert "train_image" in container["image"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task in GPU_TASKS:
        executor = k8s["exec-" + task]
        assert executor["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert executor["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert int(executor["activeDeadlineSeconds"]) == pipeline.definition().GPU_STEP_DEADLINE_S
    for task in ("publish", "grpo", "sft", "sft-2"):  # all write to the store
        secret = k8s["exec-" + task]["secretAsEnv"][0]
        assert secret["secretName"] == "mlpipeline-minio-artifact"
        assert {e["envVar"] for e in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID",
                                                            "AWS_SECRET_ACCESS_KEY"}
    # side effects (a GPU Job and staged files; the store's contents) are never taken from
    # KFP's cache; the pure steps may be
    cached = {name for name, task in tasks.items()
              if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == set(tasks) - {"grpo", "publish", "for-loop-1"}  # the loop runs no container
    inner = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["datagen"]
    assert inner["cachingOptions"]["enableCache"]
    launcher = executors["exec-grpo"]["container"]
    assert "accelerator" not in launcher.get("resources", {})  # the GPUs are the Job's
    assert tasks["grpo"]["inputs"]["parameters"]["launcher"]["runtimeValue"]["constant"] == "job"
    for name in ("preset", "datagen_pods", "sft_gpus", "sft_nodes", "store", "model_name", "model_version", "image", "train_image",
                 "sft_overrides", "grpo_overrides", "sglang_image", "namespace", "s3_endpoint"):
        assert name in spec["root"]["inputDefinitions"]["parameters"]


def test_components_install_nothing_at_run_time():
    documents = list(yaml.safe_load_all(COMMITTED.read_text()))
    for name, executor in documents[0]["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, name


class FakeMetrics:
    """What a component does with a dsl.Output[dsl.Metrics]: a path and log_metric."""

    def __init__(self, path: Path):
        self.path, self.metadata, self.logged = str(path), {}, {}

    def log_metric(self, name: str, value) -> None:
        self.logged[name] = value


def test_the_sft_component_mirrors_checkpoints_under_a_key_of_its_inputs(tmp_path, monkeypatch):
    """A retry of the same step finds the same mirror; other inputs, another one; a local
    store (kfp.local) none. The step's environment is left as it was."""
    from apr.stages import sft as stage

    pipeline.definition()
    from components.sft import sft

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "step-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "step-secret")
    calls = []

    def run(config, data, out, resume, progress, mirror, mirror_settings):
        calls.append((mirror, mirror_settings, resume))
        raise KeyboardInterrupt  # enough: what the stage was asked to do

    monkeypatch.setattr(stage, "run", run)
    before = dict(os.environ)

    def call(store, overrides=(), data_uri="s3://apr-models/v2/artifacts/run-1/datagen/data"):
        model = SimpleNamespace(path=str(tmp_path / "model"), metadata={})
        with pytest.raises(KeyboardInterrupt):
            sft.python_func(preset="local", traces="apr", overrides=list(overrides), store=store,
                            s3_endpoint="http://seaweedfs.kubeflow:9000",
                            data=SimpleNamespace(path=str(tmp_path / "data"), uri=data_uri),
                            model=model, metrics=FakeMetrics(tmp_path / "metrics"))
        return calls[-1]

    first, settings, resume = call("s3://apr-models/pipeline")
    assert first.startswith("s3://apr-models/pipeline/sft-runs/") and resume
    assert settings.url == "http://seaweedfs.kubeflow:9000" and settings.access_key == "step-access"
    assert call("s3://apr-models/pipeline")[0] == first  # the retry
    assert call("s3://apr-models/pipeline", ["max_steps=7"])[0] != first
    assert call("s3://apr-models/pipeline", data_uri="s3://apr-models/other")[0] != first
    assert call(str(tmp_path / "store"))[:2] == (None, None)
    assert dict(os.environ) == before


@pytest.mark.parametrize("endpoint", ["http://minio.apr-store:9000", ""])
def test_the_grpo_component_launches_a_job_with_its_own_endpoint(endpoint, tmp_path,
                                                                 monkeypatch):
    """launcher "job": the settings and the Job get the component's s3_endpoint (else the
    environment's), and the step's environment is left as it was."""
    from apr.cluster import grpo_job

    pipeline.definition()  # `components` importable from the checkout
    from components.grpo import grpo

    monkeypatch.setenv("S3_ENDPOINT", "http://from-the-env:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "step-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "step-secret")
    calls = []

    def run_grpo_job(fields, model_dir, data_dir, store, args, out_model, settings=None,
                     timeout_s=0, log=None):
        calls.append(dict(fields=fields, model_dir=model_dir, data_dir=data_dir, store=store,
                          args=args, out_model=out_model, settings=settings,
                          timeout_s=timeout_s))
        return {"steps": 4, "initial_val_accuracy": None, "val_accuracy": 0.5}

    monkeypatch.setattr(grpo_job, "run_grpo_job", run_grpo_job)
    before = dict(os.environ)
    model = SimpleNamespace(path=str(tmp_path / "model"), metadata={})
    metrics = FakeMetrics(tmp_path / "metrics")
    grpo.python_func(
        preset="local", overrides=["steps=4", "group_size=2"], launcher="job", run_id="run-7",
        store="s3://apr-store/pipeline", s3_endpoint=endpoint, namespace="ml-team",
        train_image="example/apr-train:2", sglang_image="example/sglang:2", timeout_s=900.0,
        sft_model=SimpleNamespace(path=str(tmp_path / "sft"), metadata={}),
        data=SimpleNamespace(path=str(tmp_path / "data"), metadata={}), model=model,
        metrics=metrics)
    assert dict(os.environ) == before  # nothing the next step or component sees was changed
    [call] = calls
    expected = endpoint or "http://from-the-env:9000"
    assert call["settings"].url == expected
    assert (call["settings"].access_key, call["settings"].secret_key) == ("step-access",
                                                                         "step-secret")
    assert call["fields"] == {"name": job_name("run-7"), "namespace": "ml-team",
                              "trainer_image": "example/apr-train:2",
                              "sglang_image": "example/sglang:2", "s3_endpoint": expected}
    assert call["args"] == ["--config", "local", "--set", "steps=4", "--set", "group_size=2"]
    assert (call["model_dir"], call["data_dir"], call["out_model"]) == (
        str(tmp_path / "sft"), str(tmp_path / "data"), model.path)
    assert (call["store"], call["timeout_s"]) == ("s3://apr-store/pipeline", 900.0)
    assert model.metadata == {"stage": "grpo", "preset": "local", "steps": 4}
    assert metrics.logged == {"steps": 4, "val_accuracy": 0.5}  # a None accuracy is not logged


def test_the_sft_component_beyond_one_node_runs_a_trainjob(tmp_path, monkeypatch):
    """`nodes` > 1: the step stages the data and follows a TrainJob of nodes x gpus, named
    for the run and the traces (a retry finds its checkpoints), and its result is the step's."""
    from apr.cluster import trainjob

    pipeline.definition()
    from components.sft import sft, sft_step_gpus

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "step-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "step-secret")
    calls = []

    def run_sft_trainjob(fields, data_dir, store, out_dir, settings=None, timeout_s=0, log=None):
        calls.append((fields, data_dir, store, settings))
        (Path(out_dir) / "model").mkdir(parents=True)
        (Path(out_dir) / "model" / "model.safetensors").write_bytes(b"weights")
        (Path(out_dir) / "sft.json").write_text(json.dumps({
            "steps": 9, "train_loss": 0.5, "val_loss": 0.6, "train_sequences": 100,
            "dropped_sequences": 0}))
        return Path(out_dir)

    monkeypatch.setattr(trainjob, "run_sft_trainjob", run_sft_trainjob)
    model = SimpleNamespace(path=str(tmp_path / "step" / "model"), metadata={})
    metrics = FakeMetrics(tmp_path / "metrics")
    sft.python_func(preset="paper", traces="apr", overrides=["max_steps=9"],
                    store="s3://apr-models/pipeline", s3_endpoint="http://minio.kubeflow:9000",
                    data=SimpleNamespace(path=str(tmp_path / "data"), uri="s3://a/data"),
                    model=model, metrics=metrics, gpus=8, nodes=4, run_id="run-7",
                    namespace="ml-team", image="example/apr-train:2")
    [(fields, data_dir, store, settings)] = calls
    assert fields == {"name": job_name("run-7/apr", "apr-sft"), "namespace": "ml-team",
                      "image": "example/apr-train:2", "preset": "paper",
                      "overrides": ("traces=apr", "max_steps=9"), "nodes": 4, "gpus_per_node": 8,
                      "s3_endpoint": "http://minio.kubeflow:9000"}
    assert (data_dir, store, settings.access_key) == (str(tmp_path / "data"),
                                                      "s3://apr-models/pipeline", "step-access")
    assert (Path(model.path) / "model.safetensors").read_bytes() == b"weights"
    assert metrics.logged["steps"] == 9 and model.metadata["steps"] == 9
    # the step itself asks for no GPU then: the TrainJob's pods hold them
    assert sft_step_gpus.python_func(nodes=4, gpus=8) == 0
    assert sft_step_gpus.python_func(nodes=1, gpus=8) == 8
    with pytest.raises(InputError, match="sft_nodes=0"):
        sft_step_gpus.python_func(nodes=0, gpus=8)


@pytest.mark.slow
def test_the_sft_component_runs_torchrun_over_its_gpus(tmp_path, monkeypatch):
    """`gpus` > 1: one `apr sft` process per GPU through torchrun (here two gloo processes on
    the CPU), and the step's model and metrics come from their run."""
    from conftest import make_dataset

    pipeline.definition()
    from components.sft import sft

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = make_dataset(tmp_path / "data", train=16, val=4, seed=3, chunk=4)
    model = SimpleNamespace(path=str(tmp_path / "step" / "model"), metadata={})
    metrics = FakeMetrics(tmp_path / "metrics")
    sft.python_func(preset="local", traces="sos", store=str(tmp_path / "store"), s3_endpoint="",
                    overrides=["shape=tiny", "context=1024", "tokens_per_batch=2048",
                               "max_steps=2", "eval_every=2", "checkpoint_every=2",
                               "eval_sequences=4", "dtype=fp32"],
                    data=SimpleNamespace(path=str(data), uri=str(data)), model=model,
                    metrics=metrics, gpus=2)
    assert (Path(model.path) / "model.safetensors").is_file()
    assert model.metadata == {"traces": "sos", "shape": "tiny", "steps": 2}
    assert metrics.logged["steps"] == 2
    assert json.loads((tmp_path / "step" / "sft-run" / "sft.json").read_text())["processes"] == 2


def test_progress_prints_a_line_per_task_and_keeps_the_failed_tasks_last_lines():
    log, out = io.StringIO(), io.StringIO()
    progress = TaskProgress(log, out, {"sft-2": "SFT SoS+"}, tail_lines=2)
    stream = ("\x1b[36mExecuting task 'datagen'\x1b[0m\nwrote 40 problems\n"
              "Task 'datagen' finished with status \x1b[92mSUCCESS\x1b[0m\n"
              "Executing task 'sft-2'\nstep 1\nstep 2\nValueError: bad shape\n"
              "Task 'sft-2' finished with status \x1b[91mFAILURE")
    for piece in (stream[:50], stream[50:], "\x1b[0m\n"):  # lines arrive in pieces
        progress.write(piece)
    lines = out.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["datagen", "success"],
                                                     ["SFT", "SoS+"]] and "failure" in lines[1]
    assert progress.failed == "sft-2" and progress.failed_tail == ["step 2",
                                                                   "ValueError: bad shape"]
    assert log.getvalue() == stream + "\x1b[0m\n"  # the log keeps everything, as written


def test_progress_sees_every_task_end_on_a_shared_line():
    """A task's print without its newline, then kfp.local's records: one line, two ends."""
    log, out = io.StringIO(), io.StringIO()
    progress = TaskProgress(log, out)
    progress.write("output Task 'a' finished with status SUCCESS "
                   "Task 'b' finished with status FAILURE\n")
    assert [line.split()[:2] for line in out.getvalue().splitlines()] == [
        ["a", "success"], ["b", "failure"]]
    assert progress.failed == "b"


@pytest.mark.slow
def test_a_failed_task_stops_the_run_and_shows_its_last_lines(tmp_path, capsys, caplog):
    with pytest.raises(pipeline.PipelineFailed, match=r"datagen.*pipeline\.log") as failed:
        pipeline.run_local(tmp_path, overrides={"datagen": ["problems.n_numbers=1"]})
    assert "\n" not in str(failed.value)  # one line for the terminal
    terminal = capsys.readouterr().out.splitlines()
    # the plan is the first task to read the datagen config
    assert ["datagen", "plan", "failure"] in [line.split()[:3] for line in terminal]
    # nothing that needs the data ran (the SFT GPU count, which does not, may have)
    ran = [line.split()[:2] for line in terminal[1:]]
    assert all(words[0] == "datagen" or words == ["SFT", "GPUs"] for words in ran), ran
    [record] = [r for r in caplog.records if "last lines" in r.getMessage()]
    assert "n_numbers" in record.getMessage()  # the task's own error, without the rest
    assert "n_numbers" in (tmp_path / "pipeline.log").read_text()


@pytest.mark.slow
def test_local_run_end_to_end(tmp_path, capsys, caplog):
    caplog.set_level("INFO")  # kfp.local's records are made, and must not reach the terminal
    summary = pipeline.run_local(tmp_path, datagen_pods=2, overrides={
        "datagen": ["problems.train_size=40", "problems.val_size=6", "problems.test_size=0",
                    "chunk_size=10", "shard_size=40", "workers=1"],
        "sft": ["max_steps=2", "context=1024", "tokens_per_batch=2048", "eval_sequences=8",
                "checkpoint_every=2", "eval_every=2"],
        "grpo": ["steps=1", "group_size=2", "prompts_per_step=2", "context=96",
                 "tokens_per_batch=2048", "val_problems=2"],
        "evaluate": ["max_problems=3", "context=64", "context_limits=[32,64]"]})
    report = Path(summary["report"])
    assert report.is_file() and "| apr |" in report.read_text() and "| sos |" in report.read_text()
    header = report.read_text().splitlines()[2]  # each model named by how it was trained
    assert "APR: GRPO step 1 from SFT on APR traces (tiny shape), step 2" in header
    assert "SoS+: SFT on SoS+ traces (tiny shape), step 2" in header
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert set(metrics["settings"]) == {"apr", "sos"}
    assert (report.parent / "report.html").read_text().count("data:image/png;base64") == 3
    published = tmp_path / "store" / "models" / "apr-countdown" / "v1"
    assert storage.is_complete(published)
    assert (published / "model.safetensors").is_file()
    grpo_runs = list(Path(summary["run"]).glob("grpo/grpo-run/metrics.jsonl"))
    assert grpo_runs and '"weight_version": "0"' in grpo_runs[0].read_text()
    # the terminal: a header and one line per task; the tasks' own logs are in pipeline.log
    terminal = capsys.readouterr().out.splitlines()
    assert all(" success " in line for line in terminal[1:])
    assert sorted(line[2:22].strip() for line in terminal[1:]) == sorted([
        "datagen plan", "datagen part", "datagen part", "datagen", "SFT GPUs", "SFT APR", "SFT SoS+", "GRPO APR", "evaluate APR", "evaluate SoS+",
        "APR vs SoS+ report", "publish model"])
    assert "Streamed logs" in (tmp_path / "pipeline.log").read_text()
    # kfp.local's own records ("Cleaned up workspace") go to the log file, not the terminal
    assert not [r for r in caplog.records if f"{os.sep}kfp{os.sep}" in r.pathname]
    assert "Cleaned up workspace" in (tmp_path / "pipeline.log").read_text()


# Every section of a preset, shrunk only in size: the shapes, batches, samples, dtypes,
# compilation, compression and engines are the preset's own.
SMALL = {
    "datagen": ["problems.train_size=40", "problems.val_size=6", "problems.test_size=0",
                "chunk_size=10", "shard_size=40", "workers=1"],
    "sft": ["shape=tiny", "context=1024", "tokens_per_batch=2048", "max_steps=2",
            "eval_every=2", "checkpoint_every=2", "eval_sequences=8"],
    "grpo": ["steps=1", "group_size=2", "prompts_per_step=2", "context=96",
             "tokens_per_batch=2048", "val_problems=2"],
    "evaluate": ["max_problems=3", "context=64", "context_limits=[32,64]",
                 "total_token_limits=[64,128]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gpu-small", "paper"])
def test_every_preset_runs_the_whole_pipeline(preset, tmp_path, monkeypatch):
    """gpu-small and paper through the whole DAG on the CPU (local runs in the test above):
    bf16 and torch.compile in SFT, gzip traces, paper's evaluation starting its own server
    (on a CPU `apr engine serve`; SGLang's own run is in tests/test_sglang.py)."""
    from apr.config import load
    from apr.decode.rollout_server import SGLANG_PYTHON_ENV
    from apr.stages.evaluate import EvalConfig

    if load(EvalConfig, preset, "evaluate", []).server == "sglang":
        from conftest import sglang_python_or_skip

        monkeypatch.setenv(SGLANG_PYTHON_ENV, sglang_python_or_skip())
    summary = pipeline.run_local(tmp_path, preset=preset, overrides=SMALL)
    metrics = json.loads(Path(summary["metrics"]).read_text())
    samples = load(EvalConfig, preset, "evaluate", []).sos_samples
    assert set(metrics["settings"]) == {"apr", *(f"sos-n{n}" if n > 1 else "sos"
                                                 for n in samples)}
    assert storage.is_complete(tmp_path / "store" / "models" / "apr-countdown" / "v1")
