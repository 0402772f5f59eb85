"""minisirev: a small PyTorch kit for studying LLM self-improvement (arXiv 2407.05013)."""

__version__ = "0.1.0"
