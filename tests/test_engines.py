"""Engines: the local transformers engine, the SGLang wire format, `apr engine serve` and
the `sglang` client end to end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from apr import model as model_lib
from apr.decode.engine import (
    LENGTH,
    STOP,
    Completion,
    EngineError,
    Sampling,
    cut_at_stop,
)
from apr.decode.local import LocalEngine
from apr.decode.sglang import (
    GENERATE,
    SAMPLING_KEYS,
    SGLangEngine,
    completion_json,
    generate_payload,
    parse_completion,
)
from apr.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Moving to Node #0\nCurrent State: 24:[1, 2, 3, 4], Operations: []\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "model"
    model_lib.save(model_lib.build("tiny", seed=1), path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir) -> LocalEngine:
    return LocalEngine(model_dir)


def test_cut_at_stop_keeps_the_earliest_stop_string():
    assert cut_at_stop("ab<X>cd<Y>", ["<Y>", "<X>"]) == ("ab<X>", "<X>")
    assert cut_at_stop("abc", ["<X>"]) == ("abc", None)


@pytest.mark.slow
def test_greedy_batch_equals_one_by_one(engine):
    prompts = [PROMPT, "Current State: 50:[5, 10], Operations: []\n", "Moving to Node #0,1\n"]
    sampling = Sampling(12, 0.0)
    together = asyncio.run(engine.generate(prompts, sampling))
    alone = [asyncio.run(engine.generate([p], sampling))[0] for p in prompts]
    assert [c.text for c in together] == [c.text for c in alone]
    for c, p in zip(together, prompts):
        assert c.prompt_tokens == len(engine.tokenizer(p).input_ids)
        assert c.finish_reason in (STOP, LENGTH) and c.completion_tokens <= 12


@pytest.mark.slow
def test_the_shrinking_loop_decodes_what_generate_decodes(engine, model_dir):
    """Rows leaving the batch early change nothing in what the others decode: greedy rows with
    their own limits and a stop string that some of them write match transformers' generate."""
    reference = LocalEngine(model_dir, batching="generate")
    assert (engine.batching, reference.batching) == ("shrink", "generate")
    prompts = [PROMPT, "Current State: 50:[5, 10], Operations: []\n", "Moving to Node #0,1\n"]
    [free] = asyncio.run(engine.generate([PROMPT], Sampling(30, 0.0)))
    stop = free.text[5:7]
    for limits in ((30, 30, 30), (3, 30, 12)):
        rows = [(p, Sampling(n, 0.0, stop=(stop,))) for p, n in zip(prompts, limits)]
        ours, theirs = engine.decode(rows), reference.decode(rows)
        assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
        assert [(c.text, c.finish_reason, c.matched) for c in ours] == \
            [(c.text, c.finish_reason, c.matched) for c in theirs]
    assert any(c.matched == stop for c in ours)


@pytest.mark.slow
def test_a_row_that_ends_leaves_the_batch(model_dir):
    rows = [(PROMPT, Sampling(n, 0.0)) for n in (2, 16, 16)]
    for batching in ("shrink", "generate"):
        e = LocalEngine(model_dir, batching=batching)
        out = e.decode(rows)
        decoded = sum(c.completion_tokens for c in out)
        if batching == "shrink":
            assert e.stats.row_steps == decoded  # no step is spent on a row that has ended
        else:
            assert e.stats.row_steps == 3 * e.stats.steps > decoded


@pytest.mark.slow
def test_an_unknown_batching_names_the_choices(model_dir):
    with pytest.raises(ValueError, match="shrink, generate"):
        LocalEngine(model_dir, batching="continuous")


def test_token_limit_gives_length_and_counts_tokens(engine):
    [c] = asyncio.run(engine.generate([PROMPT], Sampling(5, 0.0)))
    written = len(engine.tokenizer(c.text, add_special_tokens=False).input_ids)
    assert c.completion_tokens <= 5 and written <= 5
    if c.finish_reason == LENGTH:  # the random model may also end with EOS first
        assert c.completion_tokens == written == 5
    else:
        assert c.completion_tokens == written + 1  # EOS counts as generated


@pytest.mark.slow
def test_stop_strings_end_generation_and_stay_in_the_text(engine):
    """Whatever the random model writes, a stop string that occurs ends the text, once."""
    [free] = asyncio.run(engine.generate([PROMPT], Sampling(40, 0.0)))
    assert len(free.text) > 4
    stop = free.text[2:4]
    [c] = asyncio.run(engine.generate([PROMPT], Sampling(40, 0.0, stop=(stop,))))
    assert c.finish_reason == STOP and c.matched == stop
    assert c.text.endswith(stop) and c.text.count(stop) == 1
    assert free.text.startswith(c.text)


@pytest.mark.slow
def test_concurrent_requests_share_one_batch(engine, monkeypatch):
    batches = []
    original = engine.decode

    def spy(rows, abandoned=()):
        batches.append(len(rows))
        return original(rows, abandoned)

    monkeypatch.setattr(engine, "decode", spy)

    async def many():
        return await asyncio.gather(*(engine.generate([PROMPT], Sampling(4, 0.0)) for _ in range(6)))

    outs = asyncio.run(many())
    assert len(outs) == 6 and max(batches) > 1 and sum(batches) == 6


def test_wire_format_round_trips():
    c = Completion("abc<End Calling Sub Searches>", STOP, "<End Calling Sub Searches>", 9, 4, "3")
    assert parse_completion(completion_json(c)) == c
    eos = parse_completion({"text": "x", "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                                      "prompt_tokens": 3, "completion_tokens": 2}})
    assert eos.finish_reason == STOP and eos.matched is None
    payload = generate_payload(["a", "b"], Sampling(7, 0.5, 0.9, ("x",)))
    assert payload["text"] == ["a", "b"]
    assert set(payload["sampling_params"]) == set(SAMPLING_KEYS)
    assert payload["sampling_params"]["max_new_tokens"] == 7  # always sent (SGLang defaults to 128)
    assert payload["sampling_params"]["no_stop_trim"] is True
    with pytest.raises(EngineError):
        parse_completion({"text": "x"})


@pytest.fixture(scope="module")
def server(model_dir):
    """`apr engine serve` with the loop the in-process engine (shrink on CPU) does not use, so
    the tests comparing the two cover both loops."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "apr.cli", "engine", "serve", "--model",
                             str(model_dir), "--port", str(port), "--batching", "generate"],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("apr engine serve did not come up: " + proc.stdout.read().decode()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.slow
def test_sglang_client_and_server_agree_with_the_local_engine(server, engine):
    prompts = [PROMPT, "Current State: 50:[5, 10], Operations: []\n"]
    sampling = Sampling(10, 0.0, stop=("]",))
    expected = asyncio.run(engine.generate(prompts, sampling))

    async def over_http():
        client = SGLangEngine(server)
        try:
            return await client.ready(), await client.generate(prompts, sampling), \
                await client.model_info()
        finally:
            await client.close()

    ready, got, info = asyncio.run(over_http())
    assert ready and info["is_generation"]
    assert [(c.text, c.finish_reason, c.matched, c.prompt_tokens, c.completion_tokens)
            for c in got] == [(c.text, c.finish_reason, c.matched, c.prompt_tokens,
                               c.completion_tokens) for c in expected]


@pytest.mark.slow
def test_server_speaks_sglang_shapes_and_rejects_unknown_keys(server):
    one = httpx.post(server + "/generate", json={"text": "Moving to Node #0\n",
                                                 "sampling_params": {"max_new_tokens": 3,
                                                                     "temperature": 0}}).json()
    assert set(one) == {"text", "output_ids", "meta_info"}
    assert len(one["output_ids"]) == one["meta_info"]["completion_tokens"]
    assert {"finish_reason", "prompt_tokens", "completion_tokens", "e2e_latency",
            "weight_version"} <= set(one["meta_info"])
    bad = httpx.post(server + "/generate", json={"text": ["x"], "sampling_params": {"top_k": 3}})
    assert bad.status_code == 400 and "top_k" in bad.text
    scored = httpx.post(server + "/generate", json={
        "text": "Moving to Node #0\n", "return_logprob": True,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0}}).json()
    entries = scored["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in entries] == scored["output_ids"] and all(e[0] <= 0 for e in entries)
    for path in ("/health", "/health_generate", "/ready", "/model_info", "/get_model_info"):
        assert httpx.get(server + path, timeout=30).status_code == 200, path
    assert httpx.post(server + "/flush_cache").status_code == 200


@pytest.mark.slow
def test_weight_update_from_disk_changes_what_the_server_generates(server, model_dir, tmp_path):
    other = tmp_path / "other"
    model_lib.save(model_lib.build("tiny", seed=99), other)

    async def flow():
        client = SGLangEngine(server)
        try:
            before = await client.generate([PROMPT], Sampling(16, 0.0))
            body = await client.update_weights_from_disk(str(other), "7")
            after = await client.generate([PROMPT], Sampling(16, 0.0))
            await client.update_weights_from_disk(str(model_dir), "8")
            with pytest.raises(EngineError, match="rejected"):
                await client.update_weights_from_disk(str(tmp_path / "missing"), "9")
            # a rejected update still continues generation (a paused server would hang here)
            again = await asyncio.wait_for(client.generate([PROMPT], Sampling(16, 0.0)), 60)
            assert again[0].text == before[0].text and again[0].weight_version == "8"
            return before, body, after
        finally:
            await client.close()

    before, body, after = asyncio.run(flow())
    assert body["success"] is True
    assert after[0].weight_version == "7"
    assert after[0].text != before[0].text


def test_unreachable_server_is_an_engine_error():
    async def call():
        client = SGLangEngine(f"http://127.0.0.1:{free_port()}", timeout_s=2)
        try:
            assert not await client.ready()
            await client.generate(["x"], Sampling(1))
        finally:
            await client.close()

    with pytest.raises(EngineError, match="unreachable"):
        asyncio.run(call())


@pytest.mark.parametrize("drops, ok", [(1, True), (2, False)])
def test_a_connection_the_server_closed_is_retried_once(drops, ok):
    calls = []
    item = completion_json(Completion("x", LENGTH, None, 3, 1, "0"))

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= drops:
            raise httpx.ReadError("connection closed by the server", request=request)
        return httpx.Response(200, json=[item])

    async def call():
        client = SGLangEngine("http://sglang.test")
        client._client = httpx.AsyncClient(base_url=client.base_url,
                                           transport=httpx.MockTransport(handler))
        try:
            return await client.generate(["x"], Sampling(1))
        finally:
            await client.close()

    if ok:
        assert [c.text for c in asyncio.run(call())] == ["x"]
    else:
        with pytest.raises(EngineError, match="unreachable"):
            asyncio.run(call())
    assert calls == ["/generate"] * 2


@pytest.mark.parametrize("batching", ["shrink", "generate"])
@pytest.mark.slow
def test_logprobs_of_a_padded_batch_are_each_rows_own(model_dir, batching):
    """Sampled tokens' log-probs (softmax of logits / temperature, as SGLang reports them)
    match a forward pass over each row alone: left padding changes nothing."""
    import torch

    from apr import tokenizer as domain_tokenizer
    from apr.rl.losses import token_logprobs

    engine = LocalEngine(model_dir, batching=batching)
    prompts = [PROMPT, "Current State: 50:[5, 10], Operations: []\n"]
    outs = asyncio.run(engine.generate(prompts, Sampling(12, 0.7, logprobs=True)))
    tok = domain_tokenizer.build()
    for prompt, out in zip(prompts, outs):
        assert len(out.logprobs) == len(out.token_ids) == out.completion_tokens > 0
        prompt_ids = tok.encode(prompt).ids
        ids = torch.tensor([prompt_ids + list(out.token_ids)])
        with torch.no_grad():
            ours = token_logprobs(engine.model, ids, 0.7)[0, len(prompt_ids) - 1:]
        assert torch.allclose(ours, torch.tensor(out.logprobs), atol=1e-4)


@pytest.mark.slow
def test_a_request_nobody_waits_for_leaves_the_batch(model_dir):
    """A timed-out solve once kept its rows decoding to their limit, for nobody, ahead of
    every later request."""
    engine = LocalEngine(model_dir, batching="shrink")
    long = Sampling(max_new_tokens=400, temperature=0.0)
    kept_sampling = Sampling(max_new_tokens=40, temperature=0.0)

    async def scenario():
        given_up = asyncio.create_task(asyncio.wait_for(engine.generate([PROMPT] * 2, long), 0.3))
        kept = asyncio.create_task(engine.generate([PROMPT], kept_sampling))
        with pytest.raises(asyncio.TimeoutError):
            await given_up
        return await kept

    (kept,) = asyncio.run(scenario())
    assert engine.stats.abandoned_rows == 2
    assert engine.stats.row_steps < 2 * 400  # the abandoned rows stopped early
    alone = engine.decode([(PROMPT, kept_sampling)])[0]
    assert kept.token_ids == alone.token_ids


@pytest.mark.slow
def test_a_client_that_leaves_the_engine_server_takes_its_rows_along(model_dir):
    """`apr engine serve` once decoded a /generate to its limit after the client had gone."""
    from conftest import ServedApp

    from apr.decode.engine_server import create_app

    engine = LocalEngine(model_dir, batching="shrink")
    body = {"text": [PROMPT] * 2, "sampling_params": {"max_new_tokens": 400, "temperature": 0}}
    with ServedApp(create_app(engine, str(model_dir))) as served:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{served.url}{GENERATE}", json=body, timeout=0.5)
        deadline = time.monotonic() + 20
        while engine.stats.abandoned_rows < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert engine.stats.abandoned_rows == 2
    assert engine.stats.row_steps < 2 * 400
