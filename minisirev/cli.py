"""What the three scripts share on the command line: flag checks, the device and attention defaults, and the
one-line error. A user mistake is refused before anything runs: one line naming the flag, the value and what is
allowed, exit status 2, nothing created or touched."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

# rules: (test, what is allowed); a flag left at None (meaning "the default") is not checked
INT_GE1 = (lambda v: v >= 1, "an integer >= 1")
INT_GE0 = (lambda v: v >= 0, "an integer >= 0")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NONNEG = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
PROB = (lambda v: 0 < v <= 1, "in (0, 1]")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")


def fail(prog: str, msg: str, code: int = 2):
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def check_flags(prog: str, args, rules: dict[str, tuple[Callable, str]]) -> None:
    """Refuse the first flag whose value breaks its rule."""
    for name, (ok, allowed) in rules.items():
        v = getattr(args, name)
        if v is not None and not ok(v):
            fail(prog, f"--{name.replace('_', '-')} {v}: must be {allowed}")


def resolve_device(prog: str, flag: str | None) -> torch.device:
    """--device: cpu, cuda, cuda:N (default cuda when there is one). A device this machine lacks is refused."""
    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(prog, f"--device {flag}: not a device name (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(prog, f"--device {flag}: this machine has no CUDA device (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            fail(prog, f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        fail(prog, f"--device {flag}: only cpu and cuda are supported")
    return device


def default_attn(device: torch.device, flag: str | None) -> str:
    """--attn: our Triton kernel on CUDA, torch SDPA elsewhere."""
    return flag or ("triton" if device.type == "cuda" else "sdpa")
