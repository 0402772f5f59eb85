"""Triton kernels: flash attention and the fused linear log-prob / DPO loss. Imports nothing from minisirev."""
