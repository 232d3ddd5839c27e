"""Pairs to token ids (exact sampled ids; legacy re-tokenizing), padded batches, and rank schedules."""

import pytest
from transformers import AutoTokenizer

from actors.learner.batching import collate, rank_schedule, tokenize_pairs
from common.types import PreferencePair
from tests.conftest import DEMO_MODEL

BOS, EOS, PAD = 1, 2, 0


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def _pair(prompt="17+26=", chosen="43", rejected="4", **kw):
    return PreferencePair(prompt, chosen, rejected, 1.0, 0.0, **kw)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


class CompletionTextForbidden:
    """A tokenizer that fails the test if anything is tokenized: exact ids must need none."""

    eos_token_id = EOS

    def __call__(self, *args, **kwargs):
        raise AssertionError(f"the learner tokenized {args!r} although the pair carries exact ids")

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("the learner rendered a chat template although the pair carries prompt ids")


def test_sampled_pairs_are_trained_on_their_exact_ids_without_any_tokenizing():
    # Ids as the engine returned them: one side ended on a sampled EOS, one on an extra EOS id (30)
    # of generation_config, one on a stop string (its last token, 22, completed the string), one was
    # cut by the token limit. Nothing may be appended, dropped or re-tokenized.
    prompt = [BOS, 22, 24, 16, 29, 29, 34]
    pairs = [_pair(prompt_token_ids=prompt, chosen_token_ids=[25, 24, EOS], rejected_token_ids=[30]),
             _pair(prompt_token_ids=prompt, chosen_token_ids=[103, 22], rejected_token_ids=[28, 28],
                   rejected_finish_reason="length")]
    kept, stats = tokenize_pairs(CompletionTextForbidden(), pairs, chat_template=True, max_len=64)
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in kept] == [
        (prompt, [25, 24, EOS], [30]), (prompt, [103, 22], [28, 28])]
    assert stats == {"too_long": 0, "truncated": 0, "empty": 0, "retokenized": 0}


def test_a_written_side_is_tokenized_from_text_with_eos(tok):
    # A correction pair: the chosen answer was written, not sampled; the rejected keeps its ids.
    [p], stats = tokenize_pairs(tok, [_pair(prompt_token_ids=[BOS, 9], rejected_token_ids=[30, 2], source="correction")],
                                chat_template=False, max_len=64)
    assert (p.prompt_ids, p.chosen_ids, p.rejected_ids) == ([BOS, 9], _ids(tok, "43") + [EOS], [30, 2])
    assert stats["retokenized"] == 0


def test_legacy_pairs_without_prompt_ids_are_retokenized_as_when_written(tok):
    # Pairs files from before ids were carried: no prompt ids, completion ids stored without EOS.
    [p], stats = tokenize_pairs(tok, [_pair(rejected_finish_reason="length")], chat_template=False, max_len=64)
    assert p.prompt_ids == [BOS] + _ids(tok, "17+26=")
    assert p.chosen_ids == _ids(tok, "43") + [EOS]
    assert p.rejected_ids == _ids(tok, "4")  # cut off by max_new_tokens: no EOS
    assert stats == {"too_long": 0, "truncated": 0, "empty": 0, "retokenized": 1}
    [q], _ = tokenize_pairs(tok, [_pair(chosen_token_ids=[25, 24], rejected_token_ids=[30])], chat_template=False, max_len=64)
    assert (q.chosen_ids, q.rejected_ids) == ([25, 24, EOS], [30, EOS])


def test_chat_template_renders_the_generation_prompt(tok):
    messages = [{"role": "user", "content": "17+26="}]
    [a, b], _ = tokenize_pairs(tok, [_pair(prompt=messages), _pair(prompt="17+26=")], chat_template=True, max_len=64)
    assert a.prompt_ids == b.prompt_ids == _ids(tok, "user: 17+26=\nassistant: ")
    with pytest.raises(ValueError, match="pair 0: prompt is a list of chat messages"):
        tokenize_pairs(tok, [_pair(prompt=messages)], chat_template=False, max_len=64)


def test_long_pairs_are_truncated_or_dropped_and_counted(tok):
    pairs = [_pair(), _pair(chosen="1234567890"), _pair(prompt="1" * 20), _pair(chosen="", chosen_finish_reason="length")]
    kept, stats = tokenize_pairs(tok, pairs, chat_template=False, max_len=12)
    assert [p.index for p in kept] == [0, 1]
    assert len(kept[1].prompt_ids) + len(kept[1].chosen_ids) == 12
    assert kept[1].chosen_ids == _ids(tok, "12345")  # 7 prompt tokens leave room for 5
    assert stats == {"too_long": 1, "truncated": 1, "empty": 1, "retokenized": 4}


def test_collate_puts_chosen_then_rejected_right_padded(tok):
    kept, _ = tokenize_pairs(tok, [_pair(chosen="43", rejected="4"), _pair(prompt="9+9=", chosen="18", rejected="1800")],
                             chat_template=False, max_len=64)
    batch = collate(kept, PAD)
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert ids.shape == (4, 10)  # longest: BOS + "9+9=" + "1800" + EOS
    assert ids[1].tolist() == kept[1].prompt_ids + kept[1].chosen_ids + [PAD, PAD]
    assert ids[3].tolist() == kept[1].prompt_ids + kept[1].rejected_ids
    assert attn.sum(1).tolist() == [7 + 3, 5 + 3, 7 + 2, 5 + 5]
    assert comp[2].tolist() == [0] * 7 + [1, 1] + [0]
    assert kept[0].tokens == 2 * 7 + 3 + 2


@pytest.mark.parametrize("world", [1, 2, 3])
def test_schedule_splits_every_step_across_ranks(tok, world):
    pairs, _ = tokenize_pairs(tok, [_pair(chosen=str(i)) for i in range(22)], chat_template=False, max_len=64)
    per_rank = [rank_schedule(pairs, batch_size=8, micro_batch_size=2, rank=r, world_size=world, epochs=2, seed=0, round=3)
                for r in range(world)]
    assert all(len(s) == 6 for s in per_rank)  # 22 pairs: steps of 8, 8, 6 per epoch
    for step in range(6):
        micro = [s[step] for s in per_rank]
        assert len({len(m) for m in micro}) == 1  # same number of forwards on every rank
        real = [p.index for m in micro for mb in m if not mb.filler for p in mb.pairs]
        assert len(real) == len(set(real)) == (8 if step % 3 < 2 else 6)
        weights = {mb.weight for m in micro for mb in m if not mb.filler}
        assert weights == {world / len(real)}
    epoch0 = {p.index for s in per_rank for m in s[:3] for mb in m if not mb.filler for p in mb.pairs}
    assert epoch0 == set(range(22))
    # Deterministic per (seed, round, epoch); a different round shuffles differently.
    again = rank_schedule(pairs, batch_size=8, micro_batch_size=2, rank=0, world_size=world, epochs=2, seed=0, round=3)
    other = rank_schedule(pairs, batch_size=8, micro_batch_size=2, rank=0, world_size=world, epochs=2, seed=0, round=4)
    first = lambda s: [p.index for mb in s[0] for p in mb.pairs]  # noqa: E731
    assert first(again) == first(per_rank[0]) and first(other) != first(per_rank[0])


def test_schedule_pads_short_shares_with_zero_weight_fillers(tok):
    pairs, _ = tokenize_pairs(tok, [_pair(chosen=str(i)) for i in range(3)], chat_template=False, max_len=64)
    [step] = rank_schedule(pairs, batch_size=4, micro_batch_size=1, rank=3, world_size=4, epochs=1, seed=0, round=0)
    assert len(step) == 1 and step[0].filler and step[0].weight == 0.0
