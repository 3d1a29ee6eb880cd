"""Triton kernels of hdccf_triton (installed as ``hdccf_triton.kernels``).

Nothing here is imported unless the Triton backend is used.
"""
