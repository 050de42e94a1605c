"""The trace language: golden lines, render/parse round trips, a parser that never raises,
the verifier."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apr.countdown import trace
from apr.countdown.trace import (
    SUB_CALL_BUDGET,
    TOKEN_BUDGET,
    Budget,
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
    ParsedTrace,
    SpawnChild,
    SpawnEnd,
    SpawnStart,
    State,
    operation,
    parse,
    parse_line,
    render,
    render_line,
    solution_path,
    token_budget,
    verify,
    verify_text,
)


def typed(events):
    """Events with their types: NamedTuples compare as plain tuples, so
    `Goal(5, 5) == DeadEnd(5, 5)` and `Exhausted() == SpawnStart()`; a round trip must keep the
    type too."""
    return [(type(e).__name__, e) for e in events]


def assert_round_trip(events, budget=None):
    parsed = parse(render(events, budget))
    assert parsed.failure is None, parsed.failure
    assert parsed.budget == budget
    assert typed(parsed.events) == typed(events)


# --- golden lines: the paper's strings -----------------------------------------------------
def test_golden_lines_match_the_papers_trace():
    op = operation(79, "-", 27, 52)
    events = [
        Move("0"),
        State(62, (5, 50, 79, 27), ()),
        Explore(op, (5, 50, 52)),
        Generated("0,0", 62, (5, 50, 52), op),
        Goal(62, 62),
    ]
    assert render(events) == (
        "Moving to Node #0\n"
        "Current State: 62:[5, 50, 79, 27], Operations: []\n"
        "Exploring Operation: 79-27=52, Resulting Numbers: [5, 50, 52]\n"
        "Generated Node #0,0: 62:[5, 50, 52] Operation: 79-27=52\n"
        "62,62 equal: Goal Reached\n"
    )


@pytest.mark.parametrize("event, line", [
    (State(62, (5, 52), (operation(79, "-", 27, 52), operation(5, "+", 52, 57))),
     "Current State: 62:[5, 52], Operations: ['79-27=52', '5+52=57']"),
    (DeadEnd(57, 62), "57,62 unequal: No Solution"),
    (Exhausted(), "No solution found."),
    (DiveStart(2, "0,1"), "Start Sub Search at level 2: Moving to Node #0,1"),
    (DiveEnd(2), "Exit Sub Search at level 2"),
    (DiveFailed(), "No solution found in sub search"),
    (SpawnStart(), "<Calling Sub Searches>"),
    (SpawnChild(0, 1, "0,0"), "<Start Sub Search 0 at level 1> Moving to Node #0,0"),
    (SpawnEnd(), "<End Calling Sub Searches>"),
    (JoinStart(), "<Sub Searches>"),
    (JoinGoal(0, 1, "0,0"), "<Goal Reached in Sub Search 0 at level 1 at Node #0,0>"),
    (JoinNoSolution(1, 1, "0,1"), "<No Solution in Sub Search 1 at level 1 at Node #0,1>"),
    (JoinEnd(), "<End Sub Searches>"),
])
def test_golden_line(event, line):
    assert render_line(event) == line
    parsed = parse_line(line)
    assert type(parsed) is type(event) and parsed == event


def test_budget_prefixes_are_written_before_the_first_line():
    events = [Move("0")]
    assert render(events, Budget(SUB_CALL_BUDGET, 7)) == "Sub Call Budget: 7 Moving to Node #0\n"
    assert render(events, Budget(TOKEN_BUDGET, 1024)) == "Token Budget: 1024 Moving to Node #0\n"
    assert parse("Token Budget: 1024 Moving to Node #0\n") == ParsedTrace(
        Budget(TOKEN_BUDGET, 1024), [Move("0")], None)


def test_render_line_rejects_non_events():
    with pytest.raises(TypeError):
        render_line(("not", "an", "event"))


# --- round trips over solver traces --------------------------------------------------------
def assert_written_as_rendered(lines, events):
    """The solvers write their lines themselves: each must be what `render` makes of it."""
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert trace.render_lines(events) == lines


@pytest.mark.slow
def test_apr_traces_round_trip(apr_corpus):
    for item in apr_corpus[:1000]:
        t = item.trace
        assert_round_trip(t.context)
        assert_round_trip(t.context, Budget(SUB_CALL_BUDGET, 7))
        assert_written_as_rendered(t.lines, t.context)
        for spawn in t.spawns:
            assert_round_trip(spawn.block)
            assert_round_trip(spawn.join)
            assert_written_as_rendered(spawn.block_lines, spawn.block)
            assert_written_as_rendered(spawn.join_lines, spawn.join)
            for child in spawn.children:
                assert_round_trip(child.events)
                assert_written_as_rendered(child.lines, child.events)


@pytest.mark.slow
def test_sos_traces_round_trip(sos_corpus):
    for item in sos_corpus[:1000]:
        assert_round_trip(item.trace.events)
        assert_round_trip(item.trace.events, Budget(TOKEN_BUDGET, 2048))
        assert_written_as_rendered(item.trace.lines, item.trace.events)


def test_line_writers_write_the_golden_lines():
    assert trace.move_line("0,1") == "Moving to Node #0,1\n"
    assert trace.state_line(62, "[5, 52]", "['79-27=52']") == (
        "Current State: 62:[5, 52], Operations: ['79-27=52']\n")
    assert trace.explore_line("79-27=52", "[5, 50, 52]") == (
        "Exploring Operation: 79-27=52, Resulting Numbers: [5, 50, 52]\n")
    assert trace.generated_line("0,0", 62, "[5, 50, 52]", "79-27=52") == (
        "Generated Node #0,0: 62:[5, 50, 52] Operation: 79-27=52\n")
    assert trace.goal_line(62, 62) == "62,62 equal: Goal Reached\n"
    assert trace.dead_end_line(57, 62) == "57,62 unequal: No Solution\n"
    assert trace.operation_text(79, "-", 27, 52) == operation(79, "-", 27, 52).text == "79-27=52"


# --- hypothesis: arbitrary events ----------------------------------------------------------
ints = st.integers(min_value=0, max_value=10**7)
small = st.integers(min_value=0, max_value=50)
nums = st.lists(ints, max_size=6).map(tuple)
nodes = st.lists(st.integers(min_value=0, max_value=99), min_size=1, max_size=5).map(
    lambda xs: ",".join(map(str, xs)))
ops = st.builds(operation, ints, st.sampled_from("+-*/"), ints, ints)

EVENT_STRATEGIES = {
    Move: st.builds(Move, nodes),
    State: st.builds(State, ints, nums, st.lists(ops, max_size=5).map(tuple)),
    Explore: st.builds(Explore, ops, nums),
    Goal: st.builds(Goal, ints, ints),
    DeadEnd: st.builds(DeadEnd, ints, ints),
    Generated: st.builds(Generated, nodes, ints, nums, ops),
    Exhausted: st.just(Exhausted()),
    DiveStart: st.builds(DiveStart, small, nodes),
    DiveEnd: st.builds(DiveEnd, small),
    DiveFailed: st.just(DiveFailed()),
    SpawnStart: st.just(SpawnStart()),
    SpawnChild: st.builds(SpawnChild, small, small, nodes),
    SpawnEnd: st.just(SpawnEnd()),
    JoinStart: st.just(JoinStart()),
    JoinGoal: st.builds(JoinGoal, small, small, nodes),
    JoinNoSolution: st.builds(JoinNoSolution, small, small, nodes),
    JoinEnd: st.just(JoinEnd()),
}
events_strategy = st.lists(st.one_of(*EVENT_STRATEGIES.values()), max_size=30)
budgets = st.one_of(st.none(), st.builds(Budget, st.sampled_from([SUB_CALL_BUDGET, TOKEN_BUDGET]),
                                         ints))


def test_strategies_cover_every_event_type():
    assert set(EVENT_STRATEGIES) == set(trace._RENDERERS)


@given(events_strategy, budgets)
def test_arbitrary_events_round_trip(events, budget):
    assert_round_trip(events, budget)


@given(events_strategy.filter(bool))
@pytest.mark.slow
def test_last_line_without_newline_is_read_when_whole(events):
    text = render(events)
    assert text.endswith("\n")
    parsed = parse(text[:-1])
    assert parsed.failure is None
    assert typed(parsed.events) == typed(events)


# --- the parser never raises ---------------------------------------------------------------
@given(st.text())
@pytest.mark.slow
def test_parse_never_raises_on_arbitrary_text(text):
    parsed = parse(text)
    assert isinstance(parsed, ParsedTrace)
    if parsed.failure is not None:
        assert parsed.failure.kind == "malformed_line"
        assert parsed.failure.line == len(parsed.events) + 1


@given(st.lists(st.sampled_from([
    "Moving to Node #", "Current State: ", ", Operations: ", "Exploring Operation: ", "[", "]",
    "', '", "['", "']", ", ", "0", "7", "12", "+", "-", "*", "/", "=", ":", " ", "\n", ",",
    " equal: Goal Reached", " unequal: No Solution", "Generated Node #", " Operation: ",
    "<Start Sub Search ", " at level ", "> ", " at Node #", ">", "Sub Call Budget: ",
    "Token Budget: ", "No solution found.", "<Sub Searches>", "Exit Sub Search at level ",
]), max_size=40).map("".join))
def test_parse_never_raises_on_marker_soup(text):
    assert isinstance(parse(text), ParsedTrace)


@given(events_strategy, budgets, st.data())
def test_a_trace_cut_anywhere_parses_its_whole_lines(events, budget, data):
    text = render(events, budget)
    cut = data.draw(st.integers(min_value=0, max_value=len(text)), label="cut")
    parsed = parse(text[:cut])
    assert isinstance(parsed, ParsedTrace)
    prefix = str(budget) if budget is not None else ""
    if cut < len(prefix):  # cut inside the prefix: no budget, and the stub is not a line
        assert parsed.budget is None and parsed.events == []
        if cut == 0:
            assert parsed.failure is None
        else:
            assert parsed.failure is not None and parsed.failure.kind == "malformed_line"
            assert parsed.failure.line == 1
        return
    assert parsed.budget == budget
    body = text[len(prefix):cut]
    whole = body.count("\n")
    if body == "" or body.endswith("\n"):  # cut on a line boundary: parses fully
        assert parsed.failure is None
        assert typed(parsed.events) == typed(events[:whole])
        return
    stub = body.rsplit("\n", 1)[-1]
    full = render_line(events[whole])
    assert full.startswith(stub)
    if stub == full:  # only the final newline was cut: the whole last line is read
        assert parsed.failure is None
        assert typed(parsed.events) == typed(events[:whole + 1])
    elif parsed.failure is not None:
        assert parsed.failure.kind == "malformed_line"
        assert parsed.failure.line == whole + 1
        assert parsed.failure.text == stub
        assert typed(parsed.events) == typed(events[:whole])
    else:
        # A line of the language ends in a node id or a number only where a cut can hide:
        # the one way a cut line still reads as whole is to lose trailing digits (and commas).
        assert set(full[len(stub):]) <= set("0123456789,"), (full, stub)
        assert typed(parsed.events[:whole]) == typed(events[:whole])
        assert len(parsed.events) == whole + 1


def test_a_cut_inside_a_line_is_malformed():
    text = render([Move("0"), State(62, (5, 50), ())])
    parsed = parse(text[: text.index("Operations")])
    assert parsed.events == [Move("0")]
    assert parsed.failure is not None and parsed.failure.kind == "malformed_line"
    assert parsed.failure.line == 2


# Regression: `int()` refuses digit runs over 4300 characters (Python's max_str_digits), and
# `parse` raised ValueError on them; a degenerate rollout repeating digits reaches that.
@pytest.mark.parametrize("text", [
    "1" * 5000 + ",1 equal: Goal Reached\n",
    "Current State: " + "1" * 5000 + ":[], Operations: []\n",
    "Sub Call Budget: " + "9" * 5000 + " Moving to Node #0\n",
])
def test_parse_never_raises_on_huge_numbers(text):
    parsed = parse(text)
    assert isinstance(parsed, ParsedTrace)
    assert parsed.failure is not None and parsed.failure.kind == "malformed_line"
    assert parsed.budget is None


# --- the verifier --------------------------------------------------------------------------
def op(text: str):
    (parsed,) = trace._ops(f"'{text}'")
    return parsed


def test_verify_accepts_a_correct_solution():
    assert verify((2, 3, 4), 24, [op("2*3=6"), op("6*4=24")]) == (True, "ok")
    # an intermediate result is a new number, usable beside an equal original
    assert verify((1, 2, 3), 9, [op("1+2=3"), op("3*3=9")]).ok
    assert verify((50, 79, 27, 5), 107, [op("79-27=52"), op("52+5=57"), op("57+50=107")]).ok
    assert verify((12, 4, 2), 1, [op("12/4=3"), op("3-2=1")]).ok
    assert verify((6,), 6, []).ok


def test_verify_does_not_mutate_the_numbers():
    nums = [2, 3, 4]
    verify(nums, 24, [op("2*3=6"), op("6*4=24")])
    assert nums == [2, 3, 4]


@pytest.mark.parametrize("nums, target, operations, prefix", [
    ((2, 2, 5), 9, ["2+2=5"], "wrong_arithmetic"),
    ((2, 3), 6, ["2*3=5"], "wrong_arithmetic"),
    ((5, 3), 10, ["5+5=10"], "number_not_available: 5"),  # only one 5
    ((2, 3), 9, ["2+7=9"], "number_not_available: 7"),  # invented
    ((2, 3, 4), 24, ["2*3=6", "2*4=8"], "number_not_available: 2"),  # 2 already used
    ((7, 2), 3, ["7/2=3"], "operation_not_allowed"),  # not exact
    ((5, 0), 0, ["5/0=0"], "operation_not_allowed"),
    ((2, 3), 6, ["2+3=5"], "wrong_target"),
    ((2, 3, 4), 6, ["2*3=6"], "wrong_target"),  # 4 left over
    ((2, 3), 5, [], "wrong_target"),
])
def test_verify_rejects(nums, target, operations, prefix):
    verdict = verify(nums, target, [op(o) for o in operations])
    assert verdict.ok is False
    assert verdict.reason.startswith(prefix), verdict.reason


def test_verify_rejects_negative_subtraction():
    verdict = verify((2, 7), 5, [operation(2, "-", 7, -5)])
    assert verdict.ok is False and verdict.reason.startswith("operation_not_allowed")
    verdict = verify((2, 7), 5, [operation(2, "-", 7, 5)])
    assert verdict.ok is False and verdict.reason.startswith("operation_not_allowed")


def test_verify_text_on_malformed_text():
    for text in ["Moving to Node #x\n", "hello", "Current State: 5:[1, 2], Operations: [\n"]:
        verdict = verify_text((1, 2), 3, text)
        assert verdict.ok is False and verdict.reason.startswith("parse_failure"), verdict


def test_verify_text_without_a_solution_path():
    text = render([Move("0"), State(3, (1, 2), ()), Exhausted()])
    assert verify_text((1, 2), 3, text) == (False, "no_solution_path")


def test_verify_text_never_trusts_goal_reached():
    bogus = operation(2, "+", 2, 5)
    text = render([Goal(5, 5), Move("0"), State(5, (2, 2), ()), Explore(bogus, (5,)), Goal(5, 5)])
    verdict = verify_text((2, 2), 5, text)
    assert verdict.ok is False and verdict.reason.startswith("wrong_arithmetic")


def test_verify_text_on_solver_output(sos_corpus):
    checked = 0
    for item in sos_corpus[:300]:
        p, t = item.problem, item.trace
        text = render(t.events)
        verdict = verify_text(p.nums, p.target, text)
        if t.solved:
            assert verdict == (True, "ok")
            assert verify_text(p.nums, p.target + 1, text).reason.startswith("wrong_target")
            checked += 1
        else:
            assert verdict == (False, "no_solution_path")
    assert checked > 50


def test_solution_path_is_the_goals_operations(sos_corpus, apr_corpus):
    for item in sos_corpus[:300]:
        t = item.trace
        if t.solved:
            assert solution_path(t.events) == list(t.goal.operations)
    for item in apr_corpus[:300]:
        t = item.trace
        if t.solved:
            assert solution_path(t.context) == list(t.goal.operations)
    assert solution_path([Goal(1, 1)]) is None
    assert solution_path([]) is None


@pytest.mark.parametrize("count, budget", [
    (0, 512), (1, 512), (511, 512), (512, 512), (513, 1024), (1024, 1024), (1025, 1536),
])
def test_token_budget_rounds_up_to_512(count, budget):
    assert token_budget(count) == budget
