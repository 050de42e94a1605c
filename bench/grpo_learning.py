"""Does GRPO learn? Validation accuracy of an SFT'd model before and during GRPO, and where a
step's time goes (rollouts, training, weight sync).

CPU default: the tiny model on an easy Countdown (3 numbers in 1..15, targets 10..40: small
enough arithmetic for a 0.8M-parameter model to learn in minutes on a CPU; on the paper's
1..99 range it learns the trace format but not the sums, and every reward is 0). Datagen and
SFT are skipped when their output exists; GRPO resumes from its checkpoint (`--fresh-grpo`
starts it again):

    python bench/grpo_learning.py --workdir runs/grpo-bench
    python bench/grpo_learning.py --workdir runs/grpo-bench-gpu --numbers 4 --num-max 99 \
        --target-max 100 --sft-shape small --sft-steps 3000   (an H100; not measured yet)

`--fixed-problems 8` checks the loop itself: GRPO trains and validates on the same first 8
validation problems every step, so the sampled reward on them should rise within a few steps
(printed per problem); a loop that cannot raise it has a bug, one that can but does not lift
held-out accuracy needs more problems per step or more steps.

Rollouts go through a rollout server the run starts: SGLang where it is installed on a GPU,
else `apr engine serve`.
Prints the validation curve and the mean step-time breakdown; with `--grpo-set val_samples=4`
also the validation problems' sampled reward and a per-problem sign test against step 0.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from apr import atomic
from apr.config import load
from apr.stages import datagen, grpo, sft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/grpo-bench")
    parser.add_argument("--numbers", type=int, default=3, help="starting numbers per problem")
    parser.add_argument("--num-max", type=int, default=15, help="largest starting number")
    parser.add_argument("--target-max", type=int, default=40)
    parser.add_argument("--train-problems", type=int, default=3000)
    parser.add_argument("--val-problems", type=int, default=200)
    parser.add_argument("--sft-shape", default="tiny")
    parser.add_argument("--sft-steps", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps")
    parser.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fixed-problems", type=int, default=0, metavar="N",
                        help="train and validate on the first N validation problems only")
    parser.add_argument("--fresh-grpo", action="store_true", help="discard an earlier GRPO run")
    args = parser.parse_args()
    work = Path(args.workdir)
    data, sft_out, grpo_out = work / "data", work / "sft", work / "grpo"

    started = time.perf_counter()
    if not (data / "stats.json").is_file():
        config = load(datagen.DatagenConfig, "local", datagen.SECTION, [
            f"problems.n_numbers={args.numbers}", f"problems.num_max={args.num_max}",
            f"problems.target_max={args.target_max}", f"problems.train_size={args.train_problems}",
            f"problems.val_size={args.val_problems}", "problems.test_size=10"])
        datagen.run(config, data, progress=False)
    datagen_s = time.perf_counter() - started
    if not (sft_out / "model" / "config.json").is_file():
        config = load(sft.SFTConfig, "local", sft.SECTION, [
            f"shape={args.sft_shape}", f"max_steps={args.sft_steps}", "context=2048",
            "tokens_per_batch=12288", "warmup_steps=20", "eval_every=200",
            "checkpoint_every=100"])
        sft.run(config, data, sft_out, resume=True, progress=False)
    sft_s = time.perf_counter() - started - datagen_s
    problems, fixed = data, []
    if args.fixed_problems:
        problems = fixed_problems(data, work / f"fixed{args.fixed_problems}", args.fixed_problems)
        grpo_out = work / f"grpo-fixed{args.fixed_problems}"
        fixed = [f"prompts_per_step={args.fixed_problems}", f"val_problems={args.fixed_problems}"]
    if args.fresh_grpo:
        shutil.rmtree(grpo_out, ignore_errors=True)
    config = load(grpo.GRPOConfig, "local", grpo.SECTION, [
        f"steps={args.steps}", "prompts_per_step=16", "group_size=4", "lr=3e-5",
        "context=1024", "children_per_spawn=0", "tokens_per_batch=16384", "val_every=4",
        "sidecar=auto",
        f"val_problems={args.val_problems}", "checkpoint_every=5", *fixed, *args.grpo_set])
    result = grpo.run(config, sft_out / "model", problems, grpo_out, resume=True,
                      progress=False)
    grpo_s = time.perf_counter() - started - datagen_s - sft_s

    records = [json.loads(line) for line in (grpo_out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    print(f"\ndatagen {datagen_s:.0f} s, SFT {sft_s:.0f} s, GRPO {grpo_s:.0f} s "
          f"({args.numbers}-number Countdown, {args.sft_shape} model, {args.steps} GRPO steps)")
    print("\n| step | val accuracy (greedy) | val reward (sampled) | val children "
          "| train reward (last 5 steps) |")
    print("|---:|---:|---:|---:|---:|")
    for r in (r for r in records if "val_accuracy" in r):
        window = [s["reward"] for s in steps if r["step"] - 5 < s["step"] <= r["step"]]
        reward = f"{statistics.mean(window):.3f}" if window else "-"
        sampled = f"{r['val_reward']:.3f}" if "val_reward" in r else "-"
        print(f"| {r['step']} | {r['val_accuracy']:.3f} | {sampled} | {r['val_children']:.2f} "
              f"| {reward} |")
    if steps:
        print("\n| mean per step | rollout s | train s | weight sync s | generated tokens |")
        print("|---|---:|---:|---:|---:|")
        print(f"| {len(steps)} steps | {statistics.mean(s['rollout_s'] for s in steps):.2f} | "
              f"{statistics.mean(s['train_s'] for s in steps):.2f} | "
              f"{statistics.mean(s['sync_s'] for s in steps):.3f} | "
              f"{statistics.mean(s['generated_tokens'] for s in steps):.0f} |")
    if args.fixed_problems:
        print_problem_rewards(grpo_out / "rollouts.jsonl")
    print_outcomes(grpo_out / "rollouts.jsonl")
    print(f"\nvalidation accuracy {result.initial_val_accuracy} -> {result.val_accuracy}")
    vals = [r for r in records if "val_solved" in r]
    for later in vals[1:]:
        print(paired(set(vals[0]["val_solved"]), set(later["val_solved"]), later["step"]))
    sampled = [r for r in records if "val_sampled_solved" in r]
    for later in sampled[1:]:
        print(paired_counts(sampled[0]["val_sampled_solved"], later["val_sampled_solved"],
                            later["step"]))


def fixed_problems(data: Path, out: Path, n: int) -> Path:
    """A problems directory whose train and val splits are both the first n validation
    problems."""
    lines = (data / "problems" / "val.jsonl").read_text().splitlines()[:n]
    (out / "problems").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        atomic.write_text(out / "problems" / f"{split}.jsonl", "\n".join(lines) + "\n")
    return out


def print_problem_rewards(rollouts: Path) -> None:
    """Each problem's mean sampled reward at the first and the last step, and all of them."""
    by_problem: dict[str, dict[int, list[float]]] = {}
    for line in rollouts.read_text().splitlines():
        r = json.loads(line)
        key = f"{r['nums']} -> {r['target']}"
        by_problem.setdefault(key, {}).setdefault(r["step"], []).append(r["reward"])
    first = min(min(steps) for steps in by_problem.values())
    last = max(max(steps) for steps in by_problem.values())
    print(f"\n| problem | reward, step {first + 1} | reward, step {last + 1} |")
    print("|---|---:|---:|")
    for key, steps in by_problem.items():
        before, after = (statistics.mean(steps.get(s, [0])) for s in (first, last))
        print(f"| {key} | {before:.2f} | {after:.2f} |")
    for step in (first, last):
        rewards = [x for steps in by_problem.values() for x in steps.get(step, [])]
        print(f"step {step + 1}: {sum(rewards):g} of {len(rewards)} rollouts rewarded")


def print_outcomes(rollouts: Path, window: int = 5) -> None:
    """How the training rollouts ended, `window` steps at a time: whether GRPO turns failures
    into solutions, or only into claimed ones (a wrong solution is rewarded like none)."""
    columns = ("correct", "no_solution", "wrong_solution:wrong_arithmetic", "wrong_solution")
    counts: dict[int, dict[str, int]] = {}
    for line in rollouts.read_text().splitlines():
        r = json.loads(line)
        failure = r["failure"] or "correct"
        kind = next((c for c in columns if failure.startswith(c)), "other")
        row = counts.setdefault(r["step"] // window, {})
        row[kind] = row.get(kind, 0) + 1
    labels = ("correct", "no solution found", "wrong arithmetic", "other wrong solutions",
              "other")
    print(f"\n| steps | rollouts | {' | '.join(labels)} |")
    print("|---|---:|" + "---:|" * len(labels))
    for w, row in sorted(counts.items()):
        n = sum(row.values())
        shares = " | ".join(f"{row.get(c, 0) / n:.3f}" for c in (*columns, "other"))
        print(f"| {w * window + 1}-{w * window + window} | {n} | {shares} |")


def paired(before: set[int], after: set[int], step: int) -> str:
    """The same validation problems before GRPO and after `step`: how many each solved that
    the other did not, and the two-sided sign test on those."""
    gained, lost = len(after - before), len(before - after)
    return (f"same problems, step 0 -> step {step}: solved by both {len(before & after)}, "
            f"only after GRPO {gained}, only before {lost} (sign test p = "
            f"{sign_test(gained, lost):.3g})")


def paired_counts(before: list[int], after: list[int], step: int) -> str:
    """Sampled solves per validation problem before GRPO and after `step`: the mean change per
    problem with its standard error (paired), how many problems gained or lost solves, and
    the sign test on those."""
    diffs = [b - a for a, b in zip(before, after)]
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return (f"sampled solves, step 0 -> step {step}: {sum(before)} -> {sum(after)} (per problem "
            f"{statistics.mean(diffs):+.3f} +- {se:.3f} s.e.); problems with more {up}, fewer "
            f"{down}, same {len(diffs) - up - down} (sign test p = {sign_test(up, down):.3g})")


def sign_test(ups: int, downs: int) -> float:
    """Two-sided exact binomial test of ups against downs at p = 1/2."""
    n, k = ups + downs, min(ups, downs)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


if __name__ == "__main__":
    main()
