"""APR against SoS+ at the scale a 2-core CPU allows: the same tiny shape trained on the same
problems with the same number of supervised tokens, evaluated on the same held-out problems,
then GRPO from the APR model and the APR evaluation again.

    python bench/cpu_compare.py --workdir runs/cpu-compare          (about 2 hours)

The setting is 3-number Countdown (numbers 1..15, targets 10..40): the tiny model solves
nothing on the paper's 4 numbers in 1..99 in hours of this CPU, and on these it solves a
quarter after about 13M supervised tokens (docs/RESULTS.md). The traces are budget-conditioned
as in the paper's section 4.3: each APR parent prompt starts with `Sub Call Budget: N` (the
trace's child count), each SoS+ prompt with `Token Budget: N` (its tokens rounded up to 512),
so the APR model is evaluated at several sub-call budgets and the SoS+ model at several token
budgets, greedy and best-of-4 (`--unconditioned`: traces without prefixes, one setting each).
The APR model gets 2,500 steps of 12,288-token batches; the SoS+ model as many steps of the
same batches as give it the APR model's supervised tokens. GRPO then trains the APR model on
rollouts at one sub-call budget (16 problems x 8 rollouts a step, the settings under which
the GRPO benchmark's sampled reward rose) and the APR evaluation is repeated on it. Each stage
is skipped when its output exists, so the command resumes. Prints the comparison table,
per-problem sign tests, and the APR model before and after GRPO; the reports (with the
paper's three plots) are `report/` (SFT models) and `report-grpo/` (the GRPO model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from grpo_learning import sign_test

from apr.config import load
from apr.report import run_compare
from apr.stages import datagen, evaluate, grpo, sft
from apr.train.data import load_sequences

SPACE = ["problems.n_numbers=3", "problems.num_max=15", "problems.target_max=40",
         "problems.train_size=3000", "problems.val_size=200", "problems.test_size=10"]
CONDITIONED = ["apr.budget_prefix=true", "sos.budget_prefix=true"]
SFT = ["shape=tiny", "context=2048", "tokens_per_batch=12288", "warmup_steps=20",
       "eval_every=200", "checkpoint_every=100"]
# The training traces' sub-call budgets run 0..10 and their token budgets 512 and 1024.
APR_BUDGETS = [2, 4, 6, 8, 10]
SOS_BUDGETS = [512, 1024]
GRPO = ["prompts_per_step=16", "group_size=8", "temperature=0.7", "lr=5e-5", "warmup_steps=2",
        "loss_average=rollout", "context=1024", "children_per_spawn=0",
        "tokens_per_batch=16384", "val_problems=0", "checkpoint_every=2", "sidecar=auto"]
CONTEXTS = [256, 384, 512, 768, 1024, 1536, 2048]
TOTALS = [256, 512, 1024, 2048, 4096, 8192]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/cpu-compare")
    parser.add_argument("--apr-steps", type=int, default=2500)
    parser.add_argument("--problems", type=int, default=200, help="val problems evaluated")
    parser.add_argument("--grpo-steps", type=int, default=8, help="0: no GRPO stage")
    parser.add_argument("--grpo-budget", type=int, default=8,
                        help="the rollouts' sub-call budget (conditioned traces only)")
    parser.add_argument("--unconditioned", action="store_true",
                        help="traces without budget prefixes")
    args = parser.parse_args()
    work = Path(args.workdir)
    data = work / "data"
    conditioned = not args.unconditioned
    if not (data / "stats.json").is_file():
        space = [*SPACE, *(CONDITIONED if conditioned else [])]
        datagen.run(load(datagen.DatagenConfig, "local", datagen.SECTION, space), data,
                    progress=False)
    elif conditioned != is_conditioned(data):
        sys.exit(f"{data} holds {'un' if conditioned else ''}conditioned traces: use another "
                 f"--workdir{'' if conditioned else ' or drop --unconditioned'}")

    shared = [f"max_problems={args.problems}", "context=2048", f"context_limits={CONTEXTS}",
              f"total_token_limits={TOTALS}"]
    apr_eval = [*shared, "modes=[apr]", f"apr_budgets={APR_BUDGETS if conditioned else [0]}"]
    apr_run = train(work / "sft-apr", data, ["traces=apr", f"max_steps={args.apr_steps}"])
    apr_tokens = json.loads((apr_run / "sft.json").read_text())["train_target_tokens"]
    evaluations = {"apr": run_eval(work / "eval-apr", apr_run / "model", data, apr_eval)}
    if args.grpo_steps:
        budget = [f"budget={args.grpo_budget}"] if conditioned else []
        grpo_model = run_grpo(work / "grpo", apr_run / "model", data,
                              [f"steps={args.grpo_steps}", *budget])
        evaluations["grpo"] = run_eval(work / "eval-grpo", grpo_model, data, apr_eval)
    sos_run = train(work / "sft-sos", data, ["traces=sos",
                                             f"max_steps={matching_steps(data, apr_tokens)}"])
    sos_tokens = json.loads((sos_run / "sft.json").read_text())["train_target_tokens"]
    print(f"supervised tokens: APR {apr_tokens:,}, SoS+ {sos_tokens:,}", flush=True)
    evaluations["sos"] = run_eval(work / "eval-sos", sos_run / "model", data, [
        *shared, "modes=[sos]", "sos_samples=[1,4]",
        f"sos_token_budgets={SOS_BUDGETS if conditioned else [0]}"])

    metrics = run_compare(evaluations["apr"], evaluations["sos"], work / "report")
    print_table(metrics)
    print_sign_tests(evaluations["apr"], evaluations["sos"], metrics["settings"])
    print(f"report: {work / 'report' / 'report.md'}")
    if "grpo" in evaluations:
        after = run_compare(evaluations["grpo"], evaluations["sos"], work / "report-grpo")
        print_grpo(metrics, after, evaluations["apr"], evaluations["grpo"])
        print(f"report after GRPO: {work / 'report-grpo' / 'report.md'}")


def is_conditioned(data: Path) -> bool:
    """Whether a dataset's traces carry budget prefixes (its config says)."""
    config = load(datagen.DatagenConfig, str(data / "config.yaml"), datagen.SECTION, [])
    return config.apr.budget_prefix


def train(out: Path, data: Path, overrides: list[str]) -> Path:
    if not (out / "sft.json").is_file():
        config = load(sft.SFTConfig, "local", sft.SECTION, [*SFT, *overrides])
        sft.run(config, data, out, resume=True, progress=False)
    return out


def matching_steps(data: Path, target_tokens: int) -> int:
    """SoS+ steps of the same batches that hold `target_tokens` supervised tokens (SoS+
    sequences carry more of them per batch: its prompts are short)."""
    config = load(sft.SFTConfig, "local", sft.SECTION, [*SFT, "traces=sos"])
    sequences = load_sequences(data, "sos", "train", config.keep, config.context)
    batches = sft.layout(config).plan(sequences.lengths, config.seed, 0)
    per_step = int(sequences.target_lengths.sum()) / len(batches)
    return math.ceil(target_tokens / per_step)


def run_eval(out: Path, model: Path, data: Path, overrides: list[str]) -> Path:
    if not (out / "metrics.json").is_file():
        config = load(evaluate.EvalConfig, "local", evaluate.SECTION, overrides)
        evaluate.run(config, model, data, out, progress=False)
    return out


def run_grpo(out: Path, model: Path, data: Path, overrides: list[str]) -> Path:
    if not (out / "model" / "config.json").is_file():
        config = load(grpo.GRPOConfig, "local", grpo.SECTION, [*GRPO, *overrides])
        grpo.run(config, model, data, out, resume=True, progress=False)
    return out / "model"


def print_table(metrics: dict) -> None:
    print("\n| setting | accuracy | children | total tokens | sequential tokens | longest "
          "context | latency s | " + " | ".join(f"C={c}" for c in CONTEXTS) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(CONTEXTS))
    for name, m in metrics["settings"].items():
        at = m["accuracy_at_context"]
        print(f"| {name} | {100 * m['accuracy']:.1f}% | {m['children_per_problem']:.2f} | "
              f"{m['tokens_total'].get('mean', 0):.0f} | {m['tokens_sequential'].get('mean', 0):.0f}"
              f" | {m['longest_context'].get('mean', 0):.0f} | {m['latency_s'].get('mean', 0):.3f}"
              f" | " + " | ".join(f"{100 * at[str(c)]:.1f}%" for c in CONTEXTS) + " |")


def results(path: Path) -> dict[str, dict[str, dict]]:
    """An evaluation's result rows by setting, then by problem id."""
    out: dict[str, dict[str, dict]] = {}
    for line in (path / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["setting"], {})[r["id"]] = r
    return out


def best_greedy(settings: dict, mode: str) -> str:
    """The most accurate single-sample setting of a mode (its budget chosen after the fact,
    which favours each side alike)."""
    names = [n for n in settings if n.startswith(mode) and "-n" not in n]
    return max(names, key=lambda n: settings[n]["accuracy"])


def print_sign_tests(apr_eval: Path, sos_eval: Path, settings: dict) -> None:
    """Per problem, the best greedy APR setting against the best greedy SoS+ setting at each
    context limit: the problems only one of them solves, and the two-sided sign test."""
    apr_name, sos_name = best_greedy(settings, "apr"), best_greedy(settings, "sos")
    apr, sos = results(apr_eval)[apr_name], results(sos_eval)[sos_name]
    print(f"\nper problem, {apr_name} against {sos_name}:")
    for c in CONTEXTS:
        def ok(r):
            return r["correct"] and r["tokens"]["longest_context"] <= c

        only_apr = sum(ok(apr[i]) and not ok(sos[i]) for i in apr)
        only_sos = sum(ok(sos[i]) and not ok(apr[i]) for i in apr)
        print(f"C={c}: only APR {only_apr}, only SoS+ {only_sos}, "
              f"sign test p = {sign_test(only_apr, only_sos):.3g}")


def print_grpo(before: dict, after: dict, before_eval: Path, after_eval: Path) -> None:
    """Each APR setting before and after GRPO, with the sign test on the problems only one of
    the two models solves."""
    rows_before, rows_after = results(before_eval), results(after_eval)
    print("\n| APR setting | accuracy before -> after GRPO | children | sequential tokens "
          "| total tokens | only before / only after | sign test p |")
    print("|---|---|---|---|---|---:|---:|")
    for name, a in after["settings"].items():
        if not name.startswith("apr"):
            continue
        b = before["settings"][name]
        lost = sum(r["correct"] and not rows_after[name][i]["correct"]
                   for i, r in rows_before[name].items())
        gained = sum(r["correct"] and not rows_before[name][i]["correct"]
                     for i, r in rows_after[name].items())
        print(f"| {name} | {100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}% | "
              f"{b['children_per_problem']:.2f} -> {a['children_per_problem']:.2f} | "
              f"{b['tokens_sequential'].get('mean', 0):.0f} -> "
              f"{a['tokens_sequential'].get('mean', 0):.0f} | "
              f"{b['tokens_total'].get('mean', 0):.0f} -> {a['tokens_total'].get('mean', 0):.0f}"
              f" | {lost} / {gained} | {sign_test(gained, lost):.3g} |")


if __name__ == "__main__":
    sys.exit(main())
