"""DistillService server: knowledge-distillation losses on a GPU or the CPU."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distill-service")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
