"""Rollouts become training rows: every sampled token of every thread, never a prompt or a
join block; stale weights are caught."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from conftest import make_dataset

from apr import tokenizer as domain_tokenizer
from apr.countdown.threads import APR
from apr.countdown.trace import JOIN_START
from apr.dataset import read_records
from apr.decode.oracle import OracleEngine
from apr.decode.runtime import Budgets
from apr.rl.rollouts import Rollout, StalePolicy, check_version, collect, training_rows


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("rollouts") / "data", train=20, val=2, seed=4)
    solved = [r for r in read_records(data, APR, "train") if r["solved"] and r["threads"][1:]]
    engine = OracleEngine(solved[:3])
    return asyncio.run(collect(engine, solved[:3], 2, APR, Budgets(context=100_000), 1.0))


def test_collect_runs_group_size_solves_of_each_problem(rollouts):
    assert [r.group for r in rollouts] == [0, 0, 1, 1, 2, 2]
    assert all(r.reward == 1.0 and r.solve.children > 0 for r in rollouts)


def test_rows_hold_exactly_the_sampled_tokens_of_every_thread(rollouts):
    tok = domain_tokenizer.build()
    rows = training_rows(rollouts, [0.5, -0.5, 1.0, 0.0, 0.0, -1.0])
    kept = [rollouts[i] for i in (0, 1, 2, 5)]  # zero-advantage rollouts carry no gradient
    threads = [t for r in kept for t in r.solve.threads]
    assert len(rows) == len(threads)
    assert rows.advantages.tolist() == [a for r, a in zip(kept, [0.5, -0.5, 1.0, -1.0])
                                        for _ in r.solve.threads]
    seqs = rows.sequences
    for i, thread in enumerate(threads):
        seq = seqs.sequence(i).tolist()
        prompt, trained = seq[:seqs.prompt_lengths[i]], seq[seqs.prompt_lengths[i]:]
        assert prompt == tok.encode(thread.prompt).ids  # BOS + prompt, as the engine saw it
        assert trained == list(thread.token_ids)
        assert tok.decode(trained, skip_special_tokens=True) == thread.text
    trained_text = "".join(tok.decode(seqs.sequence(i)[seqs.prompt_lengths[i]:].tolist())
                           for i in range(len(seqs)))
    assert JOIN_START not in trained_text  # the runtime's join text is prompt, never trained
    assert any(JOIN_START in t.prompt for t in threads)
    assert seqs.target_tokens == sum(t.completion_tokens for t in threads)


def test_token_weights_sum_to_one_and_rollout_averaging_weighs_each_rollout_equally(rollouts):
    import numpy as np

    rows = training_rows(rollouts, [0.5, -0.5, 1.0, 0.0, 0.0, -1.0])
    targets = rows.sequences.target_lengths
    flat = rows.token_weights("token")
    assert np.allclose(flat, 1.0 / targets.sum())
    equal = rows.token_weights("rollout")
    assert (equal * targets).sum() == pytest.approx(1.0)
    shares = np.bincount(rows.rollouts, weights=equal * targets)
    assert shares[[0, 1, 2, 5]] == pytest.approx([0.25] * 4)  # 4 rollouts carry advantages
    assert shares[[3, 4]].tolist() == [0.0, 0.0]
    assert len(set(targets[rows.rollouts == 0]).union(targets[rows.rollouts == 5])) > 1


def test_a_thread_from_other_weights_is_a_stale_policy(rollouts):
    versioned = []
    for r in rollouts:
        threads = [replace(t, weight_version="3") for t in r.solve.threads]
        versioned.append(Rollout(r.group, replace(r.solve, threads=threads)))
    check_version((r.solve for r in versioned), "3")
    stale = versioned[-1].solve.threads[-1]
    versioned[-1].solve.threads[-1] = replace(stale, weight_version="2")
    with pytest.raises(StalePolicy, match="'2', expected '3'"):
        check_version((r.solve for r in versioned), "3")
