"""APR against SoS+ at the scale a 2-core CPU allows: the same tiny shape trained on the same
problems with the same number of supervised tokens, evaluated on the same held-out problems.

    python bench/cpu_compare.py --workdir runs/cpu-compare          (about 1.5 hours)

The setting is 3-number Countdown (numbers 1..15, targets 10..40): the tiny model solves
nothing on the paper's 4 numbers in 1..99 in hours of this CPU, and on these it solves a
quarter after about 13M supervised tokens (docs/RESULTS.md). Each stage is skipped when its
output exists, so the command resumes, and its stages can be given models trained before:
the APR SFT model is the GRPO benchmark's (`bench/grpo_learning.py`, 2,500 steps of
12,288-token batches); the SoS+ model gets as many steps of the same batches as give it the
APR model's supervised tokens. Both are evaluated greedily at the full 2,048-token window,
SoS+ also best-of-4 sampled; the comparison report draws accuracy against the context
window, against total tokens and against latency, and per-problem sign tests compare the
two models where their accuracies are close.
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
from apr.stages import datagen, evaluate, sft
from apr.train.data import load_sequences

SPACE = ["problems.n_numbers=3", "problems.num_max=15", "problems.target_max=40",
         "problems.train_size=3000", "problems.val_size=200", "problems.test_size=10"]
SFT = ["shape=tiny", "context=2048", "tokens_per_batch=12288", "warmup_steps=20",
       "eval_every=200", "checkpoint_every=100"]
CONTEXTS = [256, 384, 512, 768, 1024, 1536, 2048]
TOTALS = [256, 512, 1024, 2048, 4096, 8192]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/cpu-compare")
    parser.add_argument("--apr-steps", type=int, default=2500)
    parser.add_argument("--problems", type=int, default=200, help="val problems evaluated")
    args = parser.parse_args()
    work = Path(args.workdir)
    data = work / "data"
    if not (data / "stats.json").is_file():
        datagen.run(load(datagen.DatagenConfig, "local", datagen.SECTION, SPACE), data,
                    progress=False)
    apr_run = train(work / "sft-apr", data, ["traces=apr", f"max_steps={args.apr_steps}"])
    apr_tokens = json.loads((apr_run / "sft.json").read_text())["train_target_tokens"]
    sos_run = train(work / "sft-sos", data, ["traces=sos",
                                             f"max_steps={matching_steps(data, apr_tokens)}"])
    sos_tokens = json.loads((sos_run / "sft.json").read_text())["train_target_tokens"]
    print(f"supervised tokens: APR {apr_tokens:,}, SoS+ {sos_tokens:,}", flush=True)

    shared = [f"max_problems={args.problems}", "context=2048", f"context_limits={CONTEXTS}",
              f"total_token_limits={TOTALS}"]
    evaluations = {
        "apr": run_eval(work / "eval-apr", apr_run / "model", data, [*shared, "modes=[apr]"]),
        "sos": run_eval(work / "eval-sos", sos_run / "model", data,
                        [*shared, "modes=[sos]", "sos_samples=[1,4]"]),
    }
    metrics = run_compare(evaluations["apr"], evaluations["sos"], work / "report")
    print_table(metrics)
    print_sign_tests(evaluations["apr"], evaluations["sos"])
    print(f"report: {work / 'report' / 'report.md'}")


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


def print_sign_tests(apr_eval: Path, sos_eval: Path) -> None:
    """Per problem, APR greedy against SoS+ greedy (N=1) at each context limit: the problems
    only one of them solves, and the two-sided sign test on those."""
    def solved(path: Path, setting: str) -> dict[str, dict]:
        rows = [json.loads(x) for x in (path / "results.jsonl").read_text().splitlines()]
        return {r["id"]: r for r in rows if r["setting"] == setting}

    apr, sos = solved(apr_eval, "apr"), solved(sos_eval, "sos")
    for c in CONTEXTS:
        def ok(r):
            return r["correct"] and r["tokens"]["longest_context"] <= c

        only_apr = sum(ok(apr[i]) and not ok(sos[i]) for i in apr)
        only_sos = sum(ok(sos[i]) and not ok(apr[i]) for i in apr)
        print(f"C={c}: only APR {only_apr}, only SoS+ {only_sos}, "
              f"sign test p = {sign_test(only_apr, only_sos):.3g}")


if __name__ == "__main__":
    sys.exit(main())
