"""Threads: parent segments and children in decoding order, prompts that chain through joins."""

from __future__ import annotations

import pytest

from apr.countdown.search import PROMPT_EVENTS
from apr.countdown.threads import (
    CHILD,
    PARENT,
    Thread,
    apr_threads,
    final_text,
    sos_threads,
)
from apr.countdown.trace import (
    SPAWN_END,
    SUB_CALL_BUDGET,
    TOKEN_BUDGET,
    Budget,
    State,
    parse,
    render,
    render_line,
)


def expected_roles(trace):
    """(role, spawn, index) in decoding order: segment 0, its children, segment 1, ..."""
    out = []
    for k, spawn in enumerate(trace.spawns):
        out.append((PARENT, k, 0))
        out += [(CHILD, k, i) for i in range(len(spawn.children))]
    out.append((PARENT, len(trace.spawns), 0))
    return out


def check_apr_threads(trace, budget=None):
    threads = apr_threads(trace, budget)
    prefix = str(budget) if budget is not None else ""
    assert [(t.role, t.spawn, t.index) for t in threads] == expected_roles(trace)
    parents = [t for t in threads if t.role == PARENT]
    children = [t for t in threads if t.role == CHILD]
    assert len(parents) == len(trace.spawns) + 1
    assert len(children) == trace.children

    # the first segment's prompt is the problem: Move(root) and the root's State
    assert parents[0].prompt == prefix + render(trace.context[:PROMPT_EVENTS])
    for k, spawn in enumerate(trace.spawns):
        segment, following = parents[k], parents[k + 1]
        block = render(spawn.block)
        assert segment.text.endswith(block)
        assert segment.text.endswith(SPAWN_END + "\n")
        written = segment.text[: len(segment.text) - len(block)]
        assert following.prompt == segment.prompt + written + render(spawn.join)
    last = parents[-1]
    assert last.prompt + last.text == final_text(threads) == prefix + render(trace.context)
    assert not any("<Calling Sub Searches>" in t.prompt for t in threads)

    by_spawn = {}
    for t in children:
        by_spawn.setdefault(t.spawn, []).append(t)
    for k, spawn in enumerate(trace.spawns):
        for i, (t, child) in enumerate(zip(by_spawn[k], spawn.children, strict=True)):
            assert t.index == i
            assert t.prompt == render(child.events[:2])
            assert t.prompt + t.text == render(child.events)

    for t in threads:
        assert t.prompt.endswith("\n")
        assert t.text == "" or t.text.endswith("\n")
        assert t.to_json() == {"role": t.role, "prompt": t.prompt, "text": t.text,
                               "spawn": t.spawn, "index": t.index}
        assert Thread.from_json(t.to_json()) == t
    return threads


@pytest.mark.slow
def test_apr_threads(apr_corpus):
    spawned = 0
    for item in apr_corpus:
        check_apr_threads(item.trace)
        spawned += bool(item.trace.spawns)
    assert spawned > 500


@pytest.mark.slow
def test_the_budget_prefix_opens_parent_prompts_only(apr_corpus):
    for item in apr_corpus[:600]:
        budget = Budget(SUB_CALL_BUDGET, item.trace.children)
        threads = check_apr_threads(item.trace, budget)
        for t in threads:
            assert (t.prompt.startswith(str(budget))) == (t.role == PARENT)
            assert SUB_CALL_BUDGET not in t.text
            assert t.prompt.count(SUB_CALL_BUDGET) == (t.role == PARENT)
            parsed = parse(t.prompt + t.text)
            assert parsed.failure is None
            assert parsed.budget == (budget if t.role == PARENT else None)


def test_segment_text_is_parent_writing_only(apr_corpus):
    for item in apr_corpus[:600]:
        for t in apr_threads(item.trace):
            if t.role == PARENT:
                assert "<Sub Searches>" not in t.text  # a join block is never written by the model
                assert t.text.count("<Calling Sub Searches>") <= 1


@pytest.mark.slow
def test_sos_threads(sos_corpus):
    for item in sos_corpus[:600]:
        trace, p = item.trace, item.problem
        (thread,) = sos_threads(trace)
        assert thread.role == PARENT and thread.spawn == 0 and thread.index == 0
        assert thread.prompt == render_line(State(p.target, p.nums, ())) + "\n"
        assert thread.prompt + thread.text == render(trace.events)
        budget = Budget(TOKEN_BUDGET, 1024)
        (with_budget,) = sos_threads(trace, budget)
        assert with_budget.prompt == "Token Budget: 1024 " + thread.prompt
        assert with_budget.text == thread.text
