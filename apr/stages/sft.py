"""The SFT stage: train the Llama-shaped model from scratch on solver threads.

    apr sft --config local --data runs/local/data --out runs/local/sft-apr [--resume]
    torchrun --nproc_per_node 8 -m apr.cli sft ...          (single-node DDP)

The loop reads top to bottom: plan batches, then per step accumulate micro-batches, clip,
step, log, evaluate, checkpoint. Checkpoints (model, optimizer and trainer state, all in
safetensors and JSON) are written under a temporary name and renamed, and `--resume` continues
from the last complete one with the same batches in the same order.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apr import model as model_lib
from apr.config import check, check_choice, check_range, dump, option
from apr.countdown.threads import STYLES
from apr.dataset import DataError, check_tokenizer, shard_paths
from apr.resources import check_fits
from apr.train import distributed
from apr.train.checkpoints import (
    check_fresh,
    complete_checkpoints,
    pull_mirror,
    push_mirror,
    save_checkpoint,
    truncate_log,
)
from apr.train.checkpoints import resume as resume_checkpoint
from apr.train.data import (
    KEEP,
    Layout,
    Sequences,
    load_sequences,
)

log = logging.getLogger(__name__)

SECTION = "sft"
DTYPES = ("auto", "bf16", "fp32")


@dataclass
class SFTConfig:
    """Defaults follow the paper's SFT run (AdamW, peak lr 5e-5 cosine to 5e-7, betas
    0.9/0.999, weight decay 0.01, clip 1.0, 4096-token context); presets shorten it."""

    shape: str = option("paper", "model shape: tiny, small or paper (the paper's Llama-2-shaped "
                        "228M model)")
    traces: str = option("apr", 'which traces to learn: "apr" or "sos" (the SoS+ baseline)')
    keep: str = option("all", '"all" traces, as the paper, or only "solved" ones')
    context: int = option(4096, "longest sequence in tokens (paper: 4096); longer threads are "
                          "dropped and counted")
    tokens_per_batch: int = option(65_536, "tokens per micro-batch and process, padding included")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(1.0, "passes over the training threads (paper: 1)")
    max_steps: int = option(0, "optimizer steps to stop after; 0: as many steps as `epochs` take")
    lr: float = option(5e-5, "peak learning rate of AdamW (paper: 5e-5)")
    min_lr: float = option(5e-7, "learning rate at the end of the cosine decay (paper: 5e-7)")
    warmup_steps: int = option(10, "steps of linear warmup to `lr`")
    weight_decay: float = option(0.01, "AdamW weight decay of the weight matrices (paper: 0.01)")
    beta1: float = option(0.9, "AdamW beta1 (paper: 0.9)")
    beta2: float = option(0.999, "AdamW beta2 (paper: 0.999)")
    grad_clip: float = option(1.0, "gradient norm clip (paper: 1.0)")
    eval_every: int = option(200, "steps between validation losses (and at the end)")
    eval_sequences: int = option(2000, "validation sequences per evaluation (0: all)")
    checkpoint_every: int = option(500, "steps between checkpoints (and at the end)")
    keep_checkpoints: int = option(2, "complete checkpoints kept; older ones are deleted")
    log_every: int = option(10, "steps between training log lines")
    pad_multiple: int = option(64, "batch widths are rounded up to this (fewer compiled shapes)")
    packing: bool = option(False, "rows of `context` tokens holding several sequences, "
                           "not length buckets")
    seed: int = option(0, "seed of the model's initialisation and the batch order")
    dtype: str = option("auto", '"auto": bf16 autocast on CUDA, fp32 on CPU; or bf16, fp32')
    compile: bool = option(False, "torch.compile the model")
    peak_tflops: float = option(0.0, "the accelerator's measured bf16 peak, for MFU "
                                "(0: not reported)")

    def validate(self) -> None:
        check_choice("shape", self.shape, model_lib.PRESETS)
        check_choice("traces", self.traces, STYLES)
        check_choice("keep", self.keep, KEEP)
        check_choice("dtype", self.dtype, DTYPES)
        check_range("context", self.context, 16, model_lib.shape(self.shape).max_position_embeddings)
        check(self.tokens_per_batch >= self.context, "tokens_per_batch",
              f"{self.tokens_per_batch} cannot hold one {self.context}-token sequence: "
              "make it at least `context`")
        for key in ("grad_accum", "eval_every", "checkpoint_every", "log_every", "pad_multiple",
                    "keep_checkpoints"):
            check_range(key, getattr(self, key), 1)
        check_range("epochs", self.epochs, 0.0)
        check_range("max_steps", self.max_steps, 0)
        check(self.epochs > 0 or self.max_steps > 0, "epochs", "set epochs or max_steps above 0")
        check_range("lr", self.lr, 0.0)
        check_range("min_lr", self.min_lr, 0.0, self.lr)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("grad_clip", self.grad_clip, 0.0)
        check_range("eval_sequences", self.eval_sequences, 0)


# --- helpers beside the loop -------------------------------------------------------------
def check_batch_fits(config: SFTConfig, device) -> None:
    """Refuse a micro-batch no memory of `device` could hold, before data is read."""
    import torch

    shape = model_lib.shape(config.shape)
    # At the least, backward keeps each layer's inputs to its norms, attention projections
    # and MLP in fp32 (a third of the 68 KB a token takes in the tiny shape, measured).
    per_token = 4 * shape.num_hidden_layers * (4 * shape.hidden_size + 3 * shape.intermediate_size)
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    check_fits("tokens_per_batch", config.tokens_per_batch, config.tokens_per_batch * per_token,
               "lower it (and raise grad_accum to keep the step's size)", available)


def learning_rate(config: SFTConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, config: SFTConfig, device):
    """AdamW (fused on CUDA), decaying only matrices, as in nanoGPT."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type == "cuda")


def flops_per_token(model, context: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention (nanoGPT's estimate)."""
    c = model.config
    n = model_lib.parameter_count(model, embeddings=False)
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * context


def layout(config: SFTConfig) -> Layout:
    return Layout(config.tokens_per_batch, config.pad_multiple,
                  config.context if config.packing else 0)


def token_loss(model, ids, mask, positions=None):
    """Summed next-token cross entropy over the masked targets (no padding counted).

    With packed rows (`positions` restarting per sequence) the cache must stay off: transformers
    reads the restarts as sequence boundaries only when there is no cache and no mask.
    """
    import torch.nn.functional as F

    extra = {} if positions is None else {"position_ids": positions, "use_cache": False}
    logits = model(input_ids=ids, **extra).logits[:, :-1].float()
    targets = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           reduction="none")
    return (loss * mask[:, :-1].reshape(-1)).sum()


def tensors(arrays, device) -> tuple:
    """numpy arrays (None kept) onto the device."""
    import torch

    return tuple(None if a is None else torch.from_numpy(a).to(device) for a in arrays)


def validation_batches(seqs: Sequences, config: SFTConfig) -> list[np.ndarray]:
    """The batches of the first `eval_sequences` validation sequences (planned once a run)."""
    count = len(seqs) if config.eval_sequences == 0 else min(len(seqs), config.eval_sequences)
    return layout(config).plan(seqs.lengths[:count], config.seed, 0)


def evaluate(model, seqs: Sequences, batches: list[np.ndarray], config: SFTConfig, device,
             autocast, pad_id: int) -> float:
    """Mean token loss over the validation batches."""
    import torch

    total = tokens = 0.0
    model.eval()
    with torch.no_grad():
        for indices in batches:
            ids, mask, positions = tensors(layout(config).collate(seqs, indices, pad_id), device)
            with autocast():
                total += token_loss(model, ids, mask, positions).item()
            tokens += mask[:, :-1].sum().item()
    model.train()
    return total / max(tokens, 1.0)


# --- data ------------------------------------------------------------------------------
def prepare_data(config: SFTConfig, data_dir: Path, cache: Path, main: bool
                 ) -> tuple[Sequences, Sequences]:
    """Tokenized train and val sequences, cached in the run directory for resumes."""
    if not Path(data_dir).is_dir():
        raise DataError(f"training data {data_dir} does not exist: run `apr datagen` first")
    check_tokenizer(data_dir)
    out = []
    for split in ("train", "val"):
        key = _fingerprint(shard_paths(data_dir, config.traces, split))
        path = cache / f"{config.traces}-{config.keep}-{config.context}-{split}-{key}.npz"
        if not path.is_file():
            seqs = load_sequences(data_dir, config.traces, split, config.keep, config.context)
            if main:
                cache.mkdir(parents=True, exist_ok=True)
                seqs.save(path)
        else:
            seqs = Sequences.load(path)
        if len(seqs) == 0:
            raise DataError(f"no {config.traces} {split} sequences fit in {config.context} tokens "
                            f"(dropped {seqs.dropped}) under {data_dir}")
        out.append(seqs)
    return out[0], out[1]


def _fingerprint(paths: list[Path]) -> str:
    """Which trace files (resolved name, size, modification time): the tokenized cache is
    reused only for the very data it was made from, never for another --data."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class SFTResult:
    model_dir: Path
    steps: int
    final_train_loss: float
    val_loss: float
    train_sequences: int
    dropped_sequences: int

    @classmethod
    def read(cls, out: str | Path) -> "SFTResult":
        """The result of a finished run in `out` (from its sft.json), for a caller that ran
        it in other processes (torchrun)."""
        out = Path(out)
        try:
            summary = json.loads((out / "sft.json").read_text())
        except (OSError, ValueError) as e:
            raise RuntimeError(f"{out} holds no finished SFT run ({e})") from None
        return cls(out / "model", summary["steps"], summary["train_loss"], summary["val_loss"],
                   summary["train_sequences"], summary["dropped_sequences"])


def run(config: SFTConfig, data: str | Path, out: str | Path, resume: bool = False,
        progress: bool = True, mirror: str | None = None, mirror_settings=None) -> SFTResult:
    """Train; writes `out/model` (HF directory), `out/checkpoints/`, `out/metrics.jsonl`.

    `mirror` (an s3:// URI): every checkpoint is also uploaded there, and a resumed run with
    no checkpoint of its own starts from the newest one there (a retried pipeline step runs
    on a new pod with an empty disk). `mirror_settings`: its S3Settings (None: from the
    environment)."""
    import torch
    from tqdm import tqdm

    out = Path(out)
    if (out / "model" / "config.json").is_file() and not resume:
        raise FileExistsError(f"{out} already holds a trained model: choose another --out")
    if not resume:
        check_fresh(out / "checkpoints")
    dist_info, device = distributed.setup()
    check_batch_fits(config, device)
    torch.manual_seed(config.seed)
    train, val = prepare_data(config, Path(data), out / "data", dist_info.main)
    use_bf16 = config.dtype == "bf16" or (config.dtype == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    model = model_lib.build(config.shape, config.context, config.seed).to(device)
    pad_id = model.config.pad_token_id
    optimizer = make_optimizer(model, config, device)
    epoch_batches = {0: layout(config).plan(train.lengths, config.seed, 0)}
    per_epoch = len(epoch_batches[0])
    val_batches = validation_batches(val, config)
    micro_per_step = config.grad_accum * dist_info.world
    total_steps = config.max_steps or max(1, int(per_epoch * config.epochs) // micro_per_step)
    checkpoints = out / "checkpoints"
    state = {"step": 0, "tokens": 0}
    # Every node resumes from the same step: its first process fetches the mirror's checkpoint
    # onto the node's disk (a restarted TrainJob's pods start with empty ones).
    if resume and mirror and dist_info.local_main and not complete_checkpoints(checkpoints):
        pulled = pull_mirror(mirror, checkpoints, out, ("metrics.jsonl",), mirror_settings)
        if pulled is not None:
            log.info("checkpoint of step %d taken from %s", pulled, mirror)
    distributed.barrier(dist_info)
    restored = resume_checkpoint(checkpoints, model, optimizer, device) if resume else None
    if restored is not None:
        latest, state = restored
        if dist_info.main:
            truncate_log(out / "metrics.jsonl", state["step"])
            log.info("resumed from %s (step %d)", latest, state["step"])
    if dist_info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump(config, SECTION))
    trained = model
    if config.compile:
        trained = torch.compile(model)
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        trained = DDP(trained, device_ids=[device.index] if device.type == "cuda" else None)

    flops = flops_per_token(model, config.context)
    train_targets = train.target_lengths  # once: `lengths` is computed from the offsets
    metrics_log = open(out / "metrics.jsonl", "a") if dist_info.main else None
    bar = tqdm(total=total_steps, initial=state["step"], desc="sft", unit="step",
               disable=not (progress and dist_info.main), file=sys.stderr, dynamic_ncols=True)
    def micro_batch(index: int) -> np.ndarray:
        """The `index`-th micro-batch of the whole run, epoch after epoch, same on resume."""
        epoch, position = divmod(index, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = layout(config).plan(train.lengths, config.seed, epoch)
        return epoch_batches[epoch][position]

    train_loss = float("nan")
    val_loss = float("nan")
    started, window_tokens = time.perf_counter(), 0
    while state["step"] < total_steps:
        step = state["step"]
        lr = learning_rate(config, step, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Every process takes its own micro-batches of this step; the loss is a mean over all
        # target tokens of the step, so each token weighs the same whatever its batch.
        first = step * micro_per_step
        batches = [micro_batch(first + k) for k in range(micro_per_step)]
        mine = batches[dist_info.rank::dist_info.world]
        step_targets = sum(int(train_targets[b].sum()) for b in batches)
        loss_sum = 0.0
        for k, indices in enumerate(mine):
            ids, mask, positions = tensors(layout(config).collate(train, indices, pad_id), device)
            sync = dist_info.world > 1 and k < len(mine) - 1
            with (trained.no_sync() if sync else nullcontext()), autocast():
                loss = token_loss(trained, ids, mask, positions) * (dist_info.world / step_targets)
            loss.backward()
            loss_sum += loss.item() / dist_info.world
            window_tokens += int(train.lengths[indices].sum())  # real tokens, no padding
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = distributed.all_reduce_mean(loss_sum * dist_info.world, dist_info)
        state = {**state, "step": step + 1, "tokens": state["tokens"] + step_targets}
        bar.update(1)
        last = state["step"] == total_steps
        if dist_info.main and (state["step"] % config.log_every == 0 or last):
            seconds = time.perf_counter() - started
            rate = window_tokens * dist_info.world / seconds
            record = {"step": state["step"], "loss": round(train_loss, 5), "lr": lr,
                      "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(rate, 1)}
            if config.peak_tflops:
                record["mfu"] = round(rate * flops / (config.peak_tflops * 1e12 * dist_info.world), 4)
            metrics_log.write(json.dumps(record) + "\n")
            metrics_log.flush()
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{rate:,.0f}")
            started, window_tokens = time.perf_counter(), 0
        if state["step"] % config.eval_every == 0 or last:
            if dist_info.main:
                val_loss = evaluate(model, val, val_batches, config, device, autocast, pad_id)
                metrics_log.write(json.dumps({"step": state["step"], "val_loss": round(val_loss, 5)}) + "\n")
                metrics_log.flush()
        if dist_info.main and (state["step"] % config.checkpoint_every == 0 or last):
            if mirror:
                state["slot"] = (state.get("slot", 1) + 1) % 2  # alternate, named in the state
            saved = save_checkpoint(checkpoints, model, optimizer, state, config.keep_checkpoints)
            if mirror:
                push_mirror(mirror, saved, [out / "metrics.jsonl"], state["slot"], out / "upload",
                            mirror_settings)
    bar.close()
    model_dir = out / "model"
    if dist_info.main:
        model_lib.save(model, model_dir, origin={"stage": "sft", "traces": config.traces,
                                                 "shape": config.shape, "step": state["step"]})
        summary = {"steps": state["step"], "train_loss": train_loss, "val_loss": val_loss,
                   "train_sequences": len(train), "dropped_sequences": train.dropped,
                   "train_target_tokens": state["tokens"],
                   "parameters": model_lib.parameter_count(model), "processes": dist_info.world}
        (out / "sft.json").write_text(json.dumps(summary, indent=2) + "\n")
        metrics_log.close()
    if dist_info.world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return SFTResult(model_dir, state["step"], train_loss, val_loss, len(train), train.dropped)
