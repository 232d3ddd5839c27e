"""The DPO loss family and completion log-probs: pure tensor math (no Ray, no I/O).

Notation: for a pair (x, y_w, y_l) with policy π_θ and frozen reference π_ref,

    h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]

is the difference of implicit rewards divided by β; ``dpo_loss`` turns h into a per-pair loss.
The learner adds ``rpo_alpha`` times ``completion_nll`` of the chosen answer (RPO).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
_GRAD_ROWS = 16_384
"""Vocabulary rows of the LM head's gradient summed at once in reduced precision (bounds the temporary)."""


def token_logps(logits: torch.Tensor, labels: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Log-prob of each completion token, 0 elsewhere; shape ``[B, T-1]``.

    ``logits`` come from a forward over ``labels`` (``[B, T, V]`` and ``[B, T]``): the logits at
    position t predict token t+1, so the sequences are shifted by one here. ``completion_mask``
    (``[B, T]``) is 1 on completion tokens and 0 on prompt and padding; masked positions are
    replaced by 0 (not multiplied) so a NaN in padding cannot leak into the sums.
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:].unsqueeze(-1)
    # gather − logsumexp == log_softmax then gather, without a second [B, T, V] tensor.
    logps = torch.gather(logits, -1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(completion_mask[:, 1:].bool(), logps, torch.zeros_like(logps))


def completion_targets(labels: torch.Tensor, completion_mask: torch.Tensor):
    """Where the completion tokens are predicted: ``(select, targets, rows)``.

    ``select`` (``[B, T-1]`` bool) marks the positions t whose next token t+1 is a completion
    token; ``targets`` are those next tokens and ``rows`` their sequence index, both ``[N]`` in
    row-major order (the order of ``hidden[:, :-1][select]``).
    """
    select = completion_mask[:, 1:].bool()
    return select, labels[:, 1:][select], select.nonzero()[:, 0]


def _linear_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here: autocast's dtype when autocast is on
    for their device (it casts every floating input but fp64), else the inputs' own."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    """One chunk's logits, computed from inputs already in the compute dtype, returned in ``acc``.
    Autocast is off inside: the forward and the backward's recomputation must run the very same
    product, and the backward runs outside the autocast region the forward ran in."""
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h, weight, bias).to(acc)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] for rows of ``h``, ``chunk`` rows at a time, never holding more
    than one chunk of logits; the backward recomputes each chunk's logits and accumulates the
    weight gradient in place (one weight-sized buffer, no per-chunk copy).

    Precision: the logits are computed in the dtype ``F.linear`` would use at the call (the
    autocast dtype under autocast, e.g. bf16), in the forward and again in the backward, and taken
    to fp32 (fp64 for fp64 inputs) for the softmax. The backward's recomputed logits are therefore
    bit-identical to the forward's, so ``exp(logits - lse)`` is the forward's softmax (summing to 1);
    recomputing them in another precision than the forward (the autocast region does not reach the
    backward) made the gradient wrong by up to 137% where the target's probability is near 1. The
    two gradient products run in the compute dtype, as autograd's would, accumulated in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        dt = _linear_dtype(hidden, weight)
        acc = torch.promote_types(torch.float32, dt)  # fp32, or fp64 for fp64 inputs
        w = weight.to(dt)
        b = bias.to(dt) if bias is not None else None
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[s : s + chunk].to(dt), w, b, acc)
            picked = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1)
            # logsumexp in place (torch.logsumexp would allocate a second chunk-sized tensor).
            top = logits.amax(-1, keepdim=True)
            lse[s : s + chunk] = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))
            out[s : s + chunk] = picked - lse[s : s + chunk]
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dt
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dt, acc = ctx.dtype, lse.dtype
        w = weight.to(dt)  # the same cast as the forward's (a no-op without autocast)
        b = bias.to(dt) if bias is not None else None
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk].to(dt)
            # d logp / d logits = onehot(y) - softmax(logits), times the incoming gradient.
            g = _chunk_logits(h, w, b, acc).sub_(lse[s : s + ctx.chunk, None]).exp_().neg_()
            g.scatter_add_(-1, targets[s : s + ctx.chunk, None], torch.ones_like(g[:, :1]))
            g.mul_(grad_out[s : s + ctx.chunk, None].to(acc))
            g_dt = g.to(dt)
            if want_h:
                grad_h[s : s + ctx.chunk] = (g_dt @ w).to(hidden.dtype)
            if want_w:
                if dt == acc:
                    grad_w.addmm_(g.t(), h)
                else:  # products in the compute dtype (as autograd's), summed in fp32, a block of rows
                    gt = g_dt.t()  # at a time so that no weight-sized temporary is made
                    for v in range(0, gt.shape[0], _GRAD_ROWS):
                        grad_w[v : v + _GRAD_ROWS] += gt[v : v + _GRAD_ROWS] @ h
            if want_b:
                grad_b += g.sum(0)
            del g, g_dt
        grad_w = grad_w.to(weight.dtype) if want_w else None
        grad_b = grad_b.to(bias.dtype) if want_b else None
        return grad_h, grad_w, grad_b, None, None


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 chunk: int = 256) -> torch.Tensor:
    """Log-prob of ``targets`` under ``softmax(hidden @ weight.T + bias)``, shape ``[N]`` (fp32, or
    fp64 for fp64 inputs); under autocast the logits are computed in its dtype, forward and
    backward alike, and normalized in fp32.

    ``hidden`` is ``[N, H]`` (only the positions that are scored), ``weight`` the LM head's
    ``[V, H]``. Equal to ``log_softmax(logits).gather(targets)`` on full logits, but peak memory is
    one ``[chunk, V]`` block (every step in place) instead of ``[N, V]`` times the copies autograd
    keeps, plus the head's gradient.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _LinearLogProbs.apply(hidden, weight, bias, targets, chunk)


def completion_lengths(completion_mask: torch.Tensor) -> torch.Tensor:
    """Number of scored completion tokens per sequence (the first token is never scored)."""
    return completion_mask[:, 1:].sum(-1)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, completion_mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Per-sequence log π(y|x) = Σ_t log π(y_t | x, y_<t) over completion tokens only.

    With ``average=True`` the sum is divided by the number of completion tokens (the
    length-normalized log-prob that IPO uses). Returns shape ``[B]``.
    """
    sums = token_logps(logits, labels, completion_mask).sum(-1)
    if average:
        return sums / completion_lengths(completion_mask).clamp(min=1)
    return sums


def completion_nll(chosen_logps_sum: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood of the chosen answer, averaged over its tokens.

    This is the NLL term of iterative RPO (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization", Eq. 3: −log M(y_w|x) / |y_w|), which the learner weights by ``rpo_alpha``.
    """
    return -chosen_logps_sum / chosen_lengths.clamp(min=1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards ``(losses, chosen_rewards, rejected_rewards)``.

    Rewards are r_w = β·(log π_θ(y_w) − log π_ref(y_w)) and r_l likewise (detached), so that
    β·h = r_w − r_l. With σ the logistic function and ε = ``label_smoothing``:

    - ``sigmoid`` (DPO, Rafailov et al. 2023, Eq. 7): −log σ(βh). With ε > 0 it is
      conservative DPO (cDPO, Mitchell 2023): −(1−ε)·log σ(βh) − ε·log σ(−βh).
    - ``robust`` (rDPO, Chowdhury et al. 2024, Eq. 8), an unbiased loss under label-flip rate ε:
      [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε).
    - ``hinge`` (SLiC-HF, Zhao et al. 2023, with margin 1/β): max(0, 1 − βh).
    - ``ipo`` (IPO, Azar et al. 2023, Eq. 17, β playing τ): (h − 1/(2β))². Azar et al. use
      length-normalized log-probs; pass ``sequence_logps(..., average=True)`` values for that.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


REPORT_FIELDS = ("pairs", "loss", "dpo_loss", "nll", "accuracy", "margin", "reward_chosen", "reward_rejected",
                 "logp_chosen", "logp_rejected", "kl")
"""Sums a learner keeps per round (all-reduced at its end); every report figure is one of them
over ``pairs``."""


def pair_terms(logps: torch.Tensor, lens: torch.Tensor, ref: torch.Tensor, cfg: Any, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair total loss (with grad: ``dpo_weight`` × DPO loss + ``rpo_alpha`` × NLL) and the
    detached figures of the round report, from ``[B, 2]`` (chosen, rejected) summed log-probs,
    lengths and reference log-probs; ``cfg`` is the ``learner`` config section."""
    pol, rf = (logps / lens.clamp(min=1), ref / lens.clamp(min=1)) if cfg.length_normalize else (logps, ref)
    losses, r_w, r_l = dpo_loss(pol[:, 0], pol[:, 1], rf[:, 0], rf[:, 1], beta=beta,
                                loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    nll = completion_nll(logps[:, 0], lens[:, 0])
    total = cfg.dpo_weight * losses + cfg.rpo_alpha * nll
    sums = logps.detach()
    return {
        "total": total, "loss": total.detach(), "dpo_loss": losses.detach(), "nll": nll.detach(),
        "accuracy": (r_w > r_l).to(sums.dtype), "margin": r_w - r_l,
        "reward_chosen": r_w, "reward_rejected": r_l,
        "logp_chosen": sums[:, 0], "logp_rejected": sums[:, 1],
        # Per-sequence log-ratio on the chosen answer: a one-sample estimate of KL(π‖π_ref)
        # when the chosen answers were sampled from π (on-policy pairs).
        "kl": sums[:, 0] - ref[:, 0],
    }


def term_sums(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[len(REPORT_FIELDS)]`` fp64: the pair count, then the sum of each figure over the pairs."""
    n = torch.tensor([terms["loss"].numel()], dtype=torch.float64)
    return torch.cat([n, torch.stack([terms[f].double().sum() for f in REPORT_FIELDS[1:]]).cpu()])


def mean_report(totals: torch.Tensor, stats: dict, n_in: int) -> dict[str, Any]:
    """The round report's pair figures: each sum of ``totals`` over the pair count, and the
    tokenizer's counts of pairs cut or dropped (``stats``) out of ``n_in``."""
    n = float(totals[0])
    report = {f: (float(totals[i]) / n if n else float("nan")) for i, f in enumerate(REPORT_FIELDS) if i}
    report["reward_accuracy"] = report.pop("accuracy")
    report["reward_margin"] = report.pop("margin")
    report.update(pairs=float(n_in), pairs_trained=n, pairs_too_long=float(stats["too_long"]),
                  pairs_truncated=float(stats["truncated"]), pairs_empty=float(stats["empty"]),
                  pairs_retokenized=float(stats["retokenized"]))
    return report
