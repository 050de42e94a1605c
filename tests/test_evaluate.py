"""The evaluation stage: metrics from hand-made rows, the oracle end to end, a tiny model on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_dataset

from apr import model as model_lib
from apr.config import ConfigError, from_dict, load
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


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("eval") / "data", train=10, val=50, seed=5)


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


def test_bad_evaluation_configs_name_the_key():
    with pytest.raises(ConfigError, match="evaluate.engine_url"):
        load(EvalConfig, None, "evaluate", ["engine=sglang"])
    with pytest.raises(ConfigError, match="evaluate.engine"):
        load(EvalConfig, None, "evaluate", ["engine=vllm"])
    with pytest.raises(ConfigError, match="evaluate.sos_samples"):
        load(EvalConfig, None, "evaluate", ["sos_samples=[0]"])
