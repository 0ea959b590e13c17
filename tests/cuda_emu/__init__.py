"""A checking CUDA execution model that runs the fused loss's CUDA kernels on the CPU (build.py)."""
