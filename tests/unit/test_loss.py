"""The DPO loss family and completion log-probs against values worked out by hand."""

import math

import pytest
import torch

from actors.learner.loss import completion_nll, dpo_loss, sequence_logps, token_logps
from tests.conftest import DEMO_MODEL

BETA = 0.1
# Two pairs: (policy chosen, policy rejected, ref chosen, ref rejected) summed log-probs.
PAIRS = [(-1.0, -3.0, -1.5, -2.0), (-4.0, -1.0, -2.0, -2.5)]
# h = (πc − rc) − (πr − rr): pair 0: 0.5 − (−1.0) = 1.5; pair 1: −2.0 − 1.5 = −3.5.
H = [1.5, -3.5]


def _inputs():
    cols = list(zip(*PAIRS))
    return [torch.tensor(c, dtype=torch.float64) for c in cols]


def _softplus(x: float) -> float:
    """−log σ(−x) = log(1 + e^x)."""
    return math.log(1 + math.exp(x))


def test_rewards_are_beta_times_log_ratios():
    _, chosen, rejected = dpo_loss(*_inputs(), beta=BETA)
    assert chosen.tolist() == pytest.approx([0.1 * 0.5, 0.1 * -2.0])
    assert rejected.tolist() == pytest.approx([0.1 * -1.0, 0.1 * 1.5])


def test_sigmoid_is_minus_log_sigmoid_of_beta_h():
    losses, _, _ = dpo_loss(*_inputs(), beta=BETA, loss_type="sigmoid")
    # −log σ(0.15) = log(1 + e^−0.15); −log σ(−0.35) = log(1 + e^0.35)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.15)), math.log(1 + math.exp(0.35))], abs=1e-12)


def test_conservative_dpo_mixes_both_labels():
    losses, _, _ = dpo_loss(*_inputs(), beta=BETA, loss_type="sigmoid", label_smoothing=0.2)
    want = [0.8 * _softplus(-0.15) + 0.2 * _softplus(0.15), 0.8 * _softplus(0.35) + 0.2 * _softplus(-0.35)]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)


def test_robust_dpo_subtracts_the_flipped_term_and_rescales():
    losses, _, _ = dpo_loss(*_inputs(), beta=BETA, loss_type="robust", label_smoothing=0.2)
    # [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1 − 2ε), ε = 0.2
    want = [(0.8 * _softplus(-0.15) - 0.2 * _softplus(0.15)) / 0.6,
            (0.8 * _softplus(0.35) - 0.2 * _softplus(-0.35)) / 0.6]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    plain, _, _ = dpo_loss(*_inputs(), beta=BETA, loss_type="robust")
    assert plain.tolist() == pytest.approx([_softplus(-0.15), _softplus(0.35)], abs=1e-12)


def test_hinge_is_relu_of_one_minus_beta_h():
    losses, _, _ = dpo_loss(*_inputs(), beta=BETA, loss_type="hinge")
    assert losses.tolist() == pytest.approx([1 - 0.15, 1 + 0.35])
    wide, _, _ = dpo_loss(*_inputs(), beta=1.0, loss_type="hinge")  # βh = 1.5 > 1: no loss
    assert wide.tolist() == pytest.approx([0.0, 1 + 3.5])


def test_ipo_is_squared_distance_to_half_inverse_beta():
    losses, _, _ = dpo_loss(*_inputs(), beta=BETA, loss_type="ipo")
    assert losses.tolist() == pytest.approx([(1.5 - 5.0) ** 2, (-3.5 - 5.0) ** 2])


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*_inputs(), beta=BETA, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_inputs(), beta=BETA, loss_type="ipo", label_smoothing=0.1)


def test_completion_nll_is_mean_token_nll():
    assert completion_nll(torch.tensor([-3.0, -1.0]), torch.tensor([3, 4])).tolist() == pytest.approx([1.0, 0.25])


def _random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    # Row 0: prompt 0..2, completion 3..5, pad 6. Row 1: prompt 0..1, completion 2..6.
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    return logits, labels, mask


def test_sequence_logps_by_hand_on_a_small_case():
    logits, labels, mask = _random_case()
    got = sequence_logps(logits, labels, mask)
    for row in range(2):
        want = 0.0
        for t in range(1, 7):
            if mask[row, t]:
                lp = logits[row, t - 1] - torch.logsumexp(logits[row, t - 1], 0)
                want += float(lp[labels[row, t]])
        assert float(got[row]) == pytest.approx(want, abs=1e-6)
    mean = sequence_logps(logits, labels, mask, average=True)
    assert mean.tolist() == pytest.approx([float(got[0]) / 3, float(got[1]) / 5], abs=1e-6)


def test_prompt_and_padding_do_not_change_sequence_logps():
    logits, labels, mask = _random_case()
    base = sequence_logps(logits, labels, mask)
    g = torch.Generator().manual_seed(1)
    other_logits, other_labels = logits.clone(), labels.clone()
    # Prompt token ids, and logits at every position that predicts a non-completion token
    # (row 0: positions 0, 1 and 5 predict prompt/pad; row 1: position 0), may be anything.
    other_labels[0, :3] = torch.randint(0, 11, (3,), generator=g)
    other_labels[1, :2] = torch.randint(0, 11, (2,), generator=g)
    other_labels[0, 6] = 0
    other_logits[0, [0, 1, 5, 6]] = torch.randn(4, 11, generator=g, dtype=torch.float64)
    other_logits[1, 6] = float("nan")  # the logits after the last token predict nothing
    other_logits[1, 0] = torch.randn(11, generator=g, dtype=torch.float64)
    assert torch.equal(sequence_logps(other_logits, other_labels, mask), base)
    # Extra right padding changes nothing either.
    wide_logits = torch.cat([logits, torch.randn(2, 3, 11, generator=g, dtype=torch.float64)], 1)
    wide_labels = torch.cat([labels, torch.zeros(2, 3, dtype=torch.long)], 1)
    wide_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1)
    assert torch.allclose(sequence_logps(wide_logits, wide_labels, wide_mask), base, atol=1e-12)
    # ...while a completion token does.
    changed = labels.clone()
    changed[0, 4] = (labels[0, 4] + 1) % 11
    assert not torch.allclose(sequence_logps(logits, changed, mask), base)


def test_sequence_logps_matches_a_manual_gather_over_the_demo_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.learner.batching import TokenizedPair, collate

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    texts = [("17+26=", "43", "4"), ("90+90=", "180", "1800")]
    pairs = [TokenizedPair(i, tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"] + [2],
                           tok(r, add_special_tokens=False)["input_ids"]) for i, (p, c, r) in enumerate(texts)]
    batch = collate(pairs, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    assert token_logps(logits, batch["input_ids"], batch["completion_mask"]).shape == (4, logits.shape[1] - 1)
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    for row, (prompt, completion) in enumerate(rows):
        ids = prompt + completion
        want = sum(
            torch.log_softmax(logits[row, t - 1].double(), -1)[ids[t]].item() for t in range(len(prompt), len(ids))
        )
        assert float(got[row]) == pytest.approx(want, abs=1e-5)


def test_linear_logps_equals_full_log_softmax_with_gradients():
    from actors.learner.loss import linear_logps

    g = torch.Generator().manual_seed(0)
    n, h, v = 11, 4, 9
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    full = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[:, None]).squeeze(-1)
    for chunk in (1, 4, 11, 100):  # chunks that divide n, do not, and exceed it
        assert torch.allclose(linear_logps(hidden, weight, bias, targets, chunk), full, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, c: linear_logps(a, b, c, targets, 4), (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda a, b: linear_logps(a, b, None, targets, 3), (hidden, weight))
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        linear_logps(hidden, weight, None, targets, 0)


def test_completion_targets_select_the_positions_predicting_completion_tokens():
    from actors.learner.loss import completion_targets

    labels = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 9, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    select, targets, rows = completion_targets(labels, mask)
    assert select.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert targets.tolist() == [7, 8, 9, 9] and rows.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("model_path", ["demo", "rehearsal"])
def test_completion_only_logps_equal_the_full_logits_path(model_path):
    """The learner's completion-only chunked log-probs (inside the model's forward, by its LM
    head) against full logits + ``token_logps``, on the demo model and a 2-layer rehearsal model
    (Qwen2.5-0.5B's layer shape and tied 151,936-entry vocabulary), values and gradients."""
    from transformers import AutoModelForCausalLM

    from actors.learner.modeling import completion_logp_sums

    if model_path == "demo":
        model, vocab = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval(), 128
    else:
        from transformers import Qwen2ForCausalLM

        from orchestrator.tools.rehearsal import rehearsal_config

        torch.manual_seed(0)
        model, vocab = Qwen2ForCausalLM(rehearsal_config(layers=1)).eval(), 151_936
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 4000), (4, 24), generator=g)
    attention = torch.ones_like(ids)
    attention[2:, 20:] = 0  # right padding
    mask = torch.zeros_like(ids)
    mask[:, 9:] = 1
    mask[2:, 20:] = 0
    mask[1, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": mask}
    sums, lens = completion_logp_sums(model, model, batch, chunk=7)
    sums.sum().backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    per_token = token_logps(model(input_ids=ids, attention_mask=attention).logits, ids, mask)
    full = per_token.sum(-1)
    full.sum().backward()
    assert lens.tolist() == [15, 3, 11, 11]  # scored: positions 9.. of each completion
    # Per token to 1e-5; the sums (about -180 here) to fp32 rounding at their size.
    from actors.learner.loss import completion_targets, linear_logps

    select, targets, _ = completion_targets(ids, mask)
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        tokens = linear_logps(hidden[:, :-1][select], model.lm_head.weight, None, targets, 7)
    assert float((tokens - per_token.detach()[select]).abs().max()) < 1e-5
    assert torch.allclose(sums, full, rtol=2e-7, atol=1e-6)
    for name, p in model.named_parameters():
        assert float((got_grads[name] - p.grad).abs().max()) < 1e-5 * max(1.0, float(p.grad.abs().max())), name
    assert model.lm_head.forward.__func__ is type(model.lm_head).forward  # the head is itself again
