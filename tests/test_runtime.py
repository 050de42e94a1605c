"""The APR runtime against the solver (oracle engine), malformed output, budgets, voting."""

from __future__ import annotations

import asyncio
import random

import pytest

from apr.countdown.problems import ProblemSpace, candidates
from apr.countdown.search import apr_search, sos_search
from apr.countdown.threads import apr_threads, sos_threads
from apr.decode.engine import LENGTH, STOP, Completion, Sampling
from apr.decode.oracle import OracleEngine
from apr.decode.runtime import (
    ROLE,
    Budgets,
    Solve,
    Vote,
    child_outcome,
    root_prompt,
    solve_apr,
    solve_sos,
    spawned_children,
)
from apr.stages.datagen import AprSolverConfig, SosSolverConfig
from apr.tokenizer import count_tokens

UNLIMITED = Budgets(context=1 << 20)


def records(n: int = 200, seed: int = 21) -> list[dict]:
    """APR and SoS+ records like datagen's, for n seeded problems."""
    out = []
    for p in candidates(ProblemSpace(), seed, 0, n):
        rng = random.Random(f"rt:{p.id}")
        apr = apr_search(p.nums, p.target, AprSolverConfig().draw(rng), rng)
        sos = sos_search(p.nums, p.target, SosSolverConfig().draw(rng), rng)
        out.append({"id": p.id, "nums": list(p.nums), "target": p.target, "solved": apr.solved,
                    "children": apr.children, "threads": [t.to_json() for t in apr_threads(apr)],
                    "kind": "apr"})
        out.append({"id": p.id, "nums": list(p.nums), "target": p.target, "solved": sos.solved,
                    "threads": [t.to_json() for t in sos_threads(sos)], "kind": "sos"})
    return out


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return records()


def run(coro):
    return asyncio.run(coro)


@pytest.mark.slow
def test_oracle_runtime_rebuilds_every_apr_thread_of_the_solver(corpus):
    engine = OracleEngine(corpus)
    apr = [r for r in corpus if r["kind"] == "apr"]

    async def all_solves():
        return await asyncio.gather(*(solve_apr(engine, r["nums"], r["target"], UNLIMITED)
                                      for r in apr))

    solves = run(all_solves())
    for record, solve in zip(apr, solves):
        built = [(t.role, t.prompt, t.text + ("\n" if t.text.endswith(">") else "")) for t in solve.threads]
        want = [(t["role"], t["prompt"], t["text"]) for t in record["threads"]]
        assert built == want, record["id"]
        assert solve.children == record["children"]
        assert solve.correct == record["solved"]
    accuracy = sum(s.correct for s in solves) / len(solves)
    assert accuracy == sum(r["solved"] for r in apr) / len(apr)


@pytest.mark.slow
def test_oracle_runtime_rebuilds_sos_traces(corpus):
    engine = OracleEngine(corpus)
    sos = [r for r in corpus if r["kind"] == "sos"]
    for r in sos:
        solve = run(solve_sos(engine, r["nums"], r["target"], UNLIMITED))
        assert solve.final_text == r["threads"][0]["prompt"] + r["threads"][0]["text"]
        assert solve.correct == r["solved"]


def test_children_of_one_spawn_go_to_the_engine_in_one_call(corpus):
    calls = []

    class Recording(OracleEngine):
        async def generate(self, prompts, sampling):
            calls.append(len(prompts))
            return await super().generate(prompts, sampling)

    engine = Recording(corpus)
    r = next(r for r in corpus if r["kind"] == "apr" and r["children"] >= 3)
    solve = run(solve_apr(engine, r["nums"], r["target"], UNLIMITED))
    spawns = sum(1 for t in r["threads"] if t["role"] == "parent") - 1
    assert solve.engine_calls == len(calls) == 2 * spawns + 1
    # parent calls carry one prompt; each spawn's call carries exactly its children
    assert sum(calls) - (spawns + 1) == solve.children
    assert max(calls) > 1


def test_critical_path_is_parent_plus_longest_child(corpus):
    r = next(r for r in corpus if r["kind"] == "apr" and r["children"] >= 3)
    solve = run(solve_apr(OracleEngine(corpus), r["nums"], r["target"], UNLIMITED))
    parents = [t.completion_tokens for t in solve.threads if t.role == "parent"]
    longest = {}
    for t in solve.threads:
        if t.role == "child":
            longest[t.spawn] = max(longest.get(t.spawn, 0), t.completion_tokens)
    assert solve.tokens_sequential == sum(parents) + sum(longest.values())
    assert solve.tokens_generated == sum(t.completion_tokens for t in solve.threads)
    assert solve.tokens_sequential < solve.tokens_generated
    assert solve.longest_context == max(t.prompt_tokens + t.completion_tokens for t in solve.threads)


def test_context_window_cuts_threads_and_is_counted(corpus):
    engine = OracleEngine(corpus)
    r = next(r for r in corpus if r["kind"] == "sos" and len(r["threads"][0]["text"]) > 3000)
    solve = run(solve_sos(engine, r["nums"], r["target"], Budgets(context=256)))
    assert solve.threads[0].finish_reason == LENGTH
    assert solve.longest_context <= 256
    assert solve.failure == "context_exhausted" and not solve.correct


# --- budgets: which limit cut a solve, and the total-token budget over parent and children --
class Limits(OracleEngine):
    """The oracle, keeping each call's role and token limit."""

    def __init__(self, records):
        super().__init__(records)
        self.calls = []

    async def generate(self, prompts, sampling):
        self.calls.append((ROLE.get(), len(prompts), sampling.max_new_tokens))
        return await super().generate(prompts, sampling)


def spawning(corpus, spawns: int = 1) -> dict:
    """An APR record whose parent spawns at least `spawns` times, the first with 2+ children."""
    return next(r for r in corpus if r["kind"] == "apr"
                and sum(t["role"] == "parent" for t in r["threads"]) > spawns
                and sum(t["role"] == "child" and t["spawn"] == 0 for t in r["threads"]) >= 2)


def first_spawn(corpus, r) -> tuple[Solve, int, int]:
    """The unlimited solve of `r`, the tokens spent when its first spawn's children start
    (the parent's call and their prompts) and the most any of those children writes."""
    solve = run(solve_apr(OracleEngine(corpus), r["nums"], r["target"], UNLIMITED))
    parent, children = solve.threads[0], [t for t in solve.threads if t.role == "child"
                                          and t.spawn == 0]
    spent = parent.prompt_tokens + parent.completion_tokens + sum(
        t.prompt_tokens - 1 for t in children)
    return solve, spent, max(t.completion_tokens for t in children)


@pytest.mark.parametrize("solver", [solve_apr, solve_sos])
def test_a_prompt_that_fills_the_context_window_is_context_exhausted(solver, corpus):
    r = next(r for r in corpus if r["kind"] == "apr")
    engine = Limits(corpus)
    solve = run(solver(engine, r["nums"], r["target"], Budgets(context=10)))
    assert solve.failure == "context_exhausted" and not solve.correct
    assert engine.calls == [] and solve.engine_calls == 0


@pytest.mark.parametrize("solver", [solve_apr, solve_sos])
def test_a_spent_total_budget_is_budget_exhausted(solver, corpus):
    r = next(r for r in corpus if r["kind"] == "apr")
    engine = Limits(corpus)
    solve = run(solver(engine, r["nums"], r["target"], Budgets(context=1 << 20, total_tokens=10)))
    assert solve.failure == "budget_exhausted" and not solve.correct
    assert engine.calls == []


@pytest.mark.parametrize("kind", ["apr", "sos"])
def test_a_parent_cut_by_the_total_budget_is_budget_exhausted_not_context(kind, corpus):
    r = next(r for r in corpus if r["kind"] == kind and len(r["threads"][0]["text"]) > 1000)
    solver = solve_apr if kind == "apr" else solve_sos
    first = run(solver(OracleEngine(corpus), r["nums"], r["target"], UNLIMITED)
                ).threads[0].prompt_tokens
    engine = Limits(corpus)
    solve = run(solver(engine, r["nums"], r["target"],
                       Budgets(context=1 << 20, total_tokens=first + 20)))
    assert engine.calls == [("parent", 1, 20)]
    assert solve.threads[0].finish_reason == LENGTH and solve.tokens_total == first + 20
    assert solve.failure == "budget_exhausted" and not solve.correct


def test_apr_parent_resuming_with_no_budget_left_is_budget_exhausted(corpus):
    r = spawning(corpus, spawns=2)  # the first join does not end the solve
    unlimited, spent, _ = first_spawn(corpus, r)
    children = sum(t.completion_tokens for t in unlimited.threads
                   if t.role == "child" and t.spawn == 0)
    engine = Limits(corpus)
    budget = spent + children  # every child of the first spawn runs to its end, then the join
    solve = run(solve_apr(engine, r["nums"], r["target"],
                          Budgets(context=1 << 20, total_tokens=budget)))
    assert [role for role, _, _ in engine.calls] == ["parent", "child"]
    assert all(t.finish_reason == STOP for t in solve.threads)  # nothing cut: the join overran
    assert solve.tokens_total > budget
    assert solve.failure == "budget_exhausted" and not solve.correct


def test_children_write_at_most_what_the_total_budget_leaves(corpus):
    r = spawning(corpus)
    _, spent, longest = first_spawn(corpus, r)
    engine = Limits(corpus)
    solve = run(solve_apr(engine, r["nums"], r["target"],
                          Budgets(context=1 << 20, total_tokens=spent + 5)))
    assert longest > 5
    assert engine.calls[1][0] == "child" and engine.calls[1][2] == 5
    assert all(t.completion_tokens <= 5 for t in solve.threads if t.role == "child")
    assert len(engine.calls) == 2 and solve.failure == "budget_exhausted"


def test_no_spawn_is_run_once_the_total_budget_is_spent(corpus):
    r = spawning(corpus)
    unlimited, spent, _ = first_spawn(corpus, r)
    parent = unlimited.threads[0]
    engine = Limits(corpus)
    solve = run(solve_apr(engine, r["nums"], r["target"], Budgets(
        context=1 << 20, total_tokens=parent.prompt_tokens + parent.completion_tokens)))
    assert solve.threads[0].text == parent.text  # the parent wrote its spawn block in full
    assert engine.calls == [("parent", 1, parent.completion_tokens)]
    assert solve.children == 0 and solve.failure == "budget_exhausted"


def test_a_parent_cut_while_writing_out_its_path_claims_nothing(corpus):
    r = next(r for r in corpus if r["kind"] == "apr" and r["solved"] and r["children"])
    unlimited = run(solve_apr(OracleEngine(corpus), r["nums"], r["target"], UNLIMITED))
    last = unlimited.threads[-1]
    goal = last.text.index("Goal Reached\n") + len("Goal Reached\nMoving to Node #0\n")
    budget = unlimited.tokens_total - last.completion_tokens + count_tokens(last.text[:goal])
    solve = run(solve_apr(OracleEngine(corpus), r["nums"], r["target"],
                          Budgets(context=1 << 20, total_tokens=budget)))
    assert solve.threads[-1].finish_reason == LENGTH
    assert solve.threads[-1].text == last.text[:goal]
    assert solve.failure == "budget_exhausted" and solve.solution is None


class Scripted:
    """An engine that answers prompts from a list of texts, in order (for malformed cases)."""

    def __init__(self, texts):
        self.texts = list(texts)

    async def generate(self, prompts, sampling: Sampling):
        out = []
        for _ in prompts:
            text = self.texts.pop(0)
            matched = next((s for s in sampling.stop if text.endswith(s)), None)
            out.append(Completion(text, STOP, matched, 10, max(1, len(text) // 3)))
        return out

    async def ready(self):
        return True

    async def close(self):
        pass


PARENT = ("Exploring Operation: 3+4=7, Resulting Numbers: [1, 2, 7]\n"
          "Generated Node #0,0: 24:[1, 2, 7] Operation: 3+4=7\n"
          "Exploring Operation: 1*2=2, Resulting Numbers: [3, 4, 2]\n"
          "Generated Node #0,1: 24:[3, 4, 2] Operation: 1*2=2\n")


@pytest.mark.parametrize("text, kind", [
    (PARENT + "Exploring Operation: 3+4=", "malformed_output"),  # cut mid-line, then spawn
    (PARENT + "<Calling Sub Searches>\n<End Calling Sub Searches>", "empty_spawn"),
])
def test_malformed_spawns_fail_the_problem_cleanly(text, kind):
    if kind == "malformed_output":
        text = PARENT + "Exploring Operation: 3+4=\n<Calling Sub Searches>\n" \
            "<Start Sub Search 0 at level 1> Moving to Node #0,0\n<End Calling Sub Searches>"
    solve = run(solve_apr(Scripted([text]), [1, 2, 3, 4], 24))
    assert solve.failure == kind and not solve.correct


def test_model_claims_of_success_are_not_trusted():
    wrong = ("Exploring Operation: 3*4=12, Resulting Numbers: [1, 2, 12]\n"
             "Generated Node #0,0: 24:[1, 2, 12] Operation: 3*4=12\n"
             "24,24 equal: Goal Reached\nMoving to Node #0\n"
             "Current State: 24:[1, 2, 3, 4], Operations: []\n"
             "Exploring Operation: 3*4=12, Resulting Numbers: [1, 2, 12]\n"
             "Generated Node #0,0: 24:[1, 2, 12] Operation: 3*4=12\nMoving to Node #0,0\n"
             "Current State: 24:[1, 2, 12], Operations: ['3*4=12']\n"
             "Exploring Operation: 12*2=24, Resulting Numbers: [1, 24]\n24,24 equal: Goal Reached\n")
    solve = run(solve_apr(Scripted([wrong]), [1, 2, 3, 4], 24))
    assert solve.solution == ["3*4=12", "12*2=24"]
    assert not solve.correct and solve.failure.startswith("wrong_solution:wrong_target")


class Capture(Scripted):
    """A scripted engine that also keeps the prompts of every call."""

    def __init__(self, texts):
        super().__init__(texts)
        self.seen = []

    async def generate(self, prompts, sampling):
        self.seen.append(list(prompts))
        return await super().generate(prompts, sampling)


def test_a_malformed_child_joins_as_no_solution():
    spawn = PARENT + ("<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n"
                      "<Start Sub Search 1 at level 1> Moving to Node #0,1\n<End Calling Sub Searches>")
    engine = Capture([spawn, "garbage\n", "Exploring Operation: 7", "No solution found.\n"])
    solve = run(solve_apr(engine, [1, 2, 3, 4], 24))
    seen = engine.seen
    assert seen[1] == ["Moving to Node #0,0\nCurrent State: 24:[1, 2, 7], Operations: ['3+4=7']\n",
                       "Moving to Node #0,1\nCurrent State: 24:[3, 4, 2], Operations: ['1*2=2']\n"]
    assert "<No Solution in Sub Search 0 at level 1 at Node #0,0>\n" in seen[2][0]
    assert "<No Solution in Sub Search 1 at level 1 at Node #0,1>\n<End Sub Searches>\n" in seen[2][0]
    assert solve.children == 2 and solve.failure == "no_solution"


def test_a_node_the_parent_never_generated_joins_as_no_solution_and_the_parent_goes_on():
    spawn = PARENT + ("<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,7\n"
                      "<Start Sub Search 1 at level 1> Moving to Node #0,1\n<End Calling Sub Searches>")
    engine = Capture([spawn, "No solution found.\n", "No solution found.\n"])
    solve = run(solve_apr(engine, [1, 2, 3, 4], 24))
    assert engine.seen[1] == ["Moving to Node #0,1\nCurrent State: 24:[3, 4, 2], "
                              "Operations: ['1*2=2']\n"]  # only the node that exists runs
    assert "<No Solution in Sub Search 0 at level 1 at Node #0,7>\n" in engine.seen[2][0]
    assert solve.children == 1 and solve.failure == "no_solution"


def test_a_child_runs_from_the_node_as_written_and_the_verifier_judges_its_path():
    # 4+5=9 leaves [15, 9]; the parent wrote [16, 8], and its child reaches 24 from there
    parent = ("Exploring Operation: 4+5=9, Resulting Numbers: [15, 9]\n"
              "Generated Node #0,0: 24:[16, 8] Operation: 4+5=9\n<Calling Sub Searches>\n"
              "<Start Sub Search 0 at level 1> Moving to Node #0,0\n<End Calling Sub Searches>")
    reach = ("Exploring Operation: 16+8=24, Resulting Numbers: [24]\n"
             "24,24 equal: Goal Reached\n")
    child = reach + ("Moving to Node #0,0\nCurrent State: 24:[16, 8], Operations: ['4+5=9']\n"
                     + reach)
    final = reach + ("Moving to Node #0\nCurrent State: 24:[15, 4, 5], Operations: []\n"
                     "Exploring Operation: 4+5=9, Resulting Numbers: [15, 9]\n"
                     "Generated Node #0,0: 24:[16, 8] Operation: 4+5=9\n"
                     "Moving to Node #0,0\nCurrent State: 24:[16, 8], Operations: ['4+5=9']\n"
                     + reach)
    engine = Capture([parent, child, final])
    solve = run(solve_apr(engine, [15, 4, 5], 24))
    assert engine.seen[1] == ["Moving to Node #0,0\nCurrent State: 24:[16, 8], "
                              "Operations: ['4+5=9']\n"]
    assert "<Goal Reached in Sub Search 0 at level 1 at Node #0,0>\n" in engine.seen[2][0]
    assert solve.children == 1 and solve.solution == ["4+5=9", "16+8=24"]
    assert not solve.correct and solve.failure.startswith("wrong_solution:")


def test_children_per_spawn_budget_runs_only_the_first_children():
    spawn = PARENT + ("<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,0\n"
                      "<Start Sub Search 1 at level 1> Moving to Node #0,1\n<End Calling Sub Searches>")
    engine = Scripted([spawn, "No solution found.\n", "No solution found.\n"])
    solve = run(solve_apr(engine, [1, 2, 3, 4], 24, Budgets(children_per_spawn=1)))
    assert solve.children == 1


def test_sub_call_budget_prefix_starts_the_parent_prompt():
    assert root_prompt([1, 2], 10, Budgets(sub_call_budget=4)).startswith(
        "Sub Call Budget: 4 Moving to Node #0\n")


def test_spawned_children_and_child_outcome_helpers():
    spawn = PARENT + ("<Calling Sub Searches>\n<Start Sub Search 0 at level 1> Moving to Node #0,1\n"
                      "<End Calling Sub Searches>\n")
    [(index, node, state)] = spawned_children("Moving to Node #0\nCurrent State: 24:[1, 2, 3, 4], "
                                              "Operations: []\n" + spawn)
    assert (index, node, state.nums, [op.text for op in state.operations]) == (
        0, "0,1", (3, 4, 2), ["1*2=2"])
    assert child_outcome("Moving to Node #0,1\n", "No solution found.\n") is None


def test_votes_count_best_of_n_and_majority():
    def s(solution, correct):
        return Solve("sos", (1,), 1, correct=correct, solution=solution)

    vote = Vote([s(["a"], False), s(["a"], False), s(["b"], True), s(None, False)])
    assert vote.best_of_n and not vote.majority
    assert Vote([s(["b"], True), s(["a"], False), s(["b"], True)]).majority
    assert not Vote([s(None, False)]).best_of_n
