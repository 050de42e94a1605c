"""The trace language: every marker string, the one writer, the parser and the verifier.

A trace is a list of line events. The solvers build events, `render` writes them, `parse`
reads text (model output included) back into events and never raises, and `verify` replays
a solution over the problem's own numbers. The strings are the APR paper's (arXiv
2504.15466, its public traces), so results stay comparable with it.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

# --- markers: the single source of truth for every string of the language ---------------
MOVE = "Moving to Node #"
STATE = "Current State: "
STATE_OPS = ", Operations: "
EXPLORE = "Exploring Operation: "
EXPLORE_NUMS = ", Resulting Numbers: "
GOAL = " equal: Goal Reached"
DEAD_END = " unequal: No Solution"
GENERATED = "Generated Node #"
GENERATED_OP = " Operation: "
EXHAUSTED = "No solution found."
# SoS+ serialises a promising dive as a nested sub-search inside the one trace.
DIVE_START = "Start Sub Search at level "
DIVE_END = "Exit Sub Search at level "
DIVE_FAILED = "No solution found in sub search"
# APR: a spawn block lists the children, the runtime replaces it with a join block.
SPAWN_START = "<Calling Sub Searches>"
SPAWN_CHILD = "<Start Sub Search "
SPAWN_END = "<End Calling Sub Searches>"
JOIN_START = "<Sub Searches>"
JOIN_GOAL = "<Goal Reached in Sub Search "
JOIN_NO_SOLUTION = "<No Solution in Sub Search "
JOIN_END = "<End Sub Searches>"
AT_LEVEL = " at level "
AT_NODE = " at Node #"
# Conditioning prefixes, written before the first line of a prompt.
SUB_CALL_BUDGET = "Sub Call Budget: "
TOKEN_BUDGET = "Token Budget: "
# Token Budget values are the trace's token count rounded up to a multiple of this.
TOKEN_BUDGET_STEP = 512

OPERATORS = "+-*/"


class Operation(NamedTuple):
    """`left symbol right = result`, as written in a trace (e.g. 79-27=52).

    `text` is that writing, made once by `operation()`: traces print each operation many times.
    """

    left: int
    symbol: str
    right: int
    result: int
    text: str

    def __str__(self) -> str:
        return self.text


def operation(left: int, symbol: str, right: int, result: int) -> Operation:
    return Operation(left, symbol, right, result, operation_text(left, symbol, right, result))


def operation_text(left: int, symbol: str, right: int, result: int) -> str:
    return f"{left}{symbol}{right}={result}"


# --- line events -------------------------------------------------------------------------
Nums = tuple[int, ...]


class Move(NamedTuple):
    node: str


class State(NamedTuple):
    target: int
    nums: Nums
    operations: tuple[Operation, ...]


class Explore(NamedTuple):
    operation: Operation
    nums: Nums


class Goal(NamedTuple):
    value: int
    target: int


class DeadEnd(NamedTuple):
    value: int
    target: int


class Generated(NamedTuple):
    node: str
    target: int
    nums: Nums
    operation: Operation


class Exhausted(NamedTuple):
    pass


class DiveStart(NamedTuple):
    level: int
    node: str


class DiveEnd(NamedTuple):
    level: int


class DiveFailed(NamedTuple):
    pass


class SpawnStart(NamedTuple):
    pass


class SpawnChild(NamedTuple):
    index: int
    level: int
    node: str


class SpawnEnd(NamedTuple):
    pass


class JoinStart(NamedTuple):
    pass


class JoinGoal(NamedTuple):
    index: int
    level: int
    node: str


class JoinNoSolution(NamedTuple):
    index: int
    level: int
    node: str


class JoinEnd(NamedTuple):
    pass


Event = (
    Move | State | Explore | Goal | DeadEnd | Generated | Exhausted | DiveStart | DiveEnd
    | DiveFailed | SpawnStart | SpawnChild | SpawnEnd | JoinStart | JoinGoal | JoinNoSolution
    | JoinEnd
)


class Budget(NamedTuple):
    """A conditioning prefix: `Sub Call Budget: N ` (APR) or `Token Budget: N ` (SoS+)."""

    marker: str
    value: int

    def __str__(self) -> str:
        return f"{self.marker}{self.value} "


def token_budget(token_count: int) -> int:
    """The `Token Budget` a trace of `token_count` tokens is conditioned on (next multiple of 512)."""
    steps = max(1, -(-token_count // TOKEN_BUDGET_STEP))
    return steps * TOKEN_BUDGET_STEP


# --- writer ------------------------------------------------------------------------------
# Every line is written by one of these functions, from its parts already written as text:
# `render` uses them on events, and the solvers call them directly while they search (no
# event objects, no rendering pass). Each returns the line with its newline.
def format_nums(nums: Sequence[int]) -> str:
    return str(list(nums))  # the paper's traces print Python lists: [5, 50, 52]


def format_operations(operations: Sequence[Operation]) -> str:
    return str([op.text for op in operations])  # ['79-27=52', '5+52=57']


def move_line(node: str) -> str:
    return f"{MOVE}{node}\n"


def state_line(target: int, nums: str, operations: str) -> str:
    """`nums` and `operations` as `format_nums` and `format_operations` write them."""
    return f"{STATE}{target}:{nums}{STATE_OPS}{operations}\n"


def explore_line(operation: str, nums: str) -> str:
    return f"{EXPLORE}{operation}{EXPLORE_NUMS}{nums}\n"


def generated_line(node: str, target: int, nums: str, operation: str) -> str:
    return f"{GENERATED}{node}: {target}:{nums}{GENERATED_OP}{operation}\n"


def goal_line(value: int, target: int) -> str:
    return f"{value},{target}{GOAL}\n"


def dead_end_line(value: int, target: int) -> str:
    return f"{value},{target}{DEAD_END}\n"


_RENDERERS: dict[type, Callable[..., str]] = {
    Move: lambda e: move_line(e.node),
    State: lambda e: state_line(e.target, format_nums(e.nums), format_operations(e.operations)),
    Explore: lambda e: explore_line(e.operation.text, format_nums(e.nums)),
    Goal: lambda e: goal_line(e.value, e.target),
    DeadEnd: lambda e: dead_end_line(e.value, e.target),
    Generated: lambda e: generated_line(e.node, e.target, format_nums(e.nums), e.operation.text),
    Exhausted: lambda e: f"{EXHAUSTED}\n",
    DiveStart: lambda e: f"{DIVE_START}{e.level}: {MOVE}{e.node}\n",
    DiveEnd: lambda e: f"{DIVE_END}{e.level}\n",
    DiveFailed: lambda e: f"{DIVE_FAILED}\n",
    SpawnStart: lambda e: f"{SPAWN_START}\n",
    SpawnChild: lambda e: f"{SPAWN_CHILD}{e.index}{AT_LEVEL}{e.level}> {MOVE}{e.node}\n",
    SpawnEnd: lambda e: f"{SPAWN_END}\n",
    JoinStart: lambda e: f"{JOIN_START}\n",
    JoinGoal: lambda e: f"{JOIN_GOAL}{e.index}{AT_LEVEL}{e.level}{AT_NODE}{e.node}>\n",
    JoinNoSolution: lambda e: (
        f"{JOIN_NO_SOLUTION}{e.index}{AT_LEVEL}{e.level}{AT_NODE}{e.node}>\n"),
    JoinEnd: lambda e: f"{JOIN_END}\n",
}


def render_line(event: Event) -> str:
    """One event as its line, without the newline."""
    renderer = _RENDERERS.get(type(event))
    if renderer is None:
        raise TypeError(f"not a trace event: {event!r}")
    return renderer(event)[:-1]


def render(events: Sequence[Event], budget: Budget | None = None) -> str:
    """Events as trace text, one line each, every line ending in a newline."""
    text = "".join([_RENDERERS[type(e)](e) for e in events])
    return f"{budget}{text}" if budget is not None else text


def render_lines(events: Sequence[Event]) -> list[str]:
    """Events as their lines, each with its newline (the solvers' own form of a trace)."""
    return [_RENDERERS[type(e)](e) for e in events]


# --- parser ------------------------------------------------------------------------------
class ParseFailure(NamedTuple):
    """Why text is not a trace: `kind` is countable, `line` is 1-based."""

    kind: str
    line: int
    text: str


class ParsedTrace(NamedTuple):
    budget: Budget | None
    events: list[Event]
    failure: ParseFailure | None


# ASCII digits only: `\d` would also take other scripts' digits, which int() accepts.
_NODE = r"([0-9]+(?:,[0-9]+)*)"
_INT = r"([0-9]+)"
_NUMS = r"\[((?:[0-9]+(?:, [0-9]+)*)?)\]"
_OP = r"([0-9]+)([-+*/])([0-9]+)=([0-9]+)"
_OPS = r"\[((?:'[0-9]+[-+*/][0-9]+=[0-9]+'(?:, '[0-9]+[-+*/][0-9]+=[0-9]+')*)?)\]"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    (MOVE, re.compile(re.escape(MOVE) + _NODE)),
    (STATE, re.compile(re.escape(STATE) + _INT + ":" + _NUMS + re.escape(STATE_OPS) + _OPS)),
    (EXPLORE, re.compile(re.escape(EXPLORE) + _OP + re.escape(EXPLORE_NUMS) + _NUMS)),
    (GENERATED, re.compile(
        re.escape(GENERATED) + _NODE + ": " + _INT + ":" + _NUMS + re.escape(GENERATED_OP) + _OP)),
    (DIVE_START, re.compile(re.escape(DIVE_START) + _INT + ": " + re.escape(MOVE) + _NODE)),
    (DIVE_END, re.compile(re.escape(DIVE_END) + _INT)),
    (SPAWN_CHILD, re.compile(
        re.escape(SPAWN_CHILD) + _INT + re.escape(AT_LEVEL) + _INT + "> " + re.escape(MOVE) + _NODE)),
    (JOIN_GOAL, re.compile(
        re.escape(JOIN_GOAL) + _INT + re.escape(AT_LEVEL) + _INT + re.escape(AT_NODE) + _NODE + ">")),
    (JOIN_NO_SOLUTION, re.compile(
        re.escape(JOIN_NO_SOLUTION) + _INT + re.escape(AT_LEVEL) + _INT + re.escape(AT_NODE) + _NODE
        + ">")),
]
_OUTCOME = re.compile(_INT + "," + _INT + "(" + re.escape(GOAL) + "|" + re.escape(DEAD_END) + ")")
_CONSTANT_LINES: dict[str, Event] = {
    EXHAUSTED: Exhausted(), DIVE_FAILED: DiveFailed(), SPAWN_START: SpawnStart(),
    SPAWN_END: SpawnEnd(), JOIN_START: JoinStart(), JOIN_END: JoinEnd(),
}
_BUDGET = re.compile("(" + re.escape(SUB_CALL_BUDGET) + "|" + re.escape(TOKEN_BUDGET) + r")([0-9]+) ")
_OP_ITEM = re.compile(_OP)


def _nums(text: str) -> Nums:
    return tuple(int(n) for n in text.split(", ")) if text else ()


def _op(groups: Sequence[str]) -> Operation:
    left, symbol, right, result = groups
    return operation(int(left), symbol, int(right), int(result))


def _ops(text: str) -> tuple[Operation, ...]:
    return tuple(_op(m.groups()) for m in _OP_ITEM.finditer(text))


def parse_operation(text: str) -> Operation | None:
    """`79-27=52` as an Operation, or None when the text is not one."""
    match = _OP_ITEM.fullmatch(text)
    return _op(match.groups()) if match else None


def parse_line(line: str) -> Event | None:
    """The event a line writes, or None when it is not a line of the language."""
    try:
        return _parse_line(line)
    except ValueError:  # a digit run longer than int() accepts (4300 digits): not a trace line
        return None


def _parse_line(line: str) -> Event | None:
    if line in _CONSTANT_LINES:
        return _CONSTANT_LINES[line]
    for marker, pattern in _PATTERNS:
        if not line.startswith(marker):
            continue
        m = pattern.fullmatch(line)
        if m is None:
            return None
        g = m.groups()
        if marker == MOVE:
            return Move(g[0])
        if marker == STATE:
            return State(int(g[0]), _nums(g[1]), _ops(g[2]))
        if marker == EXPLORE:
            return Explore(_op(g[0:4]), _nums(g[4]))
        if marker == GENERATED:
            return Generated(g[0], int(g[1]), _nums(g[2]), _op(g[3:7]))
        if marker == DIVE_START:
            return DiveStart(int(g[0]), g[1])
        if marker == DIVE_END:
            return DiveEnd(int(g[0]))
        if marker == SPAWN_CHILD:
            return SpawnChild(int(g[0]), int(g[1]), g[2])
        if marker == JOIN_GOAL:
            return JoinGoal(int(g[0]), int(g[1]), g[2])
        return JoinNoSolution(int(g[0]), int(g[1]), g[2])
    m = _OUTCOME.fullmatch(line)
    if m is None:
        return None
    value, target = int(m.group(1)), int(m.group(2))
    return Goal(value, target) if m.group(3) == GOAL else DeadEnd(value, target)


def split_budget(text: str) -> tuple[Budget | None, str]:
    """Separate a leading conditioning prefix from the rest of the text."""
    m = _BUDGET.match(text)
    if m is None or len(m.group(2)) > 18:
        return None, text
    return Budget(m.group(1), int(m.group(2))), text[m.end():]


def parse(text: str) -> ParsedTrace:
    """Read trace text into events; stops at the first bad line and says why (never raises).

    A last line with no newline is read if it parses (a cut that only drops trailing digits
    still parses: nothing marks a line's end but the newline); otherwise it is a failure.
    """
    budget, body = split_budget(text)
    events: list[Event] = []
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        event = parse_line(line)
        if event is None:
            return ParsedTrace(budget, events, ParseFailure("malformed_line", number, line))
        events.append(event)
    return ParsedTrace(budget, events, None)


# --- solutions and the verifier ---------------------------------------------------------
def solution_path(events: Sequence[Event]) -> list[Operation] | None:
    """The operations of the final solution path: the Explore lines after the next-to-last Goal.

    Every solved thread ends `value,target equal: Goal Reached` followed by the path from its
    start node, which itself ends in a Goal line. None when there is no such path.
    """
    goals = [i for i, e in enumerate(events) if type(e) is Goal]
    if len(goals) < 2:
        return None
    path = events[goals[-2] + 1: goals[-1]]
    return [e.operation for e in path if type(e) is Explore]


class Verdict(NamedTuple):
    ok: bool
    reason: str


def apply(symbol: str, left: int, right: int) -> int | None:
    """Exact integer arithmetic of the game; None when the operation is not allowed."""
    if symbol == "+":
        return left + right
    if symbol == "*":
        return left * right
    if symbol == "-":
        return left - right if left >= right else None
    if symbol == "/":
        return left // right if right != 0 and left % right == 0 else None
    return None


def verify(nums: Sequence[int], target: int, operations: Sequence[Operation]) -> Verdict:
    """Replay `operations` over the problem's own numbers; never trusts a claimed Goal.

    Each number is used at most once (results become new numbers), arithmetic must be exact,
    division only when it leaves no remainder, and the last number left must be the target.
    """
    pool = list(nums)
    for op in operations:
        for operand in (op.left, op.right):
            if operand not in pool:
                return Verdict(False, f"number_not_available: {operand} in {op}")
            pool.remove(operand)
        value = apply(op.symbol, op.left, op.right)
        if value is None:
            return Verdict(False, f"operation_not_allowed: {op}")
        if value != op.result:
            return Verdict(False, f"wrong_arithmetic: {op}")
        pool.append(value)
    if pool != [target]:
        return Verdict(False, f"wrong_target: left with {pool}, want [{target}]")
    return Verdict(True, "ok")


def verify_text(nums: Sequence[int], target: int, text: str) -> Verdict:
    """Parse a final trace and verify its solution path; malformed text is a failed verdict."""
    parsed = parse(text)
    if parsed.failure is not None:
        return Verdict(False, f"parse_failure: {parsed.failure.kind} at line {parsed.failure.line}")
    path = solution_path(parsed.events)
    if path is None:
        return Verdict(False, "no_solution_path")
    return verify(nums, target, path)
