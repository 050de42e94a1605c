"""Symbolic solvers that write SoS+ and APR traces: the paper's hybrid search, written fresh.

Both are a beam-pruned best-first search over Countdown states that shares one `successors()`.
When an expansion is judged promising, SoS+ dives depth-first into each generated node inside
the same trace, while APR spawns one child thread per generated node (each with its own beam)
and joins their outcomes back into the parent. Searches write their trace text as they go, one
line at a time with `trace`'s line writers (`move_line`, `state_line`, ...), each node keeping
its own numbers and operations as text so that no line is built twice from parts; `events`
and `context` read that text back as trace events. The random generator is passed in, so a
seed fixes every trace.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from operator import attrgetter, itemgetter
from typing import Callable, Sequence

from apr.countdown.trace import (
    DiveEnd,
    DiveFailed,
    DiveStart,
    Event,
    Exhausted,
    JoinEnd,
    JoinGoal,
    JoinNoSolution,
    JoinStart,
    Nums,
    Operation,
    SpawnChild,
    SpawnEnd,
    SpawnStart,
    dead_end_line,
    explore_line,
    format_nums,
    generated_line,
    goal_line,
    move_line,
    operation_text,
    parse,
    render_lines,
    state_line,
)

ROOT_ID = "0"
HEURISTICS = ("mult", "sum")
# Lines without parts, written once.
EXHAUSTED_LINE, DIVE_FAILED_LINE, JOIN_START_LINE, JOIN_END_LINE = render_lines(
    [Exhausted(), DiveFailed(), JoinStart(), JoinEnd()])


class Heuristic:
    """Distance-to-goal estimate of a state (lower is better), the paper's two data heuristics.

    `mult`: per number, the distance to the nearest factor (2..target) of the target, summed;
    it favours states that can finish with a multiplication. `sum`: the mean distance of the
    numbers to the target. Both are sums of a per-number distance, so `successors` scores a
    new state from its parent's distances without rescanning it.
    """

    __slots__ = ("name", "target", "mean", "_below")

    def __init__(self, name: str, target: int):
        if name not in HEURISTICS:
            raise ValueError(f"unknown heuristic {name!r}: choose one of {HEURISTICS}")
        self.name, self.target, self.mean = name, target, name == "sum"
        if name == "mult":
            factors = [f for f in range(2, target + 1) if target % f == 0]
            self._below = [min(abs(v - f) for f in factors) for v in range(target)]
        else:
            self._below = [target - v for v in range(target)]

    def distance(self, value: int) -> int:
        return self._below[value] if value < self.target else value - self.target

    def __call__(self, nums: Nums) -> float:
        total = sum(map(self.distance, nums))
        return total / len(nums) if self.mean else total


@lru_cache(maxsize=4096)
def heuristic(name: str, target: int) -> Heuristic:
    return Heuristic(name, target)


def combinations(a: int, b: int) -> list[tuple[str, int, int, int]]:
    """Legal operations on a pair: (symbol, left, right, result), in the paper's order.

    Subtraction and division take the larger number first; division only when exact.
    """
    out = [("+", a, b, a + b), ("*", a, b, a * b)]
    big, small = (b, a) if a <= b else (a, b)
    out.append(("-", big, small, big - small))
    if small != 0 and big % small == 0:
        out.append(("/", big, small, big // small))
    return out


def successors(nums: Nums, score: Heuristic) -> list[tuple[float, str, int, int, int, int, int]]:
    """Every operation on a pair of the numbers, scored by the state it leads to.

    Items are (score, symbol, left, right, result, i, j): the operation on `nums[i]` and
    `nums[j]`. The same operations as `combinations`, inlined: this is the solvers' hot loop.
    """
    out = []
    n = len(nums)
    below, target = score._below, score.target
    dist = [below[v] if v < target else v - target for v in nums]
    total = sum(dist)
    scale = 1 / (n - 1) if score.mean else 1
    append = out.append
    for i in range(n - 1):
        a = nums[i]
        without_a = total - dist[i]
        for j in range(i + 1, n):
            b = nums[j]
            base = without_a - dist[j]
            v = a + b
            append(((base + (below[v] if v < target else v - target)) * scale, "+", a, b, v, i, j))
            v = a * b
            append(((base + (below[v] if v < target else v - target)) * scale, "*", a, b, v, i, j))
            big, small = (b, a) if a <= b else (a, b)
            v = big - small
            append(((base + (below[v] if v < target else v - target)) * scale, "-", big, small, v,
                    i, j))
            if small != 0 and big % small == 0:
                v = big // small
                append(((base + (below[v] if v < target else v - target)) * scale, "/", big, small,
                        v, i, j))
    return out


def shuffle(items: list, rng: random.Random) -> None:
    """Fisher-Yates on `rng.random()`: the same role as `rng.shuffle`, several times faster."""
    draw = rng.random
    for i in range(len(items) - 1, 0, -1):
        j = int(draw() * (i + 1))
        items[i], items[j] = items[j], items[i]


class Node:
    """A search state: its id in the trace (`0,2,1`), numbers, parent, score, the operation
    that made it (None at the root), and how the trace writes its numbers and its operations
    so far (`format_nums`, `format_operations`): each is written once, when the node is made.
    """

    __slots__ = ("id", "nums", "parent", "score", "operation", "nums_text", "ops_text")

    def __init__(self, id: str, nums: Nums, parent: Node | None, score: float,
                 operation: Operation | None, nums_text: str, ops_text: str):
        self.id = id
        self.nums = nums
        self.parent = parent
        self.score = score
        self.operation = operation
        self.nums_text = nums_text
        self.ops_text = ops_text

    @property
    def operations(self) -> tuple[Operation, ...]:
        """The operations from the root to this node."""
        ops = []
        node: Node | None = self
        while node is not None and node.operation is not None:
            ops.append(node.operation)
            node = node.parent
        return tuple(reversed(ops))

    def child(self, id: str, nums: Nums, score: float, op: Operation) -> Node:
        """The node `op` leads to from this one."""
        ops_text = f"['{op.text}']" if self.ops_text == "[]" else (
            f"{self.ops_text[:-1]}, '{op.text}']")  # format_operations, one more appended
        return Node(id, nums, self, score, op, format_nums(nums), ops_text)


def path_lines(goal: Node, start: Node, target: int) -> list[str]:
    """The solution path from `start` to `goal`, as the trace writes it after `Goal Reached`."""
    chain = [goal]
    while chain[-1] is not start:
        parent = chain[-1].parent
        if parent is None:
            raise ValueError("goal is not a descendant of start")
        chain.append(parent)
    chain.reverse()
    lines = [move_line(start.id)]
    for node, nxt in zip(chain, chain[1:]):
        lines.append(state_line(target, node.nums_text, node.ops_text))
        lines.append(explore_line(nxt.operation.text, nxt.nums_text))
        if nxt is goal:
            lines.append(goal_line(nxt.nums[0], target))
        else:
            lines.append(generated_line(nxt.id, target, nxt.nums_text, nxt.operation.text))
            lines.append(move_line(nxt.id))
    return lines


def _events(lines: list[str]) -> list[Event]:
    """Lines the solvers wrote, read back as events."""
    parsed = parse("".join(lines))
    if parsed.failure is not None:
        raise ValueError(f"unreadable trace line: {parsed.failure}")
    return parsed.events


@dataclass(frozen=True)
class SearchParams:
    """One search's knobs (drawn per problem by datagen from the configured ranges)."""

    beam_size: int
    heuristic: str = "mult"
    promising_threshold: float = 0.5
    sub_beam_size: int = 0  # APR only: the beam of each child search


_by_score = itemgetter(0)
_node_score = attrgetter("score")


class _BeamSearch:
    """The shared search loop, writing its trace lines (`lines`) as it goes.

    `promising(search, nodes, level)` decides what happens to an expansion's nodes: it returns
    the goal it found, or None after it has taken the nodes (dived or spawned), or False to
    have them pushed on the open set as usual. None for `promising` is one that always says
    False (and draws nothing).
    """

    def __init__(self, target: int, score: Heuristic, rng: random.Random, lines: list[str],
                 path_start: Node):
        self.target = target
        self.score = score
        self.rng = rng
        self.lines = lines
        self.path_start = path_start  # a found goal's path is written from this node

    def expand(self, node: Node, beam: int) -> tuple[Node | None, list[Node]]:
        """Write one expansion; return a goal if one was generated, else the new open nodes."""
        target, emit = self.target, self.lines.append
        parent_nums = node.nums
        emit(state_line(target, node.nums_text, node.ops_text))
        if len(parent_nums) == 2:
            return self._last_step(node, beam), []
        candidates = successors(parent_nums, self.score)
        candidates.sort(key=_by_score)  # stable: ties keep generation order
        kept = candidates[:beam]
        shuffle(kept, self.rng)  # so the first child explored is not always the best-scored
        generated: list[Node] = []
        prefix = node.id + ","
        for k, (score, symbol, left, right, value, i, j) in enumerate(kept):
            op = Operation(left, symbol, right, value, operation_text(left, symbol, right, value))
            nums = parent_nums[:i] + parent_nums[i + 1:j] + parent_nums[j + 1:] + (value,)
            child = node.child(prefix + str(k), nums, score, op)
            emit(explore_line(op.text, child.nums_text))
            emit(generated_line(child.id, target, child.nums_text, op.text))
            generated.append(child)
        generated.sort(key=_node_score)
        return None, generated

    def _last_step(self, node: Node, beam: int) -> Node | None:
        """An expansion of two numbers, where each kept operation ends in an outcome line;
        returns the goal if one is reached. Nodes are only made for a goal."""
        target, below, emit = self.target, self.score._below, self.lines.append
        # `successors` of a pair, inlined: the state is the one result, its score its distance
        candidates = [(below[value] if value < target else value - target, symbol, left, right,
                       value) for symbol, left, right, value in combinations(*node.nums)]
        candidates.sort(key=_by_score)
        kept = candidates[:beam]
        shuffle(kept, self.rng)
        for score, symbol, left, right, value in kept:
            text = operation_text(left, symbol, right, value)
            emit(explore_line(text, f"[{value}]"))  # format_nums((value,))
            if value != target:
                emit(dead_end_line(value, target))
                continue
            op = Operation(left, symbol, right, value, text)
            goal = node.child(node.id + ",0", (value,), score, op)
            emit(goal_line(target, target))
            self.lines.extend(path_lines(goal, self.path_start, target))
            return goal
        return None

    def run(self, start: Node, beam: int, level: int,
            promising: Callable[[_BeamSearch, list[Node], int], Node | None | bool] | None
            ) -> Node | None:
        emit = self.lines.append
        counter = 0
        open_set: list[tuple[float, int, Node]] = [(start.score, counter, start)]
        while open_set:
            current = [heapq.heappop(open_set)[2] for _ in range(min(beam, len(open_set)))]
            last = len(current) - 1
            for k, node in enumerate(current):
                goal, generated = self.expand(node, beam)
                if goal is not None:
                    return goal
                taken = False if promising is None else promising(self, generated, level)
                if isinstance(taken, Node):
                    return taken
                if taken is False:
                    for child in generated:
                        counter += 1
                        heapq.heappush(open_set, (child.score, counter, child))
                if k < last:
                    emit(move_line(current[k + 1].id))
            if open_set:
                emit(move_line(open_set[0][2].id))
        emit(EXHAUSTED_LINE)
        return None


def root_node(nums: Sequence[int], target: int, score: Heuristic) -> Node:
    start = tuple(nums)
    return Node(ROOT_ID, start, None, score(start), None, format_nums(start), "[]")


# --- SoS+ ----------------------------------------------------------------------------------
@dataclass
class SosTrace:
    """A serialized search: one thread, `lines[:1]` is its prompt (the root's State line)."""

    lines: list[str]
    goal: Node | None
    root: Node

    @property
    def solved(self) -> bool:
        return self.goal is not None

    @cached_property
    def events(self) -> list[Event]:
        return _events(self.lines)


def sos_search(nums: Sequence[int], target: int, params: SearchParams,
               rng: random.Random) -> SosTrace:
    """SoS+: best-first beam search whose promising expansions dive depth-first in place."""
    score = heuristic(params.heuristic, target)
    root = root_node(nums, target, score)
    lines: list[str] = []
    search = _BeamSearch(target, score, rng, lines, path_start=root)

    def dive(search: _BeamSearch, nodes: list[Node], level: int) -> Node | None | bool:
        if rng.random() >= params.promising_threshold:
            return False
        for node in nodes:
            lines.extend(render_lines([DiveStart(level + 1, node.id)]))
            goal = search.run(node, params.beam_size, level + 1, dive)
            lines.extend(render_lines([DiveEnd(level + 1)]))
            if goal is not None:
                return goal
            lines.append(DIVE_FAILED_LINE)
        return None

    # A goal found inside dives is followed by its path, then the dives close, as in the paper.
    goal = search.run(root, params.beam_size, 0, dive)
    return SosTrace(lines, goal, root)


# --- APR -----------------------------------------------------------------------------------
@dataclass
class ChildThread:
    """One child search: its lines start with its prompt (`Moving to Node`, `Current State`)."""

    lines: list[str]
    goal: Node | None
    start: Node

    @cached_property
    def events(self) -> list[Event]:
        return _events(self.lines)

    def path(self, target: int) -> list[Event]:
        assert self.goal is not None
        return _events(path_lines(self.goal, self.start, target))


@dataclass
class Spawn:
    """A spawn point: `at` indexes the parent's lines (and `context`) where the join block was
    written."""

    at: int
    block_lines: list[str]
    join_lines: list[str]
    children: list[ChildThread]

    @cached_property
    def block(self) -> list[Event]:
        return _events(self.block_lines)

    @cached_property
    def join(self) -> list[Event]:
        return _events(self.join_lines)


@dataclass
class AprTrace:
    """A parent thread (its final context, prompt first) plus its spawns and their children.

    `lines` is the context as written, one line each; `context` reads it back as events.
    """

    lines: list[str]
    spawns: list[Spawn] = field(default_factory=list)
    goal: Node | None = None

    @property
    def solved(self) -> bool:
        return self.goal is not None

    @property
    def children(self) -> int:
        return sum(len(s.children) for s in self.spawns)

    @cached_property
    def context(self) -> list[Event]:
        return _events(self.lines)


PROMPT_EVENTS = 2  # a thread's prompt is its `Moving to Node` and `Current State` lines


def child_search(start: Node, target: int, params: SearchParams, score: Heuristic,
                 rng: random.Random) -> ChildThread:
    """A child thread: plain beam search (width `sub_beam_size`) from a spawned node."""
    lines = [move_line(start.id)]
    search = _BeamSearch(target, score, rng, lines, path_start=start)
    goal = search.run(start, params.sub_beam_size, 1, None)
    return ChildThread(lines, goal, start)


def apr_search(nums: Sequence[int], target: int, params: SearchParams,
               rng: random.Random) -> AprTrace:
    """APR: the same search, where a promising expansion of the parent spawns one child per
    generated node and joins their outcomes (paper, Section 3). Children do not spawn."""
    if params.sub_beam_size < 1:
        raise ValueError("APR needs sub_beam_size >= 1")
    score = heuristic(params.heuristic, target)
    root = root_node(nums, target, score)
    context = [move_line(root.id)]
    trace = AprTrace(context)
    search = _BeamSearch(target, score, rng, context, path_start=root)

    def spawn(search: _BeamSearch, nodes: list[Node], level: int) -> Node | None | bool:
        # Only the parent spawns: child searches get a callback that never does.
        if len(nodes) < 2 or rng.random() >= params.promising_threshold:
            return False
        children = [child_search(n, target, params, score, rng) for n in nodes]
        block = render_lines(
            [SpawnStart(), *(SpawnChild(i, 1, n.id) for i, n in enumerate(nodes)), SpawnEnd()])
        join = [JOIN_START_LINE]
        for i, child in enumerate(children):
            if child.goal is not None:
                join += render_lines([JoinGoal(i, 1, child.start.id)])
                join += path_lines(child.goal, child.start, target)
            else:
                join += render_lines([JoinNoSolution(i, 1, child.start.id)])
        join.append(JOIN_END_LINE)
        trace.spawns.append(Spawn(len(context), block, join, children))
        context.extend(join)
        for child in children:
            if child.goal is not None:
                context.append(goal_line(target, target))
                context.extend(path_lines(child.goal, root, target))
                return child.goal
        return None

    trace.goal = search.run(root, params.beam_size, 0, spawn)
    return trace
