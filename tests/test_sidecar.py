"""The rollout server as a subprocess: it comes up, reports clearly when it cannot, and after a
weight update it scores text exactly as the trainer does."""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from apr import model as model_lib
from apr import tokenizer as domain_tokenizer
from apr.engine.base import Sampling
from apr.engine.sglang import SGLangEngine
from apr.grpo import GRPOConfig, Trainer, push_weights, token_logprobs
from apr.sidecar import Sidecar, SidecarError

PROMPT = "Moving to Node #0\nCurrent State: 24:[3, 8, 2], Operations: []\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_lib.save(model_lib.build("tiny", seed=3), tmp_path_factory.mktemp("m") / "model")


def test_a_server_that_never_answers_fails_with_its_log(tmp_path):
    sidecar = Sidecar(tmp_path, tmp_path / "server.log", kind="apr", startup_timeout_s=1.5)
    sidecar.command = [sys.executable, "-c", "print('loading...', flush=True); "
                       "import time; time.sleep(60)"]
    with pytest.raises(SidecarError, match=r"did not answer /health within 2 s[\s\S]*loading"):
        sidecar.start()
    assert sidecar.process.poll() is not None  # and it was stopped


def test_a_server_that_exits_is_reported_with_its_exit_code(tmp_path):
    sidecar = Sidecar(tmp_path, tmp_path / "server.log", kind="apr", startup_timeout_s=30)
    sidecar.command = [sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(3)"]
    with pytest.raises(SidecarError, match=r"exited with code 3[\s\S]*CUDA out of memory"):
        sidecar.start()


def _row(prompt: str, token_ids: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    tok = domain_tokenizer.build()
    prompt_ids = tok.encode(prompt).ids
    return torch.tensor([prompt_ids + list(token_ids)]), len(prompt_ids)


def test_after_a_weight_update_the_server_scores_text_as_the_trainer(model_dir, tmp_path):
    trainer = Trainer(model_dir, GRPOConfig(kl_beta=0.0))
    with torch.no_grad():  # new weights the server has never seen
        for p in trainer.policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    async def scenario():
        with Sidecar(model_dir, tmp_path / "server.log", kind="apr", device="cpu",
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
