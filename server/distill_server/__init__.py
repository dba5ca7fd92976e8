"""DistillService server: knowledge-distillation losses on a GPU or the CPU.

Installed with the ``server`` extra (``pip install "distill-service[server]"``);
a plain install is the client only.
"""

import os
from importlib.metadata import PackageNotFoundError, version

# The server computes in threads of its own (--workers). BLAS threads on top
# only compete with them, and with a co-located trainer, for the cores:
# OpenBLAS's helper threads spin for about 0.1 s after each call (measured,
# docs/benchmarks.md). Set before NumPy loads its BLAS; an operator's own
# setting wins.
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

try:
    import grpc_health  # noqa: F401
    import grpc_reflection  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as exc:  # the client-only install
    raise ImportError(
        f'the DistillService server needs the "server" extra: pip install "distill-service[server]" '
        f"({exc.name} is not installed)",
        name=exc.name,
    ) from exc

try:
    __version__ = version("distill-service")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
