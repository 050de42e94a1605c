"""The GRPO trainer: policy, frozen reference and optimizer, one update over a step's rows,
and the weight push to the rollout server (safetensors on disk, then SGLang's update API)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np

from apr.rl.losses import grpo_loss, token_logprobs

log = logging.getLogger(__name__)


class TrainerSettings(Protocol):
    """What the trainer reads of its config (the GRPO stage's `GRPOConfig` has all of it)."""

    lr: float
    warmup_steps: int
    weight_decay: float
    dtype: str  # auto, bf16 or fp32
    clip: float
    kl_beta: float
    temperature: float
    inner_steps: int
    grad_clip: float
    loss_average: str  # token or rollout
    tokens_per_batch: int
    pad_multiple: int
    seed: int


class Trainer:
    """Policy, frozen reference and optimizer, and one GRPO update over a batch of rows."""

    def __init__(self, model_dir: Path, config: TrainerSettings):
        import torch

        from apr import model as model_lib

        self.config = config
        self.start = model_lib.origin(model_dir)  # how the starting model was trained
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.policy = model_lib.load(model_dir, str(self.device), dtype=torch.float32).train()
        self.reference = None
        if config.kl_beta > 0:
            self.reference = model_lib.load(model_dir, str(self.device), dtype=torch.float32)
            self.reference.eval().requires_grad_(False)
        self.pad_id = self.policy.config.pad_token_id
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda")
        bf16 = config.dtype == "bf16" or (config.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) \
            if bf16 else nullcontext

    def update(self, rows, step: int) -> dict:
        """`inner_steps` optimizer steps over the rows; the losses weighted over the step's
        tokens as `loss_average` says."""
        import torch

        from apr.train.data import collate, plan_batches

        c = self.config
        if len(rows) == 0:
            return {"trained_tokens": 0}
        seqs = rows.sequences
        batches = plan_batches(seqs.lengths, c.tokens_per_batch, c.pad_multiple, c.seed, step)
        row_weights = rows.token_weights(c.loss_average).astype(np.float32)
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.lr
        fixed: dict[int, tuple] = {}  # per batch: sampling-policy and reference log-probs
        sums = {"policy_loss": 0.0, "kl": 0.0, "clipped_fraction": 0.0}
        gap, gap_tokens, unchecked = 0.0, 0, 0
        grad_norm = 0.0
        for inner in range(c.inner_steps):
            for b, indices in enumerate(batches):
                ids, mask = collate(seqs, indices, c.pad_multiple, self.pad_id)
                ids = torch.from_numpy(ids).to(self.device)
                mask = torch.from_numpy(mask[:, :-1]).to(self.device)
                advantages = torch.from_numpy(rows.advantages[indices]).to(self.device)
                weights = torch.from_numpy(row_weights[indices]).to(self.device)
                with self.autocast():
                    logp = token_logprobs(self.policy, ids, c.temperature)
                if inner == 0:
                    with torch.no_grad(), self.autocast():
                        ref = token_logprobs(self.reference, ids, c.temperature) \
                            if self.reference is not None else logp.detach()
                    fixed[b] = (logp.detach(), ref)
                    g, n, skipped = _sampler_gap(logp.detach(), mask,
                                                 [rows.sampler_logprobs[i] for i in indices])
                    gap, gap_tokens, unchecked = gap + g, gap_tokens + n, unchecked + skipped
                old, ref = fixed[b]
                loss, stats = grpo_loss(logp, old, ref, advantages, mask, c.clip, c.kl_beta,
                                        weights)
                loss.backward()  # each batch's part of the step's weighted sum
                for key in sums:
                    sums[key] += stats[key] / c.inner_steps
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), c.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        out = {**{k: round(v, 6) for k, v in sums.items()}, "grad_norm": round(grad_norm, 4),
               "trained_tokens": seqs.target_tokens}
        # Mean |trainer - server| log-prob: ~0 unless the server is stale. Rows the check could
        # not be made on are counted and said, never silently left out.
        out["logprob_gap"] = round(gap / gap_tokens, 6) if gap_tokens else None
        out["logprob_gap_unchecked_rows"] = unchecked
        if unchecked:
            log.warning("step %d: server-versus-trainer log-probs not compared on %d of %d rows "
                        "(the server returned none, or a different number of tokens)",
                        step, unchecked, len(rows))
        return out


def _sampler_gap(logp, mask, sampler: list[np.ndarray]) -> tuple[float, int, int]:
    """Summed |trainer - sampler| log-prob over the trained tokens of a batch, how many tokens
    that is, and how many rows could not be compared (no log-probs from the server, or not
    one per trained token)."""
    total, count, unchecked = 0.0, 0, 0
    for row, theirs in enumerate(sampler):
        ours = logp[row][mask[row] > 0].cpu().numpy()
        if len(theirs) == len(ours) and len(ours):
            total += float(np.abs(ours - theirs).sum())
            count += len(ours)
        elif len(ours):
            unchecked += 1
    return total, count, unchecked


async def push_weights(engine, trainer: Trainer, weights_dir: Path, version: int) -> None:
    """Write the policy where the server can read it, then pause / update / continue."""
    import shutil

    from apr import model as model_lib

    path = model_lib.save(trainer.policy, weights_dir / f"step-{version:07d}")
    await engine.update_weights_from_disk(str(path.resolve()), str(version))
    for old in weights_dir.glob("step-???????"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
