"""The length-bias guard of pair selection, and the length figures of a round's pairs.

DPO learns whatever separates chosen from rejected answers; when chosen answers are longer more
often than not, the policy learns "longer" (the reason length-controlled AlpacaEval exists).
Two switches, both off by default (``pairs.length_balance``, ``pairs.max_length_ratio``):

- **Balance**: among equally scored candidates, prefer the pair whose chosen side is longer
  when, so far in the run, fewer pairs had a longer chosen than a shorter one, and the other
  way round. Pairs of equal length count for neither side, so ``longer_chosen_share`` (longer
  chosen among the pairs of unequal length) is held near 0.5. Then the usual tie-break applies.
- **Ratio cap**: a pair whose longer side has more than ``max_ratio`` times the tokens of the
  shorter is not made; among equally scored candidates one within the cap is preferred.

Lengths are in tokens (the sampled ids, EOS included when sampled), or characters for a side
without ids. Pure Python: ``orchestrator.pairs.select`` uses it, the loop reports ``length_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


def answer_length(text: str, token_ids: list[int] | None) -> int:
    """Tokens of an answer (characters when its ids are unknown)."""
    return len(token_ids) if token_ids is not None else len(text)


@dataclass
class LengthGuard:
    balance: bool = False
    """Steer ties towards a 50/50 split of longer / shorter chosen answers over the run."""
    max_ratio: float | None = None
    """Longest allowed longer-side / shorter-side token ratio (None = no cap)."""
    longer: int = 0
    """Pairs so far whose chosen side was longer."""
    shorter: int = 0
    """Pairs so far whose chosen side was shorter."""

    @property
    def active(self) -> bool:
        return self.balance or self.max_ratio is not None

    def fits(self, chosen_len: int, rejected_len: int) -> bool:
        if self.max_ratio is None:
            return True
        return max(chosen_len, rejected_len) <= self.max_ratio * max(1, min(chosen_len, rejected_len))

    def preference(self, chosen_len: int, rejected_len: int) -> int:
        """0 for a pair that moves the run towards balance, 1 for an equal-length pair, 2 for one
        that moves it away (all 0 when balance is off or the run is balanced)."""
        want = (self.longer < self.shorter) - (self.longer > self.shorter)  # +1: need a longer chosen
        if not self.balance or want == 0:
            return 0
        side = (chosen_len > rejected_len) - (chosen_len < rejected_len)
        return 0 if side == want else 1 if side == 0 else 2

    def key(self, chosen_len: int, rejected_len: int) -> tuple[bool, int]:
        """Sort key of a candidate pair: within the cap first, then towards balance."""
        return (not self.fits(chosen_len, rejected_len), self.preference(chosen_len, rejected_len))

    def record(self, chosen_len: int, rejected_len: int) -> None:
        self.longer += chosen_len > rejected_len
        self.shorter += chosen_len < rejected_len

    def counts(self) -> dict[str, int]:
        """The running counts, for the checkpoint's loop state."""
        return {"longer": self.longer, "shorter": self.shorter}


def pair_lengths(pair) -> tuple[int, int]:
    """(chosen, rejected) lengths of a ``PreferencePair``."""
    return (answer_length(pair.chosen, pair.chosen_token_ids), answer_length(pair.rejected, pair.rejected_token_ids))


def length_stats(pairs: Iterable) -> dict[str, float | None]:
    """A round's figures: mean chosen and rejected length in tokens, and the share of pairs of
    unequal length whose chosen side is longer (None when there is no such pair)."""
    lengths = [pair_lengths(p) for p in pairs]
    if not lengths:
        return {"len_chosen_mean": None, "len_rejected_mean": None, "longer_chosen_share": None}
    longer = sum(c > r for c, r in lengths)
    unequal = sum(c != r for c, r in lengths)
    return {
        "len_chosen_mean": sum(c for c, _ in lengths) / len(lengths),
        "len_rejected_mean": sum(r for _, r in lengths) / len(lengths),
        "longer_chosen_share": longer / unequal if unequal else None,
    }
