import os
import sys

import pytest
import torch

# Triton kernels run in the interpreter on a CPU. The flag must be set before any kernel module is
# imported, because @triton.jit reads it at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    # transformers (the reference of many tests) cannot import beside this repository's kernels/ when the Hub's
    # package of that name is installed: one clear line instead of a dozen ImportErrors deep in transformers
    from kernels import hub_kernels_clash

    clash = hub_kernels_clash()
    if clash:
        raise pytest.UsageError(f"tests: {clash}")


# A CUDA error such as an illegal memory access loses the process's CUDA context: every later CUDA call in that
# process fails. In the first GPU run one such test took the 64 tests its pytest-xdist worker ran next down with
# it. So after one: under xdist the worker exits (xdist reports that test as crashed and starts a fresh worker);
# in a single process the session stops, naming the test.
CONTEXT_LOST = ("illegal memory access", "unspecified launch failure", "misaligned address", "illegal instruction")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    text = str(call.excinfo.value) if report.failed and call.excinfo is not None else ""
    if "CUDA error" not in text or not any(s in text for s in CONTEXT_LOST):
        return
    why = f"{item.nodeid}: {text.splitlines()[0]}; the CUDA context is lost, so every later CUDA test would fail"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"\n{why}: this worker exits\n")
        sys.stderr.flush()
        os._exit(3)
    item.session.shouldstop = why
