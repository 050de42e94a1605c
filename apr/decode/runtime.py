"""The APR runtime: decode a parent until it spawns, decode all its children in one engine
call, join their outcomes in place of the spawn block, continue the parent. Also serialized
SoS+ decoding, best-of-N and self-consistency.

The runtime writes prompts and join blocks with `trace.render`, the writer the solver uses,
so on the solver's own text it rebuilds the solver's threads exactly (the oracle tests pin
this). Malformed model output fails that problem with a countable kind and never raises;
an engine failure raises `EngineError` (infrastructure, not the model's fault).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from apr.countdown.search import ROOT_ID
from apr.countdown.threads import APR, CHILD, PARENT, SOS, Thread
from apr.countdown.trace import (
    SPAWN_END,
    SPAWN_START,
    SUB_CALL_BUDGET,
    TOKEN_BUDGET,
    Budget,
    Event,
    Generated,
    Goal,
    JoinEnd,
    JoinGoal,
    JoinNoSolution,
    JoinStart,
    Move,
    SpawnChild,
    SpawnEnd,
    SpawnStart,
    State,
    parse,
    render,
    solution_path,
    verify,
)
from apr.decode.engine import (
    ABORT,
    LENGTH,
    STOP,
    Completion,
    Engine,
    EngineError,
    Sampling,
)
from apr.tokenizer import count_tokens

# The role of the thread an engine call decodes (PARENT or CHILD), set by the runtime around
# each call: an engine wrapper that reports per-role figures (the server's metrics) reads it
# here rather than guessing from the call's stop strings.
ROLE: contextvars.ContextVar[str] = contextvars.ContextVar("apr_thread_role", default=PARENT)


async def _generate(engine: Engine, role: str, prompts: list[str], sampling: Sampling
                    ) -> list[Completion]:
    """The engine's completions; a request the engine aborted (SGLang ends the requests in
    flight when it pauses) is the engine's failure, never a wrong answer of the model's."""
    token = ROLE.set(role)
    try:
        completions = await engine.generate(prompts, sampling)
    finally:
        ROLE.reset(token)
    for c in completions:
        if c.finish_reason == ABORT:
            raise EngineError(f"the engine aborted the request: {c.meta.get('message')}")
    return completions


@dataclass(frozen=True)
class Budgets:
    """Limits on one solve. 0 means no limit."""

    context: int = 4096  # tokens any one thread may hold (prompt + generated)
    children_per_spawn: int = 0  # children beyond this are not run and join as "No Solution"
    # Every token in any context (Solve.tokens_total); a child may write at most what is
    # left, and once it is spent no more spawns are run and the parent is cut.
    total_tokens: int = 0
    sub_call_budget: int = 0  # APR: condition the parent on `Sub Call Budget: N `
    token_budget: int = 0  # SoS+: condition on `Token Budget: N `


@dataclass(frozen=True, slots=True)
class ThreadRun(Thread):
    """A decoded thread: the `Thread` (role, prompt, text, spawn, index) and what decoding it
    gave, including what RL training needs when the solve asks for log-probs."""

    finish_reason: str = STOP
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    weight_version: str | None = None

    @classmethod
    def of(cls, role: str, prompt: str, out: Completion, spawn: int = 0, index: int = 0
           ) -> ThreadRun:
        return cls(role, prompt, out.text, spawn, index, finish_reason=out.finish_reason,
                   prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                   token_ids=out.token_ids, logprobs=out.logprobs,
                   weight_version=out.weight_version)


@dataclass
class Solve:
    """One decoded problem: its verified outcome, its threads and what it cost."""

    mode: str
    nums: tuple[int, ...]
    target: int
    correct: bool = False
    solution: list[str] | None = None  # the operations the model claims reach the target
    failure: str | None = None  # why it is not correct (a countable kind), None when correct
    threads: list[ThreadRun] = field(default_factory=list)
    children: int = 0
    engine_calls: int = 0
    tokens_total: int = 0  # every token in any context, each counted once
    tokens_generated: int = 0
    tokens_sequential: int = 0  # the critical path: parent plus the longest child of each spawn
    longest_context: int = 0
    wall_s: float = 0.0

    @property
    def final_text(self) -> str:
        parents = [t for t in self.threads if t.role == PARENT]
        return parents[-1].prompt + parents[-1].text if parents else ""

    def summary(self) -> dict:
        return {"mode": self.mode, "nums": list(self.nums), "target": self.target,
                "correct": self.correct, "solution": self.solution, "failure": self.failure,
                "children": self.children, "engine_calls": self.engine_calls,
                "tokens": {"total": self.tokens_total, "generated": self.tokens_generated,
                           "sequential": self.tokens_sequential,
                           "longest_context": self.longest_context},
                "wall_s": round(self.wall_s, 4)}


class Malformed(Exception):
    """The model's output is not a usable trace; `kind` is what gets counted."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


def prompt_length(prompt: str) -> int:
    return count_tokens(prompt) + 1  # BOS


def _finish(solve: Solve, text: str, finish_reason: str = STOP,
            cut: str = "context_exhausted") -> Solve:
    """Verify the final parent text: the solution path must replay over the problem's numbers.
    `cut`: which limit ended the parent's last call if it ran out of tokens (see `_room`).
    A parent cut while writing out its path has claimed nothing: it fails with `cut` too."""
    parsed = parse(text)
    path = solution_path(parsed.events)
    if path is None:
        if finish_reason == LENGTH:
            solve.failure = cut
        else:
            solve.failure = "malformed_output" if parsed.failure else "no_solution"
        return solve
    verdict = verify(solve.nums, solve.target, path)
    if finish_reason == LENGTH and not verdict.ok:
        solve.failure = cut
        return solve
    solve.solution = [op.text for op in path]
    solve.correct = verdict.ok
    solve.failure = None if verdict.ok else "wrong_solution:" + verdict.reason.split(":")[0]
    return solve


# --- APR ---------------------------------------------------------------------------------
def root_prompt(nums: Sequence[int], target: int, budgets: Budgets = Budgets()) -> str:
    budget = Budget(SUB_CALL_BUDGET, budgets.sub_call_budget) if budgets.sub_call_budget else None
    return render([Move(ROOT_ID), State(target, tuple(nums), ())], budget)


def generated_nodes(events: Sequence[Event]) -> dict[str, tuple[State, State]]:
    """Every node the parent generated: (the state it was expanded from, its own state).

    A Generated line belongs to the expansion of the last State written before it.
    """
    nodes: dict[str, tuple[State, State]] = {}
    current: State | None = None
    for e in events:
        if type(e) is State:
            current = e
        elif type(e) is Generated and current is not None:
            nodes[e.node] = (current, State(e.target, e.nums, current.operations + (e.operation,)))
    return nodes


def spawned_children(parent_text: str) -> list[tuple[int, str, State | None]]:
    """The children the parent's last spawn block asks for: (index, node id, start state).

    The start state is the node as the parent wrote it, even when its numbers do not follow
    from its operation: the child runs from it and the verifier judges the final path (as
    in the paper's runtime, where a child is given what its parent wrote). A node the parent
    never generated has no state to start from (None): it joins as "No Solution".
    """
    parsed = parse(parent_text)
    if parsed.failure is not None:
        raise Malformed("malformed_output")
    events = parsed.events
    starts = [i for i, e in enumerate(events) if type(e) is SpawnStart]
    if not starts or type(events[-1]) is not SpawnEnd:
        raise Malformed("malformed_spawn")
    block = events[starts[-1] + 1:-1]
    if not block:
        raise Malformed("empty_spawn")
    if any(type(e) is not SpawnChild for e in block):
        raise Malformed("malformed_spawn")
    nodes = generated_nodes(events[:starts[-1]])
    return [(e.index, e.node, nodes[e.node][1] if e.node in nodes else None) for e in block]


def child_outcome(prompt: str, text: str) -> list[Event] | None:
    """A child's solution path (from its start node to its Goal line), or None.

    A child whose output is malformed after a complete path still counts its path; one
    without a complete path joins as "No Solution", as in the paper's runtime.
    """
    events = parse(prompt + text).events
    goals = [i for i, e in enumerate(events) if type(e) is Goal]
    if len(goals) < 2:
        return None
    return events[goals[-2] + 1:goals[-1] + 1]


async def solve_apr(engine: Engine, nums: Sequence[int], target: int,
                    budgets: Budgets = Budgets(), temperature: float = 0.0,
                    logprobs: bool = False) -> Solve:
    """Decode one problem with spawn/join (`logprobs`: keep each thread's sampled tokens and
    their log-probs, for RL)."""
    started = time.perf_counter()
    solve = Solve(APR, tuple(nums), target)
    context = root_prompt(nums, target, budgets)
    solve.tokens_total = prompt_length(context)
    spawn = 0
    while True:
        room, limit = _room(budgets, prompt_length(context), solve.tokens_total)
        if room <= 0:  # the parent cannot write another token: no answer to verify
            solve.failure = limit
            return _timed(solve, started)
        (out,) = await _generate(engine, PARENT, [context],
                                 Sampling(room, temperature, stop=(SPAWN_END,), logprobs=logprobs))
        solve.engine_calls += 1
        _account(solve, out.prompt_tokens, out.completion_tokens, sequential=True)
        solve.threads.append(ThreadRun.of(PARENT, context, out, spawn))
        if out.matched != SPAWN_END:
            return _timed(_finish(solve, context + out.text, out.finish_reason, limit), started)
        text = out.text if out.text.endswith("\n") else out.text + "\n"
        try:
            children = spawned_children(context + text)
        except Malformed as e:
            solve.failure = e.kind
            return _timed(solve, started)
        allowed = children[:budgets.children_per_spawn or None]  # the rest join unrun
        runnable = [k for k, (_, _, state) in enumerate(allowed) if state is not None]
        prompts = [render([Move(children[k][1]), children[k][2]]) for k in runnable]
        paths: dict[int, list[Event] | None] = {}
        if prompts:
            # The children decode in one call with one limit: the smallest room any of them
            # has, capped by what the total budget leaves once their prompts are written.
            # Together they may overrun it; the parent is then cut when it resumes. So a run
            # under budget T follows the unlimited run until that passes T (the evaluation's
            # accuracy_at_total_tokens curve counts on this).
            room = max(1, min(budgets.context - prompt_length(p) for p in prompts))
            if budgets.total_tokens:
                left = (budgets.total_tokens - solve.tokens_total
                        - sum(prompt_length(p) - 1 for p in prompts))
                if left <= 0:  # spent: this spawn is not run and the parent is cut
                    solve.failure = "budget_exhausted"
                    return _timed(solve, started)
                room = min(room, left)
            outs = await _generate(engine, CHILD, prompts,
                                   Sampling(room, temperature, logprobs=logprobs))
            solve.engine_calls += 1
            solve.tokens_sequential += max(o.completion_tokens for o in outs)
            for k, prompt, out_k in zip(runnable, prompts, outs):
                solve.threads.append(ThreadRun.of(CHILD, prompt, out_k, spawn, children[k][0]))
                _account(solve, out_k.prompt_tokens, out_k.completion_tokens, sequential=False)
                solve.tokens_total += out_k.prompt_tokens - 1  # the runtime wrote the prompt
                paths[k] = child_outcome(prompt, out_k.text)
        solve.children += len(runnable)
        join: list[Event] = [JoinStart()]
        for k, (index, node, _) in enumerate(children):
            path = paths.get(k)
            if path is not None:
                join.append(JoinGoal(index, 1, node))
                join.extend(path)
            else:
                join.append(JoinNoSolution(index, 1, node))
        join.append(JoinEnd())
        full = context + text
        joined = render(join)
        solve.tokens_total += count_tokens(joined)
        context = full[:full.rindex(SPAWN_START)] + joined
        spawn += 1
    return _timed(_finish(solve, context), started)


def _room(budgets: Budgets, prompt_tokens: int, spent: int) -> tuple[int, str]:
    """New tokens the parent's next call may write, and the limit that sets it, which is the
    failure when the parent runs out: the thread's context window ("context_exhausted") or
    the solve's total-token budget ("budget_exhausted")."""
    room = budgets.context - prompt_tokens
    if budgets.total_tokens and budgets.total_tokens - spent < room:
        return budgets.total_tokens - spent, "budget_exhausted"
    return room, "context_exhausted"


def _account(solve: Solve, prompt_tokens: int, completion_tokens: int, sequential: bool) -> None:
    solve.tokens_generated += completion_tokens
    solve.tokens_total += completion_tokens
    solve.longest_context = max(solve.longest_context, prompt_tokens + completion_tokens)
    if sequential:
        solve.tokens_sequential += completion_tokens


def _timed(solve: Solve, started: float) -> Solve:
    solve.wall_s = time.perf_counter() - started
    return solve


# --- SoS+ --------------------------------------------------------------------------------
def sos_prompt(nums: Sequence[int], target: int, budgets: Budgets = Budgets()) -> str:
    budget = Budget(TOKEN_BUDGET, budgets.token_budget) if budgets.token_budget else None
    return render([State(target, tuple(nums), ())], budget)


async def solve_sos(engine: Engine, nums: Sequence[int], target: int,
                    budgets: Budgets = Budgets(), temperature: float = 0.0,
                    logprobs: bool = False) -> Solve:
    """Decode one problem as one serialized search."""
    started = time.perf_counter()
    solve = Solve(SOS, tuple(nums), target)
    prompt = sos_prompt(nums, target, budgets)
    room, limit = _room(budgets, prompt_length(prompt), prompt_length(prompt))
    if room <= 0:
        solve.failure = limit
        return _timed(solve, started)
    (out,) = await _generate(engine, PARENT, [prompt],
                             Sampling(room, temperature, logprobs=logprobs))
    solve.engine_calls = 1
    solve.tokens_total = out.prompt_tokens
    _account(solve, out.prompt_tokens, out.completion_tokens, sequential=True)
    solve.threads.append(ThreadRun.of(PARENT, prompt, out))
    return _timed(_finish(solve, prompt + out.text, out.finish_reason, limit), started)


# --- several samples of one problem -----------------------------------------------------
@dataclass
class Vote:
    """N samples of one problem: best-of-N (any sample verifies) and self-consistency (the
    most frequent claimed solution, ties broken by first appearance, must verify)."""

    samples: list[Solve]

    @property
    def best_of_n(self) -> bool:
        return any(s.correct for s in self.samples)

    @property
    def majority(self) -> bool:
        claims = Counter(tuple(s.solution) for s in self.samples if s.solution)
        if not claims:
            return False
        top = claims.most_common(1)[0][0]
        return next(s.correct for s in self.samples if s.solution and tuple(s.solution) == top)


async def sample(engine: Engine, mode: str, nums: Sequence[int], target: int, n: int,
                 budgets: Budgets = Budgets(), temperature: float = 1.0) -> Vote:
    solver = solve_apr if mode == APR else solve_sos
    samples = await asyncio.gather(*(solver(engine, nums, target, budgets, temperature)
                                     for _ in range(n)))
    return Vote(list(samples))
