"""fp32 linear layers on a CPU through oneDNN's GEMM, on weights packed once: for inference, where a weight does not
change between calls (the sampler's decode step, the sentence encoder of the diversity metrics).

    Linear(w, bias)      x [..., K] -> x w^T + bias [..., N], plus an optional `add` (a residual, added inside the
                         GEMM); oneDNN's packed GEMM from PACKED_MIN_ROWS rows, torch.mm / addmm below
    PackedLinear(m)      an nn.Linear's inference twin (an nn.Module, same call), its weight packed at creation;
                         PackedLinear(m, gelu=True): the linear layer and an exact GELU after it, in one call
    pack_linears(module) every nn.Linear inside `module` replaced by its PackedLinear, in place (inference only)
    packed(w)            w in oneDNN's blocked layout, or None where oneDNN is not had or gets it wrong

Why: torch's own fp32 GEMM on a CPU (MKL, what F.linear and torch.mm run) reaches about half of oneDNN's on the
2-core AMD EPYC (Zen 5, AVX-512) of bench/results/: at the encoder's shapes (3,840 x 384 x 1,536) 164 against 384
GFLOP/s, at the decode step's (256 rows) 138-150 against 278-286. torch.ops.mkldnn._linear_pointwise is the op
torch's own CPU compiler emits for frozen linear layers; its weight is reordered once into oneDNN's blocked layout
(_reorder_linear_weight). Its results are within float rounding of MKL's, and a row's result does not depend on how
many rows share the call (tests/test_decode_cpu.py checks both), so batching cannot change a sample or an
embedding. oneDNN's fixed cost per call (13-15 us against 3-4 us for torch.mm) makes torch.mm the faster below
about 32 rows. Where this torch has no oneDNN, or oneDNN's result on a random input of a weight's shape does not
match torch.mm's (checked once per shape and process), every call runs torch.mm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PACKED_MIN_ROWS = 32  # below this many rows oneDNN's fixed cost per call outweighs its faster GEMM

_PACKED_OK: dict[tuple[int, int], bool] = {}  # (N, K) -> whether oneDNN's packed GEMM matched torch.mm there


def packed(w: torch.Tensor) -> torch.Tensor | None:
    """w [N, K] fp32 on a CPU in oneDNN's blocked layout for torch.ops.mkldnn._linear_pointwise, or None where
    this torch has no such op, w is not an fp32 CPU tensor, or oneDNN's result does not match torch.mm's. The
    match is checked once per shape and process, on a random weight of that shape (what it catches, an op this
    CPU or build gets wrong, does not depend on the weight's values; checking every weight took a third of a
    decode step's set-up)."""
    shape = tuple(w.shape)
    if w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
        return None
    try:
        if not torch.backends.mkldnn.is_available() or _PACKED_OK.get(shape) is False:
            return None
        out = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 256)
        if shape not in _PACKED_OK:
            g = torch.Generator().manual_seed(0)
            wt, x = torch.randn(shape, generator=g), torch.randn(PACKED_MIN_ROWS, shape[1], generator=g)
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(wt, 256), None,
                                                   "none", [], "")
            _PACKED_OK[shape] = torch.allclose(y, x @ wt.t(), rtol=1e-4, atol=1e-4 * math.sqrt(shape[1]))
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return out if _PACKED_OK[shape] else None


class Linear:
    """x [..., K] -> x w^T (+ bias) [..., N], plus `add` [..., N] when given (the residual, added inside the GEMM),
    or through an exact GELU when gelu=True (applied inside the GEMM), on a weight w [N, K] (and bias [N]) fixed for
    the Linear's life: oneDNN's packed GEMM from PACKED_MIN_ROWS rows
    where it is had, else torch.mm. Each row's result does not depend on the others (oneDNN's per-row results are
    the same at any number of rows)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False):
        w = w.detach()
        self.gelu = gelu  # exact (erf) GELU applied to the result: inside the GEMM where packed
        self.t = w.t()  # K, N: torch.mm's operand
        self.bias = None if bias is None else bias.detach().contiguous()
        self.packed = packed(w)

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2:  # [..., K]: the rows flattened, the result shaped back
            y = self(x.reshape(-1, x.shape[-1]), None if add is None else add.reshape(-1, add.shape[-1]))
            return y.view(*x.shape[:-1], y.shape[-1])
        if self.gelu and add is not None:
            raise ValueError("Linear: a fused GELU and an added residual do not go together")
        if self.packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            if self.gelu:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "none")
            if add is None:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.packed, self.bias, "add")
        if add is None:
            y = torch.mm(x, self.t) if self.bias is None else torch.addmm(self.bias, x, self.t)
            return F.gelu(y) if self.gelu else y
        return torch.addmm(add if self.bias is None else add + self.bias, x, self.t)


class PackedLinear(nn.Module):
    """An nn.Linear for inference: the same forward (x [..., in] -> [..., out]) on its weight and bias packed once
    (Linear); gelu=True: followed by the exact GELU, fused into the GEMM. The packed copy is taken at creation, so it
    is for weights that no longer change (no training)."""

    def __init__(self, m: nn.Linear, gelu: bool = False):
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self.linear = Linear(m.weight, m.bias, gelu=gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def extra_repr(self) -> str:
        kind = "oneDNN packed" if self.linear.packed is not None else "torch.mm"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}" + (
            ", then GELU" if self.linear.gelu else "")


def pack_linears(module: nn.Module) -> int:
    """Replace every fp32 CPU nn.Linear inside `module` by its PackedLinear, in place; for a module used for
    inference only (no gradient flows through a PackedLinear). -> how many were replaced with a packed weight
    (0 where oneDNN is not had: then the module is left as it was)."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                twin = PackedLinear(child)
                if twin.linear.packed is not None:
                    setattr(parent, name, twin)
                    replaced += 1
    return replaced
