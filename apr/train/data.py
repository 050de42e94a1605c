"""SFT sequences from solver traces, batched with no padding to speak of.

One sequence per thread (APR: every parent segment and every child; SoS+: one per problem):
BOS + prompt + text + EOS, with the loss on the text and EOS only. Sequences longer than the
context are dropped and counted. Two layouts (`Layout`):
- buckets: sequences of similar length under a token budget, right-padded; a causal model
  needs no attention mask for that (no real token attends to a later pad);
- packing: rows of `context` tokens holding several whole sequences, position ids restarting
  at each; transformers reads the restarts as sequence boundaries and keeps attention inside
  each sequence (a block-diagonal causal mask), so there is no padding but the tail of a row.
Either way a sequence's logits do not depend on its batch-mates (tests pin both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from apr import atomic
from apr import tokenizer as domain_tokenizer
from apr.countdown.threads import STYLES
from apr.dataset import DataError, read_records

KEEP = ("all", "solved")


@dataclass
class Sequences:
    """Token sequences stored flat: sequence i is tokens[offsets[i]:offsets[i+1]], and its
    first `prompt_lengths[i]` tokens (BOS + prompt) carry no loss."""

    tokens: np.ndarray  # int16
    offsets: np.ndarray  # int64, n + 1
    prompt_lengths: np.ndarray  # int32, n
    dropped: int = 0  # sequences longer than the context

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def target_lengths(self) -> np.ndarray:
        """Tokens of each sequence that carry loss (text and EOS)."""
        return self.lengths - self.prompt_lengths

    @property
    def target_tokens(self) -> int:
        return int(self.target_lengths.sum())

    def save(self, path: str | Path) -> None:
        with atomic.partial_file(path) as partial, open(partial, "wb") as f:
            np.savez(f, tokens=self.tokens, offsets=self.offsets,
                     prompt_lengths=self.prompt_lengths, dropped=np.array(self.dropped))

    @classmethod
    def load(cls, path: str | Path) -> Sequences:
        with np.load(path, allow_pickle=False) as f:
            return cls(f["tokens"], f["offsets"], f["prompt_lengths"], int(f["dropped"]))


def thread_pairs(records: Iterator[dict], keep: str) -> Iterator[tuple[str, str]]:
    for record in records:
        if keep == "solved" and not record["solved"]:
            continue
        for thread in record["threads"]:
            yield thread["prompt"], thread["text"]


def build_sequences(pairs: Iterator[tuple[str, str]], context: int,
                    batch: int = 4096) -> Sequences:
    """Tokenize (prompt, text) pairs into sequences, dropping those longer than `context`."""
    tok = domain_tokenizer.build()
    bos = tok.token_to_id(domain_tokenizer.BOS)
    eos = tok.token_to_id(domain_tokenizer.EOS)
    chunks: list[np.ndarray] = []
    lengths: list[int] = []
    prompts: list[int] = []
    dropped = 0

    def flush(buffer: list[tuple[str, str]]) -> None:
        nonlocal dropped
        encoded = tok.encode_batch([p for p, _ in buffer] + [t for _, t in buffer],
                                   add_special_tokens=False)
        n = len(buffer)
        for prompt, text in zip(encoded[:n], encoded[n:]):
            length = len(prompt.ids) + len(text.ids) + 2
            if length > context:
                dropped += 1
                continue
            chunks.append(np.array([bos, *prompt.ids, *text.ids, eos], dtype=np.int16))
            lengths.append(length)
            prompts.append(len(prompt.ids) + 1)

    buffer: list[tuple[str, str]] = []
    for pair in pairs:
        buffer.append(pair)
        if len(buffer) == batch:
            flush(buffer)
            buffer = []
    if buffer:
        flush(buffer)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return Sequences(tokens, offsets, np.array(prompts, dtype=np.int32), dropped)


def load_sequences(data_dir: str | Path, kind: str, split: str, keep: str, context: int
                   ) -> Sequences:
    if kind not in STYLES:
        raise DataError(f"unknown trace kind {kind!r}: choose one of {STYLES}")
    return build_sequences(thread_pairs(read_records(data_dir, kind, split), keep), context)


def plan_batches(lengths: np.ndarray, tokens_per_batch: int, pad_multiple: int, seed: int,
                 epoch: int) -> list[np.ndarray]:
    """Index batches for one epoch: sequences sorted by length (ties broken at random), cut
    so that batch size x padded length stays within `tokens_per_batch`, then shuffled.

    Deterministic in (seed, epoch), so a resumed run sees the same batches in the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        end = start
        while end < len(order):
            padded = padded_length(int(lengths[order[end]]), pad_multiple)
            if (end - start + 1) * padded > tokens_per_batch:
                break
            end += 1
        if end == start:
            raise DataError(f"a {lengths[order[start]]}-token sequence does not fit "
                            f"tokens_per_batch={tokens_per_batch}: raise it to at least the context")
        batches.append(order[start:end])
        start = end
    rng.shuffle(batches)
    return batches


def padded_length(length: int, multiple: int) -> int:
    return int(math.ceil(length / multiple) * multiple)


def collate(seqs: Sequences, indices: np.ndarray, pad_multiple: int, pad_id: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded input ids and a loss mask over next-token targets, both (B, L).

    `mask[b, t]` is 1 where token t+1 of row b is a target (text or EOS).
    """
    longest = max(int(seqs.offsets[i + 1] - seqs.offsets[i]) for i in indices)
    width = padded_length(longest, pad_multiple)
    ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=np.float32)
    for row, i in enumerate(indices):
        seq = seqs.sequence(int(i))
        ids[row, :len(seq)] = seq
        mask[row, seqs.prompt_lengths[i] - 1:len(seq) - 1] = 1.0
    return ids, mask


def pack_rows(lengths: np.ndarray, width: int) -> list[list[int]]:
    """Positions (into `lengths`) per row, filling rows of `width` tokens in order (next fit)."""
    rows: list[list[int]] = [[]]
    used = 0
    for k, length in enumerate(lengths):
        if length > width:
            raise DataError(f"a {length}-token sequence does not fit a {width}-token packed row: "
                            "raise the context")
        if used + length > width:
            rows.append([])
            used = 0
        rows[-1].append(k)
        used += int(length)
    return rows if rows[0] else []


def plan_packed(lengths: np.ndarray, tokens_per_batch: int, width: int, seed: int, epoch: int
                ) -> list[np.ndarray]:
    """Index batches for one epoch of packed rows: sequences in a random order (deterministic in
    seed and epoch), rows filled in that order, `tokens_per_batch // width` rows a batch."""
    if tokens_per_batch < width:
        raise DataError(f"tokens_per_batch={tokens_per_batch} cannot hold one {width}-token "
                        "packed row: raise it to at least the context")
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    rows = pack_rows(lengths[order], width)
    per_batch = tokens_per_batch // width
    return [np.concatenate([order[row] for row in rows[k:k + per_batch]])
            for k in range(0, len(rows), per_batch)]


def collate_packed(seqs: Sequences, indices: np.ndarray, width: int, pad_id: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed input ids, loss mask and position ids, each (rows, width); rows are filled in the
    order of `indices` exactly as `plan_packed` counted them. The pad tail of a row continues
    its last sequence's positions: no real token attends to it."""
    rows = pack_rows(seqs.lengths[indices], width)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    positions = np.tile(np.arange(width, dtype=np.int64), (len(rows), 1))
    for r, row in enumerate(rows):
        at = 0
        for k in row:
            i = int(indices[k])
            seq = seqs.sequence(i)
            ids[r, at:at + len(seq)] = seq
            mask[r, at + seqs.prompt_lengths[i] - 1:at + len(seq) - 1] = 1.0
            positions[r, at:] = np.arange(width - at)
            at += len(seq)
    return ids, mask, positions


@dataclass(frozen=True)
class Layout:
    """How sequences become model inputs: length buckets (`pack_width` 0) or packed rows."""

    tokens_per_batch: int
    pad_multiple: int = 64
    pack_width: int = 0  # packed rows of this many tokens (the context); 0: buckets

    def plan(self, lengths: np.ndarray, seed: int, epoch: int) -> list[np.ndarray]:
        if self.pack_width:
            return plan_packed(lengths, self.tokens_per_batch, self.pack_width, seed, epoch)
        return plan_batches(lengths, self.tokens_per_batch, self.pad_multiple, seed, epoch)

    def collate(self, seqs: Sequences, indices: np.ndarray, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Input ids, loss mask (`mask[b, t]`: token t+1 is a target) and position ids (None
        for buckets: the model counts positions itself)."""
        if self.pack_width:
            return collate_packed(seqs, indices, self.pack_width, pad_id)
        return (*collate(seqs, indices, self.pad_multiple, pad_id), None)
