"""Token-budget micro-batches (``learner.max_tokens_per_micro_batch``): packed rows, grouping by
real token counts, the ranks' shares, and a round's gradients equal to pair-count batching's."""

from __future__ import annotations

import pytest
import torch

from actors.learner.batching import TokenizedPair, group_by_tokens, pack, rank_schedule, split_by_tokens
from orchestrator.config import LearnerConfig, ModelConfig
from tests.conftest import DEMO_MODEL

PAD = 0


def _tp(i: int, prompt: int, chosen: int, rejected: int) -> TokenizedPair:
    g = torch.Generator().manual_seed(i)
    ids = lambda n: torch.randint(3, 120, (n,), generator=g).tolist()  # noqa: E731
    return TokenizedPair(i, ids(prompt), ids(chosen), ids(rejected))


def _skewed(n: int = 24) -> list[TokenizedPair]:
    """Mostly short pairs, one in six long (the shape that makes right padding costly)."""
    return [_tp(i, 4 + i % 5, 2 + i % 3 if i % 6 else 30, 1 + i % 4 if i % 6 else 24) for i in range(n)]


def test_pack_puts_sequences_end_to_end_with_restarting_positions():
    pairs = [_tp(0, 3, 4, 2), _tp(1, 2, 1, 1)]
    b = pack(pairs, PAD)
    assert int(b["num_sequences"]) == 4
    width = b["input_ids"].shape[1]
    assert width == 7  # the longest sequence: pair 0's prompt + chosen
    # Every sequence appears once, whole, with positions 0..n-1 and its completion marked.
    for number, (p, side) in enumerate([(pairs[0], "chosen_ids"), (pairs[1], "chosen_ids"),
                                        (pairs[0], "rejected_ids"), (pairs[1], "rejected_ids")]):
        where = b["sequence_ids"] == number
        row = int(where.any(1).nonzero()[0])
        assert b["input_ids"][row][where[row]].tolist() == p.prompt_ids + getattr(p, side)
        assert b["position_ids"][row][where[row]].tolist() == list(range(len(p.prompt_ids) + len(getattr(p, side))))
        assert b["completion_mask"][row][where[row]].tolist() == [0] * len(p.prompt_ids) + [1] * len(getattr(p, side))
    real = int((b["sequence_ids"] >= 0).sum())
    assert real == sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) == 18
    assert b["input_ids"].shape[0] == 3  # 18 tokens (7, 5, 3, 3) in rows of 7: first-fit gives 7 | 5 | 3+3
    assert int((b["sequence_ids"] < 0).sum()) == 3 * 7 - 18  # padding only at rows' ends


def test_grouping_respects_the_budget_and_splits_ranks_by_tokens():
    pairs = _skewed()
    groups = group_by_tokens(pairs, 60)
    assert sorted(p.index for g in groups for p in g) == list(range(24))
    assert all(sum(p.tokens for p in g) <= 60 or len(g) == 1 for g in groups)
    shares = split_by_tokens(pairs, 3)
    loads = [sum(p.tokens for p in s) for s in shares]
    assert max(loads) - min(loads) <= max(p.tokens for p in pairs)
    assert sorted(p.index for s in shares for p in s) == list(range(24))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_token_schedule_covers_every_pair_once_with_equal_forwards_per_rank(world):
    pairs = _skewed(22)
    per_rank = [rank_schedule(pairs, batch_size=8, micro_batch_size=2, rank=r, world_size=world, epochs=1, seed=0,
                              round=3, max_tokens=50) for r in range(world)]
    for step in range(3):
        micro = [s[step] for s in per_rank]
        assert len({len(m) for m in micro}) == 1
        real = [p.index for m in micro for mb in m if not mb.filler for p in mb.pairs]
        assert len(real) == len(set(real)) == (8 if step < 2 else 6)
        assert {mb.weight for m in micro for mb in m if not mb.filler} == {world / len(real)}
        # The same pairs in each step as pair-count batching: only their grouping differs.
        plain = [rank_schedule(pairs, batch_size=8, micro_batch_size=2, rank=r, world_size=world, epochs=1, seed=0,
                               round=3)[step] for r in range(world)]
        assert sorted(real) == sorted(p.index for m in plain for mb in m if not mb.filler for p in mb.pairs)


def _learner(**kw):
    from actors.learner.rank import Learner

    cfg = LearnerConfig(**{"lr": 1e-3, "batch_size": 24, "micro_batch_size": 6, "beta": 0.5, "logprob_chunk": 16, **kw})
    return Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64), cfg)


def _as_pairs(tps: list[TokenizedPair]):
    from common.types import PreferencePair

    return [PreferencePair("", "", "", 1.0, 0.0, prompt_token_ids=t.prompt_ids, chosen_token_ids=t.chosen_ids,
                           rejected_token_ids=t.rejected_ids) for t in tps]


def _round_gradients(learner, pairs) -> dict[str, torch.Tensor]:
    """The gradient each optimizer step of a round applies (captured just before the step)."""
    grads: dict[str, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):
        step = len(grads) // len(list(learner.model.parameters()))
        for name, p in learner.model.named_parameters():
            grads[f"{step}:{name}"] = p.grad.clone()

    hook = learner.optimizer.register_step_pre_hook(capture)
    report = learner.train(pairs, round=1)
    hook.remove()
    return grads, report


def test_a_round_s_gradients_by_token_budget_equal_pair_count_batching():
    pairs = _as_pairs(_skewed(24))
    by_pairs, plain = _round_gradients(_learner(), pairs)
    by_tokens, packed = _round_gradients(_learner(max_tokens_per_micro_batch=80), pairs)
    assert plain["steps"] == packed["steps"] == 1
    assert by_pairs.keys() == by_tokens.keys()
    scale = max(float(g.abs().max()) for g in by_pairs.values())
    worst = max(float((by_pairs[k] - by_tokens[k]).abs().max()) for k in by_pairs)
    assert worst <= 1e-5 * max(1.0, scale), worst
    assert packed["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    # Less padding computed: right-padded micro-batches of 6 pairs pad every short pair to the long one.
    assert 0 <= packed["pad_share"] < plain["pad_share"] / 2, (packed["pad_share"], plain["pad_share"])


def test_packed_log_probs_equal_padded_ones_pair_by_pair():
    pairs = _as_pairs(_skewed(12))
    plain = _learner().completion_logps(pairs)
    packed = _learner(max_tokens_per_micro_batch=40).completion_logps(pairs)
    assert torch.allclose(plain, packed, atol=1e-5)
