"""The on-policy contract: the learner trains exactly the token ids the generators' engines
received and sampled, and scores them as the engine did.

Real ``GeneratorPool``s (vLLM on CPU) sample; pairs are selected as the loop does; the learner's
own batch is built for them. For five ways a completion can end or a prompt can be built, every
sequence of the batch must equal vLLM's prompt ids + vLLM's output ids, token for token, and the
learner's summed log-prob of each sampled completion (same weights, fp32) must equal vLLM's
``cumulative_logprob`` to 1e-3 per token: a dropped BOS, an appended EOS or a one-token shift
breaks both.
"""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from actors.generator.pool import GeneratorPool
from actors.learner.batching import collate
from actors.learner.rank import Learner
from orchestrator.pairs.select import select_pairs
from orchestrator.config import GeneratorConfig, LearnerConfig, ModelConfig
from tests.conftest import DEMO_MODEL

pytestmark = pytest.mark.integration

ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
N, PROMPTS, MAX_NEW = 4, 16, 8
EOS = 2
EXTRA_EOS = 22  # "1": most sums of two 2-digit numbers start with it, so the model samples it often
PAD = 0


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def learner():
    """One learner rank in this process, on the same weights the engines serve."""
    return Learner(ModelConfig(path=str(DEMO_MODEL), max_model_len=64),
                   LearnerConfig(batch_size=64, micro_batch_size=64), seed=0)


@pytest.fixture(scope="module")
def two_eos_model(tmp_path_factory):
    """The demo model whose generation_config lists a second EOS id (as Llama-3 and Qwen do)."""
    path = tmp_path_factory.mktemp("two-eos") / "model"
    shutil.copytree(DEMO_MODEL, path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [EOS, EXTRA_EOS]
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def make_pool(model_path, chat=False):
    return GeneratorPool(ModelConfig(path=str(model_path), max_model_len=64, chat_template=chat),
                         GeneratorConfig(num_actors=1, n=N, max_new_tokens=MAX_NEW, engine=ENGINE), seed=0)


def sample(rows, model_path, *, chat=False):
    pool = make_pool(model_path, chat)
    try:
        return pool.sample(rows, seed=11)
    finally:
        pool.shutdown()


def check_learner_trains_what_was_sampled(groups, learner):
    """Every completion in some pair; the learner's batch rows and log-probs against vLLM's."""
    items = [g.to_item() for g in groups]
    # Distinct scores make every ordered pair above the margin: every completion is trained.
    sel = select_pairs(items, [list(range(len(it.completions))) for it in items], strategy="all_pairs_above_margin",
                       max_pairs_per_prompt=N * (N - 1) // 2, prompt_token_ids=[g.prompt_token_ids for g in groups])
    pairs = sel.pairs
    assert len(pairs) == PROMPTS * N * (N - 1) // 2

    kept, stats = learner._tokenize(pairs)
    assert stats == {"too_long": 0, "truncated": 0, "empty": 0, "retokenized": 0} and len(kept) == len(pairs)
    batch = collate(kept, PAD)
    b = len(kept)
    for k, pair in enumerate(pairs):
        group = groups[sel.prompt_index[k]]
        for row, sampled in ((k, pair.chosen_token_ids), (b + k, pair.rejected_token_ids)):
            length = int(batch["attention_mask"][row].sum())
            seq = batch["input_ids"][row, :length].tolist()
            assert seq == group.prompt_token_ids + sampled, (seq, group.prompt_token_ids, sampled)
            mask = batch["completion_mask"][row, :length].tolist()
            assert mask == [0] * len(group.prompt_token_ids) + [1] * len(sampled)

    logps = learner.completion_logps(pairs)
    checked = set()
    for k, pair in enumerate(pairs):
        by_ids = {tuple(c.token_ids): c for c in groups[sel.prompt_index[k]].completions}
        for side, ids in enumerate((pair.chosen_token_ids, pair.rejected_token_ids)):
            c = by_ids[tuple(ids)]
            assert abs(float(logps[k, side]) - c.logprob) <= 1e-3 * len(ids), (ids, float(logps[k, side]), c.logprob)
            checked.add((sel.prompt_index[k], tuple(ids)))
    completions = [(i, c) for i, g in enumerate(groups) for c in g.completions]
    assert all((i, tuple(c.token_ids)) in checked for i, c in completions)
    return len(completions), [c for _, c in completions]


def test_plain_prompts_stop_strings_and_length_cuts_are_trained_as_sampled(ray_local, eval_rows, tok, learner):
    rows = eval_rows[:PROMPTS]
    seen = 0
    pool = make_pool(DEMO_MODEL)
    try:
        plain, by_stop_string, cut = [pool.sample(rows, seed=11, overrides=o)
                                      for o in (None, {"stop": ["1"]}, {"max_new_tokens": 2})]
    finally:
        pool.shutdown()

    groups = plain
    for row, g in zip(rows, groups):
        assert g.prompt_token_ids == [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
    n, comps = check_learner_trains_what_was_sampled(groups, learner)
    seen += n
    eos_ended = [c for c in comps if c.finish_reason == "stop"]
    assert eos_ended and all(c.token_ids[-1] == EOS and c.stop_reason is None for c in eos_ended)

    # A stop string: the ids run up to and including the token that completed it; the text stops before it.
    groups = by_stop_string
    n, comps = check_learner_trains_what_was_sampled(groups, learner)
    seen += n
    by_string = [c for c in comps if c.stop_reason == "1"]
    assert by_string, "expected some completions to end on the stop string"
    for c in by_string:
        assert c.token_ids[-1] == EXTRA_EOS and "1" not in c.text and EOS not in c.token_ids

    # Cut by the token limit: exactly max_new_tokens ids, no EOS.
    groups = cut
    n, comps = check_learner_trains_what_was_sampled(groups, learner)
    seen += n
    cut = [c for c in comps if c.finish_reason == "length"]
    assert cut and all(len(c.token_ids) == 2 and c.token_ids[-1] != EOS for c in cut)
    assert seen == 3 * PROMPTS * N  # with the two tests below: 320 sampled completions checked


def test_chat_template_prompts_are_trained_with_the_bos_the_engine_received(ray_local, eval_rows, tok, learner):
    rows = eval_rows[:PROMPTS]
    groups = sample(rows, DEMO_MODEL, chat=True)
    for row, g in zip(rows, groups):
        # The demo template writes no BOS; the generator adds the one plain text gets, and the
        # learner trains that very sequence (it used to re-render the template without it).
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        assert g.prompt_token_ids == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    n, _ = check_learner_trains_what_was_sampled(groups, learner)
    assert n == PROMPTS * N


def test_an_extra_eos_id_from_generation_config_is_trained_once(ray_local, eval_rows, two_eos_model, learner):
    groups = sample(eval_rows[:PROMPTS], two_eos_model)
    n, comps = check_learner_trains_what_was_sampled(groups, learner)
    assert n == PROMPTS * N
    extra = [c for c in comps if c.stop_reason == EXTRA_EOS]
    assert extra, "expected some completions to end on the extra EOS id"
    # The sampled extra EOS is the last id; no second EOS is appended after it.
    assert all(c.token_ids[-1] == EXTRA_EOS and EOS not in c.token_ids for c in extra)
