"""When does SFT teach the tiny model to solve? Greedy APR accuracy on held-out problems at
every Nth SFT checkpoint, against the training tokens spent to reach it.

    python bench/sft_learning.py --workdir runs/sft-learning --steps 800 --every 100 \
        --data-set problems.n_numbers=3 --data-set problems.num_max=15 \
        --data-set problems.target_max=40 --data-set problems.train_size=3000 \
        --sft-set tokens_per_batch=4096 --sft-set lr=3e-3 --sft-set context=1024

Datagen runs once (skipped when the workdir has data); SFT keeps every checkpoint of the run
and resumes; each checkpoint is then evaluated (the local engine, greedy, `--problems` val
problems, a `--context`-token window). Prints one line per checkpoint: step, training tokens,
accuracy, children per problem and how the unsolved ones failed.

Two variations, for the question of what could teach faster: `--hidden H --layers L`, a
shape other than the presets (heads of 32 dimensions); `--drill-seconds S`, an arithmetic
drill before SFT (lines `a*b=c`, operands up to `--drill-num-max` and results of one earlier
operation, in the solvers' operation rules), which SFT then starts from.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from apr import model as model_lib
from apr import tokenizer as domain_tokenizer
from apr.config import load
from apr.countdown.search import combinations
from apr.stages import datagen, evaluate, sft

CUSTOM = "bench-custom"  # the preset name of a --hidden/--layers shape


def drill_line(rng: random.Random, num_max: int) -> str:
    """One operation as the traces write it, on numbers up to num_max or on the result of an
    earlier operation (what a child computes)."""
    a, b = rng.randint(1, num_max), rng.randint(1, num_max)
    if rng.random() < 0.5:
        a = max(1, rng.choice(combinations(a, rng.randint(1, num_max)))[3])
    if rng.random() < 0.5:
        a, b = b, a
    symbol, left, right, result = rng.choice(combinations(a, b))
    return f"{left}{symbol}{right}={result}\n"


def drill(model, seconds: float, num_max: int, lr: float) -> int:
    """Train `model` on arithmetic lines for `seconds`; returns the steps taken."""
    import torch

    tok = domain_tokenizer.build()
    bos, eos = tok.token_to_id(domain_tokenizer.BOS), tok.token_to_id(domain_tokenizer.EOS)
    pad = model.config.pad_token_id
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    started, step = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        rows = [[bos, *tok.encode("".join(drill_line(rng, num_max) for _ in range(24)),
                                  add_special_tokens=False).ids, eos] for _ in range(8)]
        width = max(map(len, rows))
        ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
        labels = ids.masked_fill(ids == pad, -100)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        model(input_ids=ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/sft-learning")
    parser.add_argument("--steps", type=int, default=800, help="SFT steps in all")
    parser.add_argument("--every", type=int, default=100, help="evaluate every N steps")
    parser.add_argument("--traces", default="apr", choices=("apr", "sos"))
    parser.add_argument("--problems", type=int, default=100, help="val problems evaluated")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--hidden", type=int, help="hidden size of a custom shape")
    parser.add_argument("--layers", type=int, help="layers of a custom shape")
    parser.add_argument("--drill-seconds", type=float, default=0.0)
    parser.add_argument("--drill-num-max", type=int, default=15)
    parser.add_argument("--drill-lr", type=float, default=3e-3)
    args = parser.parse_args()
    if args.hidden or args.layers:
        hidden, layers = args.hidden or 128, args.layers or 4
        if hidden % 32 or layers < 1:
            parser.error("--hidden must be a multiple of 32 (heads of 32) and --layers 1 or more")
        model_lib.PRESETS[CUSTOM] = model_lib.Shape(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
            intermediate_size=hidden * 43 // 16)
        args.sft_set.append(f"shape={CUSTOM}")
    work = Path(args.workdir)
    data, run = work / "data", work / f"sft-{args.traces}"

    if not (data / "stats.json").is_file():
        datagen.run(load(datagen.DatagenConfig, "local", datagen.SECTION, args.data_set), data,
                    progress=False)
    config = load(sft.SFTConfig, "local", sft.SECTION, [
        f"traces={args.traces}", f"max_steps={args.steps}", f"checkpoint_every={args.every}",
        f"keep_checkpoints={args.steps // args.every + 1}", f"eval_every={args.steps}",
        *args.sft_set])
    build = model_lib.build
    if args.drill_seconds and not (run / "checkpoints").is_dir():
        drilled = model_lib.build(config.shape, config.context, config.seed)
        steps = drill(drilled, args.drill_seconds, args.drill_num_max, args.drill_lr)
        print(f"drill: {steps} steps in {args.drill_seconds:.0f} s", flush=True)
        model_lib.build = lambda *_, **__: drilled  # SFT starts from the drilled weights
    started = time.perf_counter()
    try:
        sft.run(config, data, run, resume=True, progress=False)
    finally:
        model_lib.build = build
    print(f"SFT: {args.steps} steps in {time.perf_counter() - started:.0f} s "
          f"(0 when resumed whole)", flush=True)

    tokens = {}  # step -> training target tokens, from the checkpoints' trainer state
    for checkpoint in sorted((run / "checkpoints").glob("step-*")):
        state = json.loads((checkpoint / "trainer.json").read_text())
        tokens[state["step"]] = (checkpoint, state["tokens"])
    for step, (checkpoint, spent) in sorted(tokens.items()):
        model = work / "eval-model"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(run / "model", model)  # config and tokenizer of the run
        shutil.copyfile(checkpoint / "model.safetensors", model / "model.safetensors")
        eval_config = load(evaluate.EvalConfig, "local", evaluate.SECTION, [
            f"max_problems={args.problems}", f"context={args.context}",
            f"modes=[{args.traces}]", "context_limits=[]", "total_token_limits=[]"])
        out = work / "eval"
        shutil.rmtree(out, ignore_errors=True)
        metrics = evaluate.run(eval_config, model, data, out, progress=False)
        [setting] = metrics["settings"].values()
        print(json.dumps({"step": step, "train_tokens": spent, "accuracy": setting["accuracy"],
                          "children": setting["children_per_problem"],
                          "failures": setting["failures"], "eval_s": metrics["seconds"]}),
              flush=True)


if __name__ == "__main__":
    main()
