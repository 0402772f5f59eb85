"""The DPO loss family, once: from sequence log-probs, and fused with the LM head (the logits never materialised).

Symbols (per pair i): pi_c, pi_r = the policy's log-probs of the chosen and rejected completions (summed over
their labelled tokens, or averaged); ref_c, ref_r = the same under the frozen reference model; beta = the KL
strength; Delta = (pi_c - ref_c) - (pi_r - ref_r).

    sigmoid (Rafailov et al. 2023, arXiv 2305.18290, eq. 7; label smoothing eps of cDPO, Mitchell 2023):
        L = -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)
    ipo (Azar et al. 2023, arXiv 2310.12036):   L = (Delta - 1 / (2 beta))^2
    hinge (SLiC, Zhao et al. 2023, arXiv 2305.10425):   L = max(0, 1 - beta Delta)
    rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r), detached.

`dpo_loss` is that formula (minisirev/losses.py re-exports it; the training loop calls it). `fused_linear_dpo_loss`
computes pi_c, pi_r from the policy's final hidden states with kernels/linear_logprobs.py and applies the same
function, optionally adding the NLL term of RPO (Pang et al. 2024, arXiv 2404.19733):
nll_weight * (- sum of chosen log p / number of chosen labelled tokens). Rows 0 .. B-1 of its inputs are the
chosen completions, B .. 2B-1 the rejected ones (Liger-Kernel's convention).

This module imports no Triton at import time (minisirev imports it on machines without Triton); the fused log-prob
functions are re-exported lazily from kernels/linear_logprobs.py: `from kernels.dpo_loss import
fused_linear_logprobs` works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LINEAR_LOGPROBS = ("fused_linear_logprobs", "fused_sequence_logprobs", "linear_logprobs_ref")


def __getattr__(name: str):
    if name in _LINEAR_LOGPROBS:
        from kernels import linear_logprobs
        return getattr(linear_logprobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses [P] and the chosen and rejected rewards [P] (formulas in the module docstring) from
    sequence log-probs [P] each."""
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; choose sigmoid, ipo or hinge")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def _dpo_from_token_logprobs(logp, mask, ref_chosen, ref_rejected, *, beta, label_smoothing, loss_type, nll_weight,
                             average_log_prob):
    """Token log-probs [2B, T] (0 where mask is False) -> (mean loss, chosen_rewards [B], rejected_rewards [B])."""
    from kernels.linear_logprobs import reduce_rows
    B = logp.shape[0] // 2
    seq = reduce_rows(logp, mask, average_log_prob)  # 2B
    losses, chosen_rewards, rejected_rewards = dpo_loss(seq[:B], seq[B:], ref_chosen.float(), ref_rejected.float(),
                                                        beta=beta, label_smoothing=label_smoothing,
                                                        loss_type=loss_type)
    loss = losses.mean()
    if nll_weight > 0:
        loss = loss + nll_weight * (-logp[:B].sum() / mask[:B].sum().clamp_min(1))
    return loss, chosen_rewards, rejected_rewards


def fused_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
                          label_smoothing: float = 0.0, loss_type: str = "sigmoid", nll_weight: float = 0.0,
                          average_log_prob: bool = False, bias: torch.Tensor | None = None,
                          ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss (module docstring) from the policy's final hidden states, never forming the logits.

    hidden [2B, T, C] and targets [2B, T]: rows 0 .. B-1 chosen, B .. 2B-1 rejected; targets[r, t] is the token
    predicted from hidden[r, t] (already shifted; prompt and padding = ignore_index). ref_*_logps [B]: the
    reference model's sequence log-probs (same reduction). Returns (mean loss, chosen_rewards [B],
    rejected_rewards [B]), the rewards detached."""
    from kernels.linear_logprobs import fused_linear_logprobs
    assert hidden.dim() == 3 and hidden.shape[0] % 2 == 0, f"hidden must be [2B, T, C], got {tuple(hidden.shape)}"
    logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index)  # 2B, T
    return _dpo_from_token_logprobs(logp, targets != ignore_index, ref_chosen_logps, ref_rejected_logps, beta=beta,
                                    label_smoothing=label_smoothing, loss_type=loss_type, nll_weight=nll_weight,
                                    average_log_prob=average_log_prob)


def linear_dpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
                        label_smoothing: float = 0.0, loss_type: str = "sigmoid", nll_weight: float = 0.0,
                        average_log_prob: bool = False, bias: torch.Tensor | None = None,
                        ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The twin of fused_linear_dpo_loss on full logits (linear_logprobs_ref), O(N V) memory."""
    from kernels.linear_logprobs import linear_logprobs_ref
    logp = linear_logprobs_ref(hidden, weight, targets, bias=bias, ignore_index=ignore_index)  # 2B, T
    return _dpo_from_token_logprobs(logp, targets != ignore_index, ref_chosen_logps, ref_rejected_logps, beta=beta,
                                    label_smoothing=label_smoothing, loss_type=loss_type, nll_weight=nll_weight,
                                    average_log_prob=average_log_prob)
