"""A round's preference pairs from every source in ``pairs.sources``.

- ``best_worst``: two sampled answers of a prompt, picked by ``orchestrator.pairs.select.select_pairs``
  (``pairs.strategy``); both sides on-policy.
- ``correction``: the corrector (``corrector`` section, hosted in the judge actors) has proposed an
  improved text for each sampled answer, in the judge phase (``JudgePool.score(..., correct=True)``:
  pair making itself calls no actor); per prompt, one corrected answer becomes the pair
  (corrected, original). The rejected side is the sampled answer, ids and all; the chosen side
  was written, not sampled, so it is tokenized here, from its text, plus EOS, and the pairs file
  holds exactly the ids the learner trains. These pairs are off-policy by design and say so in
  their ``source`` column. Among a prompt's corrected answers the lowest-scored is taken (an
  unscored one counts as lowest), then the one the length guard prefers, then ``pairs.tie_break``
  (``logprob``: the answer the policy found most likely, the mistake it is most sure of).

A prompt's pairs are kept in the order of ``pairs.sources`` up to ``pairs.max_pairs_per_prompt``
(the rest counted as ``max_pairs_per_prompt``); a prompt for which the corrector proposed nothing
is counted as ``no_correction``. The length guard (``orchestrator.pairs.length_guard``) sees every source:
its running counts come in from the loop state and go back out with the result, so the loop
keeps them only when the round completes.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from judges.base import JudgeItem
from orchestrator.pairs.length_guard import LengthGuard, answer_length, length_stats
from orchestrator.pairs.select import rank_key, select_pairs
from common.types import PreferencePair

SOURCES = ("best_worst", "correction")


@dataclass
class RoundPairs:
    pairs: list[PreferencePair]
    dropped: dict[str, int]
    """Prompts (or pairs, for ``max_pairs_per_prompt``) that yielded no pair, by reason."""
    length_counts: dict[str, int]
    """The length guard's running counts after this round (for ``LoopState.length_counts``)."""
    corrector_failures: dict[str, int] = field(default_factory=dict)
    """Completions the corrector failed on, by kind."""


def correction_pairs(
    items: list[JudgeItem], scores: list[list[float | None]], corrections: list[list[str | None]], *,
    encode: Callable[[str], list[int]], versions: list[int], prompt_token_ids: list[list[int] | None],
    tie_break: str, rng: random.Random, guard: LengthGuard,
) -> tuple[dict[int, PreferencePair], Counter]:
    """At most one (corrected, original) pair per item, keyed by item index, and the drop counts.
    ``encode(text)`` gives the ids the learner trains for a written answer (EOS included); the
    guard is not updated here (the caller records the pairs it keeps)."""
    out: dict[int, PreferencePair] = {}
    dropped: Counter = Counter()
    for i, (item, row_scores, texts) in enumerate(zip(items, scores, corrections)):
        candidates = [j for j, (c, text) in enumerate(zip(item.completions, texts))
                      if isinstance(text, str) and text != c.text and c.finish_reason != "abort"]
        if not candidates:
            dropped["no_correction"] += 1
            continue
        ids = {j: encode(texts[j]) for j in candidates}
        length = {j: (len(ids[j]), answer_length(item.completions[j].text, item.completions[j].token_ids))
                  for j in candidates}
        noise = {j: rng.random() for j in candidates} if tie_break == "random" else {}

        def key(j: int):
            score = row_scores[j]
            worst_first = score if score is not None and math.isfinite(score) else -math.inf
            return (worst_first, guard.key(*length[j]), rank_key(item.completions[j], j, tie_break, noise.get(j, 0.0)))

        j = min(candidates, key=key)
        if not guard.fits(*length[j]):
            dropped["length_ratio"] += 1
            continue
        original = item.completions[j]
        out[i] = PreferencePair(
            prompt=item.prompt, chosen=texts[j], rejected=original.text,
            chosen_score=None, rejected_score=row_scores[j], row=item.row, policy_version=versions[i],
            prompt_token_ids=None if prompt_token_ids[i] is None else list(prompt_token_ids[i]),
            chosen_token_ids=ids[j], rejected_token_ids=original.token_ids,
            chosen_finish_reason="stop", rejected_finish_reason=original.finish_reason, source="correction",
        )
    return out, dropped


class PairMaker:
    """Builds each round's pairs from the ``pairs`` and ``model`` config sections."""

    def __init__(self, pairs_cfg: Any, model_cfg: Any):
        self.cfg, self.model_cfg = pairs_cfg, model_cfg
        self._tokenizer = None

    def encode(self, text: str) -> list[int]:
        """A written answer's ids as the learner trains them: the text without special tokens, then EOS."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_cfg.tokenizer or self.model_cfg.path)
        tok = self._tokenizer
        return list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]

    def make(self, items: list[JudgeItem], scores: list[list[float | None]], *, versions: list[int],
             prompt_token_ids: list[list[int] | None], rng: random.Random, length_counts: dict[str, int],
             corrections: list[list[str | None]] | None = None,
             corrector_failures: dict[str, int] | None = None) -> RoundPairs:
        """The round's pairs; ``corrections`` (one text or None per completion, from the judge
        phase) are needed when ``correction`` is a source."""
        cfg = self.cfg
        guard = LengthGuard(cfg.length_balance, cfg.max_length_ratio, **length_counts)
        per_prompt: dict[int, list[PreferencePair]] = defaultdict(list)
        dropped: Counter = Counter()
        failures: dict[str, int] = {}
        if "best_worst" in cfg.sources:
            sel = select_pairs(items, scores, strategy=cfg.strategy, min_margin=cfg.min_margin,
                               tie_break=cfg.tie_break, max_pairs_per_prompt=cfg.max_pairs_per_prompt,
                               versions=versions, prompt_token_ids=prompt_token_ids, rng=rng, length_guard=guard)
            dropped.update(sel.dropped)
            for pair, i in zip(sel.pairs, sel.prompt_index):
                per_prompt[i].append(pair)
        if "correction" in cfg.sources:
            dropped.update(dict.fromkeys(("no_correction", "max_pairs_per_prompt"), 0))
            if items and corrections is None:
                raise ValueError("pairs.sources includes correction: the judge phase must return corrections")
            failures = dict(corrector_failures or {})
            found, counts = correction_pairs(
                items, scores, corrections or [], encode=self.encode, versions=versions,
                prompt_token_ids=prompt_token_ids, tie_break=cfg.tie_break, rng=rng, guard=guard)
            dropped.update(counts)
            for i, pair in found.items():
                if len(per_prompt[i]) >= cfg.max_pairs_per_prompt:
                    dropped["max_pairs_per_prompt"] += 1
                    continue
                guard.record(*(answer_length(text, ids) for text, ids in (
                    (pair.chosen, pair.chosen_token_ids), (pair.rejected, pair.rejected_token_ids))))
                per_prompt[i].append(pair)
        pairs = [p for i in sorted(per_prompt) for p in per_prompt[i]]
        return RoundPairs(pairs, dict(dropped), guard.counts(), failures)


def pair_figures(pairs: list[PreferencePair], sources: list[str]) -> dict[str, Any]:
    """The metrics line's pair figures: pairs per source and the length statistics."""
    by_source = dict.fromkeys(sources, 0)
    by_source.update(Counter(p.source for p in pairs))
    return {"pairs_by_source": by_source, **length_stats(pairs)}
