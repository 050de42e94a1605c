"""The Grafana dashboards of helm/apr-server: every panel queries metrics that really exist.

APR metric names come from apr.serve.metrics (their one source of truth); SGLang's are the ones
confirmed in SGLang 0.5.23's source (below). Every query also parses with promtool.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DASHBOARDS = sorted((Path(__file__).resolve().parents[1] / "helm" / "apr-server" / "dashboards").glob("*.json"))
REQUIRE_TOOLS = os.environ.get("APR_REQUIRE_TOOLS") == "1"

# SGLang's metrics used by the dashboards, with their Prometheus type, as defined in SGLang 0.5.23
# (wheel sglang-0.5.23, file sglang/srt/observability/metrics_collector.py; line of each name=).
SGLANG_METRICS = {
    "sglang:num_running_reqs": "gauge",  # line 365, SchedulerMetricsCollector
    "sglang:num_queue_reqs": "gauge",  # line 371
    "sglang:gen_throughput": "gauge",  # line 383, tokens/s
    "sglang:token_usage": "gauge",  # line 405, fraction of the KV cache in use
    "sglang:generation_tokens_total": "counter",  # line 1861, TokenizerMetricsCollector
    "sglang:time_to_first_token_seconds": "histogram",  # line 2041
    "sglang:e2e_request_latency_seconds": "histogram",  # line 2068
}
# PromQL words that are not metric names (aggregations and functions are followed by "(").
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def exported(kind: str, name: str) -> set[str]:
    """The series names a metric family exports (prometheus_client's and Prometheus's naming)."""
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "counter":
        return {name if name.endswith("_total") else f"{name}_total"}
    return {name}


def apr_series() -> set[str]:
    """Every series the APR server can export, from its own collectors."""
    from apr.serve.metrics import ALL, Metrics

    families = {f.name: f.type for f in Metrics().registry.collect()}
    names = set()
    for name in ALL:
        family = name.removesuffix("_total") if families.get(name) is None else name
        assert family in families, f"{name} is in ALL but not registered by Metrics()"
        names |= exported(families[family], family)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a lexer, not a parser: promtool parses below)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values, Grafana variables)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0) in PROMQL_WORDS:
            continue  # a function or an aggregation, or an operator word
        if re.match(r"\d", e[m.start() - 1:m.start()] if m.start() else ""):
            continue  # the exponent or unit of a number
        names.add(m.group(0))
    return names


def dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out += [panel] if panel["type"] != "row" else []
        out += [p for p in panel.get("panels", []) if p["type"] != "row"]
    return out


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p["targets"]]


def test_there_are_dashboards():
    assert DASHBOARDS, "helm/apr-server/dashboards/*.json"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path):
    dash = dashboard(path)
    assert dash["title"] and re.fullmatch(r"[a-z0-9-]{1,40}", dash["uid"])
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dash):
        assert panel["title"] and {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}"
            assert "$instance" in target["expr"], f"{panel['title']!r} ignores the instance variable"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_only_real_metrics(path):
    known_apr = apr_series()
    known_sglang = set().union(*(exported(kind, name) for name, kind in SGLANG_METRICS.items()))
    for expr in exprs(dashboard(path)):
        names = metric_names(expr)
        assert names, f"no metric in {expr}"
        for name in names:
            if name.startswith("apr_"):
                assert name in known_apr, f"{name} is not exported by apr.serve.metrics ({expr})"
            elif name.startswith("sglang:"):
                assert name in known_sglang, f"{name} is not a confirmed SGLang metric ({expr})"
            else:
                pytest.fail(f"{name} is neither an APR nor an SGLang metric ({expr})")


def test_dashboards_cover_every_apr_metric_and_the_engine():
    from apr.serve.metrics import ALL

    named = {n for path in DASHBOARDS for e in exprs(dashboard(path)) for n in metric_names(e)}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in named}
    assert [m for m in ALL if m not in families] == []
    for engine in ("sglang:e2e_request_latency_seconds", "sglang:time_to_first_token_seconds",
                   "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:gen_throughput"):
        assert engine in families, engine


def test_metric_name_lexer():
    expr = ('histogram_quantile(0.99, sum by (le, role) (rate(apr_engine_call_duration_seconds_bucket'
            '{instance=~"$instance:[0-9]+",role!="x"}[$__rate_interval]))) / on (instance) '
            'sglang:num_queue_reqs offset 5m > 1e3 and bool apr_engine_up')
    assert metric_names(expr) == {"apr_engine_call_duration_seconds_bucket", "sglang:num_queue_reqs", "apr_engine_up"}


def test_every_query_parses_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if REQUIRE_TOOLS:
            pytest.fail("promtool (Debian package prometheus) is required (APR_REQUIRE_TOOLS=1) but absent")
        pytest.skip("promtool is not installed (set APR_REQUIRE_TOOLS=1 to make this a failure)")
    # Grafana's variables, replaced by what they expand to, then each query as a recording rule.
    rules = []
    for path in DASHBOARDS:
        for n, expr in enumerate(exprs(dashboard(path))):
            expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
            rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{n}", "expr": expr})
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    run = subprocess.run([promtool, "check", "rules", str(tmp_path / "queries.yaml")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
