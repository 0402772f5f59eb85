"""Losses against independent computations: a hand-written masked cross entropy for SFT, and the DPO formula of
Rafailov et al. (2023), eq. 7, written out with plain math in the test (value and gradient)."""

import math

import pytest
import torch

from minisirev.config import ModelConfig
from minisirev.losses import IGNORE, dpo_loss, sequence_logprobs, sft_loss, token_logprobs
from minisirev.model import Transformer


def test_token_logprobs_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[1, IGNORE]])
    lp = token_logprobs(logits, labels)
    want = 2.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5))
    assert lp[0, 0].item() == pytest.approx(want, abs=1e-6) and lp[0, 1].item() == 0.0


def test_sft_loss_is_masked_cross_entropy():
    model = Transformer(ModelConfig(vocab_size=31, dim=32, n_layers=1, n_heads=2, ffn_dim=64)).init_weights(seed=0)
    ids = torch.randint(3, 31, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = IGNORE  # prompt
    labels[1, 7:] = IGNORE  # padding of a shorter row
    with torch.no_grad():
        logits = model(ids)
        nll, count, per_seq = 0.0, 0, []
        for b in range(3):  # position t-1 predicts token t, only where the label is not ignored
            s = 0.0
            for t in range(1, 9):
                if labels[b, t] != IGNORE:
                    p = torch.softmax(logits[b, t - 1].double(), -1)[labels[b, t]]
                    s -= math.log(p.item())
                    count += 1
            nll += s
            per_seq.append(s)
        sums, counts = sequence_logprobs(model, ids, labels)
    assert counts.tolist() == [5, 3, 5]
    assert sft_loss(sums, counts, "mean").item() == pytest.approx(nll / count, rel=1e-5)
    assert sft_loss(sums, counts, "sum").item() == pytest.approx(sum(per_seq) / 3, rel=1e-5)


def dpo_by_formula(pc, pr, rc, rr, beta, eps):
    """-(1-eps) log sigma(beta h) - eps log sigma(-beta h), h = log pi_c/ref_c - log pi_r/ref_r, in plain math."""
    h = (pc - rc) - (pr - rr)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    loss = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
    # d loss / d pc = -beta [(1-eps)(1 - sig(beta h)) - eps sig(-beta h) * ... ] written as the derivative of each term
    dloss_dh = -(1 - eps) * beta * (1 - sig(beta * h)) + eps * beta * (1 - sig(-beta * h))
    return loss, dloss_dh


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_and_gradient_match_the_formula(beta, eps):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 - 20 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    losses.sum().backward()
    for i in range(6):
        want, dh = dpo_by_formula(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), beta, eps)
        assert losses[i].item() == pytest.approx(want, rel=1e-10)
        assert pc.grad[i].item() == pytest.approx(dh, rel=1e-8)
        assert pr.grad[i].item() == pytest.approx(-dh, rel=1e-8)
    torch.testing.assert_close(r_c, beta * (pc - rc).detach())
    torch.testing.assert_close(r_r, beta * (pr - rr).detach())
    assert not r_c.requires_grad


def test_ipo_and_hinge():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5])
    h = 1.0 - (-0.5)
    assert dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")[0].item() == pytest.approx((h - 2.0) ** 2)
    assert dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="hinge")[0].item() == pytest.approx(1 - 0.25 * h)
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
