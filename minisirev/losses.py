"""Reference PyTorch losses: per-token and per-sequence log-probs (shared by SFT, DPO and evaluation), the
masked SFT cross entropy, and the DPO family (sigmoid / IPO / hinge).

Symbols (per pair i): pi_c, pi_r = policy log-probs of the chosen and rejected completions (summed over their
tokens, or averaged); ref_c, ref_r = the same under the frozen reference model; beta = the KL strength;
Delta = (pi_c - ref_c) - (pi_r - ref_r).

    sigmoid (Rafailov et al. 2023, label smoothing eps of cDPO, Mitchell 2023):
        L = -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)
    ipo (Azar et al. 2023):    L = (Delta - 1 / (2 beta))^2
    hinge (SLiC, Zhao et al. 2023): L = max(0, 1 - beta Delta)
    rewards: r_c = beta (pi_c - ref_c), r_r = beta (pi_r - ref_r), detached.

On CUDA the training loop computes log-probs with kernels/dpo_loss.py (the logits never exist in memory); this
file is the reference every path is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under softmax(logits), in fp32; 0 at ignored positions. logits [..., V], labels [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor, *, fused: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over the labelled tokens of each row, and how many there are.

    input_ids and labels are [B, T] and aligned (labels[b, t] is the token at t, IGNORE where it is prompt or
    padding); position t - 1 predicts token t. fused=True uses the Triton kernel on the final hidden states and
    the output weight, so the [B, T, V] logits are never built. Returns (sums [B], counts [B])."""
    targets = labels[:, 1:]  # B, T-1
    if fused:
        from kernels.dpo_loss import fused_linear_logprobs
        hidden = model.hidden(input_ids)[:, :-1]  # B, T-1, C
        B, Tm1, C = hidden.shape
        lp = fused_linear_logprobs(hidden.reshape(-1, C), model.output_weight, targets.reshape(-1)).view(B, Tm1)
    else:
        lp = token_logprobs(model(input_ids)[:, :-1], targets)  # B, T-1
    return lp.sum(-1), (targets != IGNORE).sum(-1)


def sft_loss(sums: torch.Tensor, counts: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of the completions. "mean": per token over the whole batch (each token weighs the
    same); "sum": per sequence, averaged over sequences (each sequence's total NLL weighs the same)."""
    if reduction == "mean":
        return -sums.sum() / counts.sum().clamp_min(1)
    if reduction == "sum":
        return -sums.mean()
    raise ValueError(f"unknown SFT reduction {reduction!r}; choose 'mean' or 'sum'")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses [P] and the chosen and rejected rewards [P] (formulas in the module docstring)."""
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
