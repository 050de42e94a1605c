"""Real SGLang 0.5.23, on the CPU (`make sglang`), against the project.

One behaviour suite runs against SGLang and against `apr engine serve` alike, so the stand-in
cannot drift from what it stands in for. Then SGLang in each of its roles: the rollout server
of a GRPO run (weight sync and log-probs checked), the engine behind the APR server (pauses,
outages, restarts), and the engine of an evaluation (the same answers as the local engine).
Without the SGLang environment these skip, saying how to build it; CI requires them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
from conftest import ServedApp, sglang_python_or_skip
from test_dashboards import SGLANG_METRICS, exported

from apr import model as model_lib
from apr.config import from_dict
from apr.decode.engine import ABORT, LENGTH, STOP, EngineError, Sampling
from apr.decode.local import LocalEngine
from apr.decode.rollout_server import ENGINE_SERVE, RolloutServer
from apr.decode.sglang import SGLangEngine

pytestmark = [pytest.mark.slow, pytest.mark.sglang]

SFT_STEPS = 60
PROMPTS = ["Current State: 24:[3, 8, 2], Operations: []\n",
           "Moving to Node #0\nCurrent State: 17:[9, 4, 1, 5], Operations: []\n"]


def start_server(kind: str, model_dir, log_dir, port: int = 0, extra_args=()) -> RolloutServer:
    python = sglang_python_or_skip() if kind == "sglang" else ""
    return RolloutServer(model_dir, log_dir / f"{kind}.log", kind=kind, device="cpu", port=port,
                         python=python, startup_timeout_s=300, extra_args=extra_args).start()


def run(coroutine):
    return asyncio.run(coroutine)


async def _with_client(url: str, work):
    engine = SGLangEngine(url, timeout_s=120)
    try:
        return await work(engine)
    finally:
        await engine.close()


def generate(url: str, prompts, sampling: Sampling):
    return run(_with_client(url, lambda engine: engine.generate(prompts, sampling)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return model_lib.save(model_lib.build("tiny", seed=3), tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return model_lib.save(model_lib.build("tiny", seed=4), tmp_path_factory.mktemp("m2") / "model")


@pytest.fixture(scope="module")
def local(model_dir):
    """The reference: the project's own engine on the same weights, in process."""
    return LocalEngine(model_dir, device="cpu")


@pytest.fixture(scope="module", params=["sglang", ENGINE_SERVE])
def server(request, model_dir, tmp_path_factory):
    started = start_server(request.param, model_dir, tmp_path_factory.mktemp("logs"))
    yield started
    started.stop()


# --- the behaviour suite: SGLang and `apr engine serve` ----------------------------------
def test_a_batch_comes_back_in_sglang_shapes(server):
    body = {"text": PROMPTS, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}}
    items = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert isinstance(items, list) and len(items) == 2
    for item in items:
        meta = item["meta_info"]
        assert len(item["output_ids"]) == 8
        assert meta["finish_reason"] == {"type": "length", "length": 8}
        assert meta["completion_tokens"] == 8 and meta["prompt_tokens"] > 0
        assert meta["weight_version"] == "0"
        logprobs = meta["output_token_logprobs"]
        assert [entry[1] for entry in logprobs] == item["output_ids"]
        assert all(entry[0] <= 0 and entry[2] is None for entry in logprobs)


def test_greedy_tokens_and_logprobs_are_the_local_engines(server, local):
    sampling = Sampling(max_new_tokens=24, temperature=0.0, logprobs=True)
    served = generate(server.url, PROMPTS, sampling)
    reference = run(local.generate(PROMPTS, sampling))
    for got, want in zip(served, reference):
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason == LENGTH
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) < 1e-3


def test_a_stop_string_ends_the_text_and_stays_in_it(server, local):
    full = run(local.generate(PROMPTS[:1], Sampling(max_new_tokens=24, temperature=0.0)))[0]
    stop = full.text[6:9]  # three characters the model writes, whatever it writes
    got = generate(server.url, PROMPTS[:1], Sampling(max_new_tokens=24, temperature=0.0,
                                                     stop=(stop,)))[0]
    assert got.finish_reason == STOP and got.matched == stop
    assert got.text.endswith(stop) and full.text.startswith(got.text)
    assert got.text.count(stop) == 1


def test_what_the_server_rejects_is_a_clear_client_error(server, tmp_path):
    body = {"text": "x", "sampling_params": {"max_new_tokens": 2, "typical_q": 0.5}}
    assert httpx.post(server.url + "/generate", json=body, timeout=30).status_code == 400
    missing = tmp_path / "no-such-model"

    async def update(engine):
        await engine.update_weights_from_disk(str(missing), "9")

    with pytest.raises(EngineError, match="rejected"):
        run(_with_client(server.url, update))

    # ... and the server goes on serving, on its old weights and version
    assert generate(server.url, PROMPTS[:1], Sampling(max_new_tokens=2))[0].weight_version == "0"
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200


def test_an_almost_zero_temperature_decodes_greedily(server):
    """SGLang reads a temperature below 1e-6 as greedy; dividing logits by it would overflow."""
    greedy = generate(server.url, PROMPTS, Sampling(max_new_tokens=12, temperature=0.0))
    tiny = generate(server.url, PROMPTS, Sampling(max_new_tokens=12, temperature=1e-30))
    assert [c.token_ids for c in tiny] == [c.token_ids for c in greedy]


@pytest.mark.parametrize("kind", ["sglang", ENGINE_SERVE])
def test_a_corrupt_weight_file_is_a_400_from_the_stand_in_and_kills_sglang(kind, model_dir,
                                                                          tmp_path):
    """Where the two differ, on purpose: SGLang's scheduler dies on a weight file it cannot
    parse (0.5.23), the stand-in refuses it. Why the trainer writes its weights to a temporary
    name and renames them: the server never sees a partial file."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (corrupt / name).write_bytes((model_dir / name).read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    server = start_server(kind, model_dir, tmp_path)
    try:
        try:
            answer = httpx.post(server.url + "/update_weights_from_disk",
                                json={"model_path": str(corrupt), "weight_version": "9"},
                                timeout=60)
        except httpx.HTTPError:
            answer = None
        if kind == ENGINE_SERVE:
            assert answer.status_code == 400 and answer.json()["success"] is False
            assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
        else:
            assert answer is None or answer.status_code >= 500
            server.process.wait(30)  # the whole server goes down
    finally:
        server.stop()


def test_health_generates_and_model_info_names_the_model(server, model_dir):
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 200
    info = httpx.get(server.url + "/model_info", timeout=10).json()
    assert info["model_path"] == str(model_dir) and info["weight_version"] == "0"


def test_a_pause_aborts_requests_in_flight_holds_new_ones_and_unreadies(server):
    long = Sampling(max_new_tokens=1500, temperature=0.0)  # still decoding at the pause
    short = Sampling(max_new_tokens=64, temperature=0.0)  # done soon after the continue
    results: dict = {}

    def call(name, sampling=long):
        results[name] = generate(server.url, PROMPTS[:1], sampling)[0]

    in_flight = threading.Thread(target=call, args=("in_flight",))
    in_flight.start()
    time.sleep(1.0)
    assert httpx.post(server.url + "/pause_generation", json={"mode": "abort"},
                      timeout=60).status_code == 200
    in_flight.join(30)
    assert results["in_flight"].finish_reason == ABORT
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 503
    held = threading.Thread(target=call, args=("held", short))
    held.start()
    held.join(2.0)
    assert held.is_alive()  # waits for the server to continue
    assert httpx.post(server.url + "/continue_generation", json={}, timeout=60).status_code == 200
    held.join(120)
    assert results["held"].finish_reason == LENGTH
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200


def test_a_weight_update_changes_answers_version_and_names(server, model_dir, other_model_dir):
    sampling = Sampling(max_new_tokens=16, temperature=0.0)
    before = generate(server.url, PROMPTS, sampling)
    other = run(LocalEngine(other_model_dir, device="cpu").generate(PROMPTS, sampling))

    async def update(path, version):
        return await _with_client(server.url,
                                  lambda e: e.update_weights_from_disk(str(path), version))

    try:
        assert run(update(other_model_dir, "7"))["success"]
        after = generate(server.url, PROMPTS, sampling)
        assert [c.token_ids for c in after] == [c.token_ids for c in other]
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        assert {c.weight_version for c in after} == {"7"}
        info = httpx.get(server.url + "/model_info", timeout=10).json()
        assert info["model_path"] == info["served_model_name"] == str(other_model_dir)
        assert info["weight_version"] == "7"
    finally:
        run(update(model_dir, "0"))  # the module's server, back as it was


# --- SGLang in its roles ------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four 2-number problems: few and short enough for a tiny model to learn in a minute."""
    from apr.stages import datagen

    config = from_dict(datagen.DatagenConfig, {
        "problems": {"n_numbers": 2, "num_max": 20, "target_min": 10, "target_max": 25,
                     "train_size": 4, "val_size": 4, "test_size": 0, "seed": 0},
        "workers": 1, "chunk_size": 4, "shard_size": 8}, "datagen")
    out = tmp_path_factory.mktemp("data") / "data"
    datagen.run(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained_dir(data, tmp_path_factory):
    """A tiny model fitted to the four training problems: greedy, it solves them; sampled,
    it still errs now and then (so GRPO's groups have rewards to compare)."""
    from apr.stages import sft

    config = from_dict(sft.SFTConfig, {
        "shape": "tiny", "traces": "apr", "context": 256, "tokens_per_batch": 1024,
        "lr": 3e-3, "min_lr": 1e-3, "warmup_steps": 5, "max_steps": SFT_STEPS,
        "log_every": 25, "eval_every": 1000, "checkpoint_every": 1000, "dtype": "fp32",
        "pad_multiple": 16}, "sft")
    out = tmp_path_factory.mktemp("sft") / "run"
    return sft.run(config, data, out, progress=False).model_dir


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grpo_rolls_out_on_sglang_and_syncs_its_weights_every_step(data, trained_dir, tmp_path,
                                                                   sglang_python):
    from apr.stages import grpo

    config = from_dict(grpo.GRPOConfig, {
        # every training problem each step, and a small step: groups with a reward to learn
        # from each step (a step where all rollouts score alike trains nothing, checks nothing)
        "group_size": 4, "prompts_per_step": 4, "steps": 2, "lr": 1e-5, "context": 192,
        "tokens_per_batch": 4096, "val_every": 2, "val_problems": 2, "checkpoint_every": 1,
        "sidecar": "sglang", "sidecar_device": "cpu", "sidecar_python": sglang_python,
        "sidecar_startup_s": 300, "engine_timeout_s": 120})
    out = tmp_path / "grpo"
    result = grpo.run(config, trained_dir, data, out, progress=False)
    assert result.steps == 2
    assert "sglang" in (out / "sidecar.log").read_text().lower()  # SGLang served, not a stand-in
    rollouts = read_jsonl(out / "rollouts.jsonl")
    assert [(r["step"], r["weight_version"]) for r in rollouts] == \
        [(0, "0")] * 16 + [(1, "1")] * 16  # each step's rollouts on the weights it was sent
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    assert len(steps) == 2
    for record in steps:
        assert record["rows"] > 0, record
        # SGLang's log-probs of its own samples against the trainer's, same weights and tokens
        assert record["logprob_gap_unchecked_rows"] == 0
        assert isinstance(record["logprob_gap"], float) and record["logprob_gap"] < 1e-3, record


def test_an_evaluation_through_sglang_answers_as_the_local_engine(data, trained_dir, tmp_path,
                                                                  monkeypatch):
    """`server: sglang` (the paper preset's): the evaluation starts SGLang on the model
    itself, decodes through it and stops it."""
    from apr.decode.rollout_server import SGLANG_PYTHON_ENV
    from apr.stages import evaluate

    monkeypatch.setenv(SGLANG_PYTHON_ENV, sglang_python_or_skip())
    base = {"split": "train", "max_problems": 4, "context": 192, "context_limits": [96, 192],
            "total_token_limits": [192, 384], "sos_samples": [1]}
    served = evaluate.run(from_dict(evaluate.EvalConfig, {
        **base, "engine": "sglang", "server": "sglang", "server_startup_s": 300}, "evaluate"),
        trained_dir, data, tmp_path / "sglang", progress=False)
    assert "SFT" in served["model_label"]  # the model it started SGLang on, by its training
    local = evaluate.run(from_dict(evaluate.EvalConfig, {**base, "engine": "local"}, "evaluate"),
                         trained_dir, data, tmp_path / "local", progress=False)

    def answers(out):
        return {(r["id"], r["setting"]): (r["correct"], r["solution"], r["failures"],
                                          r["children"], r["tokens"])
                for r in read_jsonl(out / "results.jsonl")}

    got, want = answers(tmp_path / "sglang"), answers(tmp_path / "local")
    assert len(want) == 8
    differences = {key: (got[key], want[key]) for key in want if got[key] != want[key]}
    assert not differences
    assert served["settings"]["apr"]["accuracy"] == local["settings"]["apr"]["accuracy"] > 0


def test_the_apr_server_in_front_of_sglang(data, trained_dir, tmp_path):
    from apr.decode.runtime import Budgets, solve_apr
    from apr.serve.app import create_app

    first = read_jsonl(next((data / "problems").glob("train*.jsonl")))[0]  # one it learned
    body = {"nums": first["nums"], "target": first["target"], "max_tokens": 192}
    reference = run(solve_apr(LocalEngine(trained_dir, device="cpu"), body["nums"],
                              body["target"], Budgets(context=192)))
    assert reference.correct

    def solve():
        return httpx.post(served.url + "/v1/solve", json=body, timeout=120)

    def ready():
        return httpx.get(served.url + "/readyz", timeout=30).status_code

    sglang = start_server("sglang", trained_dir, tmp_path, extra_args=("--enable-metrics",))
    try:
        with ServedApp(create_app(SGLangEngine(sglang.url, timeout_s=120))) as served:
            answer = solve()
            assert answer.status_code == 200 and ready() == 200
            assert answer.json()["solution"] == reference.solution
            assert answer.json()["correct"] == reference.correct
            assert answer.json()["tokens"]["total"] == reference.tokens_total
            # every SGLang series the chart's dashboard reads, as SGLang exports it
            scraped = httpx.get(served.url + "/engine/metrics", timeout=30)
            series = {line.split("{")[0].split(" ")[0] for line in scraped.text.splitlines()
                      if line and not line.startswith("#")}
            for name, kind in SGLANG_METRICS.items():
                assert exported(kind, name) <= series, name

            httpx.post(sglang.url + "/pause_generation", json={"mode": "abort"}, timeout=60)
            assert ready() == 503
            assert solve().status_code == 503  # now, not after the request timeout
            httpx.post(sglang.url + "/continue_generation", json={}, timeout=60)
            assert ready() == 200 and solve().status_code == 200

            port = sglang.port
            sglang.stop()
            assert ready() == 503
            down = solve()
            assert down.status_code == 503 and down.json()["kind"] == "engine_unavailable"
            sglang = start_server("sglang", trained_dir, tmp_path, port=port,
                                  extra_args=("--enable-metrics",))
            assert ready() == 200
            again = solve()
            assert again.status_code == 200 and again.json()["solution"] == reference.solution
    finally:
        sglang.stop()
