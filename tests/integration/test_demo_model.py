"""The shipped demo model: vLLM on CPU and transformers agree, and it starts imperfect."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import SamplingParams

from judges.base import Completion, JudgeItem
from judges.verifiable import VerifiableJudge
from tests.conftest import DEMO_MODEL

pytestmark = pytest.mark.integration

# The shipped model was SFT'd for 240 steps: held-out greedy accuracy 0.39 when made.
ACCURACY_RANGE = (0.20, 0.50)


def test_vllm_and_transformers_greedy_tokens_agree(demo_llm, eval_rows):
    rows = eval_rows[:64]
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([tok(r["prompt"])["input_ids"] for r in rows])
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    outs = demo_llm.generate([r["prompt"] for r in rows], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    for i, out in enumerate(outs):
        assert list(out.prompt_token_ids) == ids[i].tolist()
        hf_new = hf[i, ids.shape[1]:].tolist()
        vl = list(out.outputs[0].token_ids)
        assert hf_new[: len(vl)] == vl, (rows[i]["prompt"], hf_new, vl)


def test_held_out_accuracy_is_in_range_and_samples_find_answers(demo_llm, eval_rows):
    judge = VerifiableJudge()
    greedy = demo_llm.generate([r["prompt"] for r in eval_rows], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    items = [JudgeItem(r["prompt"], [Completion(o.outputs[0].text)], r) for r, o in zip(eval_rows, greedy)]
    accuracy = sum(s[0] for s in judge.score(items)) / len(items)
    assert ACCURACY_RANGE[0] <= accuracy <= ACCURACY_RANGE[1], accuracy

    rows = eval_rows[:200]
    sampled = demo_llm.generate([r["prompt"] for r in rows], SamplingParams(temperature=1.0, n=8, max_tokens=6, seed=0), use_tqdm=False)
    items = [JudgeItem(r["prompt"], [Completion(c.text) for c in o.outputs], r) for r, o in zip(rows, sampled)]
    pass_at_8 = sum(max(s) for s in judge.score(items)) / len(items)
    assert pass_at_8 > accuracy + 0.15, (pass_at_8, accuracy)
