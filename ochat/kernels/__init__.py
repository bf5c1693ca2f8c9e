"""Attention dispatch and fused GPU kernels, each beside a plain PyTorch reference."""
