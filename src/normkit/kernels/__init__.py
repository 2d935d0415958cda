"""Kernels of the normkit op family, one file per backend: ``reference`` (pure torch, the
ground truth), ``cpu`` (C++ compiled when the package is installed: ``csrc/``) and ``triton``
(CUDA; the CPU under ``TRITON_INTERPRET=1``).

``reference`` is imported eagerly; ``cpu`` loads the compiled extension and ``triton`` imports
triton, each on first use by ``normkit.functional``; kernels never import ``functional``.  All
three write the same (M, 3) row statistics [m1, dm, rstd], so a backward can run on any backend
that reaches the tensors' device.
"""
