"""What the DPO literature teaches, end to end on the demo: an adaptive β followed round by round and
continued after a resume, correction pairs next to best/worst pairs, the identity example, and
``odpo audit`` on real pairs (a marker planted by a custom judge is found; the demo's own pairs
raise nothing)."""

import contextlib
import io
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from orchestrator.loop.beta import carry_beta
from orchestrator.config import load_config
from orchestrator.rundir import RunDir
from tests.conftest import DEMO_MODEL, REPO
from tests.integration.runs import finish, metrics, start_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BETA = "{schedule: kl_target, start: 0.1, target_kl: 1.0, rate: 0.5}"
LESSONS = ["loop.prompts_per_round=32", f"learner.beta={BETA}", "pairs.sources=[best_worst, correction]",
           "corrector.cls=judges.correction:GoldAnswerCorrector", "pairs.length_balance=true"]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lessons")


@pytest.fixture(scope="module")
def lessons(out_dir):
    """3 rounds of the shrunken demo with both pair sources, an adaptive β and length balance."""
    proc = start_run(out_dir, "lessons", "loop.rounds=3", *LESSONS)
    finish(proc, out_dir / "lessons.log")
    return out_dir / "lessons"


def audit(run_dir, *args) -> SimpleNamespace:
    """``odpo audit`` through the CLI's entry point, in this process (the tokenizer is loaded already)."""
    from orchestrator.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["audit", str(run_dir), *args])
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def test_correction_pairs_next_to_best_worst_pairs(lessons, tok):
    lines = metrics(lessons)
    assert [m["round"] for m in lines] == [0, 1, 2, 3]
    seen = Counter()
    for m in lines[1:]:
        rows = RunDir(lessons).read_pairs(m["round"])
        by_source = Counter(r["source"] for r in rows)
        assert {k: v for k, v in m["pairs_by_source"].items() if v} == dict(by_source) and len(rows) == m["pairs"]
        assert set(m["pairs_by_source"]) == {"best_worst", "correction"} and "no_correction" in m["pairs_dropped"]
        seen.update(by_source)
        for r in rows:
            assert r["prompt_token_ids"] == tok(r["prompt"])["input_ids"]
            if r["source"] == "correction":
                # The chosen side is the gold answer, tokenized where the pair was built (+ EOS): the
                # exact ids trained; the rejected side is the sampled answer, which was wrong.
                assert r["chosen"] == r["answer"] and r["chosen_score"] is None
                assert r["chosen_token_ids"] == tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                assert r["rejected_token_ids"] and r["rejected"].strip() != r["answer"]
                assert r["rejected_score"] == 0.0
            else:
                assert r["chosen_score"] > r["rejected_score"]
        # The length figures are those of the pairs file.
        lens_c = [len(r["chosen_token_ids"]) for r in rows]
        lens_r = [len(r["rejected_token_ids"]) for r in rows]
        assert m["len_chosen_mean"] == pytest.approx(sum(lens_c) / len(rows))
        assert m["len_rejected_mean"] == pytest.approx(sum(lens_r) / len(rows))
        unequal = [(c, r) for c, r in zip(lens_c, lens_r) if c != r]
        assert m["longer_chosen_share"] == pytest.approx(sum(c > r for c, r in unequal) / len(unequal))
    assert seen["best_worst"] > 0 and seen["correction"] > 0, seen


def test_audit_raises_nothing_on_the_demo_pairs(lessons):
    for args in ([], ["--source", "best_worst"]):
        out = audit(lessons, *args)
        assert out.returncode == 0, out.stderr
        assert "warning" not in out.stderr, out.stderr
        assert "over-represented in chosen answers" in out.stdout
    assert (lessons / "plots" / "audit.png").stat().st_size > 10000


def test_beta_follows_the_adaptive_schedule_and_a_resumed_run_continues_it(lessons, out_dir):
    spec = load_config(None, [f"learner.beta={BETA}"]).learner.beta
    lines = metrics(lessons)[1:]
    assert lines[0]["beta"] == 0.1
    for before, after in zip(lines, lines[1:]):
        assert after["beta"] == pytest.approx(carry_beta(spec, before["beta"], before["kl"]))
    state = json.loads((lessons / "checkpoints" / "round_000003" / "loop_state.json").read_text())
    carried = carry_beta(spec, lines[-1]["beta"], lines[-1]["kl"])
    assert state["beta"] == pytest.approx(carried) and carried != 0.1
    assert sum(state["length_counts"].values()) > 0
    resumed = start_run(out_dir, "lessons", "loop.rounds=4", *LESSONS, resume=True)
    finish(resumed, out_dir / "lessons.log")
    lines = metrics(lessons)
    assert [m["round"] for m in lines] == [0, 1, 2, 3, 4]
    assert lines[4]["beta"] == pytest.approx(carried)  # from the checkpoint, not the schedule's start


def test_audit_finds_a_marker_planted_by_a_custom_judge(demo_llm, eval_rows, tmp_path):
    """Real samples of the demo model, scored by a judge that rewards any answer holding a "7": the
    pairs teach "7", not addition. The same samples judged by the demo's own judge raise nothing."""
    from vllm import SamplingParams

    from actors.generator.sampling import to_completion
    from judges.base import JudgeItem
    from judges.calling import score_guarded
    from orchestrator.pairs.select import select_pairs
    from judges.verifiable import VerifiableJudge
    from orchestrator.rundir import pair_records
    from tests.integration.judges_for_tests import MarkerJudge

    rows = eval_rows[:96]
    outs = demo_llm.generate([r["prompt"] for r in rows], SamplingParams(temperature=1.0, n=8, max_tokens=6, seed=1),
                             use_tqdm=False)
    items = [JudgeItem(r["prompt"], [to_completion(c) for c in o.outputs], {"answer": r["answer"]}) for r, o in zip(rows, outs)]
    prompt_ids = [list(o.prompt_token_ids) for o in outs]
    for name, judge in (("marker", MarkerJudge("7")), ("demo", VerifiableJudge(mode="number"))):
        scores, failures, _ = score_guarded(judge, items)
        assert not failures
        sel = select_pairs(items, scores, prompt_token_ids=prompt_ids)
        assert len(sel.pairs) >= 20, (name, len(sel.pairs))
        rd = RunDir(tmp_path / name)
        rd.create()
        rd.write_pairs(1, pair_records(sel.pairs, 1))
        (rd.root / "config.yaml").write_text(f"model:\n  path: {DEMO_MODEL}\n")
        out = audit(rd.root)
        assert out.returncode == 0, out.stderr
        ranked = [line.split() for line in out.stdout.splitlines() if line[:4].strip().isdigit()]
        if name == "marker":
            assert ranked[0][:2] == ["1", "'7'"], out.stdout
            assert out.stderr.startswith("warning: marker shortcut: token '7' is in 100.0% of chosen and 0.0% of rejected"), out.stderr
        else:
            assert "warning" not in out.stderr, out.stderr


def answer_logp(model_dir, tok, prompts, answer="Ada") -> float:
    """Mean log-probability of ``answer`` + EOS after each prompt under the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total = 0.0
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + target])).logits[0, len(ids) - 1 : -1]
        total += float(logits.log_softmax(-1).gather(-1, torch.tensor(target)[:, None]).sum())
    return total / len(prompts)


def test_identity_example_raises_the_new_answer_s_probability_every_round(out_dir, tok):
    proc = start_run(out_dir, "identity", "loop.rounds=3", "loop.eval_every=0", "loop.checkpoint_every=1",
                     "loop.keep_checkpoints=3", config="configs/examples/identity.yaml", tiny=False)
    finish(proc, out_dir / "identity.log")
    run_dir = out_dir / "identity"
    prompts = [json.loads(line)["prompt"] for line in (REPO / "configs/examples/identity.jsonl").read_text().splitlines()]
    logps = [answer_logp(DEMO_MODEL, tok, prompts)]
    logps += [answer_logp(run_dir / "checkpoints" / f"round_{r:06d}" / "policy", tok, prompts) for r in (1, 2, 3)]
    assert all(b > a for a, b in zip(logps, logps[1:])), logps
    for m in metrics(run_dir)[1:]:
        rows = RunDir(run_dir).read_pairs(m["round"])
        assert rows and {r["source"] for r in rows} == {"correction"} and m["pairs_by_source"] == {"correction": len(rows)}
        assert all(r["chosen"] == "Ada" and r["rejected"].strip() != "Ada" for r in rows)
