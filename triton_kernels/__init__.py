"""Triton kernels of the latent step (installed as ``gapkern.triton_kernels``).

One op per module: the formula, the @triton.jit kernel, the launcher
(``project``, ``reconstruct``, ``calibrate``, ``ema``, ``reembed``,
``latent_step``). Set ``TRITON_INTERPRET=1`` before importing them to run
on CPU tensors.
"""
