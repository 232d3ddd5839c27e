"""The DPO loss family and completion log-probs: pure tensor math (no Ray, no I/O).

Notation: for a pair (x, y_w, y_l) with policy π_θ and frozen reference π_ref,

    h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]

is the difference of implicit rewards divided by β; ``dpo_loss`` turns h into a per-pair loss.
The learner adds ``rpo_alpha`` times ``completion_nll`` of the chosen answer (RPO).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


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
