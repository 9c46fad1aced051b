"""GPU kernels (Triton). Imported only on CUDA paths: Triton is not needed on CPU."""
