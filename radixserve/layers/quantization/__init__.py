"""Quantised weights and activations: FP8 formats (fp8_utils.py) and their Triton kernels (fp8_kernels.py)."""
