"""Triton kernels: flash attention and the fused linear log-prob / DPO loss. Imports nothing from minisirev.

The import name `kernels` is also that of the Hugging Face Hub's `kernels` package, which transformers 5.25 and
later require and import at start-up: in an environment that has both, `import kernels` gives whichever comes
first on sys.path, and each breaks the other (transformers fails with "cannot import name ... from 'kernels'").
This kit's extras therefore pin transformers below 5.25; `hub_kernels_clash()` says when the clash is present.
"""

import importlib.metadata


def hub_kernels_clash() -> str | None:
    """A one-line explanation when the Hub's `kernels` distribution is installed beside this package, else None."""
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return (f"the Hugging Face Hub's 'kernels' package {version} is installed (transformers >= 5.25 needs it) and "
            "its import name is that of this kit's kernels/: run pip uninstall -y kernels && "
            "pip install 'transformers<5.25'")
