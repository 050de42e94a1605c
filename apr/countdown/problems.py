"""Countdown problems: seeded generation, a recorded solution, dedup and disjoint splits.

Problem `i` of a stream is a pure function of (seed, i), so any number of worker processes
produces the same problems; the stream is then deduplicated in index order by `Problem.key`
(sorted numbers, target), and cut into val, test and train in that order, which keeps the
evaluation splits fixed whatever the train size.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from typing import Callable

from apr.config import InputError
from apr.countdown.search import combinations
from apr.countdown.trace import Operation, operation, parse_operation

SPLITS = ("val", "test", "train")  # the order in which the deduplicated stream is cut


@dataclass(frozen=True, slots=True)
class Problem:
    id: str
    nums: tuple[int, ...]
    target: int
    solution: tuple[Operation, ...]  # one solution, as found by the generator

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        return tuple(sorted(self.nums)), self.target

    def to_json(self) -> dict:
        return {"id": self.id, "nums": list(self.nums), "target": self.target,
                "solution": [str(op) for op in self.solution]}

    @classmethod
    def from_json(cls, record: dict) -> Problem:
        """The inverse of `to_json`; KeyError, TypeError or ValueError when `record` is not
        one of its outputs."""
        solution = tuple(parse_operation(text) for text in record["solution"])
        if None in solution:
            raise ValueError(f"not a solution: {record['solution']!r}")
        if not re.fullmatch(r"p[0-9]+", record["id"]):  # the stream index is in it
            raise ValueError(f"not a problem id: {record['id']!r}")
        return cls(record["id"], tuple(int(n) for n in record["nums"]),
                   int(record["target"]), solution)


def find_solution(nums: tuple[int, ...], target: int) -> tuple[Operation, ...] | None:
    """Depth-first search for a way to reach `target` using every number once."""
    if len(nums) == 2:
        for symbol, left, right, value in combinations(nums[0], nums[1]):
            if value == target:
                return (operation(left, symbol, right, value),)
        return None
    n = len(nums)
    for i in range(n - 1):
        for j in range(i + 1, n):
            rest = nums[:i] + nums[i + 1:j] + nums[j + 1:]
            for symbol, left, right, value in combinations(nums[i], nums[j]):
                found = find_solution(rest + (value,), target)
                if found is not None:
                    return (operation(left, symbol, right, value),) + found
    return None


def _results(x: int, y: int) -> tuple[int, ...]:
    """The values one operation on x and y can give (the `combinations` rules)."""
    big, small = (y, x) if x <= y else (x, y)
    if small and big % small == 0:
        return big + small, big * small, big - small, big // small
    return big + small, big * small, big - small


@lru_cache(maxsize=1 << 15)
def reachable(nums: tuple[int, ...]) -> frozenset[int]:
    """Every value an expression over all of `nums` (sorted) can take.

    Combining numbers pairwise until one is left builds a binary expression tree, so the
    values are those of (left part) op (right part) over every split of the numbers.
    """
    if len(nums) == 1:
        return frozenset(nums)
    if len(nums) == 2:
        return frozenset(_results(*nums))
    values: set[int] = set()
    for left, right in _splits(nums):
        for x in reachable(left):
            for y in reachable(right):
                values.update(_results(x, y))
    return frozenset(values)


@lru_cache(maxsize=None)
def _split_indices(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Unordered splits of n positions into two non-empty parts (position 0 goes left)."""
    out = []
    for mask in range((1 << (n - 1)) - 1):
        left = (0,) + tuple(k + 1 for k in range(n - 1) if mask >> k & 1)
        right = tuple(k + 1 for k in range(n - 1) if not mask >> k & 1)
        out.append((left, right))
    return tuple(out)


@lru_cache(maxsize=None)
def _split_getters(n: int) -> tuple[tuple[Callable, Callable], ...]:
    """`_split_indices(n)` as functions that cut a tuple (itemgetter: the draw's hot path)."""
    def getter(indices: tuple[int, ...]) -> Callable:
        if len(indices) == 1:
            return lambda nums, i=indices[0]: (nums[i],)
        return itemgetter(*indices)
    return tuple((getter(left), getter(right)) for left, right in _split_indices(n))


def _splits(nums: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(left(nums), right(nums)) for left, right in _split_getters(len(nums))]


def solvable(nums: tuple[int, ...], target: int) -> bool:
    """Whether `target` is reachable: `reachable` on both parts, the last operation inverted.

    Several times faster than `find_solution` on the unsolvable draws that dominate generation.
    """
    ordered = tuple(sorted(nums))
    if len(ordered) == 1:
        return ordered[0] == target
    for left, right in _splits(ordered):
        big, small = (left, right) if len(left) >= len(right) else (right, left)
        others = reachable(big)
        for x in reachable(small):
            # Is there a y in `others` with x op y == target? Each operation inverted, inline
            # (this loop is most of the draw's time): x+y, x-y, y-x; then, as division by x
            # or into a zero result is not a move of the game, y/x, x*y and x/y.
            if target - x in others or x - target in others or x + target in others:
                return True
            if x and (x * target in others
                      or (target % x == 0 and target // x in others)
                      or (target and x % target == 0 and x // target in others)):
                return True
    return False


@dataclass(frozen=True)
class ProblemSpace:
    """What a problem may look like (the paper: 4 numbers in 1..99, targets 10..100)."""

    n_numbers: int = 4
    num_min: int = 1
    num_max: int = 99
    target_min: int = 10
    target_max: int = 100


MAX_DRAWS = 100_000  # about 7.6 draws are needed per problem in the paper's space


class NoSolvableProblem(InputError):
    """The configured space has (almost) no solvable problem for a drawn target."""


def candidate(space: ProblemSpace, seed: int, index: int) -> Problem:
    """Stream element `index`: a uniform target, then uniform numbers until solvable."""
    rng = random.Random(f"countdown:{seed}:{index}")
    target = rng.randint(space.target_min, space.target_max)
    for _ in range(MAX_DRAWS):
        nums = tuple(rng.randint(space.num_min, space.num_max) for _ in range(space.n_numbers))
        if solvable(nums, target):
            solution = find_solution(nums, target)
            assert solution is not None
            return Problem(f"p{index:08d}", nums, target, solution)
    raise NoSolvableProblem(
        f"no solvable problem for target {target} in {MAX_DRAWS} draws of {space.n_numbers} "
        f"numbers in {space.num_min}..{space.num_max}: widen the number or target range")


def candidates(space: ProblemSpace, seed: int, start: int, stop: int) -> list[Problem]:
    """A chunk of the stream (the unit of work a worker process gets)."""
    return [candidate(space, seed, i) for i in range(start, stop)]
