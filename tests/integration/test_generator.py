"""Generator actors on real vLLM engines (CPU, the demo model) in a local Ray cluster:
n completions per prompt with version tags, plain and chat prompts, over-long prompts skipped,
results in row order across two actors, reproducible seeds."""

import math

import pytest
from transformers import AutoTokenizer

from actors.generator.pool import GeneratorPool
from orchestrator.config import GeneratorConfig, ModelConfig
from tests.conftest import DEMO_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Eager mode: starts in seconds on CPU (no compile warmup) and generates at least as fast here.
ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
MAX_LEN = 32


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def pool(ray_local):
    pool = GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=MAX_LEN),
                         GeneratorConfig(num_actors=1, n=4, max_new_tokens=6, engine=ENGINE), seed=0)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def chat_pool(ray_local):
    pool = GeneratorPool(ModelConfig(path=str(DEMO_MODEL), max_model_len=64, chat_template=True),
                         GeneratorConfig(num_actors=2, n=2, max_new_tokens=6, engine=ENGINE),
                         prompt_field="question", seed=0)
    yield pool
    pool.shutdown()


def test_n_completions_per_prompt_with_version_tags(pool, eval_rows, tok):
    rows = eval_rows[:16]
    groups = pool.sample(rows, seed=7)
    assert [g.row for g in groups] == rows
    assert pool.versions() == [0] and pool.version == 0
    for row, group in zip(rows, groups):
        assert group.prompt == row["prompt"] and group.skipped is None and group.policy_version == 0
        assert group.prompt_token_ids == tok(row["prompt"])["input_ids"]
        assert len(group.completions) == 4
        for c in group.completions:
            # The ids are exactly what was sampled: a sampled EOS is the last id, and only there.
            assert tok.eos_token_id not in c.token_ids[:-1]
            assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
            assert c.logprob is not None and math.isfinite(c.logprob) and c.logprob < 0
            # "length" exactly when the 6-token budget ran out before EOS
            if c.finish_reason == "length":
                assert len(c.token_ids) == 6 and c.token_ids[-1] != tok.eos_token_id
            else:
                assert c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_token_id and c.stop_reason is None
    assert any(c.finish_reason == "stop" for g in groups for c in g.completions)
    assert pool.last_sample_stats["tokens"] > 0

    # A round is reproducible from its seed; another seed samples differently.
    again = pool.sample(rows, seed=7)
    assert [[c.token_ids for c in g.completions] for g in again] == [[c.token_ids for c in g.completions] for g in groups]
    other = pool.sample(rows, seed=8)
    assert [[c.token_ids for c in g.completions] for g in other] != [[c.token_ids for c in g.completions] for g in groups]


def test_greedy_is_one_completion_and_deterministic(pool, eval_rows):
    rows = eval_rows[:8]
    first, second = pool.sample(rows, seed=1, greedy=True), pool.sample(rows, seed=2, greedy=True)
    assert all(len(g.completions) == 1 for g in first)
    assert [g.completions[0].token_ids for g in first] == [g.completions[0].token_ids for g in second]


def test_over_long_prompts_are_skipped_with_a_reason(pool, tok):
    # BOS + 31 chars = 32 tokens: no room for one more token in max_model_len=32.
    fits_one = "1" * (MAX_LEN - 2)
    rows = [{"prompt": "12+34="}, {"prompt": "9" * 40}, {"prompt": "1" * (MAX_LEN - 1)}, {"prompt": fits_one}]
    groups = pool.sample(rows, seed=0)
    assert [g.skipped for g in groups] == [None, "too_long", "too_long", None]
    assert groups[1].completions == [] and groups[2].completions == []
    assert len(groups[1].prompt_token_ids) == 41
    assert len(groups[0].completions) == 4
    # The prompt that leaves room for exactly one token gets one-token completions.
    assert all(len(c.token_ids) == 1 for c in groups[3].completions)


def test_a_row_without_the_prompt_field_is_an_error_naming_it(pool):
    with pytest.raises(ValueError, match=r"row 1: no prompt field 'prompt'"):
        pool.sample([{"prompt": "1+1="}, {"question": "1+1="}], seed=0)


def test_chat_and_plain_prompts_in_order_over_two_actors(chat_pool, eval_rows, tok):
    rows = []
    for i, r in enumerate(eval_rows[:10]):
        messages = [{"role": "system", "content": "add"}, {"role": "user", "content": r["prompt"]}]
        rows.append({"question": messages if i % 2 else r["prompt"], "answer": r["answer"], "i": i})
    groups = chat_pool.sample(rows, seed=0, greedy=True)
    assert [g.row["i"] for g in groups] == list(range(10))
    assert chat_pool.versions() == [0, 0]
    for row, group in zip(rows, groups):
        messages = row["question"] if isinstance(row["question"], list) else [{"role": "user", "content": row["question"]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.endswith("assistant: ")
        # The demo template writes no BOS; the generator adds the one plain text gets.
        assert group.prompt_token_ids == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        assert len(group.completions) == 1 and group.skipped is None

    # Both actors took a share, and the seeded result does not depend on the split.
    sampled = chat_pool.sample(rows, seed=3)
    shares = chat_pool.sample(rows[:5], seed=3)
    assert [[c.token_ids for c in g.completions] for g in sampled[:5]] == \
        [[c.token_ids for c in g.completions] for g in shares]


def test_a_sample_past_the_timeout_is_an_error_naming_the_actor(pool, eval_rows):
    cfg = pool.gen_cfg
    pool.gen_cfg = cfg.model_copy(update={"timeout_s": 0.001})
    try:
        with pytest.raises(TimeoutError, match=r"generator 0 \(actor id [0-9a-f]+\) did not answer sample within 0.001s"):
            pool.sample(eval_rows[:64], seed=0)
    finally:
        pool.gen_cfg = cfg
    assert len(pool.sample(eval_rows[:2], seed=0)) == 2  # the actor itself is fine


def test_a_restart_between_calls_is_noticed_when_the_pool_asks_where_its_actors_run(pool):
    """Ray restarts a generator that died between calls (on another node, if its node was lost):
    the next weight sync asks ``node_ids`` to pick its path, and that notices and counts it."""
    import ray

    node, pid, restarts = pool.node_ids(), pool.pids()[0], pool.restarts
    assert pool.restarts == restarts  # asking again changes nothing
    ray.kill(pool.actors[0], no_restart=False)
    while True:
        try:
            if ray.get(pool.actors[0].ready.remote(), timeout=120)["pid"] != pid:
                break
        except ray.exceptions.ActorUnavailableError:
            pass
    assert pool.pids()[0] == pid  # not yet seen by the pool
    assert pool.node_ids() == node
    assert pool.pids()[0] != pid and pool.restarts == restarts + 1


def test_a_self_rewarding_judge_samples_its_verdicts_on_the_policy_generators(pool):
    """The LLM judge in self-rewarding mode runs in the driver and generates through the pool."""
    from actors.generator.pool import make_generate_fn
    from actors.judging.pool import JudgePool
    from judges.base import Completion, JudgeItem
    from orchestrator.config import JudgeConfig

    generate = make_generate_fn(pool, "prompt", seed=0)
    texts = generate(["17+26=", "3+4="], 3, 1.0, 4)
    assert [len(t) for t in texts] == [3, 3] and all(isinstance(x, str) for t in texts for x in t)
    assert len(generate(["17+26="], 1, 0.0, 4)[0]) == 1  # temperature 0: one greedy answer

    cfg = JudgeConfig(cls="judges.llm:LLMJudge",
                      kwargs={"self_rewarding": True, "template": "{prompt}{response}=", "max_tokens": 4})
    judges = JudgePool(cfg, generate_fn=generate)
    try:
        assert judges.runs_in_driver
        items = [JudgeItem("1+1=", [Completion("2"), Completion("3")], {})]
        res = judges.score(items)
        # The tiny demo model never writes "Score: N": every verdict is unparseable, hence None.
        assert res.scores == [[None, None]]
        assert res.failures["judge.unparseable"] == 2
    finally:
        judges.shutdown()
