"""Compile every autotune config of the Triton kernels for a GPU that is not here, and read the machine code.

    python -m kernels.compile_check               # the cases the model uses, a table on stdout
    python -m kernels.compile_check --json        # the same rows as JSON lines (tests/test_kernel_compile.py)
    python -m kernels.compile_check --arch 100    # another target (default 90: Hopper, compiled as sm_90a)

How: the real launchers of kernels/attention.py and kernels/linear_logprobs.py run on meta-device tensors (no
data, no GPU) while `JITFunction.run` and `Autotuner.run` are patched: instead of launching, every launch is
compiled with `triton.compile(..., target=GPUTarget("cuda", arch, 32))`, once per autotune config that the kernel's
own `early_config_prune` keeps for those arguments. So the signature, the stride and alignment specialisations and
the constexprs are exactly those of a real call. The cubin is then read with Triton's bundled `cuobjdump`:
`-res-usage` gives registers and the stack frame, `-sass` the instructions, where local-memory traffic (STL / LDL,
i.e. register spills) is counted, and counted separately when it sits inside a loop (between a backward branch
and its target): a spill in the key loop costs on every tile, one in the prologue once.

Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit by a Python emulation); the CLI clears it
before importing the kernels. Compiled kernels land in Triton's cache (~/.triton/cache), so a rerun is fast.
Nothing is executed: register counts are ptxas's, timings need a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time


@dataclasses.dataclass
class Row:
    case: str  # which launch, e.g. "train bf16 D=128 causal"
    kernel: str
    config: str  # "BLOCK_M x BLOCK_N, warps, stages"
    regs: int
    stack: int  # bytes of stack frame per thread (spilled registers live there)
    spill_instrs: int  # STL / LDL instructions in the whole kernel
    loop_spill_instrs: int  # of which inside a loop
    fp_fusion: bool  # the enable_fp_fusion option the launch compiled with
    aligned: list[str]  # arguments specialised as multiples of 16 (pointers 16-byte aligned), which vectorise
    compile_s: float
    shared: int = 0  # bytes of shared memory a program needs (a launch fails above the chip's 227 KB)


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def read_cubin(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack bytes, STL/LDL count, STL/LDL count inside loops) of a single-kernel cubin. cuobjdump takes
    about a second a kernel, so results are cached beside Triton's own cache, by the cubin's hash."""
    from triton import knobs
    cache = os.path.join(knobs.cache.dir, "compile_check", hashlib.sha256(cubin).hexdigest() + ".json")
    if os.path.exists(cache):
        with open(cache) as f:
            return tuple(json.load(f))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([_tool("cuobjdump"), "-res-usage", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", dump).group(1))
    stack = int(re.search(r"STACK:(\d+)", dump).group(1))
    instrs = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", dump)]
    loops = []  # [target, branch] address ranges of backward branches
    for addr, text in instrs:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            loops.append((int(m.group(1), 16), addr))
    spills = [addr for addr, text in instrs if re.search(r"\b(STL|LDL)\b", text)]
    in_loop = [a for a in spills if any(lo <= a <= hi for lo, hi in loops)]
    result = (regs, stack, len(spills), len(in_loop))
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache, "w") as f:
        json.dump(result, f)
    return result


@contextlib.contextmanager
def compile_instead_of_launch(arch: int, rows: list[Row], case: str):
    """Within the block, a kernel launch compiles (every pruned autotune config) and appends a Row; nothing runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)

    def jit_run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        t0 = time.time()
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        regs, stack, spills, loop_spills = read_cubin(kernel.asm["cubin"])
        tile = ("BLOCK_N", "BLOCK_V") if "BLOCK_V" in kwargs else ("BLOCK_M", "BLOCK_N")  # rows x columns
        config = f"{kwargs.get(tile[0], '-')}x{kwargs.get(tile[1], '-')} w{options.num_warps} s{options.num_stages}"
        aligned = sorted(self.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v)
        if any((r.case, r.kernel, r.config, r.aligned) == (case, self.__name__, config, aligned) for r in rows):
            return  # the same compilation again (the log-prob kernels run once per logits tile)

        rows.append(Row(case, self.__name__, config, regs, stack, spills, loop_spills, options.enable_fp_fusion,
                        aligned, round(time.time() - t0, 1), kernel.metadata.shared))

    def autotune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotune_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def model_cases(full: bool = False):
    """(name, thunk) pairs: the launches the model makes, on meta tensors. Training runs flash_attention forward and
    backward in bf16 (fp16 has the same register layout); sampling runs the fp32 KV cache through the prefill
    (flash_attention with kv_lens) and flash_decode. Head dims: 128 and 64 (Llama / Mistral sizes) and 32 (the
    tiny preset's dim 128 / 4 heads), each without and with a sliding window (the window's prefill and decode at
    D=128 only). `full` adds fp16 (the same register layout as bf16) and the remaining windowed variants."""
    import torch

    from kernels import attention as A

    def qkv(dtype, D, H=8, KVH=2, T=1024, S=None):
        S = S or T
        q = torch.empty(1, T, H, D, dtype=dtype, device="meta").transpose(1, 2)  # B, H, T, D as the model makes it
        k = torch.empty(1, S, KVH, D, dtype=dtype, device="meta").transpose(1, 2)
        return q, k, torch.empty_like(k)

    def train(dtype, D, window):
        def run():
            q, k, v = qkv(dtype, D)
            o, lse = A._attn_fwd(q, k, v, True, window, D**-0.5, None)
            A._attn_bwd(torch.empty_like(o), q, k, v, o, lse, True, window, D**-0.5, None)
        return run

    def prefill(D, window):
        def run():
            q, k, v = qkv(torch.float32, D, T=512, S=2048)
            A._attn_fwd(q, k, v, True, window, D**-0.5, torch.empty(1, dtype=torch.int32, device="meta"))
        return run

    def decode(dtype, D, window):
        def run():
            q, k, v = qkv(dtype, D, T=1, S=2048)
            A.flash_decode(q, k, v, torch.empty(1, dtype=torch.int32, device="meta"), window=window, num_splits=4)
        return run

    def logprobs(dtype):
        def run():  # V = 32001 in one column chunk at N = 2048: the tile row stride would be odd unpadded
            from kernels import linear_logprobs as L
            N, C, V = 2048, 4096, 32001
            h, w = (torch.empty(n, C, dtype=dtype, device="meta") for n in (N, V))
            t = torch.empty(N, dtype=torch.long, device="meta")
            _, lse = L._logprobs_fwd(h, w, t, None, -100)
            L._logprobs_bwd(torch.empty(N, device="meta"), h, w, t, None, lse, -100, (True, True, False))
        return run

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    train_dtypes = [torch.bfloat16, torch.float16] if full else [torch.bfloat16]
    for D in (128, 64, 32):
        for dtype in train_dtypes:
            for window in (None, 256):  # Llama, and Mistral's sliding window (a third masked key loop)
                yield f"train {names[dtype]} D={D} causal" + (" window" if window else ""), train(dtype, D, window)
        if D == 128:  # fp32 gradients (flash_attention on fp32 tensors): the largest shared-memory footprints
            yield "train fp32 D=128 causal window", train(torch.float32, D, 256)
        yield f"prefill fp32 D={D} kv_lens", prefill(D, None)
        yield f"decode fp32 D={D}", decode(torch.float32, D, None)
        if D == 128 or full:
            yield f"prefill fp32 D={D} kv_lens window", prefill(D, 256)
            yield f"decode fp32 D={D} window", decode(torch.float32, D, 256)
            yield f"decode bf16 D={D}", decode(torch.bfloat16, D, None)
    for dtype in (torch.bfloat16, torch.float32):
        yield f"logprobs {names[dtype]} V=32001", logprobs(dtype)


def config_name(c) -> str:
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"


def autotune_configs() -> dict[str, list[str]]:
    """Every autotuned kernel's candidate configs, as Row.config names them."""
    from kernels import attention as A
    return {k.fn.__name__: [config_name(c) for c in k.configs]
            for k in (A._attn_fwd_kernel, A._attn_bwd_dkdv_kernel, A._attn_bwd_dq_kernel)}


def check(arch: int = 90, full: bool = False, only: str | None = None) -> list[Row]:
    rows: list[Row] = []
    for case, run in model_cases(full):
        if only and not re.search(only, case):
            continue
        with compile_instead_of_launch(arch, rows, case):
            run()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: sm_90a)")
    parser.add_argument("--full", action="store_true", help="also fp16, and windowed prefill and decode at every D")
    parser.add_argument("--only", default=None, help="regex: only the cases whose name matches")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    args = parser.parse_args()
    rows = check(args.arch, args.full, args.only)
    if args.json:
        for r in rows:
            print(json.dumps(dataclasses.asdict(r)))
        print(json.dumps({"autotune_configs": autotune_configs()}))
        return
    print("| case | kernel | config | regs | stack B | STL/LDL | in loops | shared KB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.case} | {r.kernel} | {r.config} | {r.regs} | {r.stack} | {r.spill_instrs} | "
              f"{r.loop_spill_instrs} | {r.shared / 1024:.0f} | {r.compile_s} |")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernels/compile_check.py: unset TRITON_INTERPRET (the interpreter does not compile)")
    main()
