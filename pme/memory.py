"""Host memory for pme's tables: large CPU buffers on 2 MiB pages where the OS allows it.

A CPU lookup reads a row's offset and then the row: two dependent random reads into tables of
tens to hundreds of MiB. With 4 KiB pages nearly every one of them also misses the TLB, and the
page walk lengthens the chain of the row's address. Linux backs anonymous memory with 2 MiB
transparent huge pages when the memory is advised ``MADV_HUGEPAGE`` (THP mode ``madvise``, the
common default) or always (mode ``always``); mode ``never`` turns them off.

pme advises its own tables (the flat buffer, the offset table, a collection's buffers, a fused
optimizer's state) when it allocates them: a fresh buffer is advised before its first write, so
its pages are huge from the start; a buffer the caller passed in (shared with the caller, as
``nn.Embedding(_weight=...)`` shares it) is advised in place and may be collapsed into huge pages
later by the kernel. Only CPU buffers of at least 4 MiB, only the 2 MiB-aligned part of each.
PyTorch does the same for every CPU allocation of the process with ``THP_MEM_ALLOC_ENABLE=1``.
``PME_HUGE_PAGES=0`` (or ``false`` / ``off`` / ``no``) turns pme's advice off (read when a table
is allocated; ``1`` / ``true`` / ``on`` / ``yes`` keep it on, any other value warns and keeps it
on). Where the kernel's THP mode is ``never`` pme neither advises nor copies. Tensor subclasses
(FakeTensor under tracing) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

import torch

__all__ = ["huge_pages_enabled", "advise_huge_pages", "empty", "fresh_table", "thp_mode", "describe"]

MIN_BYTES = 4 << 20
_HUGE = 2 << 20
_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14  # linux/mman.h


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _load_madvise()
_OFF = ("0", "false", "off", "no")  # PME_HUGE_PAGES values that turn the advice off
_ON = ("", "1", "true", "on", "yes")  # ... and those that keep it on (the default)
_warned: set[str] = set()


def _env_on() -> bool:
    """``PME_HUGE_PAGES`` read: off for ``0`` / ``false`` / ``off`` / ``no`` (any case), on when unset
    or ``1`` / ``true`` / ``on`` / ``yes``; any other value warns once, naming it, and keeps the
    default (on)."""
    raw = os.environ.get("PME_HUGE_PAGES")
    value = "" if raw is None else raw.strip().lower()
    if value in _OFF:
        return False
    if value not in _ON and raw not in _warned:
        _warned.add(raw)
        warnings.warn(
            f"PME_HUGE_PAGES={raw!r} is not understood: pme keeps advising its tables for huge pages "
            f"(the default); set it to one of {', '.join(_OFF)} to turn that off, or to 1 to keep it",
            stacklevel=3,
        )
    return True


def huge_pages_enabled() -> bool:
    """Whether pme advises its tables for huge pages: Linux, and ``PME_HUGE_PAGES`` not ``0`` (or
    ``false`` / ``off`` / ``no``; a value it does not know warns and counts as on)."""
    return _MADVISE is not None and _env_on()


def advised() -> bool:
    """Whether pme's big tables get huge pages: the advice is on and the kernel's THP mode takes it."""
    return huge_pages_enabled() and thp_mode() != "never"


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (``"always"``, ``"madvise"``, ``"never"``), or None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        return text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        return None


def describe() -> str:
    """One line for ``pme info``: whether pme advises its tables, and the kernel's THP mode."""
    mode = thp_mode()
    if _MADVISE is None:
        return "no (not Linux)"
    if not huge_pages_enabled():
        return f"no (PME_HUGE_PAGES={os.environ.get('PME_HUGE_PAGES')}; THP mode {mode})"
    if mode == "never":
        return "no (THP mode never)"
    return f"yes: tables of 4 MiB or more advised (THP mode {mode})"


def _big_cpu(t: torch.Tensor) -> bool:
    """A plain CPU tensor (not a subclass: a FakeTensor under tracing or FakeTensorMode has no memory
    of its own, and reading its data_ptr is an error) that is contiguous and at least 4 MiB."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and t.is_contiguous()
        and t.numel() * t.element_size() >= MIN_BYTES
    )


def advise_huge_pages(t: torch.Tensor, fresh: bool = False) -> bool:
    """Advises the 2 MiB-aligned part of ``t``'s memory ``MADV_HUGEPAGE``; True if it did.

    ``fresh=True`` says ``t``'s values do not matter yet (a buffer about to be written in full):
    its pages in that part are also given back (``MADV_DONTNEED``), so that memory the allocator
    reused, already backed by small pages, is backed by huge pages from the next write. Nothing
    happens (False) off Linux, with ``PME_HUGE_PAGES=0``, for tensors not on the CPU, not
    contiguous or under 4 MiB, when the kernel's THP mode is ``never`` (the advice would not give
    a huge page, and ``fresh`` would throw pages away for nothing), or when the kernel refuses (THP
    compiled out). Without ``fresh`` the values are untouched either way.
    """
    if not _big_cpu(t) or not advised():
        return False
    start = t.data_ptr()
    lo = -(-start // _HUGE) * _HUGE
    hi = (start + t.numel() * t.element_size()) // _HUGE * _HUGE
    if hi <= lo or _MADVISE(lo, hi - lo, _MADV_HUGEPAGE) != 0:
        return False
    if fresh:
        _MADVISE(lo, hi - lo, _MADV_DONTNEED)
    return True


def empty(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``torch.empty(shape)`` for a table pme is about to fill in full: a big CPU one advised for
    huge pages before its first write (:func:`advise_huge_pages` with ``fresh=True``)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(out, fresh=True)
    return out


def fresh_table(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """``t`` in memory advised for huge pages before it was written: a copy where huge pages apply
    (see :func:`advise_huge_pages`), else ``t`` itself, or a plain copy with ``copy=True`` (for a
    caller that needs its own buffer either way). Only for buffers pme owns: the copy ends any
    sharing. No copy where huge pages do not apply (THP mode ``never`` included): a copy of a big
    table for nothing would double its memory while both live."""
    if not _big_cpu(t) or not advised():
        return t.clone(memory_format=torch.contiguous_format) if copy else t
    return empty(t.shape, t.dtype, t.device).copy_(t)
