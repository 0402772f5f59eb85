"""Losses of the training loop: per-token and per-sequence log-probs (shared by SFT, DPO and evaluation), the
masked SFT cross entropy, and the DPO family (sigmoid / IPO / hinge; the formula lives in kernels/dpo_loss.py,
re-exported here as `dpo_loss`).

`sequence_logprobs(..., fused=True)` computes the log-probs with kernels/linear_logprobs.py on the final hidden
states (the [B, T, V] logits never exist in memory); the default path builds the logits and is the reference the
fused one is checked against (tests/test_dpo_kernel.py).
"""

from __future__ import annotations

import torch

from kernels.dpo_loss import dpo_loss

__all__ = ["IGNORE", "dpo_loss", "sequence_logprobs", "sft_loss", "token_logprobs"]

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
        from kernels.linear_logprobs import fused_linear_logprobs
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
