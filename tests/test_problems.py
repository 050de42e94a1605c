"""Seeded problems: solvable, in range, a pure function of (seed, index), chunks compose."""

from __future__ import annotations

import pytest
from conftest import problems
from hypothesis import given
from hypothesis import strategies as st

from apr.countdown.problems import (
    Problem,
    ProblemSpace,
    candidate,
    candidates,
    find_solution,
    reachable,
    solvable,
)
from apr.countdown.trace import operation, verify

COUNTS = {2: 40, 3: 40, 4: 40, 5: 6, 6: 3}  # five and six numbers are slower to generate


def check_problem(p: Problem, space: ProblemSpace) -> None:
    assert len(p.nums) == space.n_numbers
    assert all(space.num_min <= n <= space.num_max for n in p.nums)
    assert space.target_min <= p.target <= space.target_max
    assert verify(p.nums, p.target, p.solution) == (True, "ok"), p
    assert len(p.solution) == space.n_numbers - 1


def test_default_candidates_are_solvable_and_in_range():
    space = ProblemSpace()
    for p in problems(11, 300):
        check_problem(p, space)


@pytest.mark.parametrize("n", sorted(COUNTS))
def test_every_size_of_problem(n):
    space = ProblemSpace(n_numbers=n)
    for p in candidates(space, 5, 0, COUNTS[n]):
        check_problem(p, space)


def test_custom_ranges_are_respected():
    space = ProblemSpace(n_numbers=3, num_min=5, num_max=20, target_min=30, target_max=40)
    ps = candidates(space, 2, 0, 60)
    for p in ps:
        check_problem(p, space)
    assert len({p.target for p in ps}) >= 8  # 11 targets possible


def test_candidate_is_a_pure_function_of_seed_and_index():
    space = ProblemSpace()
    assert candidate(space, 3, 17) == candidate(space, 3, 17)
    assert candidate(space, 3, 17).id == "p00000017"
    assert candidates(space, 3, 0, 10) == candidates(space, 3, 0, 5) + candidates(space, 3, 5, 10)
    assert candidates(space, 3, 4, 9) == [candidate(space, 3, i) for i in range(4, 9)]
    assert candidates(space, 3, 0, 10) != candidates(space, 4, 0, 10)
    assert candidates(space, 3, 7, 7) == []


def test_streams_vary():
    ps = problems(11, 300)
    assert len({p.key for p in ps}) > 290
    assert len({p.target for p in ps}) > 60


def test_problem_key_and_json():
    op = operation(3, "*", 4, 12)
    p = Problem("p00000001", (4, 3), 12, (op,))
    assert p.key == ((3, 4), 12)
    assert p.to_json() == {"id": "p00000001", "nums": [4, 3], "target": 12,
                           "solution": ["3*4=12"]}


def test_find_solution():
    assert find_solution((1, 1), 100) is None
    assert find_solution((2, 3), 7) is None
    assert find_solution((1, 1, 1), 50) is None
    for nums, target in [((2, 3), 6), ((2, 3, 4), 24), ((75, 3, 1, 25), 100), ((9, 3), 3),
                         ((7, 7), 0), ((12, 4, 2), 1)]:
        solution = find_solution(nums, target)
        assert solution is not None, (nums, target)
        assert verify(nums, target, solution).ok, (nums, target, solution)


# --- the fast solvability check agrees with the depth-first search -------------------------
def brute_reachable(nums: tuple[int, ...]) -> set[int]:
    """Every value reachable by combining pairs until one number is left (the game's moves)."""
    from apr.countdown.search import combinations

    if len(nums) == 1:
        return {nums[0]}
    out: set[int] = set()
    for i in range(len(nums)):
        for j in range(i + 1, len(nums)):
            rest = nums[:i] + nums[i + 1:j] + nums[j + 1:]
            for _, _, _, value in combinations(nums[i], nums[j]):
                out |= brute_reachable(rest + (value,))
    return out


small_nums = st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=4).map(
    lambda xs: tuple(sorted(xs)))


@given(small_nums)
def test_reachable_is_every_value_of_an_expression(nums):
    assert reachable(nums) == brute_reachable(nums)


@given(small_nums.filter(lambda xs: len(xs) >= 2), st.integers(min_value=0, max_value=80))
def test_solvable_agrees_with_find_solution(nums, target):
    assert solvable(nums, target) == (find_solution(nums, target) is not None)
    assert solvable(tuple(reversed(nums)), target) == solvable(nums, target)


def test_solvable_on_realistic_draws():
    import random

    rng = random.Random(0)
    solved = 0
    for _ in range(400):
        n = rng.choice([2, 3, 4, 4, 4])
        nums = tuple(rng.randint(1, 99) for _ in range(n))
        target = rng.randint(10, 100)
        found = find_solution(nums, target)
        assert solvable(nums, target) == (found is not None), (nums, target)
        solved += found is not None
    assert 20 < solved < 380  # both outcomes are exercised
