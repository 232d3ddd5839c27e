"""Preference pairs to token ids, padded or packed batches, and each rank's share of every step.

A pair becomes two sequences, prompt+chosen and prompt+rejected, laid out in one batch as
``[all chosen; all rejected]`` so that one forward scores both: right-padded rows of
``micro_batch_size`` pairs (``collate``), or, with a token budget, pairs grouped by their real
token counts and their sequences packed into rows (``pack``). The sequences are the token ids
the generators' engines received and sampled, exactly (the on-policy contract): nothing is
re-tokenized and no EOS is added to a sampled answer. Every worker builds the whole round the
same way and derives the same schedule from (seed, round, epoch), so the ranks agree on which
pairs each of them takes in each step without exchanging anything.
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
    """A legacy pair's prompt tokenized from text, the way odpo's generators encoded prompts when
    that pair was written: the chat template with the generation prompt when on, else the plain
    text with the tokenizer's default special tokens (e.g. a leading BOS)."""
    if chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        # Rendered text is tokenized without special tokens: the template already holds any it wants.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: prompt is a list of chat messages but model.chat_template is off")
    return list(tokenizer(prompt)["input_ids"])


def completion_token_ids(tokenizer: Any, text: str, token_ids: list[int] | None, finish_reason: str) -> list[int]:
    """A completion side that carries no exact ids: the given ids (a legacy pairs file stored the
    sampled ids without their EOS) or else the text's ids, plus EOS when the answer ended by
    stopping (``length`` ones were cut off)."""
    ids = list(token_ids) if token_ids is not None else list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if finish_reason == "stop":
        ids.append(tokenizer.eos_token_id)
    return ids


def pair_token_ids(tokenizer: Any, pair: Any, *, chat_template: bool, where: str) -> tuple[list[int], list[int], list[int], bool]:
    """``(prompt, chosen, rejected, retokenized)`` ids of one pair, as the learner trains them.

    A pair from the generators carries the prompt ids its engine received and each side's sampled
    ids (EOS or stop token included when sampled): those are used as they are, with no tokenizer
    call. A side without ids (a written correction) is tokenized from its text, with EOS. A pair
    without prompt ids comes from a pairs file written before ids were carried end to end: its
    prompt is re-tokenized and its stored completion ids get the EOS they were stored without.
    """
    if pair.prompt_token_ids is None:
        prompt = prompt_token_ids(tokenizer, pair.prompt, chat_template=chat_template, where=where)
        sides = [completion_token_ids(tokenizer, text, ids, finish) for text, ids, finish in (
            (pair.chosen, pair.chosen_token_ids, pair.chosen_finish_reason),
            (pair.rejected, pair.rejected_token_ids, pair.rejected_finish_reason))]
        return prompt, sides[0], sides[1], True
    sides = [list(ids) if ids is not None else completion_token_ids(tokenizer, text, None, "stop")
             for text, ids in ((pair.chosen, pair.chosen_token_ids), (pair.rejected, pair.rejected_token_ids))]
    return list(pair.prompt_token_ids), sides[0], sides[1], False


def tokenize_pairs(
    tokenizer: Any, pairs: list, *, chat_template: bool, max_len: int
) -> tuple[list[TokenizedPair], dict]:
    """A round's pairs as token ids (see ``pair_token_ids``); returns the kept pairs and counts of
    what was cut, dropped or re-tokenized.

    Sampled pairs always fit: the generators leave room for the completion in ``max_len``. A
    completion tokenized from text that would make its sequence longer than ``max_len`` is cut to
    fit (counted in ``truncated``); a pair whose prompt leaves no room for a completion token, or
    whose answer is empty, is dropped (``too_long`` / ``empty``); ``retokenized`` counts pairs
    from legacy pairs files.
    """
    kept, stats = [], {"too_long": 0, "truncated": 0, "empty": 0, "retokenized": 0}
    for i, pair in enumerate(pairs):
        prompt, chosen, rejected, legacy = pair_token_ids(tokenizer, pair, chat_template=chat_template,
                                                          where=f"pair {i}")
        stats["retokenized"] += legacy
        if len(prompt) >= max_len:
            stats["too_long"] += 1
            continue
        room = max_len - len(prompt)
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


def pack(pairs: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """The pairs' ``2B`` sequences packed into rows without padding between them (token-budget
    micro-batches): ``input_ids``, ``position_ids`` (restarting at 0 with each sequence, which is
    how transformers tells packed sequences apart and keeps them from attending to each other),
    ``sequence_ids`` (sequence ``j`` is pair j's prompt+chosen, ``B + j`` its prompt+rejected; -1
    on padding), ``completion_mask``, each ``[rows, width]``, and ``num_sequences``.

    The width is the longest sequence; the others are placed longest first into the first row
    with room (first-fit decreasing), so the only padding is what is left at the rows' ends. The
    attention cost of a row stays that of one padded row of the same width.
    """
    b = len(pairs)
    seqs = [(p.prompt_ids + getattr(p, side), len(p.prompt_ids), j + k * b)
            for k, side in enumerate(("chosen_ids", "rejected_ids")) for j, p in enumerate(pairs)]
    width = max(len(ids) for ids, _, _ in seqs)
    rows: list[list[tuple[list[int], int, int]]] = []
    room: list[int] = []
    for seq in sorted(seqs, key=lambda s: (-len(s[0]), s[2])):
        slot = next((r for r, free in enumerate(room) if free >= len(seq[0])), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(seq)
        room[slot] -= len(seq[0])
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    completion = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ids, prompt_len, number in row:
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            position_ids[r, at : at + n] = torch.arange(n)
            sequence_ids[r, at : at + n] = number
            completion[r, at + prompt_len : at + n] = 1
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # the padding is a sequence of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "sequence_ids": sequence_ids,
            "completion_mask": completion, "num_sequences": torch.tensor(2 * b)}


def batch_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(tokens computed, of which padding)`` of a collated or packed batch."""
    real = batch["sequence_ids"].ge(0) if "sequence_ids" in batch else batch["attention_mask"].bool()
    total = real.numel()
    return total, total - int(real.sum())


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


def split_by_tokens(items: list[TokenizedPair], parts: int) -> list[list[TokenizedPair]]:
    """``parts`` shares of about equal tokens: longest first, each to the share with the fewest
    tokens so far (the lowest index on a tie); every rank computes the same split."""
    shares: list[list[TokenizedPair]] = [[] for _ in range(parts)]
    load = [0] * parts
    for item in sorted(items, key=lambda p: (-p.tokens, p.index)):
        k = load.index(min(load))
        shares[k].append(item)
        load[k] += item.tokens
    return shares


def group_by_tokens(items: list[TokenizedPair], budget: int) -> list[list[TokenizedPair]]:
    """Micro-batches of at most ``budget`` tokens each (a pair longer than that alone), longest
    pairs first into the first micro-batch with room (first-fit decreasing)."""
    groups: list[list[TokenizedPair]] = []
    room: list[int] = []
    for item in sorted(items, key=lambda p: (-p.tokens, p.index)):
        slot = next((g for g, free in enumerate(room) if free >= item.tokens), None)
        if slot is None:
            groups.append([])
            room.append(budget)
            slot = len(groups) - 1
        groups[slot].append(item)
        room[slot] -= item.tokens
    return groups


def share_micro_batches(items: list[TokenizedPair], *, rank: int, world_size: int, micro_batch_size: int,
                        max_tokens: int = 0) -> tuple[list[list[TokenizedPair]], int]:
    """This rank's micro-batches of ``items`` and the count every rank runs (the largest share's).

    By pair count (``max_tokens`` 0): ``items`` split evenly, then ``micro_batch_size`` at a time.
    By token budget: split for equal tokens, then grouped up to ``max_tokens`` each."""
    if max_tokens:
        groups = [group_by_tokens(share, max_tokens) for share in split_by_tokens(items, world_size)]
    else:
        groups = [[share[k : k + micro_batch_size] for k in range(0, len(share), micro_batch_size)]
                  for share in split_evenly(items, world_size)]
    return groups[rank], max(1, max(map(len, groups)))


def rank_schedule(
    pairs: list[TokenizedPair], *, batch_size: int, micro_batch_size: int, rank: int, world_size: int,
    epochs: int, seed: int, round: int, max_tokens: int = 0,
) -> list[list[MicroBatch]]:
    """This rank's micro-batches for every optimizer step of the round.

    Each step's global batch (``batch_size`` pairs, the last one of an epoch smaller) is split
    across ranks (evenly by pairs, or by tokens with a token budget) and each share into
    micro-batches (``micro_batch_size`` pairs, or up to ``max_tokens`` tokens); every rank runs the
    same number of micro-batches per step (FSDP needs matching collectives), padding with
    zero-weight fillers where its share is shorter. The weights make the DDP-averaged gradient
    equal to the gradient of the mean loss over the global batch, whatever the world size and
    however the step's pairs are grouped.
    """
    steps = []
    for epoch in range(epochs):
        order = [pairs[i] for i in epoch_order(len(pairs), seed=seed, round=round, epoch=epoch)]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            mine, n_micro = share_micro_batches(batch, rank=rank, world_size=world_size,
                                                micro_batch_size=micro_batch_size, max_tokens=max_tokens)
            weight = world_size / len(batch)
            micro = [MicroBatch(group, weight) for group in mine]
            micro += [MicroBatch(batch[:1], 0.0) for _ in range(n_micro - len(micro))]
            steps.append(micro)
    return steps
