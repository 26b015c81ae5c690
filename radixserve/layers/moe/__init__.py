"""Mixture-of-Experts layers: top-k routing, the experts' computation (torch on the CPU, a fused Triton
kernel on CUDA) and their split over tensor- and expert-parallel ranks."""
