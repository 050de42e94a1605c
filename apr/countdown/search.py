"""Symbolic solvers that write SoS+ and APR traces: the paper's hybrid search, written fresh.

Both are a beam-pruned best-first search over Countdown states that shares one `successors()`.
When an expansion is judged promising, SoS+ dives depth-first into each generated node inside
the same trace, while APR spawns one child thread per generated node (each with its own beam)
and joins their outcomes back into the parent. Searches emit trace events; rendering them to
text is `trace.render`. The random generator is passed in, so a seed fixes every trace.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter, itemgetter
from typing import Callable, Sequence

from apr.countdown.trace import (
    DeadEnd, DiveEnd, DiveFailed, DiveStart, Event, Exhausted, Explore, Generated, Goal,
    JoinEnd, JoinGoal, JoinNoSolution, JoinStart, Move, Nums, Operation, SpawnChild, SpawnEnd,
    SpawnStart, State,
)

ROOT_ID = "0"
HEURISTICS = ("mult", "sum")


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
    """A search state: its id in the trace (`0,2,1`), numbers, operations so far, parent."""

    __slots__ = ("id", "nums", "operations", "parent", "score")

    def __init__(self, id: str, nums: Nums, operations: tuple[Operation, ...],
                 parent: Node | None, score: float):
        self.id = id
        self.nums = nums
        self.operations = operations
        self.parent = parent
        self.score = score


def path_events(goal: Node, start: Node, target: int) -> list[Event]:
    """The solution path from `start` to `goal`, as the trace writes it after `Goal Reached`."""
    chain = [goal]
    while chain[-1] is not start:
        parent = chain[-1].parent
        if parent is None:
            raise ValueError("goal is not a descendant of start")
        chain.append(parent)
    chain.reverse()
    events: list[Event] = [Move(start.id)]
    for node, nxt in zip(chain, chain[1:]):
        op = nxt.operations[-1]
        events.append(State(target, node.nums, node.operations))
        events.append(Explore(op, nxt.nums))
        if nxt is goal:
            events.append(Goal(nxt.nums[0], target))
        else:
            events.append(Generated(nxt.id, target, nxt.nums, op))
            events.append(Move(nxt.id))
    return events


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
    """The shared search loop; `promising` decides what happens to a promising expansion.

    `promising(search, nodes, level)` returns the goal it found, or None after it has taken
    the nodes (dived or spawned), or False to have them pushed on the open set as usual.
    """

    def __init__(self, target: int, score: Heuristic, rng: random.Random, events: list[Event],
                 path_start: Node):
        self.target = target
        self.score = score
        self.rng = rng
        self.events = events
        self.path_start = path_start  # a found goal's path is written from this node

    def expand(self, node: Node, beam: int) -> tuple[Node | None, list[Node]]:
        """Write one expansion; return a goal if one was generated, else the new open nodes."""
        target, emit = self.target, self.events.append
        parent_nums, operations = node.nums, node.operations
        emit(State(target, parent_nums, operations))
        candidates = successors(parent_nums, self.score)
        candidates.sort(key=_by_score)  # stable: ties keep generation order
        kept = candidates[:beam]
        shuffle(kept, self.rng)  # so the first child explored is not always the best-scored
        generated: list[Node] = []
        prefix = node.id + ","
        last_step = len(parent_nums) == 2  # every result is a single number: an outcome line
        for score, symbol, left, right, value, i, j in kept:
            op = Operation(left, symbol, right, value, f"{left}{symbol}{right}={value}")
            if last_step:
                nums = (value,)
                emit(Explore(op, nums))
                if value != target:
                    emit(DeadEnd(value, target))
                    continue
                goal = Node(prefix + str(len(generated)), nums, operations + (op,), node, score)
                emit(Goal(target, target))
                self.events.extend(path_events(goal, self.path_start, target))
                return goal, []
            nums = parent_nums[:i] + parent_nums[i + 1:j] + parent_nums[j + 1:] + (value,)
            emit(Explore(op, nums))
            child = Node(prefix + str(len(generated)), nums, operations + (op,), node, score)
            emit(Generated(child.id, target, nums, op))
            generated.append(child)
        generated.sort(key=_node_score)
        return None, generated

    def run(self, start: Node, beam: int, level: int,
            promising: Callable[[_BeamSearch, list[Node], int], Node | None | bool]) -> Node | None:
        counter = 0
        open_set: list[tuple[float, int, Node]] = [(start.score, counter, start)]
        while open_set:
            current = [heapq.heappop(open_set)[2] for _ in range(min(beam, len(open_set)))]
            for k, node in enumerate(current):
                goal, generated = self.expand(node, beam)
                if goal is not None:
                    return goal
                taken = promising(self, generated, level)
                if isinstance(taken, Node):
                    return taken
                if taken is False:
                    for child in generated:
                        counter += 1
                        heapq.heappush(open_set, (child.score, counter, child))
                if k < len(current) - 1:
                    self.events.append(Move(current[k + 1].id))
            if open_set:
                self.events.append(Move(open_set[0][2].id))
        self.events.append(Exhausted())
        return None


def root_node(nums: Sequence[int], target: int, score: Heuristic) -> Node:
    start = tuple(nums)
    return Node(ROOT_ID, start, (), None, score(start))


# --- SoS+ ----------------------------------------------------------------------------------
@dataclass
class SosTrace:
    """A serialized search: one thread, `events[:1]` is its prompt (the root's State line)."""

    events: list[Event]
    goal: Node | None
    root: Node

    @property
    def solved(self) -> bool:
        return self.goal is not None


def sos_search(nums: Sequence[int], target: int, params: SearchParams,
               rng: random.Random) -> SosTrace:
    """SoS+: best-first beam search whose promising expansions dive depth-first in place."""
    score = heuristic(params.heuristic, target)
    root = root_node(nums, target, score)
    events: list[Event] = []
    search = _BeamSearch(target, score, rng, events, path_start=root)

    def dive(search: _BeamSearch, nodes: list[Node], level: int) -> Node | None | bool:
        if rng.random() >= params.promising_threshold:
            return False
        for node in nodes:
            events.append(DiveStart(level + 1, node.id))
            goal = search.run(node, params.beam_size, level + 1, dive)
            events.append(DiveEnd(level + 1))
            if goal is not None:
                return goal
            events.append(DiveFailed())
        return None

    # A goal found inside dives is followed by its path, then the dives close, as in the paper.
    goal = search.run(root, params.beam_size, 0, dive)
    return SosTrace(events, goal, root)


# --- APR -----------------------------------------------------------------------------------
@dataclass
class ChildThread:
    """One child search: its events start with its prompt (`Moving to Node`, `Current State`)."""

    events: list[Event]
    goal: Node | None
    start: Node

    def path(self, target: int) -> list[Event]:
        assert self.goal is not None
        return path_events(self.goal, self.start, target)


@dataclass
class Spawn:
    """A spawn point: `at` indexes the parent context where the join block was written."""

    at: int
    block: list[Event]
    join: list[Event]
    children: list[ChildThread]


@dataclass
class AprTrace:
    """A parent thread (its final context, prompt first) plus its spawns and their children."""

    context: list[Event]
    spawns: list[Spawn] = field(default_factory=list)
    goal: Node | None = None

    @property
    def solved(self) -> bool:
        return self.goal is not None

    @property
    def children(self) -> int:
        return sum(len(s.children) for s in self.spawns)


PROMPT_EVENTS = 2  # a thread's prompt is its `Moving to Node` and `Current State` lines


def child_search(start: Node, target: int, params: SearchParams, score: Heuristic,
                 rng: random.Random) -> ChildThread:
    """A child thread: plain beam search (width `sub_beam_size`) from a spawned node."""
    events: list[Event] = [Move(start.id)]
    search = _BeamSearch(target, score, rng, events, path_start=start)
    goal = search.run(start, params.sub_beam_size, 1, lambda *_: False)
    return ChildThread(events, goal, start)


def apr_search(nums: Sequence[int], target: int, params: SearchParams,
               rng: random.Random) -> AprTrace:
    """APR: the same search, where a promising expansion of the parent spawns one child per
    generated node and joins their outcomes (paper, Section 3). Children do not spawn."""
    if params.sub_beam_size < 1:
        raise ValueError("APR needs sub_beam_size >= 1")
    score = heuristic(params.heuristic, target)
    root = root_node(nums, target, score)
    context: list[Event] = [Move(root.id)]
    trace = AprTrace(context)
    search = _BeamSearch(target, score, rng, context, path_start=root)

    def spawn(search: _BeamSearch, nodes: list[Node], level: int) -> Node | None | bool:
        # Only the parent spawns: child searches get a callback that never does.
        if len(nodes) < 2 or rng.random() >= params.promising_threshold:
            return False
        children = [child_search(n, target, params, score, rng) for n in nodes]
        block: list[Event] = [SpawnStart()]
        block += [SpawnChild(i, 1, n.id) for i, n in enumerate(nodes)]
        block.append(SpawnEnd())
        join: list[Event] = [JoinStart()]
        for i, child in enumerate(children):
            if child.goal is not None:
                join.append(JoinGoal(i, 1, child.start.id))
                join += child.path(target)
            else:
                join.append(JoinNoSolution(i, 1, child.start.id))
        join.append(JoinEnd())
        trace.spawns.append(Spawn(len(context), block, join, children))
        context.extend(join)
        for child in children:
            if child.goal is not None:
                context.append(Goal(target, target))
                context.extend(path_events(child.goal, root, target))
                return child.goal
        return None

    trace.goal = search.run(root, params.beam_size, 0, spawn)
    return trace
