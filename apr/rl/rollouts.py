"""GRPO rollouts: G solves of each problem through the runtime, and the rows they train.

A rollout is one full solve (APR: the parent's segments and every child; SoS+: one thread).
Each engine call of the solve is one training row: the prompt the engine was given (BOS +
prompt tokens, never trained) followed by the tokens it sampled (trained, each with the
rollout's advantage). The runtime's join blocks are part of later parent prompts, so they are
never trained either. Rows use the sampled token ids themselves, not a re-tokenization of
the text, so the trainer scores exactly what the sampler produced.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from apr import tokenizer as domain_tokenizer
from apr.countdown.threads import APR
from apr.decode.engine import Engine
from apr.decode.runtime import Budgets, Solve, solve_apr, solve_sos
from apr.train.data import Sequences


class StalePolicy(RuntimeError):
    """A rollout was sampled by weights other than the ones the trainer last sent."""


@dataclass
class Rollout:
    group: int  # the problem's index in the step's batch: rollouts of a group share a problem
    solve: Solve

    @property
    def reward(self) -> float:
        return 1.0 if self.solve.correct else 0.0

    def record(self, step: int) -> dict:
        """What the run keeps of it (rollouts.jsonl): enough to audit rewards and versions."""
        versions = sorted({t.weight_version or "" for t in self.solve.threads})
        return {"step": step, "group": self.group, "reward": self.reward,
                "weight_version": versions[0] if len(versions) == 1 else versions,
                **self.solve.summary()}


async def collect(engine: Engine, problems: Sequence[dict], group_size: int, mode: str,
                  budgets: Budgets, temperature: float) -> list[Rollout]:
    """`group_size` sampled solves of every problem, all in flight at once (the engine
    batches them), with each thread's sampled tokens and log-probs."""
    solver = solve_apr if mode == APR else solve_sos
    jobs = [(g, solver(engine, p["nums"], p["target"], budgets, temperature, logprobs=True))
            for g, p in enumerate(problems) for _ in range(group_size)]
    solves = await asyncio.gather(*(job for _, job in jobs))
    return [Rollout(g, s) for (g, _), s in zip(jobs, solves)]


def check_version(solves: Iterable[Solve], expected: str) -> None:
    """Every thread must come from the weights the trainer last sent: a stale policy would
    otherwise train silently on the wrong ratios."""
    for solve in solves:
        for t in solve.threads:
            if t.weight_version != expected:
                raise StalePolicy(f"a rollout thread was sampled with weight_version "
                                  f"{t.weight_version!r}, expected {expected!r}: the rollout "
                                  "server did not apply the last weight update")


@dataclass
class Rows:
    """The training rows of a step: sequences (prompt tokens carry no loss), the advantage of
    each row, and the sampler's log-prob of each trained token (for the mismatch metric)."""

    sequences: Sequences
    advantages: np.ndarray  # float32, one per row
    sampler_logprobs: list[np.ndarray]
    rollouts: np.ndarray  # int, the rollout each row belongs to

    def __len__(self) -> int:
        return len(self.sequences)

    def token_weights(self, average: str) -> np.ndarray:
        """Each row's weight per trained token; over a step they sum to 1. "token": every
        token weighs the same (long rollouts weigh more); "rollout": each rollout's tokens
        share an equal part, so a long failed rollout counts no more than a short success."""
        targets = self.sequences.target_lengths.astype(np.float64)
        if average == "token":
            return np.full(len(targets), 1.0 / max(1.0, targets.sum()))
        per_rollout = np.bincount(self.rollouts, weights=targets)
        return 1.0 / (np.count_nonzero(per_rollout) * per_rollout[self.rollouts])


def training_rows(rollouts: Sequence[Rollout], advantages: Sequence[float]) -> Rows:
    """One row per engine call of every rollout whose advantage is not zero (a group whose
    rollouts all scored the same carries no policy gradient)."""
    tok = domain_tokenizer.build()
    bos = tok.token_to_id(domain_tokenizer.BOS)
    chunks, lengths, prompts, row_adv, sampler, owner = [], [], [], [], [], []
    for index, (rollout, advantage) in enumerate(zip(rollouts, advantages)):
        if advantage == 0:
            continue
        threads = [t for t in rollout.solve.threads if t.token_ids]
        encoded = tok.encode_batch([t.prompt for t in threads], add_special_tokens=False)
        for thread, prompt in zip(threads, encoded):
            sequence = [bos, *prompt.ids, *thread.token_ids]
            chunks.append(np.asarray(sequence, dtype=np.int64))
            lengths.append(len(sequence))
            prompts.append(len(prompt.ids) + 1)
            row_adv.append(advantage)
            sampler.append(np.asarray(thread.logprobs, dtype=np.float32))
            owner.append(index)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return Rows(Sequences(tokens, offsets, np.asarray(prompts, dtype=np.int32)),
                np.asarray(row_adv, dtype=np.float32), sampler, np.asarray(owner, dtype=np.int64))
