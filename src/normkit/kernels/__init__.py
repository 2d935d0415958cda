"""Kernels of the normkit op family, one file per backend (reference, cpu, and later triton).

``reference`` is imported eagerly (pure torch); ``cpu`` imports numba and is loaded on first use
by ``normkit.functional``.
"""
