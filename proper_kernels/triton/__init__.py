"""@triton.jit kernels of proper-kernels and their launchers (imports triton)."""
