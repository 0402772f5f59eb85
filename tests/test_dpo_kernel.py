"""kernels/linear_logprobs.py and kernels/dpo_loss.py against their plain PyTorch twins (full logits, log_softmax
in fp32, gather): token log-probs and the gradients for hidden, weight and bias; the DPO loss (beta, label
smoothing, loss types, NLL term, summed or averaged log-probs) and its gradients; autocast and the tile layout; and
a training step of the tiny model with the fused loss against one with the reference loss. On a CPU the kernels
run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU the same tests run natively."""

import copy

import pytest
import torch

import kernels.dpo_loss as dpo_mod
import kernels.linear_logprobs as lp_mod
from kernels.dpo_loss import fused_linear_dpo_loss, linear_dpo_loss_ref
from kernels.linear_logprobs import fused_linear_logprobs, fused_sequence_logprobs, linear_logprobs_ref
from minisirev import losses

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100

# (atol, rtol, reason) against the twin evaluated in fp32 on the same (upcast) inputs. Inputs: hidden N(0, 1),
# weight N(0, 4 / C) (logits ~ N(0, 4), a peaked softmax), bias N(0, 0.25); upstream gradients N(0, 1). Log-probs
# are O(1-10), dH O(1), dW and db O(1-5). Measured maximum absolute errors (interpreter, all CASES) are noted.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4, "fp32 throughout; only the summation order differs (tiles, online logsumexp, "
                                "chunked GEMMs): measured max 1.7e-6 (dW)"),
    torch.float16: (1e-2, 1e-2, "the logits tile and dz are rounded to fp16 (2^-11 relative) before the softmax "
                                "and the gradient GEMMs, as on the naive fp16 path, and the inputs themselves are "
                                "rounded: measured max 1.3e-3 (log-probs of magnitude ~13), 2.8e-3 (dW ~5)"),
    torch.bfloat16: (6e-2, 5e-2, "bf16 keeps 8 mantissa bits (2^-9 relative), 8x fp16's rounding of inputs, "
                                 "logits and dz: measured max 1.4e-2 (log-probs ~13), 3.5e-2 (dW ~5)"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# id: (N, C, V, (max rows, tile elements) of a logits chunk or None for the defaults)
CASES = {
    "odd-one-tile": (37, 24, 123, None),
    "row-and-col-chunks": (37, 72, 300, (16, 16 * 48)),  # 3 row chunks x 7 column chunks: dW via fp32 accumulator
    "col-chunks-only": (37, 72, 300, (64, 37 * 40)),  # 1 row chunk x 8 column chunks: dW straight from one GEMM
}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the module allocates starts as NaN, so an element it forgets to write fails the test."""
    monkeypatch.setattr(lp_mod, "_alloc", lambda shape, *, dtype, device: torch.full(shape, float("nan"),
                                                                                     dtype=dtype, device=device))


def set_chunks(monkeypatch, chunks):
    if chunks is not None:
        monkeypatch.setattr(lp_mod, "_MAX_ROWS", chunks[0])
        monkeypatch.setattr(lp_mod, "_TILE_ELEMS", chunks[1])


def make_inputs(lead, C, V, dtype, seed=0, ignore_every=4):
    """hidden [*lead, C], weight [V, C], bias [V], targets [*lead] (every `ignore_every`-th one ignored)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn((*lead, C), generator=gen)
    weight = torch.randn((V, C), generator=gen) * (2 / C**0.5)
    bias = torch.randn(V, generator=gen) * 0.5
    targets = torch.randint(0, V, lead, generator=gen)
    targets.view(-1)[::ignore_every] = IGNORE
    return [x.to(DEVICE, dtype) for x in (hidden, weight, bias)] + [targets.to(DEVICE)]


def grads(fn, tensors, upstream):
    """fn(*tensors) and the gradients of sum(out * upstream) for each tensor, all in fp32."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    if not torch.is_tensor(out):
        out = out[0]
    out.backward(upstream.to(out.dtype) if upstream is not None else None)
    return [out.float()] + [t.grad.float() for t in tensors]


def assert_all_close(names, actual, expected, atol, rtol):
    for name, a, e in zip(names, actual, expected):
        assert torch.isfinite(a).all(), f"{name}: NaN or Inf (an unwritten element?)"
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_logprobs_and_gradients_match_reference(case, dtype, with_bias, monkeypatch):
    N, C, V, chunks = case
    set_chunks(monkeypatch, chunks)
    hidden, weight, bias, targets = make_inputs((N,), C, V, dtype)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    tensors = [hidden, weight] + ([bias] if with_bias else [])

    def ours(h, w, b=None):
        return fused_linear_logprobs(h, w, targets, bias=b)

    def ref(h, w, b=None):
        return linear_logprobs_ref(h, w, targets, bias=b)

    actual = grads(ours, tensors, upstream)
    expected = grads(ref, [t.float() for t in tensors], upstream)
    assert actual[0].dtype == torch.float32
    assert (actual[0][targets == IGNORE] == 0).all() and (actual[1][targets == IGNORE] == 0).all(), \
        "ignored positions must give log-prob 0 and no gradient for hidden"
    atol, rtol, _ = TOLERANCES[dtype]
    assert_all_close(["logprobs", "d_hidden", "d_weight", "d_bias"], actual, expected, atol, rtol)


def test_leading_shape_and_all_ignored():
    """hidden [..., C] comes back as [...]; a sequence whose targets are all ignored gets 0 and no gradient."""
    hidden, weight, _, targets = make_inputs((3, 13), 24, 123, torch.float32)
    targets[1] = IGNORE
    h = hidden.clone().requires_grad_()
    lp = fused_linear_logprobs(h, weight, targets)
    assert lp.shape == (3, 13)
    lp.sum().backward()
    assert (lp[1] == 0).all() and (h.grad[1] == 0).all()
    torch.testing.assert_close(lp, linear_logprobs_ref(hidden, weight, targets), atol=1e-4, rtol=1e-4)


def test_one_dpo_formula():
    """minisirev.losses.dpo_loss is the function the fused loss applies (tests/test_losses.py checks it against
    the paper's formula written out in plain math), not a second copy."""
    assert losses.dpo_loss is dpo_mod.dpo_loss


def test_tile_rows_are_aligned_for_odd_vocabularies(monkeypatch):
    """V = 123 in one chunk: the logits tile the kernels stream over has a row stride that is a multiple of 64
    elements (an odd stride would force scalar loads on a GPU), and the padding columns never leak into the
    result (checked against the twin)."""
    seen = []
    launch = lp_mod._launch
    monkeypatch.setattr(lp_mod, "_launch", lambda kernel, z, *args: (seen.append(z.stride(0)),
                                                                     launch(kernel, z, *args)))
    hidden, weight, _, targets = make_inputs((37,), 24, 123, torch.float32)
    h = hidden.clone().requires_grad_()
    fused_linear_logprobs(h, weight, targets).sum().backward()
    assert seen and all(st % 64 == 0 for st in seen), seen
    h_ref = hidden.clone().requires_grad_()
    linear_logprobs_ref(h_ref, weight, targets).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-4, rtol=1e-4)


class GemmDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtype of every matrix product dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.dtypes.append(args[0].dtype if func.overloadpacket is torch.ops.aten.mm else args[1].dtype)
        return func(*args, **(kwargs or {}))


def test_autocast_reaches_the_gemms():
    """Under the trainer's bf16 autocast (here CPU autocast), the LM-head GEMMs of forward and backward run in
    bf16, like F.linear would, although they write through out= (which autocast does not intercept); the
    gradients come back in the parameters' fp32."""
    hidden, weight, _, targets = make_inputs((37,), 24, 123, torch.float32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with GemmDtypes() as seen, torch.autocast(DEVICE, dtype=torch.bfloat16):
        lp = fused_linear_logprobs(h, w, targets)
    with GemmDtypes() as seen_bwd:
        lp.sum().backward()
    assert seen.dtypes and set(seen.dtypes) == {torch.bfloat16}, seen.dtypes
    assert seen_bwd.dtypes and set(seen_bwd.dtypes) <= {torch.bfloat16, torch.float32}
    assert h.grad.dtype == w.grad.dtype == torch.float32
    expected = linear_logprobs_ref(hidden.bfloat16().float(), weight.bfloat16().float(), targets)
    torch.testing.assert_close(lp, expected, atol=6e-2, rtol=5e-2)  # bf16 logits: TOLERANCES[torch.bfloat16]


def make_pairs(B, T, C, V, dtype, seed=0):
    """A DPO batch: hidden [2B, T, C], targets [2B, T] with a prompt (ignored) of 1-4 tokens and right padding
    (ignored), reference log-probs [B] each."""
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, bias, targets = make_inputs((2 * B, T), C, V, dtype, seed=seed, ignore_every=10**9)
    for r in range(2 * B):
        prompt = int(torch.randint(1, 5, (1,), generator=gen))
        end = int(torch.randint(T // 2, T + 1, (1,), generator=gen))
        targets[r, :prompt] = IGNORE
        targets[r, end:] = IGNORE
    ref_c = (-torch.rand(B, generator=gen) * 20).to(DEVICE)
    ref_r = (-torch.rand(B, generator=gen) * 20).to(DEVICE)
    return hidden, weight, bias, targets, ref_c, ref_r


# Each option on and off at least once, and every loss type: the formula itself is tested in tests/test_losses.py,
# here the log-prob reductions and the gradients through the fused path.
DPO_SETTINGS = [dict(beta=0.1, label_smoothing=0.0, nll_weight=0.0, average_log_prob=False, loss_type="sigmoid"),
                dict(beta=0.5, label_smoothing=0.1, nll_weight=0.0, average_log_prob=True, loss_type="sigmoid"),
                dict(beta=0.1, label_smoothing=0.1, nll_weight=1.0, average_log_prob=False, loss_type="sigmoid"),
                dict(beta=0.5, label_smoothing=0.0, nll_weight=1.0, average_log_prob=True, loss_type="ipo"),
                dict(beta=0.5, label_smoothing=0.0, nll_weight=0.0, average_log_prob=False, loss_type="hinge")]


def _dpo_case(dtype, with_bias, settings, monkeypatch, chunks=(8, 8 * 40)):
    set_chunks(monkeypatch, chunks)
    hidden, weight, bias, targets, ref_c, ref_r = make_pairs(2, 11, 24, 123, dtype)
    tensors = [hidden, weight] + ([bias] if with_bias else [])
    outs = {}

    def ours(h, w, b=None):
        outs["ours"] = fused_linear_dpo_loss(h, w, targets, ref_c, ref_r, bias=b, **settings)
        return outs["ours"][0]

    def ref(h, w, b=None):
        outs["ref"] = linear_dpo_loss_ref(h, w, targets, ref_c, ref_r, bias=b, **settings)
        return outs["ref"][0]

    actual = grads(ours, tensors, None)
    expected = grads(ref, [t.float() for t in tensors], None)
    atol, rtol, _ = TOLERANCES[dtype]
    assert_all_close(["loss", "d_hidden", "d_weight", "d_bias"], actual, expected, atol, rtol)
    assert_all_close(["chosen_rewards", "rejected_rewards"], outs["ours"][1:], outs["ref"][1:], atol, rtol)
    assert not any(r.requires_grad for r in outs["ours"][1:]), "rewards must be detached"


@pytest.mark.parametrize("settings", DPO_SETTINGS,
                         ids=[f"{s['loss_type']}-b{s['beta']}-ls{s['label_smoothing']}-nll{s['nll_weight']}-"
                              f"{'mean' if s['average_log_prob'] else 'sum'}" for s in DPO_SETTINGS])
def test_dpo_loss_and_gradients_match_reference(settings, monkeypatch):
    _dpo_case(torch.float32, False, settings, monkeypatch)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_dpo_loss_dtypes_with_bias(dtype, monkeypatch):
    _dpo_case(dtype, True, dict(beta=0.5, label_smoothing=0.1, nll_weight=1.0, average_log_prob=True),
              monkeypatch)


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_sequence_logprobs_under_no_grad(average):
    hidden, weight, _, targets, _, _ = make_pairs(2, 11, 24, 123, torch.float32)
    with torch.no_grad():
        got = fused_sequence_logprobs(hidden, weight, targets, average=average)
    lp = linear_logprobs_ref(hidden, weight, targets)
    n = (targets != IGNORE).sum(-1)
    torch.testing.assert_close(got, lp.sum(-1) / n if average else lp.sum(-1), atol=1e-4, rtol=1e-4)
    assert not got.requires_grad


def test_matches_liger_kernel_when_installed():
    """An outside implementation of the same loss: Liger-Kernel's chunked DPO (reference log-probs computed inside
    from the reference hidden states and weight). Skipped when liger-kernel is not installed."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight, _, targets, _, _ = make_pairs(2, 11, 24, 123, torch.float32)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    with torch.no_grad():
        ref = fused_sequence_logprobs(ref_hidden, weight, targets)
    ours = fused_linear_dpo_loss(hidden, weight, targets, ref[:2], ref[2:], beta=0.5)[0]
    theirs = liger.LigerFusedLinearDPOLoss(beta=0.5, use_ref_model=True, compiled=False)(
        weight, hidden, targets, ref_input=ref_hidden, ref_weight=weight)
    torch.testing.assert_close(ours, (theirs[0] if isinstance(theirs, tuple) else theirs).float(), atol=1e-4,
                               rtol=1e-4)


# ---- a training step of the tiny model -----------------------------------------------------------------------

def tiny_model():
    """The kit's tiny preset (tied embeddings: the output weight's gradient also flows through the embedding),
    shrunk to one layer so the interpreter stays fast."""
    from minisirev.config import ModelConfig
    from minisirev.model import Transformer
    cfg = ModelConfig.from_preset("tiny", n_layers=1, vocab_size=157, dim=48, n_heads=4, n_kv_heads=2, ffn_dim=64)
    return Transformer(cfg).init_weights(std=0.2, seed=0).to(DEVICE)


def step_loss(model, ref_model, tokens, labels, method, fused):
    hidden = model.hidden(tokens)[:, :-1]  # rows, T-1, C: position t predicts token t + 1
    targets = labels[:, 1:]  # rows, T-1
    if method == "sft":
        sums, counts = losses.sequence_logprobs(model, tokens, labels, fused=fused)
        return losses.sft_loss(sums, counts)
    with torch.no_grad():
        ref_hidden = ref_model.hidden(tokens)[:, :-1]
        ref_lp = fused_sequence_logprobs(ref_hidden, ref_model.output_weight, targets) if fused else \
            linear_logprobs_ref(ref_hidden, ref_model.output_weight, targets).sum(-1)
    B = tokens.shape[0] // 2
    fn = fused_linear_dpo_loss if fused else linear_dpo_loss_ref
    return fn(hidden, model.output_weight, targets, ref_lp[:B], ref_lp[B:], beta=0.5, nll_weight=0.5)[0]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_training_step_fused_equals_reference(method):
    torch.manual_seed(0)
    base = tiny_model()
    V = base.config.vocab_size
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, V, (4, 13), generator=gen).to(DEVICE)  # rows 0-1 chosen, 2-3 rejected
    labels = tokens.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[1, 10:] = IGNORE  # padding
    ref_model = copy.deepcopy(base).requires_grad_(False)
    # a reference that differs from the policy, so the DPO margin is not 0 at the first step
    with torch.no_grad():
        ref_model.output_weight.mul_(0.9)
    stepped = {}
    for fused in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = step_loss(model, ref_model, tokens, labels, method, fused)
        loss.backward()
        opt.step()
        stepped[fused] = (loss.detach(), model.state_dict())
    torch.testing.assert_close(stepped[True][0], stepped[False][0], atol=1e-5, rtol=1e-5)
    moved = 0.0
    for name, p in stepped[False][1].items():
        torch.testing.assert_close(stepped[True][1][name], p, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, (p - base.state_dict()[name]).abs().max().item())
    assert moved > 1e-3, "the step did not move the parameters; the comparison would be vacuous"
