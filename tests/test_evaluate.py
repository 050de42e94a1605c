"""The evaluation stage: metrics from hand-made rows, the oracle end to end, a tiny model on CPU."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import make_dataset

from apr import model as model_lib
from apr.config import ConfigError, from_dict, load
from apr.countdown.threads import Thread
from apr.decode.runtime import Vote
from apr.report import nothing_solved_note, summary, trace_text
from apr.stages import evaluate
from apr.stages.evaluate import EvalConfig, summarize

OUTPUTS = {"results.jsonl", "metrics.json", "report.md", "config.yaml",
           "accuracy_vs_context.png", "accuracy_vs_total_tokens.png", "accuracy_vs_latency.png"}


def hand_row(correct, children, total, sequential, longest, wall, failures=(), majority=None):
    r = {"correct": correct, "children": children, "failures": list(failures), "wall_s": wall,
         "tokens": {"total": total, "generated": total - 10, "sequential": sequential,
                    "longest_context": longest}}
    if majority is not None:
        r["majority"] = majority
    return r


def test_metrics_of_hand_made_rows_equal_hand_computed_values():
    rows = [hand_row(True, 4, 1000, 400, 300, 1.0),
            hand_row(False, 2, 2000, 600, 900, 3.0, ["no_solution"]),
            hand_row(True, 0, 600, 600, 600, 2.0),
            hand_row(False, 6, 3000, 800, 1200, 4.0, ["context_exhausted"])]
    m = summarize(rows, [512, 1024])
    assert m["problems"] == 4
    assert m["accuracy"] == 0.5
    assert m["children_per_problem"] == 3.0
    assert m["tokens_total"]["mean"] == 1650.0
    assert m["tokens_sequential"]["mean"] == 600.0
    assert m["latency_s"]["mean"] == 2.5
    assert m["longest_context"]["max"] == 1200
    assert m["failures"] == {"context_exhausted": 1, "no_solution": 1}
    # correct with longest thread <= 512: only the first; <= 1024: the first and the third
    assert m["accuracy_at_context"] == {"512": 0.25, "1024": 0.5}
    assert "majority_accuracy" not in m
    voted = summarize([hand_row(True, 0, 1, 1, 1, 1, majority=False),
                       hand_row(True, 0, 1, 1, 1, 1, majority=True)], [512])
    assert voted["majority_accuracy"] == 0.5


def test_accuracy_at_a_total_token_budget_counts_correct_solves_that_fit():
    rows = [hand_row(True, 4, 1000, 400, 300, 1.0),
            hand_row(False, 2, 700, 600, 900, 3.0, ["budget_exhausted"]),
            hand_row(True, 0, 600, 600, 600, 2.0),
            hand_row(True, 6, 3000, 800, 1200, 4.0)]
    m = summarize(rows, [512], [500, 600, 999, 1000, 4000])
    # correct with total <= T: none below 600; the third from 600; the first from 1000
    assert m["accuracy_at_total_tokens"] == {"500": 0.0, "600": 0.25, "999": 0.25,
                                             "1000": 0.5, "4000": 0.75}
    assert m["failures"] == {"budget_exhausted": 1}
    assert summarize(rows, [512])["accuracy_at_total_tokens"] == {}
    assert summarize([], [512], [600])["accuracy_at_total_tokens"] == {"600": 0.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eval") / "data", train=10, val=50, seed=5)


@pytest.mark.slow
def test_oracle_evaluation_reports_the_solver_solve_rates(dataset, tmp_path):
    config = from_dict(EvalConfig, {"engine": "oracle", "context": 1 << 20,
                                    "context_limits": [4096, 1 << 20]})
    metrics = evaluate.run(config, None, dataset, tmp_path / "eval", progress=False)
    assert OUTPUTS <= {p.name for p in (tmp_path / "eval").iterdir()}
    stats = json.loads((dataset / "stats.json").read_text())["splits"]["val"]
    assert metrics["settings"]["apr"]["accuracy"] == stats["apr"]["solve_rate"]
    assert metrics["settings"]["sos"]["accuracy"] == stats["sos"]["solve_rate"]
    assert metrics["settings"]["apr"]["children_per_problem"] == pytest.approx(
        stats["apr"]["children_per_problem"], abs=1e-3)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and {r["setting"] for r in rows} == {"apr", "sos"}


def test_the_report_shows_one_solved_apr_trace_as_the_model_wrote_it(dataset, tmp_path):
    config = from_dict(EvalConfig, {"engine": "oracle", "context": 1 << 20, "max_problems": 20})
    metrics = evaluate.run(config, None, dataset, tmp_path / "eval", progress=False)
    example = metrics["settings"]["apr"]["example"]
    rows = [json.loads(x) for x in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["setting"] == "apr" and r["correct"] and r["children"])
    assert example["id"] == first["id"] and example["children"] == first["children"] > 0
    threads = [Thread.from_json(t) for t in example["threads"]]
    text = "\n".join(trace_text(threads))
    parents = [t for t in threads if t.role == "parent"]
    assert text.startswith("[parent]\n" + parents[0].prompt + parents[0].text)
    assert text.count("[parent, after the join]") == len(parents) - 1 > 0
    assert text.endswith(parents[-1].text.rstrip("\n"))  # the parent's last words
    children = [t for t in threads if t.role == "child"]
    assert len(children) == example["children"]
    for child in children:  # each child whole, indented under its spawn
        assert "\n".join("    " + x for x in (child.prompt + child.text).splitlines()) in text
    join = parents[1].prompt[parents[1].prompt.index("<Sub Searches>"):]
    assert "[parent, after the join]\n" + join in text + "\n"  # the outcomes the parent saw
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## A solved APR trace" in report and ", ".join(example["solution"]) in report


@pytest.mark.slow
def test_oracle_evaluation_under_a_total_token_budget(dataset, tmp_path):
    """Every solve runs under `total_tokens`; the solves it cuts count as budget_exhausted,
    and each setting scores at least what the unlimited run's curve says at that budget."""
    budget = 2000
    unlimited = evaluate.run(from_dict(EvalConfig, {
        "engine": "oracle", "context": 1 << 20, "total_token_limits": [budget]}),
        None, dataset, tmp_path / "unlimited", progress=False)
    config = from_dict(EvalConfig, {"engine": "oracle", "context": 1 << 20,
                                    "total_tokens": budget, "total_token_limits": [budget]})
    metrics = evaluate.run(config, None, dataset, tmp_path / "eval", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert metrics["total_tokens"] == budget
    for name, m in metrics["settings"].items():
        mine = [r for r in rows if r["setting"] == name]
        cut = sum("budget_exhausted" in r["failures"] for r in mine)
        assert cut > 0 and m["failures"]["budget_exhausted"] == cut
        assert all(r["tokens"]["total"] <= budget for r in mine if r["correct"])
        assert m["accuracy"] == m["accuracy_at_total_tokens"][str(budget)]
        curve = unlimited["settings"][name]["accuracy_at_total_tokens"][str(budget)]
        assert curve <= m["accuracy"] < unlimited["settings"][name]["accuracy"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"total-token budget {budget} per solve" in report and f"| T={budget} |" in report


@pytest.mark.slow
def test_cpu_run_with_a_tiny_model_writes_every_output(dataset, tmp_path):
    model_lib.save(model_lib.build("tiny", seed=2), tmp_path / "model")
    config = from_dict(EvalConfig, {"engine": "local", "context": 160, "max_problems": 50,
                                    "apr_budgets": [0, 2], "sos_samples": [1, 2],
                                    "concurrency": 50})
    metrics = evaluate.run(config, tmp_path / "model", dataset, tmp_path / "eval", progress=False)
    assert OUTPUTS <= {p.name for p in (tmp_path / "eval").iterdir()}
    assert set(metrics["settings"]) == {"apr", "apr-budget2", "sos", "sos-n2"}
    assert all(m["problems"] == 50 for m in metrics["settings"].values())
    assert "majority_accuracy" in metrics["settings"]["sos-n2"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| apr-budget2 |" in report and "accuracy_vs_latency.png" in report
    assert not (tmp_path / "eval.partial").exists()
    # the terminal's lines: one per setting, then the failures of its unsolved solves
    terminal = summary(metrics).splitlines()
    assert terminal[1].startswith("  apr ") and "accuracy" in terminal[1]
    counts = metrics["settings"]["apr"]["failures"]
    assert terminal[2].split(" failures: ")[1] == ", ".join(
        f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(counts.items(),
                                                              key=lambda kv: (-kv[1], kv[0])))
    assert sum(counts.values()) == 50 - round(50 * metrics["settings"]["apr"]["accuracy"])


@pytest.mark.parametrize("preset, accuracies, noted", [
    ("local", [0.0, 0.0], True), ("local", [0.0, 0.05], False), ("gpu-small", [0.0, 0.0], False)])
def test_a_local_run_that_solves_nothing_says_why(preset, accuracies, noted):
    metrics = {"settings": {f"s{i}": {"accuracy": a} for i, a in enumerate(accuracies)}}
    note = nothing_solved_note(preset, metrics)
    assert (note is not None) == noted
    assert note is None or ("trace language" in note and "docs/RESULTS.md" in note)


def test_bad_evaluation_configs_name_the_key():
    with pytest.raises(ConfigError, match="evaluate.engine_url"):
        load(EvalConfig, None, "evaluate", ["engine=sglang"])
    with pytest.raises(ConfigError, match="evaluate.server: a server is started only for engine"):
        load(EvalConfig, None, "evaluate", ["server=sglang"])
    with pytest.raises(ConfigError, match="evaluate.server: 'vllm': choose one of"):
        load(EvalConfig, None, "evaluate", ["engine=sglang", "server=vllm"])
    assert load(EvalConfig, "paper", "evaluate", []).server == "auto"  # no URL to set
    from apr.decode.rollout_server import KINDS
    from apr.stages.evaluate import SERVER_KINDS

    assert SERVER_KINDS == KINDS
    with pytest.raises(ConfigError, match="evaluate.engine"):
        load(EvalConfig, None, "evaluate", ["engine=vllm"])
    with pytest.raises(ConfigError, match="evaluate.sos_samples"):
        load(EvalConfig, None, "evaluate", ["sos_samples=[0]"])
    with pytest.raises(ConfigError, match=r"evaluate.total_tokens: -1 is out of range"):
        load(EvalConfig, None, "evaluate", ["total_tokens=-1"])
    with pytest.raises(ConfigError, match="evaluate.total_token_limits: .* must be >= 1"):
        load(EvalConfig, None, "evaluate", ["total_token_limits=[2048, 0]"])


@pytest.mark.slow
def test_out_that_holds_something_else_is_refused_before_any_work(dataset, tmp_path):
    """`--out` never deletes what evaluate did not write; an earlier evaluation is replaced."""
    from apr.cli import main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "plan.md").write_text("mine")
    args = ["evaluate", "--problems", str(dataset), "--no-progress", "--set", "engine=oracle",
            "--set", "max_problems=3"]
    assert main([*args, "--out", str(notes)]) == 2
    assert [p.name for p in notes.iterdir()] == ["plan.md"]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 0
    assert main([*args, "--out", str(tmp_path / "eval"), "--set", "max_problems=2"]) == 0
    rows = (tmp_path / "eval" / "results.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2  # the second evaluation's rows (2 problems, apr and sos)


@pytest.mark.parametrize("line, says", [
    ('{"nums": "5,50,79", "target": 10}', "nums must be a list"),
    ('{"nums": [5, 50], "target": null}', "target must be a positive integer"),
    ('{"nums": [5, true], "target": 10}', "nums must be a list"),
    ('{"nums": [5, 50], "target": "10"}', "target must be a positive integer"),
    ('{"nums": [5], "target": 10}', "nums must be a list"),
    ("[5, 50, 10]", "expected an object"),
    ("{nums", "not JSON"),
])
def test_a_malformed_problem_is_an_error_naming_its_line_never_scored(tmp_path, line, says):
    from apr.dataset import DataError, load_problems

    path = tmp_path / "val.jsonl"
    path.write_text('{"nums": [3, 8, 2], "target": 24}\n' + line + "\n")
    with pytest.raises(DataError, match=f"line 2: {says}"):
        load_problems(path, "val", 10)
    assert load_problems(path, "val", 1) == [{"nums": [3, 8, 2], "target": 24}]


def test_each_budget_prefix_is_a_setting_solved_under_its_own_budget(monkeypatch):
    config = from_dict(EvalConfig, {"apr_budgets": [0, 4], "sos_token_budgets": [0, 1024],
                                    "sos_samples": [1, 2]})
    seen = []

    async def recording_sample(engine, mode, nums, target, n, budgets, temperature):
        seen.append((mode, n, budgets.sub_call_budget, budgets.token_budget))
        return Vote(samples=[])

    monkeypatch.setattr(evaluate, "sample", recording_sample)
    monkeypatch.setattr(evaluate, "row", lambda problem, setting, vote: setting.name)
    problem = {"id": 0, "nums": [1, 2, 3], "target": 6}
    rows, _ = asyncio.run(evaluate.evaluate(None, [problem], config, progress=False))
    assert rows == ["apr", "apr-budget4", "sos", "sos-n2", "sos-budget1024",
                    "sos-budget1024-n2"]
    assert seen == [("apr", 1, 0, 0), ("apr", 1, 4, 0), ("sos", 1, 0, 0), ("sos", 2, 0, 0),
                    ("sos", 1, 0, 1024), ("sos", 2, 0, 1024)]
    with pytest.raises(ConfigError, match="evaluate.sos_token_budgets: budgets must be >= 0"):
        load(EvalConfig, None, "evaluate", ["sos_token_budgets=[-1]"])
