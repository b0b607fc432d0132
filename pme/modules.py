"""nn.EmbeddingBag / nn.Embedding drop-ins over a flat multi-size table, and ``convert``."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping

import torch
from torch import nn

from . import memory, ops

__all__ = ["MultiSizeEmbeddingBag", "MultiSizeEmbedding", "convert", "parse_sizes"]

LAYOUTS = ("padded", "grouped")


def parse_sizes(sizes, num_embeddings: int, embedding_dim: int) -> torch.Tensor:
    """Sizes argument -> ``[V]`` int64 CPU tensor, checked to lie in ``[0, embedding_dim]``.

    ``sizes`` may be ``None`` (every row full width), an int (uniform), or a sequence / tensor of
    ``num_embeddings`` ints.
    """
    if sizes is None:
        sizes = embedding_dim
    if isinstance(sizes, bool):
        raise TypeError("sizes must be an int, a sequence of ints or a tensor, got a bool")
    if isinstance(sizes, int):
        out = torch.full((num_embeddings,), sizes, dtype=torch.int64)
    else:
        if isinstance(sizes, str):
            raise TypeError("sizes must be an int, a sequence of ints or a tensor, got a str")
        if isinstance(sizes, torch.Tensor) and sizes.is_meta:
            raise ValueError(
                "sizes is a meta tensor (made under torch.device('meta')?): the row sizes are values the table "
                "is laid out by; make them on the CPU (device='cpu', or outside the with block)"
            )
        t = torch.as_tensor(sizes, device="cpu") if not isinstance(sizes, torch.Tensor) else sizes.detach().cpu()
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"sizes must be integers, got dtype {t.dtype}")
        if t.dim() > 1:
            raise ValueError(f"sizes must be 1-D with {num_embeddings} entries, got shape {tuple(t.shape)}")
        out = t.to(torch.int64).reshape(-1)
        if out.numel() != num_embeddings:
            raise ValueError(f"sizes has {out.numel()} entries but the table has {num_embeddings} rows")
    if out.numel() and (int(out.min()) < 0 or int(out.max()) > embedding_dim):
        bad = int(((out < 0) | (out > embedding_dim)).nonzero()[0])
        raise ValueError(f"sizes[{bad}] = {int(out[bad])} is outside [0, embedding_dim = {embedding_dim}]")
    return out


def _storage_of(t: torch.Tensor):
    """Where a plain tensor's values live (its data pointer), or None for a tensor subclass (a
    FakeTensor under tracing has no memory) or one without storage."""
    if type(t) not in (torch.Tensor, nn.Parameter):
        return None
    try:
        return t.data_ptr()
    except RuntimeError:
        return None


def _first_columns(V: int, D: int, device=None) -> torch.Tensor:
    """Scores ``[V, D]`` under which every row keeps its first columns (for ``prune_pack``)."""
    return -torch.arange(D, dtype=torch.float32, device=device).expand(V, D).contiguous()


def _offsets_of(sizes: torch.Tensor) -> torch.Tensor:
    off = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=off[1:])
    return off


def _summary(sizes: torch.Tensor) -> str:
    if sizes.numel() == 0:
        return "[]"
    u = torch.unique(sizes)
    if u.numel() <= 6:
        counts = [(int(s), int((sizes == s).sum())) for s in u]
        return "{" + ", ".join(f"{s}: {c}" for s, c in counts) + "}"
    return f"[{int(sizes.min())}..{int(sizes.max())}, mean {sizes.double().mean():.1f}]"


class _Shape:
    """The shape facts a ``RowConsumer.state`` reads (rows, width, entries), for a table not built yet."""

    def __init__(self, num_embeddings, embedding_dim, weight):
        self.num_embeddings, self.embedding_dim, self.weight = num_embeddings, embedding_dim, weight
        self.offsets = torch.empty(num_embeddings + 1, dtype=torch.int64, device="meta")


def _grouped_columns(classes, D: int):
    """The grouped layout's column map: ``col_of_size [D + 1]`` int64 (size 0 at column 0, each
    class ``c`` at the sum of the classes before it, -1 for the other sizes) and the output width
    (the sum of the classes)."""
    col = torch.full((D + 1,), -1, dtype=torch.int64)
    col[0] = 0
    start = 0
    for c in classes:
        col[c] = start
        start += c
    return col, start


def _classes_of_col(col_of_size, D: int) -> list[int]:
    """Size classes of a grouped layout's column map, checked to be exactly the map pme builds.

    A checkpoint's ``col_of_size`` is derived data: it is never used as is. Its classes (the
    sizes with a slot) are read, the map is rebuilt from them, and the two must be equal.
    """
    if not isinstance(col_of_size, torch.Tensor) or col_of_size.dtype != torch.int64 or col_of_size.shape != (D + 1,):
        raise ValueError(
            f"col_of_size must be an int64 tensor of shape ({D + 1},), got "
            f"{getattr(col_of_size, 'dtype', type(col_of_size))} of shape "
            f"{tuple(getattr(col_of_size, 'shape', ()))}"
        )
    col = col_of_size.detach().cpu()
    classes = [s for s in range(1, D + 1) if int(col[s]) != -1]
    rebuilt, _ = _grouped_columns(classes, D)
    if not torch.equal(rebuilt, col):
        bad = int((rebuilt != col).nonzero()[0])
        raise ValueError(
            f"col_of_size[{bad}] = {int(col[bad])} in the checkpoint is not the layout of its size "
            f"classes {classes} (expected {int(rebuilt[bad])}): derived data is rebuilt, not trusted"
        )
    return classes


def load_is_strict(passed: bool) -> bool:
    """Whether the ``load_state_dict`` running is strict. ``nn.Module.load_state_dict`` passes
    ``strict=True`` to every module's ``_load_from_state_dict`` whatever it was called with (it
    applies strictness afterwards, to the keys the modules report), so a module that undoes its
    load on a missing or unexpected key must read the caller's own argument: from the frame of
    ``nn.Module.load_state_dict``, or ``passed`` when the load did not come through it."""
    code = nn.Module.load_state_dict.__code__
    f = sys._getframe(1)
    for _ in range(64):
        if f is None:
            break
        if f.f_code is code:
            return bool(f.f_locals.get("strict", passed))
        f = f.f_back
    return passed


def built_on_host(init):
    """Decorates a module's ``__init__`` so that it can run under a default-device context
    (``with torch.device("meta"):``, the meta-init idiom): the module's tensors go to ``device``,
    which defaults to the context's device as nn modules' do, while the host-side helpers of the
    build (sizes, offsets before they move) are made on the CPU, where their values can be read."""
    sig = inspect.signature(init)

    def wrapped(self, *args, **kwargs):
        here = torch.get_default_device()
        if here.type == "cpu":
            return init(self, *args, **kwargs)
        bound = sig.bind(self, *args, **kwargs)
        if bound.arguments.get("device") is None:
            bound.arguments["device"] = here
        with torch.device("cpu"):
            return init(*bound.args, **bound.kwargs)

    wrapped.__signature__ = sig
    wrapped.__doc__, wrapped.__name__, wrapped.__qualname__ = init.__doc__, init.__name__, init.__qualname__
    return wrapped


class _FusedStateOwner:
    """What a pme table and a collection share as owners of a fused optimizer's state
    (``self.optimizer``, a ``pme.ops.RowConsumer``, or None): freezing, shared memory, and the
    refusal of a checkpoint while on the meta device. A mixin before ``nn.Module``."""

    _frozen = False  # requires_grad_(False) with a fused optimizer: no step in backward

    def requires_grad_(self, requires_grad: bool = True):
        """As ``nn.Module.requires_grad_``. With a fused optimizer (whose weight never requires a
        gradient: backward steps it in place) ``False`` freezes the module, which then takes no
        step, and ``True`` lets it train again."""
        super().requires_grad_(requires_grad)
        if getattr(self, "optimizer", None) is not None:
            self._frozen = not requires_grad
            self.weight.requires_grad_(False)
        return self

    def share_memory(self):
        """As ``nn.Module.share_memory``, the fused optimizer's state included (Hogwild-style
        training steps one shared weight and one shared state)."""
        super().share_memory()
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.share_state(self)
        return self

    def _refuse_meta_checkpoint(self, prefix, error_msgs) -> bool:
        """True (and an error for load_state_dict to raise) while on the meta device: the offsets
        have no values there to check a checkpoint against or to copy into."""
        if not self.weight.is_meta:
            return False
        error_msgs.append(
            f"{prefix or 'the module'}: a pme table or collection on the meta device cannot take a checkpoint "
            "(its offsets are structure with no values there): build it on its real device and load it there"
        )
        return True


class _MultiSizeTable(_FusedStateOwner, nn.Module):
    """Storage shared by the two modules: flat ``weight`` ``[total]`` and ``offsets`` ``[V + 1]``.

    ``weight`` is an nn.Parameter; ``offsets`` (and ``col_of_size`` for the grouped layout) are
    buffers, so ``state_dict`` carries the sizes and ``load_state_dict`` accepts a table of other
    sizes (the module is re-shaped to the loaded one).
    """

    # The arguments before ``*`` are nn's, given by the subclasses by name (see _table_args), whose
    # constructors hold the defaults in the positional orders of nn.EmbeddingBag and nn.Embedding;
    # pme's own keyword-only options are declared here, once, with their defaults.
    @built_on_host
    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        padding_idx,
        device,
        dtype,
        _weight,
        max_norm,
        norm_type,
        scale_grad_by_freq,
        sparse,
        *,
        sizes=None,
        layout="padded",
        size_classes=None,
        project=False,
        optimizer=None,
    ):
        if optimizer is not None and not isinstance(optimizer, ops.RowConsumer):
            raise TypeError(
                f"optimizer must be a pme.optim optimizer (SGD, RowwiseAdagrad, Adam), got {type(optimizer).__name__} "
                "(a torch.optim optimizer takes the parameters instead: build it over model.parameters())"
            )
        if optimizer is not None and (sparse or scale_grad_by_freq):
            raise ValueError(
                "a fused optimizer (optimizer=...) updates the table inside backward and makes no "
                "gradient: it cannot be combined with sparse=True (a gradient for torch.optim) or "
                "scale_grad_by_freq"
            )
        super().__init__()
        if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))):
            raise TypeError(
                f"max_norm must be a number or None, got {type(max_norm).__name__} (sizes is a "
                "keyword argument: MultiSizeEmbeddingBag(V, D, sizes=...), as nn.EmbeddingBag's third "
                "positional argument is max_norm)"
            )
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.sparse = bool(sparse)
        if not isinstance(num_embeddings, int) or num_embeddings < 0:
            raise ops.ArgumentError(f"num_embeddings must be a non-negative int, got {num_embeddings!r}")
        if not isinstance(embedding_dim, int) or embedding_dim < 0:
            raise ops.ArgumentError(f"embedding_dim must be a non-negative int, got {embedding_dim!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if project and layout != "grouped":
            raise ValueError("project=True needs layout='grouped' (a padded output is already [B, D])")
        dtype = dtype or torch.get_default_dtype()
        if dtype not in ops.WEIGHT_DTYPES:
            raise TypeError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = None if padding_idx is None else ops.normalize_padding_idx(padding_idx, num_embeddings)
        self.layout = layout
        self.project = project
        if size_classes is not None:
            if layout != "grouped":
                raise ValueError("size_classes is for layout='grouped' (the padded layout has no slots)")
            if isinstance(size_classes, (str, bytes)) or not hasattr(size_classes, "__iter__"):
                raise TypeError(f"size_classes must be a sequence of ints, got {size_classes!r}")
            bad = [c for c in size_classes if isinstance(c, bool) or int(c) != c]
            if bad:
                raise TypeError(f"size_classes must be ints, got {bad}")
        self._size_classes = size_classes
        sizes = parse_sizes(sizes, num_embeddings, embedding_dim)
        self.register_buffer("offsets", memory.fresh_table(_offsets_of(sizes).to(device)))
        self.register_buffer("col_of_size", None)
        self._set_layout(sizes)
        if _weight is not None:
            _weight = torch.as_tensor(_weight)
            if _weight.shape == (num_embeddings, embedding_dim) and _weight.shape != (int(sizes.sum()),):
                # a dense [V, D] table, as nn.Embedding takes it: each row keeps its first sizes[i] values
                _weight = memory.fresh_table(
                    ops.prune_pack(
                        _weight.detach(),
                        _first_columns(num_embeddings, embedding_dim, _weight.device),
                        sizes.to(_weight.device),
                    )[0]
                )
            if _weight.shape != (int(sizes.sum()),):
                raise ops.ArgumentError(
                    f"_weight must be the flat buffer of shape ({int(sizes.sum())},) or a dense "
                    f"[{num_embeddings}, {embedding_dim}] table, got {tuple(_weight.shape)} (a table of another "
                    "shape: build nn.EmbeddingBag / nn.Embedding from it and convert it with "
                    "from_embedding_bag / from_embedding)"
                )
            self.weight = nn.Parameter(_weight.to(device=device, dtype=dtype))
            memory.advise_huge_pages(self.weight)  # in place: a flat buffer given is shared, as nn.Embedding shares it
        else:
            self.weight = nn.Parameter(memory.empty(int(sizes.sum()), dtype, device))  # reset_parameters fills it
            self.reset_parameters()
        if project:
            self.projection = nn.Parameter(self._identity_projection().to(device=device, dtype=dtype))
        else:
            self.register_parameter("projection", None)
        self.optimizer = None
        if optimizer is not None:
            optimizer.attach(self)

    # ---- layout ---------------------------------------------------------------------------
    def _set_layout(self, sizes: torch.Tensor):
        D = self.embedding_dim
        if self.layout == "padded":
            self.col_of_size = None
            self.width = D
            self.size_classes = sorted({int(s) for s in torch.unique(sizes)} - {0})
            return
        classes = self._size_classes
        if classes is None:
            classes = sorted({int(s) for s in torch.unique(sizes)} - {0})
        classes = sorted({int(c) for c in classes})
        if any(c <= 0 or c > D for c in classes):
            raise ValueError(f"size_classes must lie in [1, {D}], got {classes}")
        present = {int(s) for s in torch.unique(sizes)} - {0}
        missing = present - set(classes)
        if missing:
            raise ValueError(
                f"layout='grouped' needs every size in size_classes {classes}; sizes {sorted(missing)} "
                "are not (round the sizes to the classes first)"
            )
        col, self.width = _grouped_columns(classes, D)
        self.col_of_size = col.to(self.offsets.device)
        self.size_classes = classes

    def _identity_projection(self) -> torch.Tensor:
        """``[width, D]``: the slot of size s maps to the first s output columns (== padded at init)."""
        P = torch.zeros(self.width, self.embedding_dim)
        col, _ = _grouped_columns(self.size_classes, self.embedding_dim)  # the host's copy (also on meta)
        for c in self.size_classes:
            start = int(col[c])
            P[start : start + c, :c] = torch.eye(c)
        return P

    @property
    def sizes(self) -> torch.Tensor:
        """``[V]`` int64: the stored length of every row."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def output_dim(self) -> int:
        """Width of the output: ``D`` (padded, or grouped with projection) or ``sum(size_classes)``."""
        return self.embedding_dim if (self.layout == "padded" or self.project) else self.width

    def reset_parameters(self):
        """N(0, 1) entries, as nn.EmbeddingBag; the padding row is zeroed."""
        nn.init.normal_(self.weight)
        self._zero_padding_row()

    def _zero_padding_row(self):
        if self.padding_idx is not None and not self.weight.is_meta:
            lo, hi = int(self.offsets[self.padding_idx]), int(self.offsets[self.padding_idx + 1])
            with torch.no_grad():
                self.weight[lo:hi].zero_()

    # ---- memory accounting ----------------------------------------------------------------
    def num_stored(self) -> int:
        """Number of stored embedding entries (``sum(sizes)``)."""
        return self.weight.numel()

    def nbytes(self) -> int:
        """Bytes of the table: flat weight + offsets (+ projection), optimizer state excluded."""
        n = self.weight.numel() * self.weight.element_size() + self.offsets.numel() * 8
        if self.projection is not None:
            n += self.projection.numel() * self.projection.element_size()
        return n

    def dense_nbytes(self) -> int:
        """Bytes of the full-width dense table this one replaces (``V * D`` entries)."""
        return self.num_embeddings * self.embedding_dim * self.weight.element_size()

    def memory_report(self) -> dict:
        """Entries and bytes next to the dense table's."""
        dense = self.num_embeddings * self.embedding_dim
        return {
            "rows": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "stored_entries": self.num_stored(),
            "dense_entries": dense,
            "entry_fraction": self.num_stored() / max(dense, 1),
            "bytes": self.nbytes(),
            "dense_bytes": self.dense_nbytes(),
            "compression": self.dense_nbytes() / max(self.nbytes(), 1),
        }

    def to_dense(self) -> torch.Tensor:
        """Dense view ``[V, width]`` (``width = D`` padded, ``sum(size_classes)`` grouped)."""
        return ops.to_dense(self.weight, self.offsets, self.width, self.col_of_size)

    def extra_repr(self) -> str:
        if self.offsets.is_meta:  # the row sizes are data the meta device does not hold
            sizes = "? (meta device)"
        elif self.__dict__.get("_unloaded"):
            sizes = "? (to_empty: load a checkpoint)"
        else:
            sizes = _summary(self.sizes.cpu())
        s = (
            f"{self.num_embeddings}, {self.embedding_dim}, sizes={sizes}, "
            f"stored={self.num_stored():,} "
            f"({100 * self.num_stored() / max(1, self.num_embeddings * self.embedding_dim):.1f}% of dense)"
        )
        if self.layout != "padded":
            s += f", layout='grouped', size_classes={self.size_classes}"
            if self.project:
                s += ", project=True"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}" + (f", norm_type={self.norm_type}" if self.norm_type != 2 else "")
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if self.sparse:
            s += ", sparse=True"
        if self.weight.dtype != torch.float32:
            s += f", dtype={self.weight.dtype}"
        return s

    def _optimizer_repr(self) -> str:
        return f", optimizer={self.optimizer!r}" if self.optimizer is not None else ""

    # ---- rows of the dense view -------------------------------------------------------------
    def row(self, i: int) -> torch.Tensor:
        """Row ``i`` of the dense view, ``[width]`` (zero-padded; negative ``i`` counts from the end).

        ``weight`` is the flat buffer ``[total]``, so ``weight[i]`` is one entry, not row ``i``:
        use ``row(i)`` / ``rows(idx)`` (or ``to_dense()``) where nn.Embedding code reads ``weight[i]``.
        Differentiable; neither ``max_norm`` nor ``sparse`` applies.
        """
        V = self.num_embeddings
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"row index must be an int, got {type(i).__name__}")
        if not -V <= i < V:
            raise IndexError(f"row {i} is out of range for a table of {V} rows")
        return self.rows(torch.tensor(i % V, device=self.weight.device))

    def rows(self, idx) -> torch.Tensor:
        """Rows ``idx`` (int32/int64 of any shape) of the dense view: ``[*idx.shape, width]``."""
        idx = torch.as_tensor(idx, device=self.weight.device)
        return ops.embedding(self.weight, self.offsets, idx, width=self.width, col_of_size=self.col_of_size)

    # ---- state_dict with other sizes ------------------------------------------------------
    def _adopt_dense_checkpoint(self, state_dict, prefix, error_msgs):
        """A dense nn.EmbeddingBag / nn.Embedding ``state_dict`` (``weight [V, D]``, no ``offsets``):
        each row keeps its first ``sizes[i]`` values; the table's own sizes and buffers stay."""
        w = state_dict.get(prefix + "weight")
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or (prefix + "offsets") in state_dict:
            return
        V, D = self.num_embeddings, self.embedding_dim
        if tuple(w.shape) != (V, D) or not w.is_floating_point():
            error_msgs.append(
                f"{prefix}weight: a dense [{w.shape[0]}, {w.shape[1]}] {w.dtype} table cannot be loaded into this "
                f"multi-size table of {V} rows and width {D} (a dense checkpoint must be [{V}, {D}], floating "
                "point); load it into nn.EmbeddingBag / nn.Embedding and convert it with "
                "MultiSizeEmbeddingBag.from_embedding_bag(module, sizes) (MultiSizeEmbedding.from_embedding, "
                "or from_dense(weight, sizes, scores=...) to keep the best-scored entries)"
            )
            state_dict[prefix + "weight"] = self.weight.detach()
        else:
            state_dict[prefix + "weight"] = ops.prune_pack(
                w.detach(), _first_columns(V, D, w.device), self.sizes.to(w.device)
            )[0]
        # offsets, the grouped layout's columns, projection: stay as they are; a fused optimizer's
        # state is left out, so that it starts fresh (_fresh_optim_state), as for any checkpoint of
        # the values alone (new values with the old accumulators would be neither run's state)
        optim = set() if getattr(self, "optimizer", None) is None else {b.name for b in self.optimizer.state(self)}
        for name, t in list(self._buffers.items()) + list(self._parameters.items()):
            if t is not None and prefix + name not in state_dict and name not in optim:
                state_dict[prefix + name] = t.detach().clone()

    # One rule: everything derived is rebuilt, everything stored is validated, all or nothing.
    # - offsets, weight and the fused optimizer's state from a checkpoint are checked whole
    #   (_check_checkpoint) before anything is replaced;
    # - col_of_size, width and size classes are rebuilt from the sizes; a col_of_size in the
    #   checkpoint must equal the one rebuilt from its size classes (else an error: it is never
    #   used as is);
    # - on any error (ours or the default loader's, e.g. a shape mismatch) every parameter,
    #   buffer and layout attribute of this table is restored: the module is bitwise unchanged.
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self._refuse_meta_checkpoint(prefix, error_msgs):
            return
        self._adopt_dense_checkpoint(state_dict, prefix, error_msgs)
        n_err, n_missing, n_unexpected = len(error_msgs), len(missing_keys), len(unexpected_keys)
        try:
            plan = self._check_checkpoint(state_dict, prefix)
        except (ValueError, TypeError) as e:
            error_msgs.append(f"{prefix[:-1] or type(self).__name__}: {e}")
            return
        snapshot = self._snapshot()
        try:
            if plan is not None:
                self._relayout(*plan)
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            self._fresh_optim_state(state_dict, prefix, missing_keys)
        except BaseException:
            self._restore(snapshot)
            raise
        failed = len(error_msgs) > n_err or (
            load_is_strict(strict) and (len(missing_keys) > n_missing or len(unexpected_keys) > n_unexpected)
        )
        if failed:  # load_state_dict raises after every module has been visited
            self._restore(snapshot)
        else:
            self.__dict__.pop("_unloaded", None)  # (to_empty's uninitialised offsets are loaded now)

    def _check_loaded(self):
        if self.__dict__.get("_unloaded"):
            raise RuntimeError(
                f"this {type(self).__name__} was materialised with to_empty(): its offsets (the row sizes) and "
                "values are uninitialised; load a checkpoint with load_state_dict() first, or build the table on "
                "its device"
            )

    def _fresh_optim_state(self, state_dict, prefix, missing_keys):
        """A checkpoint of the table's values without its fused optimizer's state (saved from a
        table without one, e.g. pretrained weights to fine-tune): the state starts fresh (zeros,
        step 0), and its keys are not missing."""
        if getattr(self, "optimizer", None) is None or (prefix + "weight") not in state_dict:
            return
        names = [b.name for b in self.optimizer.state(self)]
        if any(prefix + n in state_dict for n in names):
            return  # the checkpoint has the state (a part of it missing is reported as missing)
        with torch.no_grad():
            for n in names:
                getattr(self, n).zero_()
                if prefix + n in missing_keys:
                    missing_keys.remove(prefix + n)

    def _snapshot(self):
        """Everything a load may change: tensor objects with copies of their values, and attributes."""
        keep = {}
        for store in (self._parameters, self._buffers):
            for k, t in store.items():
                keep[(id(store), k)] = (store, k, t, None if t is None else t.detach().clone())
        attrs = {k: getattr(self, k) for k in ("width", "size_classes", "_size_classes")}
        return keep, attrs

    def _restore(self, snapshot):
        keep, attrs = snapshot
        for store, k, t, values in keep.values():
            store[k] = t
            if t is not None:
                with torch.no_grad():
                    t.copy_(values)
        for store in (self._parameters, self._buffers):  # drop what the load added
            for k in [k for k in store if (id(store), k) not in keep]:
                del store[k]
        for k, v in attrs.items():
            setattr(self, k, v)

    def _check_checkpoint(self, state_dict, prefix):
        """Validates the checkpoint's table (and optimizer state) against this module, reading nothing else.

        Returns None when the sizes are this module's, else ``(offsets, sizes, size_classes)`` for
        :meth:`_relayout`. Raises ValueError / TypeError naming what is wrong.
        """
        V, D = self.num_embeddings, self.embedding_dim
        off = state_dict.get(prefix + "offsets")
        w = state_dict.get(prefix + "weight")
        cos = state_dict.get(prefix + "col_of_size")
        plan = None
        if off is None:
            off = self.offsets
        else:
            if not isinstance(off, torch.Tensor) or off.dtype != torch.int64 or off.dim() != 1:
                raise TypeError(
                    f"offsets must be a 1-D int64 tensor, got {getattr(off, 'dtype', type(off))} of "
                    f"shape {tuple(getattr(off, 'shape', ()))}"
                )
            if off.numel() != V + 1:
                raise ValueError(f"offsets: the checkpoint has {off.numel() - 1} rows, this module has {V}")
            off = off.detach().cpu()
            ops.check_offsets(off, int(off[-1]), D)
        total = int(off[-1])
        if w is not None:
            if not isinstance(w, torch.Tensor) or w.dtype not in ops.WEIGHT_DTYPES or w.dim() != 1:
                raise TypeError(
                    f"weight must be a 1-D float tensor, got {getattr(w, 'dtype', type(w))} of shape "
                    f"{tuple(getattr(w, 'shape', ()))}"
                )
            if w.numel() != total:
                raise ValueError(f"weight has {w.numel()} entries but the checkpoint's offsets end at {total}")
        sizes = (off[1:] - off[:-1]).cpu()
        classes = None
        if self.layout == "grouped":
            if cos is not None:
                classes = _classes_of_col(cos, D)
            elif not torch.equal(off.cpu(), self.offsets.cpu()):
                classes = None  # the distinct sizes
            else:
                classes = self.size_classes
            present = {int(x) for x in torch.unique(sizes)} - {0}
            if classes is not None and not present <= set(classes):
                raise ValueError(
                    f"sizes {sorted(present - set(classes))} have no slot in the checkpoint's "
                    f"col_of_size (size classes {classes})"
                )
        elif cos is not None:
            raise ValueError("the checkpoint has a col_of_size (grouped layout) but this table is padded")
        if not torch.equal(off.cpu(), self.offsets.cpu()) or (
            classes is not None and list(classes) != list(self.size_classes)
        ):
            if w is None:
                raise ValueError(
                    "the checkpoint has other sizes (offsets) but no weight: loading it would leave "
                    "the table without values"
                )
            plan = (off, sizes, classes)
        if getattr(self, "optimizer", None) is not None:
            self._check_optim_state(state_dict, prefix, V, total)
        return plan

    def _check_optim_state(self, state_dict, prefix, V, total):
        """Checks the attached consumer's state in a checkpoint against the buffers it declares."""
        for b in self.optimizer.state(_Shape(V, self.embedding_dim, torch.empty(total, device="meta"))):
            t = state_dict.get(prefix + b.name)
            if t is not None:
                b.check(t)

    def _relayout(self, off, sizes, classes):
        """Takes the checkpoint's sizes: offsets, derived layout, fresh weight / state of the new shape."""
        dev = self.offsets.device
        self.offsets = memory.fresh_table(off.to(dev, torch.int64), copy=True)
        if self.layout == "grouped":
            self._size_classes = classes
        self._set_layout(sizes)
        self.weight = nn.Parameter(  # the checkpoint's values are copied in next
            memory.empty(int(sizes.sum()), self.weight.dtype, self.weight.device),
            requires_grad=self.weight.requires_grad,
        )
        if self.projection is not None:
            self.projection = nn.Parameter(
                self._identity_projection().to(self.projection), requires_grad=self.projection.requires_grad
            )
        if getattr(self, "optimizer", None) is not None:
            for b in self.optimizer.state(self):
                old = self._buffers.get(b.name)
                if old is not None and not b.host and tuple(old.shape) != tuple(b.shape):
                    self._buffers[b.name] = old.new_zeros(b.shape)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .bfloat16() cast every floating buffer; the state of an attached
        # fused optimizer or scorer (pme.ops.RowConsumer) has its own dtype and device rules.
        # Off the meta device only to_empty (this table's or a parent's: both come here) can take
        # it (.to() refuses to copy out of meta): the offsets are then uninitialised until a
        # checkpoint is loaded (_check_loaded; a fused optimizer's state starts at zeros).
        was_meta = self.offsets.is_meta
        before = {} if was_meta else {n: _storage_of(getattr(self, n)) for n in ("weight", "offsets")}
        consumer = getattr(self, "optimizer", None)
        if consumer is None:
            super()._apply(fn, recurse)
        else:
            with consumer.state_kept(self):
                super()._apply(fn, recurse)
        if was_meta and not self.offsets.is_meta:
            self._unloaded = True
        for name, ptr in before.items():  # a cast or a move made new memory: on huge pages too (pme.memory)
            t = getattr(self, name)
            if ptr is not None and _storage_of(t) not in (ptr, None):
                fresh = memory.fresh_table(t.data)
                if fresh is not t.data:
                    t.data = fresh
        return self

    def _fused_step(self) -> bool:
        """Whether this call's backward takes the fused optimizer's step: an optimizer attached, in
        training with grad enabled, not frozen (``requires_grad_(False)``, ``freeze=True``), and
        values to update (not on the meta device)."""
        return (
            self.optimizer is not None
            and self.training
            and torch.is_grad_enabled()
            and not self._frozen
            and not self.weight.is_meta
        )

    def _renorm(self, input):
        """``max_norm``: renormalise the rows ``input`` looks up, in place (the fused path's share of
        what ops.embedding_bag / ops.embedding do themselves)."""
        if self.max_norm is not None:
            flat = ops._packed(input).values() if input.is_nested else input
            ops.embedding_renorm_(
                self.weight,
                self.offsets,
                flat,
                self.max_norm,
                self.norm_type,
                width=self.width,
                col_of_size=self.col_of_size,
            )

    def _apply_projection(self, out):
        p = self.projection  # (once: a registered parameter is read through nn.Module.__getattr__)
        return out if p is None else out @ p

    def _lookup_options(self) -> dict:
        """The table's keyword arguments of ops.embedding_bag and ops.embedding (a dict literal: it
        runs on every call, 1.7 us against 2.4 us for a comprehension over getattr). ``_trusted``:
        the table is this module's own, so a traced call skips the whole-table scan (pme.ops._table_call)."""
        return {
            "width": self.width,
            "col_of_size": self.col_of_size,
            "padding_idx": self.padding_idx,
            "max_norm": self.max_norm,
            "norm_type": self.norm_type,
            "scale_grad_by_freq": self.scale_grad_by_freq,
            "sparse": self.sparse,
            "_trusted": True,
        }

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, sizes, scores: torch.Tensor | None = None, order: str = "position", **kwargs
    ):
        """A table whose row ``i`` keeps ``sizes[i]`` entries of ``weight [V, D]``.

        Without ``scores`` a row keeps its first ``sizes[i]`` columns; with ``scores [V, D]`` it
        keeps its ``sizes[i]`` best-scored entries, packed by ``order`` (``"position"`` or
        ``"score"``). Other keyword arguments go to the constructor (mode, layout, ...).
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
        V, D = weight.shape
        sizes = parse_sizes(sizes, V, D).to(weight.device)
        w = weight.detach()
        if scores is None:
            scores = _first_columns(V, D, w.device)
        flat, _ = ops.prune_pack(w, scores.detach().float(), sizes, order)
        flat = memory.fresh_table(flat)  # ours alone: a copy on huge pages (pme.memory)
        kwargs.setdefault("dtype", weight.dtype)
        kwargs.setdefault("device", weight.device)
        return cls(V, D, sizes=sizes, _weight=flat, **kwargs)

    @classmethod
    def _pretrained(cls, args: dict):
        """``from_pretrained`` of a subclass from its arguments by name (its ``locals()``):
        ``embeddings``, ``freeze``, ``sizes`` and ``kwargs``; every other one is a constructor keyword
        (nn's ``from_pretrained`` takes them positionally)."""
        args = {k: v for k, v in args.items() if k not in ("cls", "__class__")}
        embeddings, freeze, sizes = args.pop("embeddings"), args.pop("freeze"), args.pop("sizes")
        if not isinstance(freeze, (bool, int)):
            raise TypeError(
                f"freeze must be a bool, got {type(freeze).__name__} (sizes is keyword-only: "
                "from_pretrained(embeddings, sizes=...))"
            )
        kwargs = {**args.pop("kwargs"), **args}
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            raise ops.ArgumentError(
                "Embeddings parameter is expected to be 2-dimensional [V, D], got shape "
                f"{tuple(getattr(embeddings, 'shape', ()))}"
            )
        if not embeddings.is_floating_point():
            raise TypeError(
                f"pme tables hold float32, float64, float16 or bfloat16 values, got {embeddings.dtype} "
                "embeddings (integer tables are not supported); pass embeddings.float()"
            )
        m = cls.from_dense(embeddings, sizes, **kwargs)
        # frozen means the whole lookup, the projection included, and no fused step either
        m.requires_grad_(not freeze)
        return m


def _table_args(args: dict) -> dict:
    """The arguments of ``_MultiSizeTable.__init__`` among a subclass constructor's ``locals()``:
    nn's by name, then ``sizes`` and pme's ``**options`` (an unknown one refused in the public
    class's name, with the list of pme's options)."""
    cls = type(args["self"]).__name__
    unknown = sorted(set(args["options"]) - set(_PME_OPTIONS))
    if unknown:
        raise TypeError(
            f"{cls}() got an unexpected keyword argument {unknown[0]!r} (pme's keyword options: "
            f"sizes, {', '.join(_PME_OPTIONS)}; the rest are nn's, in its positional order)"
        )
    return {**{k: args[k] for k in _TABLE_ARGS}, "sizes": args["sizes"], **args["options"]}


_PME_OPTIONS = [
    p.name for p in inspect.signature(_MultiSizeTable.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY
][1:]  # layout, size_classes, project, optimizer (after sizes)
_TABLE_ARGS = [
    p.name for p in inspect.signature(_MultiSizeTable.__init__).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD
][1:]  # nn's arguments, all but self


class MultiSizeEmbeddingBag(_MultiSizeTable):
    """Drop-in for ``nn.EmbeddingBag`` whose rows have different lengths.

    Args:
        num_embeddings: ``V``, rows of the table.
        embedding_dim: ``D``, the largest row and the output width (padded layout).
        sizes: (keyword-only, as the four options below) per-row lengths in ``[0, D]``: ``None``
            (all ``D``), an int, or ``V`` ints.
        mode: ``"sum"``, ``"mean"`` (default, as nn.EmbeddingBag) or ``"max"``.
        padding_idx, include_last_offset, device, dtype: as nn.EmbeddingBag.
        _weight: initial values: the flat buffer ``[sum(sizes)]``, or a dense ``[V, D]`` table
            (row ``i`` keeps its first ``sizes[i]`` values).
        layout: ``"padded"`` (output ``[B, D]``, a row of size s fills columns ``[0, s)``) or
            ``"grouped"`` (output ``[B, sum(size_classes)]``, one slot of columns per size).
        size_classes: the sizes of the grouped layout (default: the distinct sizes).
        project: grouped layout only: multiply the pooled output by a learned ``[sum(S), D]``
            projection (one ``s x D`` block per size, MDE-style), giving ``[B, D]``.
        optimizer: a ``pme.optim`` optimizer: ``loss.backward()`` then updates the table in
            place (fused sparse update) and ``weight`` gets no ``.grad``.
        options: ``layout``, ``size_classes``, ``project`` and ``optimizer`` by keyword (declared
            once, with their defaults, for both tables; an unknown keyword raises TypeError).

    max_norm, norm_type, scale_grad_by_freq, sparse: as nn.EmbeddingBag, on the dense view: rows
    looked up are renormalised in place (``max_norm``), each row's gradient is divided by its
    count in the batch (``scale_grad_by_freq``), and ``sparse=True`` makes ``weight.grad`` a
    coalesced sparse COO tensor ``[total]`` holding only the entries of the rows looked up (for
    ``torch.optim.SparseAdam``, ``SGD``, ``Adagrad``). ``mode="max"`` refuses the last two, as torch.

    The positional order is nn.EmbeddingBag's; pme's own arguments are keyword-only.

    Shapes: ``forward(input [N], offsets [B])``, ``forward(input [B, L])`` or a jagged nested
    ``input [B, j]`` -> ``[B, output_dim]`` of the table's dtype.
    """

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        mode="mean",
        sparse=False,
        _weight=None,
        include_last_offset=False,
        padding_idx=None,
        device=None,
        dtype=None,
        *,
        sizes=None,
        **options,
    ):
        if mode not in ops.MODES:
            raise ValueError(f"mode must be one of {sorted(ops.MODES)}, got {mode!r}")
        if mode == "max" and options.get("project"):
            raise ValueError(
                "mode='max' cannot take project=True: each size class's slot of columns takes its own "
                "max and the projection then adds the slots up, which is not the max over the bag; use "
                "the padded layout for max pooling (or the grouped layout without a projection)"
            )
        super().__init__(**_table_args(locals()))
        self.mode = mode
        self.include_last_offset = include_last_offset

    def forward(self, input, offsets=None, per_sample_weights=None):
        """``input [N]`` + ``offsets [B]`` (``[B + 1]`` with include_last_offset), or ``input [B, L]``.

        Returns ``[B, output_dim]``.
        """
        self._check_loaded()
        if self._fused_step():
            self._renorm(input)
            out = self.optimizer.lookup(self, input, offsets, per_sample_weights)
        else:
            out = ops.embedding_bag(
                self.weight,
                self.offsets,
                input,
                offsets,
                mode=self.mode,
                per_sample_weights=per_sample_weights,
                include_last_offset=self.include_last_offset,
                **self._lookup_options(),
            )
        return self._apply_projection(out)

    @classmethod
    def from_pretrained(
        cls,
        embeddings,
        freeze=True,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        mode="mean",
        sparse=False,
        include_last_offset=False,
        padding_idx=None,
        *,
        sizes=None,
        **kwargs,
    ):
        """As ``nn.EmbeddingBag.from_pretrained`` (same positional order), plus keyword-only ``sizes``.

        ``embeddings [V, D]`` floating point (integer tables are refused); row ``i`` keeps its first
        ``sizes[i]`` values (default: all ``D``; ``scores=`` and ``order=`` as in :meth:`from_dense`);
        ``freeze=True`` (the default, as in torch) makes ``weight`` not require a gradient.
        """
        return cls._pretrained(locals())

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", mode={self.mode!r}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        return s + self._optimizer_repr()

    @classmethod
    def from_embedding_bag(cls, module: nn.EmbeddingBag, sizes, init: str = "kept", scores=None, **kwargs):
        """Multi-size copy of an ``nn.EmbeddingBag`` (mode, padding_idx, include_last_offset,
        max_norm, norm_type, scale_grad_by_freq and sparse kept), or of a padded-layout
        ``MultiSizeEmbeddingBag`` at new sizes (its dense view; also its fused optimizer, with fresh state).

        ``init="kept"`` keeps each row's first ``sizes[i]`` values (or its best by ``scores``);
        ``init="fresh"`` draws new values with the standard deviation of the original table.
        """
        return _convert_table(cls, module, nn.EmbeddingBag, sizes, init, scores, kwargs)


class MultiSizeEmbedding(_MultiSizeTable):
    """Drop-in for ``nn.Embedding`` whose rows have different lengths.

    ``forward(input)`` takes indices of any shape (int32/int64) and returns
    ``[*input.shape, output_dim]``, zero-padded; the padding row is returned as stored and gets no
    gradient, as in ``nn.Embedding``. Arguments as ``MultiSizeEmbeddingBag`` (no mode), in
    nn.Embedding's positional order; pme's own arguments are keyword-only. A jagged nested input
    ``[B, j]`` gives a nested ``[B, j, output_dim]``.
    """

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        padding_idx=None,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        sparse=False,
        _weight=None,
        _freeze=False,
        device=None,
        dtype=None,
        *,
        sizes=None,
        **options,
    ):
        super().__init__(**_table_args(locals()))
        if _freeze:  # (with a fused optimizer: no step)
            self.requires_grad_(False)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._optimizer_repr()

    def forward(self, input):
        self._check_loaded()
        if self._fused_step():
            self._renorm(input)
            nested = input.is_nested
            if nested:
                input = ops._packed(input)
            flat = input.values() if nested else input.reshape(-1)
            bo = torch.arange(flat.numel() + 1, dtype=flat.dtype, device=flat.device)
            out = self.optimizer.lookup(
                self, flat, bo, None, include_last_offset=True, mode="sum", forward_padding=False
            )
            out = (
                torch.nested.nested_tensor_from_jagged(out, input.offsets())
                if nested
                else out.reshape(*input.shape, self.width)
            )
        else:
            out = ops.embedding(self.weight, self.offsets, input, **self._lookup_options())
        return self._apply_projection(out)

    @classmethod
    def from_pretrained(
        cls,
        embeddings,
        freeze=True,
        padding_idx=None,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        sparse=False,
        *,
        sizes=None,
        **kwargs,
    ):
        """As ``nn.Embedding.from_pretrained`` (same positional order), plus keyword-only ``sizes``
        (see ``MultiSizeEmbeddingBag.from_pretrained``)."""
        return cls._pretrained(locals())

    @classmethod
    def from_embedding(cls, module: nn.Embedding, sizes, init: str = "kept", scores=None, **kwargs):
        """Multi-size copy of an ``nn.Embedding`` or a ``MultiSizeEmbedding`` (see
        ``MultiSizeEmbeddingBag.from_embedding_bag``)."""
        return _convert_table(cls, module, nn.Embedding, sizes, init, scores, kwargs)


# What a copy of an nn table keeps of it (the arguments of its constructor of those names).
_KEPT_ATTRS = {
    nn.Embedding: ("max_norm", "norm_type", "scale_grad_by_freq", "sparse", "padding_idx"),
    nn.EmbeddingBag: (
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
        "padding_idx",
        "mode",
        "include_last_offset",
    ),
}


def _convert_table(cls, module, nn_type, sizes, init, scores, kwargs):
    """``cls.from_embedding_bag`` / ``from_embedding``: a multi-size copy of ``module`` (an
    ``nn_type``, or a pme table of the padded layout standing for one) keeping its ``_KEPT_ATTRS``
    (and a pme table's fused optimizer, whose state starts fresh) unless ``kwargs`` gives them."""
    if isinstance(module, cls):
        if module.layout != "padded":
            raise ValueError(
                "convert takes pme tables of the padded layout (their dense view is [V, D]); this one is "
                "grouped: convert its to_dense() through nn.EmbeddingBag.from_pretrained, or rebuild it"
            )
        kwargs.setdefault("optimizer", module.optimizer)
        dense, stored = module.to_dense(), module.weight
    elif isinstance(module, nn_type):
        dense = stored = module.weight
    else:
        raise TypeError(f"expected an nn.{nn_type.__name__} or a {cls.__name__}, got {type(module).__name__}")
    for attr in _KEPT_ATTRS[nn_type]:
        kwargs.setdefault(attr, getattr(module, attr))
    if init not in ("kept", "fresh"):
        raise ValueError(f"init must be 'kept' or 'fresh', got {init!r}")
    w = dense.detach()
    if init == "kept":
        m = cls.from_dense(w, sizes, scores=scores, **kwargs)
    else:
        V, D = w.shape
        kwargs.setdefault("dtype", w.dtype)
        kwargs.setdefault("device", w.device)
        m = cls(V, D, sizes=sizes, **kwargs)
        std = float(stored.detach().float().std()) if stored.numel() > 1 else 1.0
        with torch.no_grad():
            m.weight.normal_(0.0, std)
        m._zero_padding_row()
    # a frozen table stays frozen (with a fused optimizer, whose weight needs no gradient: no step)
    frozen = module._frozen if getattr(module, "optimizer", None) is not None else not stored.requires_grad
    if frozen:
        m.requires_grad_(False)
    return m


def _check_targets(modules: dict, sizes_by_module: Mapping) -> None:
    """Refuses the model itself as a target (there is no attribute to swap) and two names of one
    shared (tied) table, which would get two sets of sizes."""
    if "" in sizes_by_module:
        raise ValueError(
            "convert swaps tables inside a model, and the name '' is the model itself; build the "
            "table directly (e.g. MultiSizeEmbeddingBag.from_embedding_bag(table, sizes))"
        )
    seen = {}
    for name in sizes_by_module:
        mod = modules.get(name)
        if mod is not None and id(mod) in seen:
            raise ValueError(
                f"{seen[id(mod)]!r} and {name!r} are the same (tied) table: give its sizes once, "
                "every reference to it is swapped"
            )
        seen[id(mod)] = name


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Puts ``new`` wherever ``model`` holds ``old`` as a submodule (every alias of a shared table,
    inside ModuleDict / ModuleList / Sequential too). Returns how many references were swapped."""
    n = 0
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new
                n += 1
    return n


def convert(
    model: nn.Module, sizes_by_module: Mapping[str, object], init: str = "kept", scores=None, **kwargs
) -> nn.Module:
    """Swaps every ``nn.EmbeddingBag`` / ``nn.Embedding`` named in ``sizes_by_module``, in place, for a
    multi-size table (a padded-layout pme table named there is rebuilt at the new sizes from its dense
    view, its fused optimizer kept with fresh state).

    Args:
        model: any module; tables are found by their ``named_modules()`` names.
        sizes_by_module: ``{name: sizes}``; sizes as ``MultiSizeEmbeddingBag`` takes them.
        init: ``"kept"`` (keep the first/best entries of each row) or ``"fresh"``.
        scores: optional ``{name: [V, D] scores}`` choosing which entries ``init="kept"`` keeps.
        kwargs: passed to every new module (e.g. ``layout="grouped", project=True``).

    Returns ``model``. Raises ``KeyError`` for a name that is not an embedding table.
    """
    if not isinstance(sizes_by_module, Mapping):
        raise TypeError("sizes_by_module must be a mapping {module name: sizes}")
    modules = dict(model.named_modules(remove_duplicate=False))
    _check_targets(modules, sizes_by_module)
    stray = sorted(set(scores or {}) - set(sizes_by_module))
    if stray:
        raise KeyError(f"scores name {stray}, which are not among the tables to convert {sorted(sizes_by_module)}")
    if scores and init != "kept":
        raise ValueError("scores choose which entries init='kept' keeps; init='fresh' draws new values and uses none")
    for name, sizes in sizes_by_module.items():
        mod = modules.get(name)
        if isinstance(mod, (nn.EmbeddingBag, MultiSizeEmbeddingBag)):
            new = MultiSizeEmbeddingBag.from_embedding_bag(
                mod, sizes, init=init, scores=(scores or {}).get(name), **kwargs
            )
        elif isinstance(mod, (nn.Embedding, MultiSizeEmbedding)):
            new = MultiSizeEmbedding.from_embedding(mod, sizes, init=init, scores=(scores or {}).get(name), **kwargs)
        else:
            raise KeyError(
                f"{name!r} is not an embedding table of the model (nn.EmbeddingBag, nn.Embedding or a pme "
                f"table; found {type(mod).__name__ if mod is not None else 'nothing'})"
            )
        replace_module(model, mod, new)
    return model
