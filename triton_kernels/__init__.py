"""Triton kernels of the latent step (installed as ``gapkern.triton_kernels``)."""
