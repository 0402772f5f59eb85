"""The spill guard: every autotune config of every Triton kernel, at the head dims and dtypes the model uses,
compiled for sm_90a on this CPU (kernels/compile_check.py: the real launchers on meta tensors, triton.compile for
GPUTarget("cuda", 90, 32), the cubin read with Triton's bundled cuobjdump), must use no local memory at all: no
stack frame and no STL / LDL instruction, in or outside a loop. A spill in the key loop costs on every tile (the
dK/dV kernel at D=128 used to spill 116 B to 3 KB a thread); docs/kernels.md has the table. Runs in a subprocess
without TRITON_INTERPRET (the interpreter compiles nothing); the compiled kernels stay in Triton's cache, so a
rerun takes seconds, a cold one a few minutes on two cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
           "_decode_kernel", "_decode_reduce_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel"}


# fp32 gradients (flash_attention on fp32 tensors, which training never runs: it autocasts to bf16) hold fp32 tiles
# and tf32x3 operand splits at D = 128 and spill hundreds of bytes in the backward: a correctness path, compiled
# here for its shared memory (test_every_config_fits_in_shared_memory), exempt from the spill guard.
FP32_GRADIENT_CASES = {"train fp32 D=128 causal window"}
SHARED_LIMIT = 227 * 1024  # bytes a program of an H100 / H200 may use (232448, the limit the GPU run reported)


@pytest.fixture(scope="module")
def report():
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton ships no NVIDIA toolchain (cuobjdump), so nothing can be compiled for sm_90a")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return [r for r in lines if "kernel" in r], lines[-1]["autotune_configs"]


@pytest.mark.timeout(1800)
def test_every_config_compiles_without_spills(report):
    rows, _ = report
    assert {r["kernel"] for r in rows} == KERNELS
    cases = {r["case"] for r in rows}
    for D in (128, 64, 32):  # training in bf16 (Llama and Mistral's window), sample.py's fp32 prefill and decode
        assert {f"train bf16 D={D} causal", f"train bf16 D={D} causal window", f"prefill fp32 D={D} kv_lens",
                f"decode fp32 D={D}"} <= cases
    assert {"prefill fp32 D=128 kv_lens window", "decode fp32 D=128 window", "decode bf16 D=128"} <= cases
    spilling = [f"{r['case']} {r['kernel']} {r['config']}: {r['regs']} regs, {r['stack']} B stack, "
                f"{r['spill_instrs']} STL/LDL ({r['loop_spill_instrs']} in loops)"
                for r in rows if (r["stack"] or r["spill_instrs"]) and r["case"] not in FP32_GRADIENT_CASES]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


@pytest.mark.timeout(1800)  # each test may be the one that pays for the (cold) compilation
def test_every_launch_asks_for_fp_fusion(report):
    """The online softmax relies on FMA contraction, and Triton's default turns it off from 3.10."""
    assert all(r["fp_fusion"] for r in report[0])


@pytest.mark.timeout(1800)
def test_logits_tile_rows_are_aligned_for_an_odd_vocabulary(report):
    """V = 32001: the log-prob kernels see a row stride Triton specialises as a multiple of 16 (it is padded to 64
    elements), so their row loads vectorise; an odd stride would compile to scalar loads."""
    rows = [r for r in report[0] if r["kernel"].startswith("_logprobs")]
    assert rows and all("stride_z" in r["aligned"] for r in rows)


@pytest.mark.timeout(1800)
def test_every_autotune_config_is_compiled(report):
    """The guard sees every candidate: each config of the three autotuned kernels is compiled in some case (one
    that the pruner dropped everywhere would be dead weight in the list)."""
    rows, listed = report
    for kernel, configs in listed.items():
        seen = {r["config"] for r in rows if r["kernel"] == kernel}
        assert set(configs) == seen, f"{kernel}: listed {sorted(configs)}, compiled {sorted(seen)}"


@pytest.mark.timeout(1800)
def test_every_config_fits_in_shared_memory(report):
    """A config the pruner keeps must launch: the first GPU run found the fp32 dQ kernel at D = 128 kept at an
    estimated 196 KB that needed 256 KB (K is staged twice), and it failed with OutOfResources. The real figure
    is in the compiled kernel's metadata."""
    rows, _ = report
    assert any(r["case"] in FP32_GRADIENT_CASES for r in rows)
    over = [f"{r['case']} {r['kernel']} {r['config']}: {r['shared']} B" for r in rows if r["shared"] > SHARED_LIMIT]
    assert not over, "over the shared-memory limit:\n" + "\n".join(over)
