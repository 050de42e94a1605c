"""The rollout server as a subprocess: it comes up, reports clearly when it cannot, and after a
weight update it scores text exactly as the trainer does."""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from apr import model as model_lib
from apr import tokenizer as domain_tokenizer
from apr.decode.engine import Sampling
from apr.decode.rollout_server import ENGINE_SERVE, RolloutServer, RolloutServerError
from apr.decode.sglang import SGLangEngine
from apr.rl.losses import token_logprobs
from apr.rl.trainer import Trainer, push_weights
from apr.stages.grpo import GRPOConfig

PROMPT = "Moving to Node #0\nCurrent State: 24:[3, 8, 2], Operations: []\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_lib.save(model_lib.build("tiny", seed=3), tmp_path_factory.mktemp("m") / "model")


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """The process exits within `within_s` (a signal is delivered after kill() returns); a
    zombie waiting for init to reap it counts as gone."""
    import time

    deadline = time.monotonic() + within_s
    while True:
        try:
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _pid_in(path) -> int:
    return int(path.read_text())


@pytest.mark.slow
def test_a_server_that_never_answers_fails_with_its_log(tmp_path):
    sidecar = RolloutServer(tmp_path, tmp_path / "server.log", kind=ENGINE_SERVE, startup_timeout_s=1.5)
    sidecar.command = [sys.executable, "-c", f"import os, time; open({str(tmp_path / 'pid')!r}, "
                       "'w').write(str(os.getpid())); print('loading...', flush=True); "
                       "time.sleep(60)"]
    with pytest.raises(RolloutServerError, match=r"did not answer /health within 2 s[\s\S]*loading"):
        sidecar.start()
    assert _gone(_pid_in(tmp_path / "pid"))  # and it was stopped


@pytest.mark.slow
def test_a_server_that_exits_is_reported_and_its_children_stopped(tmp_path):
    """SGLang's scheduler processes are the server's children: they must not outlive it."""
    sidecar = RolloutServer(tmp_path, tmp_path / "server.log", kind=ENGINE_SERVE, startup_timeout_s=30)
    sidecar.command = [sys.executable, "-c", (
        "import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(child.pid)); "
        "print('CUDA out of memory', flush=True); time.sleep(0.5); sys.exit(3)")]
    with pytest.raises(RolloutServerError, match=r"exited with code 3[\s\S]*CUDA out of memory"):
        sidecar.start()
    assert _gone(_pid_in(tmp_path / "pid"))


def test_an_interrupted_start_leaves_no_server(tmp_path, monkeypatch):
    import apr.decode.rollout_server

    sidecar = RolloutServer(tmp_path, tmp_path / "server.log", kind=ENGINE_SERVE, startup_timeout_s=30)
    sidecar.command = [sys.executable, "-c", f"import os, time; open({str(tmp_path / 'pid')!r}, "
                       "'w').write(str(os.getpid())); time.sleep(60)"]
    real_get = apr.decode.rollout_server.httpx.get

    def interrupted(*args, **kwargs):  # Ctrl-C while waiting for the server's health
        if (tmp_path / "pid").exists():
            raise KeyboardInterrupt
        return real_get(*args, **kwargs)

    monkeypatch.setattr(apr.decode.rollout_server.httpx, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sidecar.start()
    assert _gone(_pid_in(tmp_path / "pid"))


def _row(prompt: str, token_ids: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    tok = domain_tokenizer.build()
    prompt_ids = tok.encode(prompt).ids
    return torch.tensor([prompt_ids + list(token_ids)]), len(prompt_ids)


@pytest.mark.slow
def test_after_a_weight_update_the_server_scores_text_as_the_trainer(model_dir, tmp_path):
    trainer = Trainer(model_dir, GRPOConfig(kl_beta=0.0))
    with torch.no_grad():  # new weights the server has never seen
        for p in trainer.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    async def scenario():
        with RolloutServer(model_dir, tmp_path / "server.log", kind=ENGINE_SERVE, device="cpu",
                     startup_timeout_s=120) as sidecar:
            engine = SGLangEngine(sidecar.url)
            sampling = Sampling(40, temperature=1.0, logprobs=True)
            try:
                (before,) = await engine.generate([PROMPT], sampling)
                await push_weights(engine, trainer, tmp_path / "weights", 1)
                (after,) = await engine.generate([PROMPT], sampling)
            finally:
                await engine.close()
            return before, after

    before, after = asyncio.run(scenario())
    assert before.weight_version == "0" and after.weight_version == "1"
    assert len(after.token_ids) == len(after.logprobs) == after.completion_tokens > 0
    ids, start = _row(PROMPT, after.token_ids)
    with torch.no_grad():
        ours = token_logprobs(trainer.policy, ids, 1.0)[0, start - 1:]
    assert torch.allclose(ours, torch.tensor(after.logprobs), atol=1e-4)
    # The check can fail: the weights the server started with score the same tokens otherwise.
    old = model_lib.load(model_dir)
    with torch.no_grad():
        stale = token_logprobs(old, ids, 1.0)[0, start - 1:]
    assert (stale - ours).abs().max() > 1e-2


def test_sglang_starts_from_its_own_interpreter_with_the_cpu_flags_on_a_cpu(monkeypatch):
    from apr.decode.rollout_server import server_command, server_env

    monkeypatch.setenv("APR_SGLANG_PYTHON", "/opt/sglang/bin/python")
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    cpu = server_command("sglang", "/m", 30000, device="cpu")
    assert cpu[:3] == ["/opt/sglang/bin/python", "-m", "sglang.launch_server"]
    flags = {f: cpu[cpu.index(f) + 1] for f in ("--device", "--dtype", "--max-total-tokens",
                                                "--weight-version")}
    assert flags["--device"] == "cpu" and flags["--dtype"] == "float32"
    assert int(flags["--max-total-tokens"]) > 0 and flags["--weight-version"] == "0"
    assert server_env("sglang", "cpu")["SGLANG_USE_CPU_ENGINE"] == "1"
    gpu = server_command("sglang", "/m", 30000, device="cuda", python="/srv/python")
    assert gpu[0] == "/srv/python" and "--device" not in gpu and "--dtype" not in gpu
    assert "SGLANG_USE_CPU_ENGINE" not in server_env("sglang", "cuda")
    # the stand-in is the project's own command, whatever SGLang's interpreter is
    assert server_command(ENGINE_SERVE, "/m", 30000, device="cpu")[0] == sys.executable
