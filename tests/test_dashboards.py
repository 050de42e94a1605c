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
    "sglang:queue_time_seconds": "histogram",  # line 838
    "sglang:inter_token_latency_seconds": "histogram",  # line 2051
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


def series_kinds() -> dict[str, str]:
    """Every series the dashboards may query (APR's and SGLang's), with its family's type."""
    from apr.serve.metrics import Metrics

    kinds = {}
    for family in Metrics().registry.collect():
        kinds |= dict.fromkeys(exported(family.type, family.name), family.type)
    for name, kind in SGLANG_METRICS.items():
        kinds |= dict.fromkeys(exported(kind, name), kind)
    return kinds


def apr_labels() -> dict[str, set[str]]:
    """The label names of each APR series (from the server's own collectors)."""
    from apr.serve.metrics import Metrics

    out = {}
    for collector in vars(Metrics()).values():
        if hasattr(collector, "_labelnames"):
            kind = collector._type
            for series in exported(kind, collector._name):
                out[series] = set(collector._labelnames) | ({"le"} if series.endswith("_bucket")
                                                            else set())
    return out


def _call_arguments(expr: str, function: str) -> list[str]:
    """The text inside the parentheses of each call of `function` in `expr`."""
    out = []
    for m in re.finditer(rf"\b{function}\s*\(", expr):
        depth, start = 1, m.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                out.append(expr[start:i])
                break
    return out


def query_problems(expr: str, kinds: dict[str, str], labels: dict[str, set[str]]) -> list[str]:
    """What a query does with a metric that its type does not allow: rate() of a gauge, a
    counter or histogram series read raw, histogram_quantile over other than buckets or
    without `le`, and grouping by a label an APR metric does not have."""
    problems = []
    names = metric_names(expr)
    rated = {m.group(2) for m in re.finditer(
        r"\b(rate|irate|increase)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", expr)}
    for name in sorted(names):
        kind = kinds.get(name)
        if name in rated and kind == "gauge":
            problems.append(f"rate of the gauge {name}")
        if name not in rated and kind in ("counter", "histogram"):
            problems.append(f"the {kind} series {name} is read without rate()")
    for argument in _call_arguments(expr, "histogram_quantile"):
        inner = metric_names(argument)
        if not inner or any(not n.endswith("_bucket") for n in inner):
            problems.append(f"histogram_quantile over {sorted(inner)}, not _bucket series")
        grouped = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", argument)
        if grouped and "le" not in {g.strip() for g in grouped[-1].split(",")}:
            problems.append("histogram_quantile of an aggregation without le")
    if names and names <= set(labels):  # APR's own metrics: their labels are known
        allowed = set().union(*(labels[n] for n in names)) | {"instance", "job"}
        for grouped in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            for label in filter(None, (g.strip() for g in grouped.split(","))):
                if label not in allowed:
                    problems.append(f"grouping by {label}, a label none of {sorted(names)} has")
    return problems


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
    for name in ("namespace", "instance"):  # the pods of one namespace, then one pod's IP
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    assert "$namespace" in variables["instance"]["query"]["query"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dash):
        assert panel["title"] and {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}"
            for variable in ("$namespace", "$instance"):
                assert variable in target["expr"], f"{panel['title']!r} ignores {variable}"


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


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_uses_its_metrics_as_their_types_allow(path):
    kinds, labels = series_kinds(), apr_labels()
    assert labels["apr_requests_total"] == {"mode", "outcome"}  # the collectors were read
    for expr in exprs(dashboard(path)):
        assert query_problems(expr, kinds, labels) == [], expr


@pytest.mark.parametrize("expr, expected", [
    ('sum by (outcome) (rate(apr_requests_total{instance=~"$instance"}[5m]))', []),
    ("rate(apr_requests_in_flight[5m])", ["rate of the gauge apr_requests_in_flight"]),
    ("sum(apr_errors_total)", ["the counter series apr_errors_total is read without rate()"]),
    ("histogram_quantile(0.9, sum by (role) (rate(apr_engine_call_duration_seconds_bucket[5m])))",
     ["histogram_quantile of an aggregation without le"]),
    ("histogram_quantile(0.9, rate(apr_request_duration_seconds_sum[5m]))",
     ["histogram_quantile over ['apr_request_duration_seconds_sum'], not _bucket series"]),
    ("sum by (outcome) (rate(apr_errors_total[5m]))",
     ["grouping by outcome, a label none of ['apr_errors_total'] has"]),
    ("sum by (le, model) (rate(sglang:e2e_request_latency_seconds_bucket[5m]))", []),
])
def test_the_query_check_finds_misused_metrics(expr, expected):
    assert query_problems(expr, series_kinds(), apr_labels()) == expected


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_fit_the_grid_without_overlapping_and_name_their_queries(path):
    dash = dashboard(path)
    placed = []
    for panel in dash["panels"]:  # a collapsed row's panels are placed when it opens
        x, y, w, h = (panel["gridPos"][k] for k in "xywh")
        assert w > 0 and h > 0 and 0 <= x and x + w <= 24, panel["title"]
        for other, (ox, oy, ow, oh) in placed:
            assert x + w <= ox or ox + ow <= x or y + h <= oy or oy + oh <= y, \
                f"{panel['title']!r} overlaps {other!r}"
        placed.append((panel["title"], (x, y, w, h)))
    for panel in panels(dash):
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{panel['title']!r} repeats a refId"


def test_dashboards_cover_every_apr_metric_and_the_engine():
    from apr.serve.metrics import ALL

    named = {n for path in DASHBOARDS for e in exprs(dashboard(path)) for n in metric_names(e)}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in named}
    assert [m for m in ALL if m not in families] == []
    for engine in ("sglang:e2e_request_latency_seconds", "sglang:time_to_first_token_seconds",
                   "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:gen_throughput",
                   "sglang:inter_token_latency_seconds", "sglang:queue_time_seconds",
                   "sglang:token_usage"):
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
