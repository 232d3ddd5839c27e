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
import ray
from transformers import AutoTokenizer

from actors.generator.pool import GeneratorPool
from actors.learner.batching import collate
from actors.learner.group import LearnerGroup
from actors.learner.rank import Learner
from actors.weight_sync import sync_weights
from orchestrator.pairs.select import select_pairs
from orchestrator.config import GeneratorConfig, LearnerConfig, LoraConfig, ModelConfig, SyncConfig
from tests.conftest import DEMO_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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


# -- LoRA: a trained adapter is what the engines sample with -------------------------------------

LORA = LoraConfig(r=8, alpha=16)


class LearnerInWorker:
    """The check's view of the rank-0 ``Learner`` inside a ``LearnerGroup``'s Ray worker."""

    def __init__(self, group):
        self.group = group

    def _call(self, method: str, pairs):
        return ray.get(self.group.rank0.apply.remote(lambda w, m, p: getattr(w.learner, m)(p), method, pairs))

    def _tokenize(self, pairs):
        return self._call("_tokenize", pairs)

    def completion_logps(self, pairs):
        return self._call("completion_logps", pairs)


def _greedy_with_exported(actor, path, prompt_ids):
    """In a generator actor: greedy answers and their log-probs with the adapter folder at ``path``
    loaded from disk, as vLLM loads any PEFT adapter."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    outs = actor.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                              SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=0),
                              lora_request=LoRARequest("exported", 10_000, str(path)), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].cumulative_logprob) for o in outs]


def test_a_trained_adapter_is_what_the_engines_sample_and_an_exported_one_serves(ray_local, eval_rows, learner,
                                                                                  tmp_path):
    """learner.lora: the learner trains an adapter on sampled pairs; the sync hands the engine the
    adapter alone (shared memory, a few hundred KB); every completion sampled after it is tagged
    with the new version and the learner's log-prob of it equals vLLM's to 1e-3 per token, while the
    base scores them differently; the checkpoint's PEFT folder, loaded from disk by vLLM, answers
    as the adapter the sync handed over (the same greedy tokens and log-probs)."""
    rows = eval_rows[:PROMPTS]
    model_cfg = ModelConfig(path=str(DEMO_MODEL), max_model_len=64)
    pool = GeneratorPool(model_cfg, GeneratorConfig(num_actors=1, n=N, max_new_tokens=MAX_NEW, engine=ENGINE), seed=0,
                         lora_rank=LORA.r)
    group = LearnerGroup(model_cfg, LearnerConfig(batch_size=64, micro_batch_size=64, lr=2e-2, lora=LORA))
    try:
        first = pool.sample(rows, seed=11)  # version 0: the base (a fresh adapter adds zero)
        items = [g.to_item() for g in first]
        sel = select_pairs(items, [list(range(len(it.completions))) for it in items], strategy="best_worst",
                           prompt_token_ids=[g.prompt_token_ids for g in first])
        assert group.train(sel.pairs, round=1)["steps"] >= 1
        timings = sync_weights(group, pool, 1, SyncConfig())
        # 2 layers x (q, k, v, o: 128 -> 128; gate, up: 128 -> 512; down: 512 -> 128), r (in + out) fp32 each.
        assert timings["path"] == "shm" and timings["bytes"] == 4 * LORA.r * 2 * (4 * 256 + 3 * 640), timings
        assert pool.versions() == [1]

        groups = pool.sample(rows, seed=12)
        assert {g.policy_version for g in groups} == {1}
        n, comps = check_learner_trains_what_was_sampled(groups, LearnerInWorker(group))
        assert n == PROMPTS * N
        # The adapter is not zero: the base (the plain learner of this module) scores them otherwise.
        items = [g.to_item() for g in groups]
        sel = select_pairs(items, [list(range(len(it.completions))) for it in items], strategy="best_worst",
                           prompt_token_ids=[g.prompt_token_ids for g in groups])
        base = learner.completion_logps(sel.pairs)
        policy = LearnerInWorker(group).completion_logps(sel.pairs)
        assert float((base - policy).abs().max()) > 0.05

        ckpt = tmp_path / "ckpt"
        group.save(str(ckpt))
        assert sorted(p.name for p in (ckpt / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
        in_memory = pool.sample(rows, seed=0, greedy=True)
        exported = ray.get(pool.actors[0].apply.remote(_greedy_with_exported, ckpt / "adapter",
                                                       [g.prompt_token_ids for g in in_memory]))
        for g, (ids, logprob) in zip(in_memory, exported):
            c = g.completions[0]
            assert ids == c.token_ids and abs(logprob - c.logprob) <= 1e-3 * len(ids), (ids, c.token_ids)
    finally:
        group.shutdown()
        pool.shutdown()
