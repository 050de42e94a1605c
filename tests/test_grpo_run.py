"""The GRPO run end to end over HTTP: it trains on rollouts with rewards that vary, syncs
weights every step, resumes exactly, and stops with a checkpoint on stale weights, a rejected
update or a server that goes away.

The rollout server here answers from the solver's recorded traces (half of the rollouts of
each problem are cut short, so every group has a reward to learn from) and records the weight
versions it is sent: the trainer's side is the real one, the model's answers are scripted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import S3_KEYS, ServedApp, make_dataset
from safetensors.torch import load_file

from apr import model as model_lib
from apr import storage
from apr import tokenizer as domain_tokenizer
from apr.config import from_dict
from apr.dataset import read_records
from apr.decode.engine import LENGTH
from apr.decode.engine_server import create_app
from apr.decode.oracle import OracleEngine
from apr.stages.grpo import GRPOConfig, GRPOError, run, validate


class ScriptedEngine:
    """The oracle's answers, every second answer to a problem's first prompt cut in half."""

    def __init__(self, records: list[dict], on_update: str = "apply", score: bool = False):
        self.oracle = OracleEngine(records)
        self.roots = {r["threads"][0]["prompt"] for r in records}
        self.asked: Counter = Counter()
        self.weight_version = "default"
        self.on_update = on_update
        self.versions: list[str] = []
        self.served: ServedApp | None = None
        # score: report each answer's log-probs under the weights last loaded, as SGLang does
        self.score = score
        self.model = None
        self.tok = domain_tokenizer.build()

    async def generate(self, prompts, sampling):
        out = []
        for prompt, c in zip(prompts, await self.oracle.generate(prompts, sampling)):
            if prompt in self.roots:
                self.asked[prompt] += 1
                if self.asked[prompt] % 2 == 0:
                    half = c.token_ids[:len(c.token_ids) // 2]
                    text = self.oracle._tok.decode(list(half), skip_special_tokens=False)
                    c = replace(c, text=text, finish_reason=LENGTH, matched=None,
                                completion_tokens=len(half), token_ids=half)
            if self.score and sampling.logprobs and c.token_ids:
                c = replace(c, logprobs=self._logprobs(prompt, c.token_ids, sampling.temperature))
            out.append(replace(c, weight_version=self.weight_version))
        return out

    def _logprobs(self, prompt, token_ids, temperature):
        """log_softmax(logits / temperature) of the answer's tokens after BOS + the prompt."""
        prompt_ids = self.tok.encode(prompt, add_special_tokens=False).ids
        ids = torch.tensor([[self.tok.token_to_id(domain_tokenizer.BOS), *prompt_ids,
                             *token_ids]])
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -len(token_ids) - 1:-1]
        return tuple(model_lib.sampled_logprobs(logits, torch.tensor(token_ids),
                                                temperature).tolist())

    def load_weights(self, path, version):
        if self.on_update == "reject" and version != "0":
            raise RuntimeError(f"cannot load {path}: shapes do not match")
        if self.on_update == "die" and version == "1":
            self.served.server.should_exit = True
        if self.on_update != "ignore" or version == "0":
            self.weight_version = version
            if self.score:
                self.model = model_lib.load(path).eval()
        self.versions.append(version)

    async def ready(self):
        return True

    async def close(self):
        return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    generated = make_dataset(root / "generated", train=12, val=3, seed=8, n_numbers=3)
    data = root / "data" / "problems"  # the problems the solver solved: the oracle knows them
    data.mkdir(parents=True)
    records = []
    for split in ("train", "val"):
        solved = [r for r in read_records(generated, "apr", split) if r["solved"]]
        records += solved
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"nums": r["nums"], "target": r["target"]}) + "\n" for r in solved))
    model = model_lib.save(model_lib.build("tiny", seed=1), root / "sft-model")
    return data.parent, model, records


CONFIG = {"group_size": 2, "prompts_per_step": 2, "steps": 3, "lr": 1e-3, "kl_beta": 0.01,
          "context": 4096, "tokens_per_batch": 16384, "val_every": 2, "val_problems": 2,
          "checkpoint_every": 1, "engine_timeout_s": 30, "sidecar_startup_s": 5}


def grpo(setup, out, steps=3, on_update="apply", resume=False, engine=None):
    data, model, records = setup
    engine = engine or ScriptedEngine(records, on_update)
    with ServedApp(create_app(engine, str(model))) as served:
        engine.served = served
        config = from_dict(GRPOConfig, {**CONFIG, "steps": steps})
        result = run(config, model, data, out, engine_url=served.url, resume=resume,
                     progress=False)
    return result, engine


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_run_trains_syncs_every_step_and_resumes_exactly(setup, tmp_path):
    straight, engine = grpo(setup, tmp_path / "straight",
                            engine=ScriptedEngine(setup[2], score=True))
    assert engine.versions == ["0", "1", "2", "3"]
    records = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["reward"] == 0.5 and r["groups_with_signal"] == 1.0
        assert r["rows"] > 4 and r["trained_tokens"] > 0 and r["children_per_rollout"] > 0
        assert {"policy_loss", "kl", "clipped_fraction", "grad_norm", "rollout_s", "train_s",
                "sync_s"} <= set(r)
        assert r["kl"] > 0 and 0 <= r["clipped_fraction"] <= 1
        # The server scored its tokens with the weights the trainer sent: every row compared,
        # and the trainer's log-probs of the same tokens agree (float noise only).
        assert r["logprob_gap_unchecked_rows"] == 0
        assert isinstance(r["logprob_gap"], float) and 0 <= r["logprob_gap"] < 1e-3
    assert steps[0]["kl"] < steps[-1]["kl"]  # the policy moves away from the reference
    vals = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in vals] == [0, 2, 3]
    for r in vals:  # which problems were solved, to compare validations problem by problem
        assert r["val_accuracy"] == round(len(r["val_solved"]) / CONFIG["val_problems"], 4)
    rollouts = read_jsonl(tmp_path / "straight" / "rollouts.jsonl")
    assert [r["weight_version"] for r in rollouts] == ["0"] * 4 + ["1"] * 4 + ["2"] * 4
    assert straight.steps == 3 and (straight.model_dir / "model.safetensors").is_file()
    weights = load_file(straight.model_dir / "model.safetensors")
    initial = load_file(setup[1] / "model.safetensors")
    assert any(not torch.equal(weights[k], initial[k]) for k in weights)

    grpo(setup, tmp_path / "resumed", steps=2)
    _, engine = grpo(setup, tmp_path / "resumed", steps=3, resume=True)
    assert engine.versions == ["2", "3"]  # the server gets the checkpoint's weights first
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
            if "reward" in r] == [1, 2, 3]


def test_validation_adds_the_sampled_reward_of_each_problem_when_asked(setup):
    records = setup[2]
    problems = [{"nums": r["nums"], "target": r["target"]} for r in records[:2]]
    engine = ScriptedEngine(records)  # answers 1, 3, 5 to a problem are whole, 2 and 4 cut
    config = from_dict(GRPOConfig, {**CONFIG, "val_samples": 4})
    result = asyncio.run(validate(engine, problems, config, "default"))
    assert result["val_accuracy"] == 1.0 and result["val_solved"] == [0, 1]  # greedy: first
    assert result["val_sampled_solved"] == [2, 2] and result["val_reward"] == 0.5
    greedy_only = asyncio.run(validate(ScriptedEngine(records), problems,
                                       from_dict(GRPOConfig, CONFIG), "default"))
    assert greedy_only["val_accuracy"] == 1.0 and "val_reward" not in greedy_only


class PrefixedEngine(ScriptedEngine):
    """Records the prompts it is sent, then answers each as the oracle answers it without
    its budget prefix."""

    def __init__(self, records, prefix: str):
        super().__init__(records)
        self.prefix, self.prompts = prefix, []

    async def generate(self, prompts, sampling):
        self.prompts += prompts
        return await super().generate([p.removeprefix(self.prefix) for p in prompts], sampling)


def test_a_budget_conditions_every_root_prompt_of_the_run(setup):
    records = setup[2]
    problems = [{"nums": r["nums"], "target": r["target"]} for r in records[:2]]
    engine = PrefixedEngine(records, "Sub Call Budget: 3 ")
    config = from_dict(GRPOConfig, {**CONFIG, "budget": 3, "val_samples": 1})
    result = asyncio.run(validate(engine, problems, config, "default"))
    parents = [p for p in engine.prompts if "Moving to Node #0\n" in p]  # joins resend them
    assert all(p.startswith("Sub Call Budget: 3 ") for p in parents)
    assert sum(p.count("\n") == 2 for p in parents) == 4  # 2 problems, greedy + 1 sample
    assert result["val_accuracy"] == 1.0
    sos = from_dict(GRPOConfig, {**CONFIG, "mode": "sos", "budget": 512}).budgets()
    assert (sos.sub_call_budget, sos.token_budget) == (0, 512)
    assert from_dict(GRPOConfig, CONFIG).budgets().sub_call_budget == 0


@pytest.mark.slow
def test_weights_the_server_did_not_apply_stop_the_run(setup, tmp_path):
    with pytest.raises(GRPOError, match=r"at step 1[\s\S]*did not apply the last weight update"):
        grpo(setup, tmp_path / "run", on_update="ignore")
    assert (tmp_path / "run" / "checkpoints" / "step-0000001" / "trainer.json").is_file()


@pytest.mark.slow
def test_a_rejected_update_ends_with_a_checkpoint_to_resume(setup, tmp_path):
    with pytest.raises(GRPOError, match=r"rejected[\s\S]*shapes do not match[\s\S]*--resume"):
        grpo(setup, tmp_path / "run", on_update="reject")
    assert (tmp_path / "run" / "checkpoints" / "step-0000001").is_dir()


@pytest.mark.slow
def test_a_server_that_goes_away_mid_run_is_resumed_on_a_new_one(setup, tmp_path):
    with pytest.raises(GRPOError, match=r"unreachable[\s\S]*--resume") as stopped:
        grpo(setup, tmp_path / "run", on_update="die")  # it shuts down after loading step 1
    step = int(re.search(r"stopped at step (\d)", str(stopped.value)).group(1))
    assert step in (1, 2)  # the last requests may still be answered while it shuts down
    result, engine = grpo(setup, tmp_path / "run", resume=True)
    assert result.steps == 3 and engine.versions == [str(v) for v in range(step, 4)]


@pytest.mark.slow
def test_a_run_that_publishes_to_s3_resumes_on_another_machine(setup, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", f"http://{s3.endpoint}")
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    data, model, records = setup
    out = "s3://grpo-runs/run-1"

    def attempt(steps, workdir, resume):
        engine = ScriptedEngine(records)
        with ServedApp(create_app(engine, str(model))) as served:
            config = from_dict(GRPOConfig, {**CONFIG, "steps": steps})
            return run(config, model, data, out, engine_url=served.url, resume=resume,
                       progress=False, workdir=workdir), engine

    attempt(2, tmp_path / "machine-a", resume=False)
    assert storage.is_complete(f"{out}/checkpoint-a") and storage.is_complete(f"{out}/checkpoint-b")
    result, engine = attempt(3, tmp_path / "machine-b", resume=True)  # nothing local there
    assert engine.versions == ["2", "3"] and result.steps == 3
    pulled = storage.download(f"{out}/model", tmp_path / "model")
    assert (pulled / "model.safetensors").is_file()
    logs = storage.download(f"{out}/logs", tmp_path / "logs")
    assert [r["step"] for r in read_jsonl(logs / "metrics.jsonl") if "reward" in r] == [1, 2, 3]


def _rows(sampler_logprobs):
    """Training rows of 3 prompt + 4 answer tokens each, with the server's log-probs given."""
    from apr.rl.rollouts import Rows
    from apr.train.data import Sequences

    n = len(sampler_logprobs)
    tokens = np.tile(np.arange(5, 12, dtype=np.int64), n)
    return Rows(Sequences(tokens, np.arange(n + 1, dtype=np.int64) * 7,
                          np.full(n, 3, dtype=np.int32)),
                np.asarray([1.0, -1.0] * (n // 2) + [1.0] * (n % 2), dtype=np.float32),
                [np.asarray(lp, dtype=np.float32) for lp in sampler_logprobs],
                np.arange(n, dtype=np.int64))


@pytest.mark.slow
def test_rows_without_comparable_server_logprobs_are_counted_and_said(setup, caplog):
    from apr.rl.trainer import Trainer

    config = from_dict(GRPOConfig, {**CONFIG, "kl_beta": 0.0})
    trainer = Trainer(setup[1], config)
    with caplog.at_level(logging.WARNING, logger="apr.rl.trainer"):
        compared = trainer.update(_rows([[-1.0] * 4, [-2.0] * 4]), 0)
    assert compared["logprob_gap_unchecked_rows"] == 0 and compared["logprob_gap"] > 0
    assert not caplog.records
    # One row without server log-probs, one with a token too few: counted, not compared.
    with caplog.at_level(logging.WARNING, logger="apr.rl.trainer"):
        partly = trainer.update(_rows([[-1.0] * 4, [], [-1.0] * 3]), 1)
    assert partly["logprob_gap_unchecked_rows"] == 2 and isinstance(partly["logprob_gap"], float)
    assert "not compared on 2 of 3 rows" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="apr.rl.trainer"):
        none = trainer.update(_rows([[], []]), 2)
    assert none["logprob_gap"] is None and none["logprob_gap_unchecked_rows"] == 2
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "step 2" in caplog.text and "not compared on 2 of 2 rows" in caplog.text
