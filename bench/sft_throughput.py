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
from apr.train.data import Layout, load_sequences


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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else nullcontext
    config = SFTConfig(preset=args.preset, context=args.context,
                       tokens_per_batch=args.tokens_per_batch, pad_multiple=64)
    seqs = load_sequences(args.data, "apr", "train", "all", args.context)
    layouts = {"ours, buckets": Layout(args.tokens_per_batch, 64),
               "ours, packed rows": Layout(args.tokens_per_batch, 64, pack_width=args.context)}
    plans = {name: layout.plan(seqs.lengths, seed=0, epoch=0) for name, layout in layouts.items()}
    dense_seq = args.dense_seq or args.context
    dense_batch = max(1, args.tokens_per_batch // dense_seq)
    print(f"device {device}, preset {args.preset}, {len(seqs)} real sequences "
          f"(median {int(np.median(seqs.lengths))} tokens), "
          + ", ".join(f"{len(plan)} batches ({name})" for name, plan in plans.items()))

    rows = []
    for compiled in ([False, True] if args.compile else [False]):
        for variant in ("dense baseline", *layouts):
            model = model_lib.build(args.preset, args.context).to(device)
            optimizer = make_optimizer(model, config, device)
            run = torch.compile(model) if compiled else model
            flops = flops_per_token(model, args.context)
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

            seconds = timed_steps(step, args.warmup, args.steps, device)
            tokens = sum(counted[args.warmup:])
            rate = tokens / seconds
            rows.append((variant + (" compiled" if compiled else ""), rate,
                         rate * flops / 1e12))
            del model, optimizer, run

    base = rows[0][1]
    print(f"{'variant':<32}{'tokens/s':>14}{'TFLOP/s':>10}{'MFU':>8}{'vs dense eager':>16}")
    for name, rate, tflops in rows:
        print(f"{name:<32}{rate:>14,.0f}{tflops:>10.1f}{tflops / args.peak_tflops:>8.1%}"
              f"{rate / base:>15.2f}x")


if __name__ == "__main__":
    main()
