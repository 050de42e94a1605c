"""The solvers: solved traces verify, trace structure (spawns, joins, dives, child prompts),
determinism, the shared `successors`, heuristics, and solve rates near the reference's."""

from __future__ import annotations

import random
import statistics

import pytest
from conftest import corpus, problems
from hypothesis import given
from hypothesis import strategies as st

from apr.countdown.problems import ProblemSpace, candidates
from apr.countdown.search import (
    ROOT_ID,
    Heuristic,
    SearchParams,
    apr_search,
    combinations,
    heuristic,
    sos_search,
    successors,
)
from apr.countdown.trace import (
    DeadEnd,
    DiveEnd,
    DiveFailed,
    DiveStart,
    Exhausted,
    Explore,
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
from apr.stages.datagen import AprSolverConfig, SosSolverConfig

SPAWN_OR_JOIN = (SpawnStart, SpawnChild, SpawnEnd, JoinStart, JoinGoal, JoinNoSolution, JoinEnd)
DIVES = (DiveStart, DiveEnd, DiveFailed)


def typed(events):
    return [(type(e).__name__, e) for e in events]


def goal_indices(events):
    return [i for i, e in enumerate(events) if type(e) is Goal]


# --- solved traces verify; unsolved ones end exhausted -------------------------------------
@pytest.mark.slow
def test_apr_solved_traces_verify_and_unsolved_end_exhausted(apr_corpus):
    solved = 0
    for item in apr_corpus:
        p, t = item.problem, item.trace
        parsed = parse(render(t.context))
        assert parsed.failure is None
        if t.solved:
            solved += 1
            path = solution_path(parsed.events)
            assert path is not None
            assert verify(p.nums, p.target, path).ok, (p, path)
            assert path == list(t.goal.operations)
            assert type(t.context[-1]) is Goal
            assert not any(type(e) is Exhausted for e in t.context)
        else:
            assert type(t.context[-1]) is Exhausted
            assert render(t.context).endswith("No solution found.\n")
            assert solution_path(parsed.events) is None
    assert 0.3 * len(apr_corpus) < solved < len(apr_corpus)


@pytest.mark.slow
def test_sos_solved_traces_verify_and_unsolved_end_exhausted(sos_corpus):
    solved = 0
    for item in sos_corpus:
        p, t = item.problem, item.trace
        parsed = parse(render(t.events))
        assert parsed.failure is None
        if t.solved:
            solved += 1
            path = solution_path(parsed.events)
            assert verify(p.nums, p.target, path).ok, (p, path)
            assert path == list(t.goal.operations)
        else:
            assert type(t.events[-1]) is Exhausted
            assert render(t.events).endswith("No solution found.\n")
    assert 0.3 * len(sos_corpus) < solved < len(sos_corpus)


@pytest.mark.slow
def test_sos_trace_starts_at_the_root_state(sos_corpus):
    for item in sos_corpus[:500]:
        p, first = item.problem, item.trace.events[0]
        assert type(first) is State and first == State(p.target, p.nums, ())


# --- APR structure --------------------------------------------------------------------------
@pytest.mark.slow
def test_apr_parent_starts_at_the_root(apr_corpus):
    for item in apr_corpus:
        p, c = item.problem, item.trace.context
        assert typed(c[:2]) == typed([Move(ROOT_ID), State(p.target, p.nums, ())])


@pytest.mark.slow
def test_child_prompts_name_a_node_the_parent_generated(apr_corpus):
    children = 0
    for item in apr_corpus:
        t, target = item.trace, item.problem.target
        joins = set()
        for spawn in t.spawns:
            joins |= set(range(spawn.at, spawn.at + len(spawn.join)))
        for spawn in t.spawns:
            # the parent's own lines before the spawn point (join blocks left out)
            before = [e for i, e in enumerate(t.context[:spawn.at]) if i not in joins]
            generated = {e.node: (i, e) for i, e in enumerate(before) if type(e) is Generated}
            for child in spawn.children:
                children += 1
                move, state = child.events[:2]
                assert type(move) is Move and type(state) is State
                assert move.node == child.start.id
                assert move.node in generated, (move, spawn)
                at, gen = generated[move.node]
                assert gen.nums == state.nums and gen.target == state.target == target
                # the State's operations are the expanded node's plus the generating operation
                expanded = next(e for e in reversed(before[:at]) if type(e) is State)
                assert state.operations == expanded.operations + (gen.operation,)
                assert move.node.startswith(next(
                    e.node for e in reversed(before[:at]) if type(e) is Move) + ",")
    assert children > 1000


def test_spawn_blocks_list_exactly_the_children(apr_corpus):
    for item in apr_corpus:
        score = heuristic(item.params.heuristic, item.problem.target)
        for spawn in item.trace.spawns:
            k = len(spawn.children)
            assert k >= 2
            # children are spawned best-scored first
            scores = [score(c.start.nums) for c in spawn.children]
            assert all(a <= b + 1e-9 for a, b in zip(scores, scores[1:])), scores
            assert typed(spawn.block) == typed(
                [SpawnStart()]
                + [SpawnChild(i, 1, c.start.id) for i, c in enumerate(spawn.children)]
                + [SpawnEnd()])


@pytest.mark.slow
def test_join_blocks_agree_with_their_children(apr_corpus):
    for item in apr_corpus:
        t, target = item.trace, item.problem.target
        for spawn in t.spawns:
            join = spawn.join
            assert type(join[0]) is JoinStart and type(join[-1]) is JoinEnd
            # the join block sits in the parent context where the spawn block was
            assert typed(t.context[spawn.at:spawn.at + len(join)]) == typed(join)
            pos = 1
            for i, child in enumerate(spawn.children):
                head = join[pos]
                if child.goal is not None:
                    assert type(head) is JoinGoal and head == JoinGoal(i, 1, child.start.id)
                    # the child's solution path follows, as the child itself wrote it
                    g = goal_indices(child.events)
                    written = child.events[g[-2] + 1:]
                    assert typed(join[pos + 1:pos + 1 + len(written)]) == typed(written)
                    assert typed(written) == typed(child.path(target))
                    pos += 1 + len(written)
                else:
                    assert type(head) is JoinNoSolution
                    assert head == JoinNoSolution(i, 1, child.start.id)
                    pos += 1
            assert pos == len(join) - 1


@pytest.mark.slow
def test_apr_stops_at_the_first_successful_child_and_children_do_not_spawn(apr_corpus):
    for item in apr_corpus:
        t = item.trace
        assert t.children == sum(len(s.children) for s in t.spawns)
        for s_index, spawn in enumerate(t.spawns):
            solved = [c for c in spawn.children if c.goal is not None]
            if solved:
                # only the last spawn can succeed: the parent returns the first child's goal
                assert s_index == len(t.spawns) - 1
                assert t.goal is solved[0].goal
            for child in spawn.children:
                assert not any(isinstance(e, SPAWN_OR_JOIN + DIVES) for e in child.events)
                last = child.events[-1]
                assert type(last) is (Goal if child.goal is not None else Exhausted)
        if t.solved and not any(c.goal for s in t.spawns for c in s.children):
            assert t.goal is not None  # solved by the parent's own search


def test_threshold_zero_never_spawns_or_dives():
    for p in problems(11, 300)[:60]:
        params = SearchParams(5, "mult", 0.0, 8)
        a = apr_search(p.nums, p.target, params, random.Random(p.id))
        assert a.spawns == [] and not any(isinstance(e, SPAWN_OR_JOIN) for e in a.context)
        s = sos_search(p.nums, p.target, params, random.Random(p.id))
        assert not any(isinstance(e, DIVES) for e in s.events)


def test_threshold_one_spawns_once_at_the_root():
    # Every parent expansion is promising, so the root's expansion spawns all its nodes and
    # the parent has nothing left to search after the join.
    for p in problems(11, 300)[:60]:
        a = apr_search(p.nums, p.target, SearchParams(4, "mult", 1.0, 8), random.Random(p.id))
        assert len(a.spawns) == 1
        (spawn,) = a.spawns
        assert spawn.at == 2 + 2 * 4  # Move, State, then Explore + Generated per kept operation
        assert {c.start.id for c in spawn.children} == {"0,0", "0,1", "0,2", "0,3"}
        if not a.solved:
            assert typed(a.context[spawn.at + len(spawn.join):]) == typed([Exhausted()])


def test_apr_requires_a_sub_beam():
    with pytest.raises(ValueError):
        apr_search((1, 2, 3, 4), 10, SearchParams(3, "mult", 0.9, 0), random.Random(0))


# --- replaying a thread: every line follows from the lines before it -----------------------
def _kept(nums, target, name, beam):
    """The operations an expansion keeps: the `beam` best-scored successors (a stable sort)."""
    items = sorted(successors(nums, heuristic(name, target)), key=lambda x: x[0])[:beam]
    return [f"{left}{symbol}{right}={value}" for _, symbol, left, right, value, _, _ in items]


def replay(events, target, name, beam, stats=None):
    """Check a thread line by line: each State is the state its node was generated with, each
    Explore is a legal operation on it, Generated/DeadEnd/Goal agree with the Explore before
    them, solution paths walk known nodes, and an expansion explores exactly its beam's best
    operations (fewer only when it stops at a goal)."""
    known = {}  # node id -> (nums, operations)
    first = events[0]
    if type(first) is Move:
        assert type(events[1]) is State
        known[first.node] = (events[1].nums, events[1].operations)
        pending = None
    else:  # a SoS+ trace opens with the root's State
        assert type(first) is State and first.operations == ()
        known[ROOT_ID] = (first.nums, ())
        pending = ROOT_ID
    current = None
    previous = None
    in_path = False
    expansion = None  # (kept operations, explored operations)

    def close_expansion(found_goal=False):
        nonlocal expansion
        if expansion is not None:
            kept, explored = expansion
            assert sorted(explored) == sorted(kept) if not found_goal else (
                set(explored) <= set(kept) and len(explored) <= len(kept)), (kept, explored)
            if stats is not None and len(set(kept)) > 1:
                stats["expansions"] += 1
                stats["best_first"] += explored[0] == kept[0]
        expansion = None

    for e in events:
        kind = type(e)
        if kind in (Move, DiveStart):
            close_expansion()
            assert e.node in known, e
            pending = e.node
        elif kind is State:
            close_expansion()
            assert pending is not None, e
            nums, ops = known[pending]
            assert (e.target, e.nums, e.operations) == (target, nums, ops), (e, pending)
            current, pending = pending, None
            if not in_path:
                expansion = (_kept(e.nums, target, name, beam), [])
        elif kind is Explore:
            assert current is not None and type(previous) in (State, Generated, DeadEnd)
            nums = list(known[current][0])
            op = e.operation
            for operand in (op.left, op.right):
                nums.remove(operand)  # raises if the operand is not available
            assert verify((op.left, op.right), op.result, [op]).ok, op
            assert sorted(e.nums) == sorted(nums + [op.result]) and e.nums[-1] == op.result
            if expansion is not None:
                expansion[1].append(op.text)
        elif kind is Generated:
            assert type(previous) is Explore
            assert (e.target, e.nums, e.operation) == (target, previous.nums, previous.operation)
            assert len(e.nums) > 1 and e.node.startswith(current + ",")
            entry = (e.nums, known[current][1] + (e.operation,))
            assert known.setdefault(e.node, entry) == entry, e
        elif kind is DeadEnd:
            assert type(previous) is Explore and len(previous.nums) == 1
            assert e == DeadEnd(previous.nums[0], target) and e.value != target
        elif kind is Goal:
            assert e == Goal(target, target)
            if type(previous) is Explore:
                assert previous.nums == (target,)
                if in_path:
                    in_path = False  # the end of a solution path
                else:
                    close_expansion(found_goal=True)
                    in_path = True  # the goal found: its path follows
            else:
                assert type(previous) is JoinEnd  # APR: a child's goal becomes the parent's
                in_path = True
        elif kind is JoinGoal:
            assert e.node in known
            in_path = True
        elif kind is JoinNoSolution:
            assert e.node in known
        else:
            close_expansion()
        previous = e
    close_expansion()
    assert not in_path


@pytest.mark.slow
def test_replay_every_thread(apr_corpus, sos_corpus):
    stats = {"expansions": 0, "best_first": 0}
    for item in apr_corpus:
        t, p, params = item.trace, item.problem, item.params
        replay(t.context, p.target, params.heuristic, params.beam_size, stats)
        for spawn in t.spawns:
            for child in spawn.children:
                replay(child.events, p.target, params.heuristic, params.sub_beam_size, stats)
    for item in sos_corpus:
        p, params = item.problem, item.params
        replay(item.trace.events, p.target, params.heuristic, params.beam_size, stats)
    # the kept operations are explored in a shuffled order, so not always best-first
    assert stats["expansions"] > 10_000
    assert 0.2 < stats["best_first"] / stats["expansions"] < 0.8, stats


def test_replay_rejects_an_inconsistent_thread(apr_corpus):
    item = next(x for x in apr_corpus if x.trace.solved and len(x.trace.context) > 12)
    t, p, params = item.trace, item.problem, item.params
    events = list(t.context)
    i = next(i for i, e in enumerate(events) if type(e) is State and e.operations)
    events[i] = events[i]._replace(operations=events[i].operations[:-1])
    with pytest.raises(AssertionError):
        replay(events, p.target, params.heuristic, params.beam_size)


@pytest.mark.slow
def test_sos_dives_are_nested_and_closed(sos_corpus):
    dived = 0
    for item in sos_corpus:
        t = item.trace
        stack: list[int] = []
        for i, e in enumerate(t.events):
            if type(e) is DiveStart:
                assert e.level == len(stack) + 1
                stack.append(e.level)
                dived += 1
            elif type(e) is DiveEnd:
                assert stack and stack.pop() == e.level
            elif type(e) is DiveFailed:
                assert type(t.events[i - 1]) is DiveEnd
        assert stack == []
    assert dived > 500


# --- determinism ----------------------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_same_traces_and_different_seeds_differ():
    params = SearchParams(4, "mult", 0.9, 9)
    sos_params = SearchParams(3, "mult", 0.5)
    differ_apr = differ_sos = 0
    for p in problems(11, 300)[:80]:
        a1 = apr_search(p.nums, p.target, params, random.Random(1))
        a2 = apr_search(p.nums, p.target, params, random.Random(1))
        a3 = apr_search(p.nums, p.target, params, random.Random(2))
        assert render(a1.context) == render(a2.context)
        assert [render(c.events) for s in a1.spawns for c in s.children] == [
            render(c.events) for s in a2.spawns for c in s.children]
        differ_apr += render(a1.context) != render(a3.context)
        s1 = sos_search(p.nums, p.target, sos_params, random.Random(1))
        s2 = sos_search(p.nums, p.target, sos_params, random.Random(1))
        s3 = sos_search(p.nums, p.target, sos_params, random.Random(2))
        assert render(s1.events) == render(s2.events)
        differ_sos += render(s1.events) != render(s3.events)
    assert differ_apr > 10 and differ_sos > 10


@pytest.mark.slow
def test_corpus_rebuild_is_identical():
    a = corpus.__wrapped__("apr", 3, 20)
    b = corpus.__wrapped__("apr", 3, 20)
    assert [render(x.trace.context) for x in a] == [render(x.trace.context) for x in b]


# --- successors and heuristics --------------------------------------------------------------
@given(st.lists(st.integers(min_value=0, max_value=120), min_size=2, max_size=5).map(tuple),
       st.integers(min_value=2, max_value=100), st.sampled_from(["mult", "sum"]))
def test_successors_agree_with_combinations(nums, target, name):
    score = Heuristic(name, target)
    items = successors(nums, score)
    expected = set()
    for i in range(len(nums)):
        for j in range(i + 1, len(nums)):
            expected |= set(combinations(nums[i], nums[j]))
    assert {(s, left, right, result) for _, s, left, right, result, _, _ in items} == expected
    for value, symbol, left, right, result, i, j in items:
        assert {left, right} == {nums[i], nums[j]} and i < j
        rest = nums[:i] + nums[i + 1:j] + nums[j + 1:] + (result,)
        assert value == pytest.approx(score(rest))  # the state's score, computed incrementally


@given(st.integers(min_value=0, max_value=500), st.integers(min_value=0, max_value=500))
def test_combinations_are_the_legal_operations(a, b):
    ops = combinations(a, b)
    big, small = max(a, b), min(a, b)
    assert ("+", a, b, a + b) in ops and ("*", a, b, a * b) in ops
    assert ("-", big, small, big - small) in ops
    exact = small != 0 and big % small == 0
    assert [o for o in ops if o[0] == "/"] == ([("/", big, small, big // small)] if exact else [])
    assert len(ops) == 3 + exact


def test_heuristics():
    mult = Heuristic("mult", 24)
    assert mult([24]) == 0
    assert mult([25]) == 1 and mult([5]) == 1 and mult([10]) == 2 and mult([1]) == 1
    assert mult([5, 10, 30]) == 1 + 2 + 6
    total = Heuristic("sum", 24)
    assert total([24]) == 0
    assert total([20, 30]) == 5  # the mean distance
    assert total([0, 24, 48]) == 16
    with pytest.raises(ValueError):
        Heuristic("bogus", 24)
    assert heuristic("mult", 24) is heuristic("mult", 24)


# --- solve rates with the paper's parameter draws -------------------------------------------
@pytest.mark.slow
def test_solve_rates_match_the_reference():
    apr_config, sos_config = AprSolverConfig(), SosSolverConfig()
    apr_solved, children, sos_solved = [], [], []
    for p in candidates(ProblemSpace(), 7, 0, 400):
        rng = random.Random(f"apr:7:{p.id}")
        params = apr_config.draw(rng)
        assert 1 <= params.beam_size <= 10 and params.beam_size <= params.sub_beam_size <= 15
        assert (params.promising_threshold, params.heuristic) == (0.9, "mult")
        t = apr_search(p.nums, p.target, params, rng)
        apr_solved.append(t.solved)
        children.append(t.children)
        rng = random.Random(f"sos:7:{p.id}")
        params = sos_config.draw(rng)
        assert 1 <= params.beam_size <= 5 and params.promising_threshold == 0.5
        sos_solved.append(sos_search(p.nums, p.target, params, rng).solved)
    apr_rate, sos_rate = statistics.fmean(apr_solved), statistics.fmean(sos_solved)
    mean_children = statistics.fmean(children)
    assert 0.64 <= apr_rate <= 0.78, apr_rate
    assert 5.0 <= mean_children <= 8.0, mean_children
    assert 0.43 <= sos_rate <= 0.58, sos_rate
