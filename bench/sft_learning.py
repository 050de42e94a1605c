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
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from apr.config import load
from apr.stages import datagen, evaluate, sft


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
    args = parser.parse_args()
    work = Path(args.workdir)
    data, run = work / "data", work / f"sft-{args.traces}"

    if not (data / "stats.json").is_file():
        datagen.run(load(datagen.DatagenConfig, "local", datagen.SECTION, args.data_set), data,
                    progress=False)
    config = load(sft.SFTConfig, "local", sft.SECTION, [
        f"traces={args.traces}", f"max_steps={args.steps}", f"checkpoint_every={args.every}",
        f"keep_checkpoints={args.steps // args.every + 1}", f"eval_every={args.steps}",
        *args.sft_set])
    started = time.perf_counter()
    sft.run(config, data, run, resume=True, progress=False)
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
