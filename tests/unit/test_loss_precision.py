"""The chunked log-prob and the DPO loss under bf16 autocast, against autograd on full logits
computed the same way (the learner's GPU path, run on CPU).

Under autocast the LM head's logits are bf16; the chunked function must compute its backward
from those very logits. Recomputing them in fp32 in the backward (outside the autocast region)
gave gradients wrong by 52-137% where the target's probability is near 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors.learner.loss import dpo_loss, linear_logps, token_logps

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _case(p_target: float, *, n: int = 48, h: int = 64, v: int = 4096, seed: int = 0):
    """Rows of ``hidden`` whose target token has probability ≈ ``p_target`` (the row's argmax,
    made likelier by moving the row along that token's weight, so logits stay of a trained
    model's size, |logit| ≲ 20), or ≈ 0 (its lowest-logit token)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g) / h**0.5
    hidden = torch.randn(n, h, generator=g)
    logits = hidden @ weight.T
    if p_target < 0.01:
        return hidden, weight, logits.argmin(-1)
    targets = logits.argmax(-1)
    for i in range(n):  # bisect the step along the target's weight row that puts it at p_target
        direction = weight[targets[i]] / weight[targets[i]].norm()
        lo, hi = -20.0, 40.0
        for _ in range(60):
            mid = (lo + hi) / 2
            p = torch.softmax((hidden[i] + mid * direction) @ weight.T, -1)[targets[i]]
            lo, hi = (mid, hi) if p < p_target else (lo, mid)
        hidden[i] += (lo + hi) / 2 * direction
    return hidden, weight, targets


def _grads(fn, hidden, weight, bias, grad_out):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    bias = bias.clone().requires_grad_(True) if bias is not None else None
    with torch.autocast(**AUTOCAST):
        out = fn(hidden, weight, bias)
    (out * grad_out).sum().backward()
    return out.detach(), hidden.grad, weight.grad, (bias.grad if bias is not None else None)


def _full(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)  # bf16 under autocast, as a model's LM head
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("p_target", [0.0, 0.7, 0.98, 0.995])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_logps_under_bf16_autocast_match_autograd(p_target, with_bias):
    hidden, weight, targets = _case(p_target)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(1)) * 0.01 if with_bias else None
    with torch.no_grad():
        p = torch.softmax(hidden @ weight.T + (bias if bias is not None else 0), -1).gather(-1, targets[:, None])
    if p_target >= 0.5:
        assert abs(float(p.mean()) - p_target) < 0.01  # the case is what it says
    else:
        assert float(p.max()) < 1e-3
    grad_out = torch.rand(hidden.shape[0], generator=torch.Generator().manual_seed(2)) + 0.5
    got = _grads(lambda a, b, c: linear_logps(a, b, c, targets, 16), hidden, weight, bias, grad_out)
    want = _grads(lambda a, b, c: _full(a, b, c, targets), hidden, weight, bias, grad_out)
    assert got[0].dtype == torch.float32
    assert float((got[0] - want[0]).abs().max()) < 1e-3  # bf16 logits (their GEMMs blocked differently), fp32 softmax
    # Gradients: within 1% (relative, in norm) per row and overall; autograd's own products
    # are rounded to bf16, so the two differ by bf16 rounding, not more.
    assert max(_rel(got[1][i], want[1][i]) for i in range(hidden.shape[0])) <= 0.01
    assert _rel(got[1], want[1]) <= 0.01
    assert _rel(got[2], want[2]) <= 0.01
    assert got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype
    if with_bias:
        assert _rel(got[3], want[3]) <= 0.01


def test_chunked_logps_under_autocast_compute_the_head_in_bf16():
    """The forward's logits are the autocast dtype's (not fp32): its log-probs equal the bf16
    full-logits path and differ from the fp32 one by bf16 rounding."""
    hidden, weight, targets = _case(0.7, n=8)
    with torch.autocast(**AUTOCAST):
        got = linear_logps(hidden, weight, None, targets, 4)
        bf16 = _full(hidden, weight, None, targets)
    fp32 = _full(hidden, weight, None, targets)
    off_bf16, off_fp32 = float((got - bf16).abs().max()), float((got - fp32).abs().max())
    assert off_fp32 > 1e-3 and off_bf16 < off_fp32 / 10


def _untied_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked next-token distributions, as a trained model's
        model.lm_head.weight.mul_(80.0)
    return model


def test_dpo_loss_through_an_untied_llama_under_bf16_autocast_matches_full_logits():
    """The learner's completion-only head (``completion_logp_sums``) and the DPO loss, under bf16
    autocast, against the same loss from the model's full logits: gradients of every parameter
    within bf16 tolerance, and the scored targets span probabilities from ≈ 0 to ≥ 0.98."""
    from actors.learner.modeling import completion_logp_sums

    model = _untied_llama()
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 512, (4, 6), generator=g)
    with torch.no_grad():  # chosen: the model's own greedy continuation (p near 1); rejected: random ids
        chosen = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[:, 6:]
    rejected = torch.randint(0, 512, (4, 8), generator=g)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    mask = torch.zeros_like(ids)
    mask[:, 6:] = 1
    attention = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": mask}
    ref = torch.tensor([[-5.0, -60.0]] * 4)

    def loss_of(sums):
        losses, _, _ = dpo_loss(sums[:4], sums[4:], ref[:, 0], ref[:, 1], beta=0.1)
        return losses.sum()

    with torch.no_grad():
        probs = token_logps(model(input_ids=ids, use_cache=False).logits, ids, mask).exp()[mask[:, 1:].bool()]
    assert float(probs.min()) < 0.01 and int((probs >= 0.98).sum()) >= 8

    with torch.autocast(**AUTOCAST):
        sums, _ = completion_logp_sums(model, model, batch, chunk=5)
        loss_of(sums).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast(**AUTOCAST):
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        full = token_logps(logits, ids, mask).sum(-1)
        loss_of(full).backward()
    assert torch.allclose(sums, full, rtol=1e-4, atol=1e-3)
    for name, p in model.named_parameters():
        assert _rel(got[name], p.grad) <= 0.02, name
