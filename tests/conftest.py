import os

import torch

# Triton kernels run in the interpreter on a CPU. The flag must be set before any kernel module is
# imported, because @triton.jit reads it at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
