"""kernels/packed_linear.py (oneDNN's GEMM on packed weights) against fp64 matmuls and nn.Linear: with and without
bias and the residual, on both sides of PACKED_MIN_ROWS, on [..., K] inputs; a row's result independent of the other
rows, bit for bit; torch.mm exactly where packing is not had; pack_linears on a module (the sentence encoder's use)."""

import pytest
import torch
from torch import nn

from kernels import packed_linear
from kernels.packed_linear import PACKED_MIN_ROWS, Linear, PackedLinear, pack_linears

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("B", [1, 7, PACKED_MIN_ROWS, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_a_matmul(B, bias):
    """Linear against x @ w^T (+ bias) in fp64, with and without the residual added, on both sides of
    PACKED_MIN_ROWS (oneDNN's packed GEMM where this torch has it, torch.mm below)."""
    g = torch.Generator().manual_seed(B)
    w, x, add = torch.randn(72, 136, generator=g), torch.randn(B, 136, generator=g), torch.randn(B, 72, generator=g)
    b = torch.randn(72, generator=g) if bias else None
    lin = Linear(w, b)
    assert lin.packed is not None or not torch.backends.mkldnn.is_available()
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    torch.testing.assert_close(lin(x).double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lin(x, add=add).double(), want + add.double(), atol=1e-4, rtol=1e-5)


def test_linear_takes_any_leading_shape():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    lin = Linear(w, b)
    for shape in [(5, 9, 40), (2, 3, 20, 40), (3, 40)]:  # 45 and 120 rows packed, 3 rows torch.mm
        x, add = torch.randn(shape, generator=g), torch.randn(*shape[:-1], 24, generator=g)
        want = (x.double() @ w.double().t() + b.double())
        assert lin(x).shape == (*shape[:-1], 24)
        torch.testing.assert_close(lin(x).double(), want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lin(x, add=add).double(), want + add.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_do_not_depend_on_the_batch(bias):
    """Bit for bit from PACKED_MIN_ROWS rows up: the first rows of a batch give what they give alone, so a sample
    (or an embedding) does not depend on which other rows share its call (the sampler's guarantee)."""
    g = torch.Generator().manual_seed(0)
    lin = Linear(torch.randn(200, 96, generator=g), torch.randn(200, generator=g) if bias else None)
    x, add = torch.randn(300, 96, generator=g), torch.randn(300, 200, generator=g)
    full, full_add = lin(x), lin(x, add=add)
    for B in (PACKED_MIN_ROWS, 61, 257):
        assert torch.equal(lin(x[:B]), full[:B])
        assert torch.equal(lin(x[:B], add=add[:B]), full_add[:B])


@pytest.mark.parametrize("bias", [False, True])
def test_linear_without_onednn_uses_torch_mm(monkeypatch, bias):
    """Where packing is not had (no oneDNN, or its result off), Linear is torch.mm / torch.addmm exactly."""
    monkeypatch.setattr(packed_linear, "packed", lambda w: None)
    g = torch.Generator().manual_seed(1)
    w, x, add = torch.randn(40, 64, generator=g), torch.randn(50, 64, generator=g), torch.randn(50, 40, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    lin = Linear(w, b)
    assert lin.packed is None
    if b is None:
        assert torch.equal(lin(x), torch.mm(x, w.t()))
        assert torch.equal(lin(x, add=add), torch.addmm(add, x, w.t()))
    else:
        assert torch.equal(lin(x), torch.addmm(b, x, w.t()))
        assert torch.equal(lin(x, add=add), torch.addmm(add + b, x, w.t()))


def test_packed_is_refused_off_an_fp32_cpu_weight():
    assert packed_linear.packed(torch.randn(8, 8, dtype=torch.float64)) is None
    assert packed_linear.packed(torch.randn(8)) is None


@onednn
def test_pack_linears_replaces_every_linear_and_keeps_the_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Sequential(nn.Linear(96, 32, bias=False)), nn.LayerNorm(32))
    x = torch.randn(4, 17, 48)
    with torch.no_grad():
        want = net(x)
        assert pack_linears(net) == 2
        assert isinstance(net[0], PackedLinear) and isinstance(net[2][0], PackedLinear)
        assert "oneDNN packed" in repr(net[0])
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(x[:1, :1]), want[:1, :1], atol=1e-5, rtol=1e-5)  # 1 row: torch.mm


def test_pack_linears_without_onednn_leaves_the_module(monkeypatch):
    monkeypatch.setattr(packed_linear, "packed", lambda w: None)
    net = nn.Sequential(nn.Linear(8, 8))
    assert pack_linears(net) == 0 and isinstance(net[0], nn.Linear)


@pytest.mark.parametrize("B", [3, PACKED_MIN_ROWS + 5])
def test_fused_gelu_equals_gelu_after_the_matmul(B):
    """gelu=True: the exact (erf) GELU of x w^T + b, inside oneDNN's GEMM where packed, F.gelu after torch.mm below."""
    g = torch.Generator().manual_seed(B)
    w, b, x = torch.randn(64, 48, generator=g), torch.randn(64, generator=g), torch.randn(B, 48, generator=g)
    lin = Linear(w, b, gelu=True)
    want = torch.nn.functional.gelu(x.double() @ w.double().t() + b.double())
    torch.testing.assert_close(lin(x).double(), want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="GELU"):
        lin(x, add=torch.zeros(B, 64))
