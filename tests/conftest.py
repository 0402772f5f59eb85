import os

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
