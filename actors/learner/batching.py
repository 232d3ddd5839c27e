"""Preference pairs to token ids, padded batches, and each rank's share of every step.

A pair becomes two sequences, prompt+chosen and prompt+rejected, laid out in one batch as
``[all chosen; all rejected]`` so that one forward scores both. Every worker tokenizes the whole
round the same way and derives the same schedule from (seed, round, epoch), so the ranks agree on
which pairs each of them takes in each step without exchanging anything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenizedPair:
    index: int
    """Position of the pair in the round's list (reports and reference log-probs are keyed by it)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    @property
    def tokens(self) -> int:
        """Non-pad tokens in its two sequences (the throughput unit of the learner bench)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def prompt_token_ids(tokenizer: Any, prompt: Any, *, chat_template: bool, where: str = "pair") -> list[int]:
    """The prompt as the generators saw it: the chat template with the generation prompt when on,
    else the plain text with the tokenizer's default special tokens (e.g. a leading BOS)."""
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        # Rendered text is tokenized without special tokens: the template already holds any it wants.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt is a list of chat messages but model.chat_template is off")
    return list(tokenizer(prompt)["input_ids"])


def completion_token_ids(tokenizer: Any, text: str, token_ids: list[int] | None, finish_reason: str) -> list[int]:
    """The sampled ids when known (re-tokenizing text need not give them back), else the text's
    ids; plus EOS when the completion ended by stopping (``length`` ones were cut off)."""
    ids = list(token_ids) if token_ids is not None else list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if finish_reason == "stop":
        ids.append(tokenizer.eos_token_id)
    return ids


def tokenize_pairs(
    tokenizer: Any, pairs: list, *, chat_template: bool, max_len: int
) -> tuple[list[TokenizedPair], dict]:
    """Tokenize a round's pairs; returns the kept pairs and counts of what was cut or dropped.

    A completion that would make its sequence longer than ``max_len`` is cut to fit (counted in
    ``truncated``); a pair whose prompt leaves no room for a completion token, or whose answer is
    empty, is dropped (``too_long`` / ``empty``).
    """
    kept, stats = [], {"too_long": 0, "truncated": 0, "empty": 0}
    for i, pair in enumerate(pairs):
        prompt = prompt_token_ids(tokenizer, pair.prompt, chat_template=chat_template, where=f"pair {i}")
        if len(prompt) >= max_len:
            stats["too_long"] += 1
            continue
        room = max_len - len(prompt)
        chosen = completion_token_ids(tokenizer, pair.chosen, pair.chosen_token_ids, pair.chosen_finish_reason)
        rejected = completion_token_ids(tokenizer, pair.rejected, pair.rejected_token_ids, pair.rejected_finish_reason)
        if not chosen or not rejected:
            stats["empty"] += 1
            continue
        if len(chosen) > room or len(rejected) > room:
            stats["truncated"] += 1
            chosen, rejected = chosen[:room], rejected[:room]
        kept.append(TokenizedPair(i, prompt, chosen, rejected))
    return kept, stats


def collate(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` of shape ``[2B, T]``:
    rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` prompt+rejected."""
    seqs, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            completion = getattr(p, side)
            seqs.append(p.prompt_ids + completion)
            masks.append([0] * len(p.prompt_ids) + [1] * len(completion))
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (seq, mask) in enumerate(zip(seqs, masks)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        completion[row, : len(seq)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


@dataclass
class MicroBatch:
    pairs: list[TokenizedPair]
    """The pairs of this forward; a filler micro-batch holds one pair and ``weight`` 0."""
    weight: float
    """Each pair's loss is multiplied by this: world_size / pairs in the step's global batch."""

    @property
    def filler(self) -> bool:
        return self.weight == 0.0


def split_evenly(items: list, parts: int) -> list[list]:
    """``parts`` contiguous chunks whose sizes differ by at most one (the first ones larger)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + q + (1 if k < r else 0)
        out.append(items[start:end])
        start = end
    return out


def epoch_order(n: int, *, seed: int, round: int, epoch: int) -> list[int]:
    """A fixed shuffle of ``range(n)`` per (seed, round, epoch), identical on every rank."""
    order = list(range(n))
    random.Random(f"odpo-learner/{seed}/{round}/{epoch}").shuffle(order)
    return order


def rank_schedule(
    pairs: list[TokenizedPair], *, batch_size: int, micro_batch_size: int, rank: int, world_size: int,
    epochs: int, seed: int, round: int,
) -> list[list[MicroBatch]]:
    """This rank's micro-batches for every optimizer step of the round.

    Each step's global batch (``batch_size`` pairs, the last one of an epoch smaller) is split
    evenly across ranks; every rank runs the same number of micro-batches per step (FSDP needs
    matching collectives), padding with zero-weight fillers where its share is shorter. The
    weights make the DDP-averaged gradient equal to the gradient of the mean loss over the global
    batch, whatever the world size.
    """
    steps = []
    for epoch in range(epochs):
        order = [pairs[i] for i in epoch_order(len(pairs), seed=seed, round=round, epoch=epoch)]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            shares = split_evenly(batch, world_size)
            n_micro = max(1, -(-len(shares[0]) // micro_batch_size))
            mine = shares[rank]
            weight = world_size / len(batch)
            micro = [MicroBatch(mine[k : k + micro_batch_size], weight) for k in range(0, len(mine), micro_batch_size)]
            micro += [MicroBatch(batch[:1], 0.0) for _ in range(n_micro - len(micro))]
            steps.append(micro)
    return steps
