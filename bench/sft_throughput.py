"""SFT training throughput: our loop on real APR threads against a plain dense baseline.

    python bench/sft_throughput.py --data runs/gpu/data --preset small     (an H100)
    python bench/sft_throughput.py --data runs/grpo-bench/data --preset tiny --steps 3 --context 1024

Baseline: `LlamaForCausalLM` with its own loss on dense random batches (every token real,
no padding), bf16 autocast and fused AdamW, eager (and compiled with `--compile`). Ours: `apr.stages.sft`'s model,
optimizer and loss on real threads, in both layouts (length buckets; packed rows with attention
kept inside each sequence); only non-padding tokens count. All run in the same process, one
after the other, after warm-up steps.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from apr import model as model_lib
from apr.stages.sft import (
    SFTConfig,
    flops_per_token,
    make_optimizer,
    tensors,
    token_loss,
)
from apr.train.data import Layout, Sequences, load_sequences


def timed_steps(step, warmup: int, steps: int, device) -> float:
    for _ in range(warmup):
        step(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclass
class Row:
    """One timed variant: real (non-padding) tokens per second and the TFLOP/s they imply."""

    variant: str
    tokens_per_s: float
    tflops: float


def measure(seqs: Sequences, preset: str, context: int, tokens_per_batch: int,
            dense_seq: int | None = None, steps: int = 20, warmup: int = 5,
            compile: bool = False) -> list[Row]:
    """Time the dense baseline, then our loop in both layouts (eager, then compiled with
    `compile`), on `seqs`; the first row is the eager dense baseline. Callable from other
    benchmarks (bench/gpu_suite.py), so it takes loaded sequences, not a path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else nullcontext
    config = SFTConfig(shape=preset, context=context,
                       tokens_per_batch=tokens_per_batch, pad_multiple=64)
    layouts = {"ours, buckets": Layout(tokens_per_batch, 64),
               "ours, packed rows": Layout(tokens_per_batch, 64, pack_width=context)}
    plans = {name: layout.plan(seqs.lengths, seed=0, epoch=0) for name, layout in layouts.items()}
    dense_seq = dense_seq or context
    dense_batch = max(1, tokens_per_batch // dense_seq)
    print(f"device {device}, preset {preset}, {len(seqs)} real sequences "
          f"(median {int(np.median(seqs.lengths))} tokens), "
          + ", ".join(f"{len(plan)} batches ({name})" for name, plan in plans.items()))

    rows = []
    for compiled in ([False, True] if compile else [False]):
        for variant in ("dense baseline", *layouts):
            model = model_lib.build(preset, context).to(device)
            optimizer = make_optimizer(model, config, device)
            run = torch.compile(model) if compiled else model
            flops = flops_per_token(model, context)
            counted = []

            if variant == "dense baseline":
                ids = torch.randint(4, model.config.vocab_size, (dense_batch, dense_seq),
                                    device=device)

                def step(i, run=run, optimizer=optimizer, ids=ids, counted=counted):
                    with autocast():
                        loss = run(input_ids=ids, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    counted.append(ids.numel())
            else:
                def step(i, run=run, optimizer=optimizer, counted=counted,
                         pad=model.config.pad_token_id, layout=layouts[variant],
                         batches=plans[variant]):
                    indices = batches[i % len(batches)]
                    ids, mask, positions = tensors(layout.collate(seqs, indices, pad), device)
                    with autocast():
                        loss = token_loss(run, ids, mask, positions) / mask.sum()
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    counted.append(int(seqs.lengths[indices].sum()))

            seconds = timed_steps(step, warmup, steps, device)
            tokens = sum(counted[warmup:])
            rate = tokens / seconds
            rows.append(Row(variant + (" compiled" if compiled else ""), rate,
                            rate * flops / 1e12))
            del model, optimizer, run, step  # the step's defaults hold the model too
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an `apr datagen` output directory")
    parser.add_argument("--preset", default="small", choices=list(model_lib.PRESETS))
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--tokens-per-batch", type=int, default=65536)
    parser.add_argument("--dense-seq", type=int, default=None, help="baseline sequence length")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time compiled variants")
    parser.add_argument("--peak-tflops", type=float, default=783.0,
                        help="measured bf16 matmul peak (H100: 783)")
    args = parser.parse_args()

    seqs = load_sequences(args.data, "apr", "train", "all", args.context)
    rows = measure(seqs, args.preset, args.context, args.tokens_per_batch, args.dense_seq,
                   args.steps, args.warmup, args.compile)
    base = rows[0].tokens_per_s
    print(f"{'variant':<32}{'tokens/s':>14}{'TFLOP/s':>10}{'MFU':>8}{'vs dense eager':>16}")
    for row in rows:
        print(f"{row.variant:<32}{row.tokens_per_s:>14,.0f}{row.tflops:>10.1f}"
              f"{row.tflops / args.peak_tflops:>8.1%}{row.tokens_per_s / base:>15.2f}x")


if __name__ == "__main__":
    main()
