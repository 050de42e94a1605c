"""Plots and the Markdown report of an evaluation: the paper's three comparisons.

Accuracy against the context-window limit, against total tokens, and against latency, one
series per decoding method (APR over child budgets, SoS+ best-of-N and majority over N). The
total-tokens plot also draws each setting's accuracy under a total-token budget T.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from apr.config import InputError
from apr.countdown.threads import APR, CHILD, PARENT, SOS, STYLE_NAMES, Thread

PLOTS = {"context": "accuracy_vs_context.png", "tokens": "accuracy_vs_total_tokens.png",
         "latency": "accuracy_vs_latency.png"}


def _series(settings: dict) -> dict[str, list[tuple[float, float, str]]]:
    """Points (x for tokens, x for latency, label) grouped into method series."""
    series: dict[str, list] = {}
    for name, m in settings.items():
        method = STYLE_NAMES[APR] if name.startswith(APR) else STYLE_NAMES[SOS]
        tokens, latency = m["tokens_total"].get("mean", 0), m["latency_s"].get("mean", 0)
        series.setdefault(method, []).append((tokens, latency, m["accuracy"], name))
        if "majority_accuracy" in m:
            series.setdefault("SoS+ majority", []).append(
                (tokens, latency, m["majority_accuracy"], name))
    return series


def _label(name: str, metrics: dict) -> str:
    """A setting's curve label: APR or SoS+, its budget or sample count, and its model."""
    style = APR if name.startswith(APR) else SOS
    label = STYLE_NAMES[style] + name[len(style):]
    model = metrics.get("model_label")
    model = model.get(style) if isinstance(model, dict) else model
    return f"{label}: {model}" if model else label


def write_plots(metrics: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = metrics["settings"]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in settings.items():
        limits = sorted(int(c) for c in m["accuracy_at_context"])
        ax.plot(limits, [100 * m["accuracy_at_context"][str(c)] for c in limits], marker="o",
                label=_label(name, metrics))
    ax.set(xlabel="context window limit (tokens)", ylabel="accuracy (%)",
           title="Accuracy against context window")
    paths.append(_save(fig, ax, directory / PLOTS["context"]))

    for key, index, label in (("tokens", 0, "total tokens per problem (mean, or budget T)"),
                              ("latency", 1, "mean latency per problem (s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        if key == "tokens":
            for name, m in settings.items():
                at = m.get("accuracy_at_total_tokens", {})  # absent in older metrics.json
                budgets = sorted(int(t) for t in at)
                ax.plot(budgets, [100 * at[str(t)] for t in budgets], linestyle="--",
                        marker=".", alpha=0.7, label=f"{_label(name, metrics)}, within T")
        for method, points in _series(settings).items():
            points = sorted(points, key=lambda p: p[index])
            ax.plot([p[index] for p in points], [100 * p[2] for p in points], marker="o",
                    label=method)
            for p in points:
                ax.annotate(p[3], (p[index], 100 * p[2]), fontsize=7, alpha=0.7)
        ax.set(xlabel=label, ylabel="accuracy (%)", title=f"Accuracy against {key}")
        paths.append(_save(fig, ax, directory / PLOTS[key]))
    plt.close("all")
    return paths


def _save(fig, ax, path: Path) -> Path:
    ax.set_ylim(0, 100)  # accuracy in percent: the whole scale, also when every point is 0
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _cell(stats: dict, key: str = "mean", digits: int = 0) -> str:
    value = stats.get(key)
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(metrics: dict) -> str:
    lines = [
        f"# Evaluation: {metrics['problems']} {metrics['split']} problems",
        "",
        f"Engine `{metrics['engine']}`, {_models(metrics)}, context window "
        f"{metrics['context']} tokens{_budget(metrics.get('total_tokens'))}, "
        f"{metrics['seconds']} s. Accuracy is checked by the "
        "verifier (the solution replayed over the problem's numbers), never taken from the "
        "model's claim.",
        "",
        "| setting | accuracy | majority | children | total tokens | sequential tokens | "
        "longest context | latency (s) | failures |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in metrics["settings"].items():
        failures = ", ".join(f"{k} {v}" for k, v in m["failures"].items()) or "-"
        majority = f"{100 * m['majority_accuracy']:.1f}%" if "majority_accuracy" in m else "-"
        lines.append(
            f"| {name} | {100 * m['accuracy']:.1f}% | {majority} | {m['children_per_problem']:.2f} "
            f"| {_cell(m['tokens_total'])} | {_cell(m['tokens_sequential'])} "
            f"| {_cell(m['longest_context'])} | {_cell(m['latency_s'], digits=3)} | {failures} |")
    lines += ["", "Accuracy when the context window is limited to C tokens (a solve whose "
              "longest thread needed more fails):", ""]
    limits = sorted({int(c) for m in metrics["settings"].values() for c in m["accuracy_at_context"]})
    lines.append("| setting | " + " | ".join(f"C={c}" for c in limits) + " |")
    lines.append("| --- |" + " --- |" * len(limits))
    for name, m in metrics["settings"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * m['accuracy_at_context'].get(str(c), 0):.1f}%" for c in limits) + " |")
    budgets = sorted({int(t) for m in metrics["settings"].values()
                      for t in m.get("accuracy_at_total_tokens", {})})
    if budgets:
        lines += ["", "Accuracy when a problem may spend at most T tokens in all its contexts "
                  "(a solve that spent more fails):", ""]
        lines.append("| setting | " + " | ".join(f"T={t}" for t in budgets) + " |")
        lines.append("| --- |" + " --- |" * len(budgets))
        for name, m in metrics["settings"].items():
            at = m.get("accuracy_at_total_tokens", {})
            lines.append(f"| {name} | " + " | ".join(
                f"{100 * at[str(t)]:.1f}%" if str(t) in at else "-" for t in budgets) + " |")
    lines += [""] + [f"![{key}]({file})" for key, file in PLOTS.items()] + [""]
    return "\n".join(lines + _example(metrics["settings"]))


def _example(settings: dict) -> list[str]:
    """One solved APR problem, its parent and children as the model wrote them."""
    name = next((n for n, m in settings.items() if n.startswith(APR) and "example" in m), None)
    if name is None:
        if any(n.startswith(APR) for n in settings):
            return ["## A solved APR trace", "", "None: the APR model solved none of these "
                    "problems.", ""]
        return []
    example = settings[name]["example"]
    threads = [Thread.from_json(t) for t in example["threads"]]
    return ["## A solved APR trace", "",
            f"Problem {example['id']} ({name}): reach {example['target']} from "
            f"{example['nums']}; {example['children']} children; the solution "
            f"{', '.join(example['solution'] or [])} checked by the verifier.", "",
            "```text", *trace_text(threads), "```", ""]


def trace_text(threads: Sequence[Thread]) -> list[str]:
    """A solve's threads as one text: each parent segment as written, the children of its
    spawn indented after it, and then what the join put in place of the call (the children's
    outcomes) before the parent goes on."""
    lines: list[str] = []
    parent_so_far = ""
    for segment in (t for t in threads if t.role == PARENT):
        common = os.path.commonprefix([parent_so_far, segment.prompt])
        common = common[:common.rfind("\n") + 1]  # the join replaced the call's whole lines
        lines += ["[parent]" if not parent_so_far else "[parent, after the join]",
                  *(segment.prompt[len(common):] + segment.text).splitlines()]
        parent_so_far = segment.prompt + segment.text
        for child in (t for t in threads if t.role == CHILD and t.spawn == segment.spawn):
            lines += [f"    [child {child.index}]",
                      *("    " + line for line in (child.prompt + child.text).splitlines())]
    return lines


def _models(metrics: dict) -> str:
    """Which model(s) the report is about, by how they were trained (their paths below)."""
    labels, paths = metrics.get("model_label"), metrics.get("model")
    if isinstance(labels, dict):  # a comparison of two evaluations
        return "models: " + "; ".join(f"{STYLE_NAMES.get(k, k)}: {v} (`{(paths or {}).get(k)}`)"
                                      for k, v in labels.items())
    return f"model: {labels or paths} (`{paths}`)"


def summary(metrics: dict) -> str:
    """A few lines for a terminal: each setting's accuracy, children, tokens and latency, and
    its failed solves by kind (failed samples, for a setting of several samples)."""
    lines = [f"{metrics['problems']} {metrics['split']} problems, {_models(metrics)}"]
    for name, m in metrics["settings"].items():
        lines.append(f"  {name:<12} accuracy {100 * m['accuracy']:5.1f}%  children "
                     f"{m['children_per_problem']:5.2f}  total tokens "
                     f"{_cell(m['tokens_total']):>6}  sequential {_cell(m['tokens_sequential']):>6}"
                     f"  latency {_cell(m['latency_s'], digits=2)} s")
        failures = sorted((m.get("failures") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        if failures:
            lines.append(" " * 15 + "failures: " + ", ".join(
                f"{count} {kind.replace('_', ' ')}" for kind, count in failures))
    return "\n".join(lines)


def nothing_solved_note(preset: str, metrics: dict) -> str | None:
    """Why a local-preset run solved nothing, for a newcomer reading `make demo`'s 0%."""
    if preset != "local" or any(m["accuracy"] for m in metrics["settings"].values()):
        return None
    return ("No problem solved: in the local preset's minutes the tiny model learns the trace "
            "language, not yet correct searches (about 40 minutes of SFT per model on 2 cores: "
            "docs/RESULTS.md, \"What the demo's CPU budget can teach\").")


def _budget(total_tokens: int | dict | None) -> str:
    """The header's note of the total-token budget the solves ran under, if any."""
    if isinstance(total_tokens, dict):  # a comparison: each model's evaluation
        return "".join(f", {k} total-token budget {v}" for k, v in total_tokens.items() if v)
    return f", total-token budget {total_tokens} per solve" if total_tokens else ""


def write_report(metrics: dict, directory: Path) -> Path:
    path = directory / "report.md"
    path.write_text(markdown(metrics))
    return path


def compare(apr_metrics: dict, sos_metrics: dict) -> dict:
    """One metrics document holding the APR model's settings and the SoS+ model's settings."""
    merged = {key: apr_metrics.get(key) for key in ("engine", "problems", "split", "context")}
    merged["model"] = {"apr": apr_metrics.get("model"), "sos": sos_metrics.get("model")}
    merged["model_label"] = {"apr": apr_metrics.get("model_label"),
                             "sos": sos_metrics.get("model_label")}
    merged["total_tokens"] = {"apr": apr_metrics.get("total_tokens", 0),
                              "sos": sos_metrics.get("total_tokens", 0)}
    merged["seconds"] = round(apr_metrics.get("seconds", 0) + sos_metrics.get("seconds", 0), 2)
    merged["settings"] = {**{k: v for k, v in apr_metrics["settings"].items() if k.startswith("apr")},
                          **{k: v for k, v in sos_metrics["settings"].items() if k.startswith("sos")}}
    return merged


def html(metrics: dict, directory: Path) -> str:
    """The report as one self-contained page (plots inlined), for the KFP UI's HTML viewer."""
    import base64
    from html import escape

    out = ["<!doctype html><meta charset=utf-8><title>APR evaluation</title>",
           "<style>body{font-family:sans-serif}td{border:1px solid #ccc;padding:2px 6px}"
           "table{border-collapse:collapse}</style>"]
    in_table = in_code = False
    for line in markdown(metrics).splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(escape(line))
            continue
        is_row = line.startswith("|")
        if in_table and not is_row:
            out.append("</table>")
        if is_row and not in_table:
            out.append("<table>")
        in_table = is_row
        if line.startswith("| ---"):
            continue
        if is_row:
            out.append("<tr>" + "".join(f"<td>{escape(c.strip())}</td>"
                                        for c in line.strip("|").split("|")) + "</tr>")
        elif line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((directory / name).read_bytes()).decode()
            out.append(f'<img alt="{escape(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("# "):
            out.append(f"<h1>{escape(line[2:])}</h1>")
        elif line.startswith("## "):
            out.append(f"<h2>{escape(line[3:])}</h2>")
        elif line:
            out.append(f"<p>{escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out) + "\n"


def _evaluation(directory: str | Path, flag: str) -> dict:
    path = Path(directory) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} {directory} is not an `apr evaluate` output ({path}: "
                         f"{getattr(e, 'strerror', None) or e})") from None
    if not isinstance(metrics, dict) or "settings" not in metrics:
        raise InputError(f"{flag} {directory} is not an `apr evaluate` output (no settings in "
                         f"{path})")
    return metrics


def run_compare(apr_eval: str | Path, sos_eval: str | Path, out: str | Path) -> dict:
    """The comparison report of two `apr evaluate` outputs (APR model, SoS+ model), written
    to `out` atomically: new, empty, or an earlier comparison (marked by its report.html)."""
    from apr import atomic

    atomic.check_replaceable(out, "report.html")
    metrics = compare(_evaluation(apr_eval, "--apr"), _evaluation(sos_eval, "--sos"))
    with atomic.partial_dir(out, replace="report.html") as partial:
        (partial / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_plots(metrics, partial)
        write_report(metrics, partial)
        (partial / "report.html").write_text(html(metrics, partial))
    return metrics
