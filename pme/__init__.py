"""pme: multi-size embedding tables for PyTorch.

Rows of different lengths live back to back in one flat buffer with an offset table; fused
C++/CUDA kernels do the lookup, the backward, a fused sparse optimizer step and the pruning
that picks every row's length (PME: Pruning-based Multi-size Embedding, our reconstruction).

Main entry points: ``MultiSizeEmbeddingBag``, ``MultiSizeEmbedding``, ``convert``, ``search``,
``pme.optim``, the functions of ``pme.ops``, ``DistributedDataParallel`` (for ``sparse=True``
tables) and ``info()``.
"""

from . import memory, ops, optim, reference
from ._version import __version__
from .collection import MultiSizeEmbeddingBagCollection, MultiSizeEmbeddingCollection
from .modules import MultiSizeEmbedding, MultiSizeEmbeddingBag, convert

__all__ = [
    "__version__",
    "ops",
    "reference",
    "optim",
    "MultiSizeEmbeddingBag",
    "MultiSizeEmbedding",
    "convert",
    "search",
    "info",
    "MultiSizeEmbeddingBagCollection",
    "MultiSizeEmbeddingCollection",
    "DistributedDataParallel",
]


def __getattr__(name):
    # The search pulls in more code; load it on first use. ``pme.search`` is the module, and
    # the module is callable (``pme.search(model, loader, budget)``), so importing the submodule
    # later (``from pme.search import ...``) cannot replace a function by a module.
    if name == "search":
        import importlib

        return importlib.import_module(".search", __name__)
    if name == "DistributedDataParallel":  # torch.distributed loads on first use only
        from .ddp import DistributedDataParallel

        return DistributedDataParallel
    raise AttributeError(f"module 'pme' has no attribute {name!r}")


def info() -> dict:
    """Version, flavour, the CUDA version and archs the binary carries, the torch it runs on,
    which backend is live (``"compiled"`` or ``"reference"``, with the reason), and whether pme puts
    its CPU tables on huge pages (``pme.memory``)."""
    import platform
    import re

    import torch

    b = ops.BUILD_INFO or {}
    cuda = b.get("cuda", "none") if b else None
    local = __version__.split("+", 1)[1] if "+" in __version__ else None
    try:
        from importlib.metadata import version

        installed = version("pme")
    except Exception:  # not installed as a distribution (source tree on sys.path)
        installed = __version__
    flavour = (
        installed.split("+", 1)[1]
        if "+" in installed
        else (None if not b else ("cpu" if cuda == "none" else "cu" + cuda.replace(".", "")))
    )
    return {
        "version": installed,
        "flavour": flavour or local,
        "backend": ops.backend(),
        "load_error": ops.LOAD_ERROR,
        "abi": b.get("abi"),
        "built_cuda": cuda,
        "built_archs": [a for a in re.split(r"[,;]", b.get("archs", "")) if a] if b else [],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "huge_pages": memory.describe(),
        "huge_pages_advised": memory.advised(),
    }
