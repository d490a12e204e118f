"""One thread for the test processes' own torch and numpy work (conftest's session fixture).
vLLM engines set their own threads in their processes."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np


def openblas():
    """numpy's bundled OpenBLAS (scipy-openblas), or None: its thread count is only settable here."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so"))
    if not libs:
        return None
    lib = ctypes.CDLL(libs[0])
    return lib if hasattr(lib, "scipy_openblas_set_num_threads64_") else None


@contextlib.contextmanager
def one_thread():
    """torch and numpy BLAS on one thread. The suite's models are tiny: on a busy 2-core machine a
    second thread only spins against the other load (measured: a [130, 64] torch linear 130x, the
    numpy reference forward of the converter tests 17x slower with two threads)."""
    import torch

    blas, threads = openblas(), torch.get_num_threads()
    before = blas.scipy_openblas_get_num_threads64_() if blas else None
    torch.set_num_threads(1)
    if blas:
        blas.scipy_openblas_set_num_threads64_(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if blas:
            blas.scipy_openblas_set_num_threads64_(before)
