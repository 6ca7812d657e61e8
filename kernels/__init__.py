"""tallow's Triton kernels (one module per op), shipped as ``tallow.kernels``.

Importing a submodule imports triton; tallow only does so lazily, when a
tensor on a CUDA device asks for the triton backend (or a test runs the
kernels under ``TRITON_INTERPRET=1``).
"""
