"""What this machine offers the tests: a CUDA device with CuPy, or not."""

from __future__ import annotations

__all__ = ["CUDA"]


def _cuda_available() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


CUDA = _cuda_available()
"""Whether CuPy finds a CUDA device."""
