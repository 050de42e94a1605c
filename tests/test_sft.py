"""SFT on CPU with the tiny preset: learning, exact resume, batching, model files, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dataset

from apr import model as model_lib
from apr import tokenizer
from apr.config import ConfigError, from_dict, load
from apr.dataset import DataError
from apr.stages import sft
from apr.stages.sft import SFTConfig
from apr.train.checkpoints import latest_checkpoint
from apr.train.data import (
    Layout,
    Sequences,
    build_sequences,
    collate,
    collate_packed,
    load_sequences,
    plan_batches,
    plan_packed,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("sft") / "data", train=24, val=8, seed=3, chunk=8)


def tiny(**overrides) -> SFTConfig:
    base = {"shape": "tiny", "traces": "sos", "context": 1024, "tokens_per_batch": 2048,
            "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "weight_decay": 0.0,
            "log_every": 1, "eval_every": 1000, "checkpoint_every": 1000, "dtype": "fp32",
            "max_steps": 6, "pad_multiple": 16}
    base.update(overrides)
    return from_dict(SFTConfig, base, "sft")


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


@pytest.mark.slow
def test_loss_falls_when_overfitting_a_few_traces(dataset, tmp_path):
    result = sft.run(tiny(max_steps=25, eval_every=25), dataset, tmp_path / "run", progress=False)
    curve = losses(tmp_path / "run")
    assert result.steps == 25
    assert curve[-1] < 0.6 * curve[0], curve
    assert np.isfinite(result.val_loss)


@pytest.mark.parametrize("packing", [False, True], ids=["buckets", "packed"])
@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(dataset, tmp_path, monkeypatch,
                                                              packing):
    config = tiny(max_steps=6, checkpoint_every=3, packing=packing)
    sft.run(config, dataset, tmp_path / "straight", progress=False)

    original = sft.save_checkpoint

    def save_then_die(directory, model, optimizer, state, keep):
        path = original(directory, model, optimizer, state, keep)
        if state["step"] == 3:
            raise KeyboardInterrupt("killed after the step-3 checkpoint")
        return path

    monkeypatch.setattr(sft, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.run(config, dataset, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(sft, "save_checkpoint", original)
    sft.run(config, dataset, tmp_path / "resumed", resume=True, progress=False)

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = model_lib.load(tmp_path / "straight" / "model").state_dict()
    b = model_lib.load(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_retried_step_on_a_new_machine_resumes_from_the_mirrored_checkpoint(
        dataset, tmp_path, monkeypatch, s3, caplog):
    """A pipeline retry: a new pod, an empty disk, the checkpoints mirrored in the store."""
    from conftest import S3_KEYS

    monkeypatch.setenv("S3_ENDPOINT", s3.url)
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    config = tiny(max_steps=6, checkpoint_every=2)
    sft.run(config, dataset, tmp_path / "straight", progress=False)
    mirror = "s3://apr-models/sft-runs/key-1"

    original = sft.push_mirror

    def push_then_die(uri, checkpoint, logs, slot, staging, settings=None):
        pushed = original(uri, checkpoint, logs, slot, staging, settings)
        if checkpoint.name == "step-0000004":
            raise KeyboardInterrupt("the pod is evicted after the step-4 checkpoint")
        return pushed

    monkeypatch.setattr(sft, "push_mirror", push_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.run(config, dataset, tmp_path / "pod-1", progress=False, mirror=mirror)
    monkeypatch.setattr(sft, "push_mirror", original)
    caplog.set_level("INFO", logger="apr.stages.sft")
    sft.run(config, dataset, tmp_path / "pod-2", resume=True, progress=False, mirror=mirror)

    assert f"checkpoint of step 4 taken from {mirror}" in caplog.text  # pod 2 trained 5 and 6
    assert losses(tmp_path / "pod-2") == losses(tmp_path / "straight")  # steps 1-4 from pod 1
    a = model_lib.load(tmp_path / "straight" / "model").state_dict()
    b = model_lib.load(tmp_path / "pod-2" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_being_written_is_not_taken_for_a_complete_one(tmp_path):
    (tmp_path / "step-0000004.partial").mkdir()
    done = tmp_path / "step-0000002"
    done.mkdir()
    (done / "trainer.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == done


def test_logits_of_a_sequence_do_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    model = model_lib.build("tiny").eval()
    seqs = two_sequences()
    alone, _ = collate(seqs, np.array([0]), 8, 0)
    together, _ = collate(seqs, np.array([0, 1]), 8, 0)
    with torch.no_grad():
        a = model(input_ids=torch.from_numpy(alone)).logits[0, :6]
        b = model(input_ids=torch.from_numpy(together)).logits[0, :6]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def two_sequences() -> Sequences:
    short = np.array([1, 20, 21, 22, 23, 2], dtype=np.int16)
    long = np.arange(1, 41, dtype=np.int16) % 100 + 4
    return Sequences(np.concatenate([short, long]), np.array([0, 6, 46]),
                     np.array([2, 2], dtype=np.int32))


def test_packed_logits_of_a_token_do_not_depend_on_its_row_mates():
    torch.manual_seed(0)
    model = model_lib.build("tiny").eval()
    seqs = two_sequences()
    alone = collate_packed(seqs, np.array([0]), 64, 0)
    shared = collate_packed(seqs, np.array([1, 0]), 64, 0)  # the short one after the long one
    assert shared[0].shape == (1, 64) and shared[0][0, 40:46].tolist() == seqs.sequence(0).tolist()
    with torch.no_grad():
        a, b = (model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos),
                      use_cache=False).logits[0] for ids, _, pos in (alone, shared))
    torch.testing.assert_close(a[:6], b[40:46], rtol=1e-5, atol=1e-5)
    # without the restarted positions the same row would let the short sequence see the long one
    with torch.no_grad():
        leaked = model(input_ids=torch.from_numpy(shared[0])).logits[0]
    assert not torch.allclose(a[:6], leaked[40:46], atol=1e-3)


def test_packed_and_bucketed_batches_give_the_same_loss():
    torch.manual_seed(0)
    model = model_lib.build("tiny").eval()
    seqs = two_sequences()
    both = np.array([0, 1])
    results = []
    for layout in (Layout(4096, 8), Layout(4096, 8, pack_width=64)):
        ids, mask, pos = (None if a is None else torch.from_numpy(a)
                          for a in layout.collate(seqs, both, 0))
        with torch.no_grad():
            results.append((sft.token_loss(model, ids, mask, pos).item(), mask.sum().item()))
    assert results[0][1] == results[1][1] == 4 + 38  # text and EOS targets of both sequences
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)


def test_plan_packed_fills_rows_within_the_budget_and_covers_every_sequence():
    lengths = np.random.default_rng(0).integers(10, 500, size=300)
    batches = plan_packed(lengths, 4096, 1024, seed=1, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(300))
    seqs = Sequences(np.zeros(int(lengths.sum()), dtype=np.int16),
                     np.concatenate([[0], np.cumsum(lengths)]), np.ones(300, dtype=np.int32))
    for b in batches:
        ids, mask, pos = collate_packed(seqs, b, 1024, 0)
        assert ids.shape[0] <= 4 and ids.shape[1] == 1024
    rows = sum(collate_packed(seqs, b, 1024, 0)[0].shape[0] for b in batches)
    assert lengths.sum() / (rows * 1024) > 0.85  # next-fit leaves only row tails empty
    again = plan_packed(lengths, 4096, 1024, seed=1, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))


def test_collate_masks_exactly_the_text_and_eos():
    seqs = Sequences(np.array([1, 10, 11, 12, 13, 2], dtype=np.int16), np.array([0, 6]),
                     np.array([3], dtype=np.int32))  # BOS + 2 prompt tokens, then 2 text + EOS
    ids, mask = collate(seqs, np.array([0]), 8, 0)
    assert ids.tolist() == [[1, 10, 11, 12, 13, 2, 0, 0]]
    # mask[t] = 1 when token t+1 is a target: tokens 3, 4, 5 (12, 13, EOS)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0]]


def test_plan_batches_covers_every_sequence_once_within_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=300)
    batches = plan_batches(lengths, 2048, 64, seed=1, epoch=0)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(300))
    for b in batches:
        width = -(-int(lengths[b].max()) // 64) * 64
        assert width * len(b) <= 2048
    again = plan_batches(lengths, 2048, 64, seed=1, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    other = plan_batches(lengths, 2048, 64, seed=1, epoch=1)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other))
    padded = sum(-(-int(lengths[b].max()) // 64) * 64 * len(b) for b in batches)
    assert lengths.sum() / padded > 0.8  # sorting by length leaves little padding


def test_sequences_drop_and_count_what_does_not_fit(dataset):
    full = load_sequences(dataset, "apr", "train", "all", 4096)
    short = load_sequences(dataset, "apr", "train", "all", 256)
    assert len(short) + short.dropped == len(full) + full.dropped
    assert short.dropped > 0 and short.lengths.max() <= 256
    solved = load_sequences(dataset, "apr", "train", "solved", 4096)
    assert len(solved) < len(full)


def test_sequence_tokens_are_bos_prompt_text_eos():
    tok = tokenizer.build()
    seqs = build_sequences(iter([("Moving to Node #0\n", "No solution found.\n")]), 64)
    ids = seqs.sequence(0).tolist()
    assert ids[0] == tok.token_to_id(tokenizer.BOS) and ids[-1] == tok.token_to_id(tokenizer.EOS)
    assert tok.decode(ids[1:seqs.prompt_lengths[0]]) == "Moving to Node #0\n"
    assert tok.decode(ids[seqs.prompt_lengths[0]:-1]) == "No solution found.\n"


def test_saved_model_round_trips_through_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model_lib.build("tiny", seed=5).eval()
    model_lib.save(model, tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = AutoTokenizer.from_pretrained(tmp_path / "m")("Current State: 24:[1, 2]").input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits)


def test_presets_have_the_documented_sizes():
    sizes = {p: model_lib.parameter_count(model_lib.build(p)) for p in ("tiny", "small")}
    assert sizes["tiny"] < 2_000_000
    assert 24e6 < sizes["small"] < 28e6
    config = model_lib.llama_config("paper")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.intermediate_size, config.max_position_embeddings) == (1024, 18, 16, 2752, 4096)
    assert config.tie_word_embeddings is False


@pytest.mark.parametrize("override, words", [
    (["shape=huge"], ["sft.shape", "huge", "tiny"]),
    (["tokens_per_batch=100", "context=512"], ["sft.tokens_per_batch", "context"]),
    (["traces=both"], ["sft.traces", "apr", "sos"]),
    (["context=8192", "shape=tiny"], ["sft.context", "4096"]),
])
def test_bad_config_fails_before_training_with_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load(SFTConfig, None, "sft", override)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sft.run(tiny(), tmp_path / "nowhere", tmp_path / "run", progress=False)
    empty = tmp_path / "empty"
    tokenizer.save(empty / "tokenizer")
    (empty / "traces" / "sos").mkdir(parents=True)
    with pytest.raises(DataError, match="no sos trace shards"):
        sft.run(tiny(), empty, tmp_path / "run2", progress=False)


def test_a_tokenizer_that_does_not_match_the_data_is_refused(dataset, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    spec = json.loads((copy / "tokenizer" / "tokenizer.json").read_text())
    spec["model"]["vocab"]["Z"], spec["model"]["vocab"]["Y"] = (
        spec["model"]["vocab"]["Y"], spec["model"]["vocab"]["Z"])
    (copy / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="does not match"):
        sft.run(tiny(), copy, tmp_path / "run", progress=False)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from apr.cli import main

    code = main(["sft", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--set", "shape=tiny", "--set", "context=1024", "--set", "tokens_per_batch=4096"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process_with_the_same_global_batch(dataset, tmp_path):
    """Two gloo processes with one micro-batch each take the same steps as one process
    accumulating two micro-batches."""
    common = ["--data", str(dataset), "--no-progress", "--set", "shape=tiny",
              "--set", "traces=sos", "--set", "context=1024", "--set", "tokens_per_batch=4096",
              "--set", "max_steps=3", "--set", "dtype=fp32", "--set", "log_every=1",
              "--set", "pad_multiple=16", "--set", "eval_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "apr.cli", "sft", "--out", str(tmp_path / "one"),
                    *common, "--set", "grad_accum=2"], check=True, env=env, cwd=ROOT,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29517", "-m", "apr.cli", "sft",
                    "--out", str(tmp_path / "two"), *common], check=True, env=env, cwd=ROOT,
                   capture_output=True)
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4)


def test_the_tokenized_cache_is_never_reused_for_other_data(dataset, tmp_path):
    """A run directory's cache once served `--data other` the old data's sequences."""
    from apr.stages.sft import prepare_data

    other = make_dataset(tmp_path / "other", train=6, val=4, seed=11, chunk=6)
    cache = tmp_path / "run" / "data"
    first, _ = prepare_data(tiny(), dataset, cache, main=True)
    second, _ = prepare_data(tiny(), other, cache, main=True)
    fresh, _ = prepare_data(tiny(), other, tmp_path / "fresh-cache", main=True)
    assert len(second) == len(fresh) != len(first)
    assert (second.lengths == fresh.lengths).all()
    again, _ = prepare_data(tiny(), dataset, cache, main=True)  # the first data's cache, reused
    assert (again.lengths == first.lengths).all()
