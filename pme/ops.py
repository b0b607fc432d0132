"""Public functional API of pme, and the Python side of its operators.

The compiled operators (``torch.ops.pme.*``, schemas in ``csrc/registration.cpp``) get their
fake (meta) kernels and autograd formulas here, next to the public wrappers that validate the
arguments and turn nn.EmbeddingBag-style inputs into the operators' normal form. When the
compiled extension is not loaded, the same wrappers run ``pme.reference`` instead.

Normal form of a lookup (what the operators take):

- ``weight`` ``[total]`` float32/float64/float16/bfloat16, ``offsets`` ``[V + 1]`` int64.
- ``indices`` ``[N]`` and ``bag_offsets`` ``[B + 1]``, both int32 or both int64.
- ``col_of_size`` ``[D + 1]`` int64 (``grouped`` layout) or ``None`` (``padded``).
- ``pooling`` (the mode) 0 sum, 1 mean, 2 max; ``padding_idx`` -1 for none.
"""

from __future__ import annotations

import warnings

import torch

from . import reference

__all__ = [
    "backend",
    "embedding_bag",
    "embedding",
    "embedding_renorm_",
    "to_dense",
    "sparse_update_",
    "accumulate_scores_",
    "topk_threshold",
    "prune_counts",
    "prune_pack",
    "MODES",
    "OPTIMIZERS",
    "SCORE_RULES",
]

MODES = {"sum": 0, "mean": 1, "max": 2}
OPTIMIZERS = {"sgd": 0, "rowwise_adagrad": 1, "adam": 2}
SCORE_RULES = {"snip": 0, "grad": 1}
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
acc_dtype = reference.acc_dtype  # accumulation / optimizer-state dtype of a table dtype


# Errors of the types PyTorch raises for the same mistake, so that code (and tests) written
# against nn.Embedding / nn.EmbeddingBag catch them; each is also the type pme raised before.
class IndexOutOfRangeError(IndexError, RuntimeError):
    """An index outside the table: nn.Embedding raises IndexError, nn.EmbeddingBag RuntimeError."""


class DtypeError(TypeError, RuntimeError):
    """A tensor of the wrong dtype (indices, offsets, per_sample_weights): torch raises RuntimeError."""


class ArgumentError(ValueError, AssertionError, RuntimeError):
    """A bad constructor argument or padding_idx: nn.Embedding / nn.EmbeddingBag assert
    (AssertionError), F.embedding_bag and a negative size raise RuntimeError."""


def _torch_error_types(fn, *args):
    """Runs a compiled lookup; an out-of-range index comes back as IndexOutOfRangeError."""
    try:
        return fn(*args)
    except RuntimeError as e:
        if "index out of range" in str(e) and not isinstance(e, IndexError):
            raise IndexOutOfRangeError(str(e)) from None
        raise


# --------------------------------------------------------------------------------------------
# Loading the compiled extension
# --------------------------------------------------------------------------------------------
def _wheel_hint() -> str:
    """The pip command that installs the pme flavour matching the installed torch."""
    from ._version import __version__

    want = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    return (f"pip install --force-reinstall --no-deps 'pme=={__version__.split('+')[0]}+{want}' "
            f"--extra-index-url https://<WHEEL_HOST>/whl/{want}/ (see README, Wheels), or build from source "
            f"with `pip install --no-build-isolation --no-cache-dir --force-reinstall pme`")


def _why_not_loaded(e: BaseException) -> str:
    """What went wrong loading ``pme._C``, in terms of what to install."""
    import importlib.util
    import re
    from importlib import metadata

    try:
        flavour = metadata.version("pme").partition("+")[2]
    except metadata.PackageNotFoundError:
        flavour = ""
    have = f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'})"
    text = f"{type(e).__name__}: {e}"
    if importlib.util.find_spec("pme._C") is None:
        return (f"this installation of pme has no compiled extension (installed from source without a working C++ "
                f"compiler, or with PME_NO_EXTENSION=1). For {have}: {_wheel_hint()}")
    if re.search(r"lib(torch_cuda|c10_cuda|cudart)\.so", str(e)):
        return (f"{text}. This pme{'+' + flavour if flavour else ''} binary has CUDA kernels for another CUDA than "
                f"{have}. Install the matching pme: {_wheel_hint()}")
    if "undefined symbol" in str(e):
        return f"{text}. pme's binary needs torch >= 2.10 (LibTorch stable ABI) but {have} is installed: upgrade torch"
    return text


def _load():
    """Imports ``pme._C``; returns (build info dict or None, reason it failed or None)."""
    try:
        from . import _C
    except (ImportError, OSError) as e:  # missing binary, or built for another torch/CUDA
        return None, _why_not_loaded(e)
    info = dict(kv.split("=", 1) for kv in _C.build_info().split(";") if "=" in kv)
    built = info.get("cuda", "none")
    have = torch.version.cuda
    if built != "none" and have is not None and built.split(".")[0] != have.split(".")[0]:
        raise ImportError(
            f"pme was built for CUDA {built} but torch {torch.__version__} uses CUDA {have}: the CUDA majors "
            f"differ. Install the pme wheel of your CUDA flavour: {_wheel_hint()}")
    return info, None


BUILD_INFO, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"pme: the compiled extension could not be loaded ({LOAD_ERROR}); running on the slow "
                  "pure-PyTorch reference (pme/reference.py). pme.info() tells the backend.", RuntimeWarning,
                  stacklevel=2)


def backend() -> str:
    """``"compiled"`` when the C++/CUDA kernels are in use, ``"reference"`` otherwise."""
    return "compiled" if BUILD_INFO is not None else "reference"


def _compiled(t: torch.Tensor) -> bool:
    """Whether the compiled kernels serve tensors on ``t``'s device."""
    if BUILD_INFO is None:
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda":
        if BUILD_INFO.get("cuda", "none") == "none":
            raise RuntimeError("pme: this build of pme has no CUDA kernels (a CPU-only build) but got CUDA "
                               "tensors; install a +cuXXX wheel or rebuild with FORCE_CUDA=1")
        return True
    return False


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd for the compiled operators
# --------------------------------------------------------------------------------------------
if BUILD_INFO is not None:

    @torch.library.register_fake("pme::bag_forward")
    def _(weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, out_width, mode, padding_idx):
        B = bag_offsets.shape[0] - 1
        out = weight.new_empty(B, out_width)
        argmax = offsets.new_empty((B, out_width) if mode == 2 else (0, 0))
        return out, argmax

    @torch.library.register_fake("pme::bag_backward")
    def _(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
          padding_idx, psw_grad):
        return torch.empty_like(weight), weight.new_empty(indices.shape[0] if psw_grad else 0)

    @torch.library.register_fake("pme::bag_backward_sparse")
    def _(grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax, mode,
          padding_idx, scale_grad_by_freq):
        nnz = torch.library.get_ctx().new_dynamic_size()
        return offsets.new_empty(nnz), weight.new_empty(nnz)

    @torch.library.register_fake("pme::embedding_forward")
    def _(weight, offsets, indices, col_of_size, out_width):
        return weight.new_empty(indices.shape[0], out_width)

    @torch.library.register_fake("pme::embedding_backward")
    def _(grad_out, weight, offsets, indices, col_of_size, padding_idx):
        return torch.empty_like(weight)

    @torch.library.register_fake("pme::sparse_update_")
    def _(weight, state1, state2, grad_out, offsets, indices, bag_offsets, per_sample_weights, col_of_size,
          argmax, mode, padding_idx, optimizer, lr, weight_decay, eps, beta1, beta2, step):
        return None

    @torch.library.register_fake("pme::accumulate_scores_")
    def _(scores, grad_out, weight, offsets, indices, bag_offsets, per_sample_weights, col_of_size, argmax,
          mode, padding_idx, rule):
        return None

    @torch.library.register_fake("pme::topk_threshold")
    def _(scores, k):
        return scores.new_empty(())

    @torch.library.register_fake("pme::prune_counts")
    def _(scores, threshold):
        return scores.new_empty(scores.shape[0], dtype=torch.int64)

    @torch.library.register_fake("pme::prune_pack")
    def _(dense, scores, offsets, by_score):
        total = torch.library.get_ctx().new_dynamic_size()
        return dense.new_empty(total)

    def _bag_setup(ctx, inputs, output):
        weight, offsets, indices, bag_offsets, psw, col_of_size, out_width, mode, padding_idx = inputs
        ctx.mode, ctx.padding_idx = mode, padding_idx
        ctx.psw_grad = psw is not None and ctx.needs_input_grad[4]
        ctx.save_for_backward(weight, offsets, indices, bag_offsets, psw, col_of_size, output[1])

    def _bag_backward(ctx, grad_out, _grad_argmax):
        weight, offsets, indices, bag_offsets, psw, col_of_size, argmax = ctx.saved_tensors
        gw, gp = torch.ops.pme.bag_backward(grad_out.contiguous(), weight, offsets, indices, bag_offsets, psw,
                                            col_of_size, argmax, ctx.mode, ctx.padding_idx, ctx.psw_grad)
        return gw, None, None, None, (gp if ctx.psw_grad else None), None, None, None, None

    torch.library.register_autograd("pme::bag_forward", _bag_backward, setup_context=_bag_setup)

    def _emb_setup(ctx, inputs, output):
        weight, offsets, indices, col_of_size, out_width = inputs
        ctx.save_for_backward(weight, offsets, indices, col_of_size)

    def _emb_backward(ctx, grad_out):
        weight, offsets, indices, col_of_size = ctx.saved_tensors
        gw = torch.ops.pme.embedding_backward(grad_out.contiguous(), weight, offsets, indices, col_of_size,
                                              getattr(ctx, "padding_idx", -1))
        return gw, None, None, None, None

    torch.library.register_autograd("pme::embedding_forward", _emb_backward, setup_context=_emb_setup)


# --------------------------------------------------------------------------------------------
# Argument normalisation (shared by every public lookup function)
# --------------------------------------------------------------------------------------------
def check_table(weight: torch.Tensor, offsets: torch.Tensor, col_of_size: torch.Tensor | None = None):
    """Checks dtypes, shapes and devices of a flat table (cheap: no data is read)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"weight must be a 1-D tensor (the flat buffer), got shape {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.numel() < 1:
        raise ValueError(f"offsets must be a 1-D int64 tensor of V + 1 entries, got dtype {offsets.dtype} and "
                         f"shape {tuple(offsets.shape)}")
    if offsets.device != weight.device:
        raise ValueError(f"offsets is on {offsets.device} but weight is on {weight.device}")
    if col_of_size is not None and (col_of_size.device != weight.device or col_of_size.dtype != torch.int64):
        raise ValueError("col_of_size must be int64 on the device of weight")


def normalize_padding_idx(padding_idx, num_embeddings: int) -> int:
    """nn.EmbeddingBag's padding_idx (None, or a row index that may be negative) -> -1 or a row."""
    if padding_idx is None:
        return -1
    if not isinstance(padding_idx, int) or isinstance(padding_idx, bool):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ArgumentError(f"padding_idx {padding_idx} is out of range for {num_embeddings} embeddings "
                         f"(valid: {-num_embeddings} to {num_embeddings - 1})")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


class _PswModeError(ValueError, NotImplementedError):
    """per_sample_weights with a mode other than sum (torch raises NotImplementedError)."""


def _unnest_bags(input, offsets, per_sample_weights):
    """A jagged nested tensor of bags ``[B, j]`` -> (flat indices, ``[B + 1]`` offsets, flat weights)."""
    if input.layout != torch.jagged:
        raise ValueError("a nested input must have layout=torch.jagged (one bag per component), as "
                         "nn.EmbeddingBag takes it; build it with torch.nested.nested_tensor(..., layout=torch.jagged)")
    if offsets is not None:
        raise ValueError("offsets must be None when input is a nested tensor (its own offsets give the bags)")
    if input.dim() != 2:
        raise ValueError(f"a nested input must be [B, j] (one bag of indices per component), got {input.dim()} "
                         "dimensions")
    if per_sample_weights is not None:
        if not per_sample_weights.is_nested:
            raise ValueError("if input is nested, per_sample_weights must be nested too (as in torch)")
        per_sample_weights = per_sample_weights.values().reshape(-1)
    values = input.values().reshape(-1)
    return values, input.offsets().to(values.dtype), per_sample_weights


def bag_inputs(weight, input, offsets=None, per_sample_weights=None, mode="mean", include_last_offset=False):
    """nn.EmbeddingBag-style ``(input, offsets, per_sample_weights)`` -> the operators' normal form.

    Returns ``(indices [N], bag_offsets [B + 1], per_sample_weights [N] or None, mode int)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if input.is_nested:
        input, offsets, per_sample_weights = _unnest_bags(input, offsets, per_sample_weights)
        include_last_offset = True
    if input.dtype not in INDEX_DTYPES:
        raise DtypeError(f"input (indices) must be int32 or int64, got {input.dtype}")
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but the table is on {weight.device}")
    if per_sample_weights is not None:
        if mode != "sum":
            raise _PswModeError(f"per_sample_weights are only supported with mode='sum', got mode={mode!r}")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"per_sample_weights has shape {tuple(per_sample_weights.shape)} but input has "
                             f"shape {tuple(input.shape)}; they must match")
        if per_sample_weights.dtype != weight.dtype:
            raise DtypeError(f"per_sample_weights ({per_sample_weights.dtype}) must have the dtype of the table "
                            f"({weight.dtype})")
        if per_sample_weights.device != weight.device:
            raise ValueError(f"per_sample_weights is on {per_sample_weights.device} but the table is on "
                             f"{weight.device}")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D [B, L] (each row is a bag)")
        B, L = input.shape
        indices = input.reshape(-1)
        bag_offsets = torch.arange(0, B * L + 1, max(L, 1), dtype=input.dtype, device=input.device)
        if L == 0:
            bag_offsets = torch.zeros(B + 1, dtype=input.dtype, device=input.device)
        psw = per_sample_weights.reshape(-1) if per_sample_weights is not None else None
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets must be given when input is 1-D")
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1:
            raise ValueError(f"offsets must be a 1-D tensor, got {type(offsets).__name__} of shape "
                             f"{tuple(getattr(offsets, 'shape', ()))}")
        if offsets.dtype not in INDEX_DTYPES:
            raise DtypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
        if offsets.device != weight.device:
            raise ValueError(f"offsets is on {offsets.device} but the table is on {weight.device}")
        indices, psw = input, per_sample_weights
        if offsets.dtype != indices.dtype:  # as torch does: promote both to int64
            indices, offsets = indices.long(), offsets.long()
        if include_last_offset:
            if offsets.numel() < 1:
                raise ValueError("offsets must have at least one entry when include_last_offset=True")
            bag_offsets = offsets
        else:
            bag_offsets = torch.cat([offsets, offsets.new_full((1,), indices.numel())])
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D [B, L], got {input.dim()} dimensions")
    return indices.contiguous(), bag_offsets.contiguous(), (psw.contiguous() if psw is not None else None), MODES[mode]


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def embedding_bag(weight, offsets, input, input_offsets=None, *, width, col_of_size=None, mode="mean",
                  per_sample_weights=None, padding_idx=None, include_last_offset=False, max_norm=None,
                  norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    """Pooled lookup into a flat multi-size table, like ``F.embedding_bag`` on its dense view.

    Args:
        weight: ``[total]`` float tensor, the rows back to back.
        offsets: ``[V + 1]`` int64, row ``i`` is ``weight[offsets[i]:offsets[i+1]]``.
        input: ``[N]`` indices with ``input_offsets``, ``[B, L]`` (one bag per row), or a jagged
            nested tensor ``[B, j]`` (one bag per component); int32/int64.
        input_offsets: ``[B]`` (or ``[B + 1]`` with ``include_last_offset``) bag starts.
        width: output width (``D`` for the padded layout, ``sum(size classes)`` for grouped).
        col_of_size: ``[D + 1]`` int64 first output column per size (grouped) or ``None``.
        mode: ``"sum"``, ``"mean"`` or ``"max"``.
        per_sample_weights: like ``input``, dtype of ``weight``, ``mode="sum"`` only.
        padding_idx: row skipped in every bag (not counted in the mean); may be negative.
        max_norm, norm_type: every row looked up whose ``norm_type``-norm exceeds ``max_norm`` is
            rescaled in place first (:func:`embedding_renorm_`, as torch does).
        scale_grad_by_freq: each row's gradient divided by its number of lookups in the batch.
        sparse: the gradient of ``weight`` is a coalesced sparse COO tensor ``[total]`` holding
            only the entries of the rows looked up (for torch.optim.SparseAdam / SGD / Adagrad).

    Returns:
        ``[B, width]`` tensor of ``weight``'s dtype (accumulated in float32, or float64).
    """
    check_table(weight, offsets, col_of_size)
    V = offsets.numel() - 1
    pad = normalize_padding_idx(padding_idx, V)
    indices, bag_offsets, psw, m = bag_inputs(weight, input, input_offsets, per_sample_weights, mode,
                                              include_last_offset)
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency (as in torch)")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights (as in torch)")
    if max_norm is not None:
        embedding_renorm_(weight, offsets, indices, max_norm, norm_type, width=width, col_of_size=col_of_size)
    if (sparse or scale_grad_by_freq) and torch.is_grad_enabled() and weight.requires_grad:
        if sparse:
            _keep_coalesced_flag(weight)
        return _SparseGradLookup.apply(weight, psw, offsets, indices, bag_offsets, col_of_size, int(width), m, pad,
                                       pad, bool(sparse), bool(scale_grad_by_freq))
    if _compiled(weight):
        out, _ = _torch_error_types(torch.ops.pme.bag_forward, weight, offsets, indices, bag_offsets, psw,
                                    col_of_size, int(width), m, pad)
        return out
    _check_reference_lookup(indices, bag_offsets, offsets, weight, col_of_size, width)
    return reference.embedding_bag(weight, offsets, indices, bag_offsets, width, col_of_size, mode, psw,
                                   None if pad < 0 else pad)


def embedding(weight, offsets, input, *, width, col_of_size=None, padding_idx=None, max_norm=None, norm_type=2.0,
              scale_grad_by_freq=False, sparse=False):
    """Non-pooled lookup ``[*input.shape, width]``, like ``F.embedding`` on the dense view.

    The padding row is returned as stored and receives no gradient, as in ``F.embedding``.
    ``input`` may be a jagged nested tensor ``[B, j]`` (the output is then ``[B, j, width]``,
    nested). ``max_norm``, ``norm_type``, ``scale_grad_by_freq``, ``sparse`` as in
    :func:`embedding_bag`.
    """
    check_table(weight, offsets, col_of_size)
    pad = normalize_padding_idx(padding_idx, offsets.numel() - 1)
    if isinstance(input, torch.Tensor) and input.is_nested:
        if input.layout != torch.jagged:
            raise ValueError("a nested input must have layout=torch.jagged; build it with "
                             "torch.nested.nested_tensor(..., layout=torch.jagged)")
        out = embedding(weight, offsets, input.values(), width=width, col_of_size=col_of_size,
                        padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                        scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
        return torch.nested.nested_tensor_from_jagged(out, input.offsets())
    if not isinstance(input, torch.Tensor) or input.dtype not in INDEX_DTYPES:
        raise DtypeError(f"input must be an int32 or int64 tensor, got {getattr(input, 'dtype', type(input))}")
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but the table is on {weight.device}")
    flat = input.reshape(-1).contiguous()
    if max_norm is not None:
        embedding_renorm_(weight, offsets, flat, max_norm, norm_type, width=width, col_of_size=col_of_size)
    if (sparse or scale_grad_by_freq) and torch.is_grad_enabled() and weight.requires_grad:
        if sparse:
            _keep_coalesced_flag(weight)
        out = _SparseGradLookup.apply(weight, None, offsets, flat, None, col_of_size, int(width), MODES["sum"], -1,
                                      pad, bool(sparse), bool(scale_grad_by_freq))
        return out.reshape(*input.shape, width)
    if _compiled(weight):
        if pad >= 0:
            out = _torch_error_types(_EmbeddingPadded.apply, weight, offsets, flat, col_of_size, int(width), pad)
        else:
            out = _torch_error_types(torch.ops.pme.embedding_forward, weight, offsets, flat, col_of_size, int(width))
        return out.reshape(*input.shape, width)
    bo = torch.arange(flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    _check_reference_lookup(flat, bo, offsets, weight, col_of_size, width)
    return reference.embedding(weight, offsets, input, width, col_of_size, None if pad < 0 else pad)


def _entries_of_rows(offsets: torch.Tensor, rows: torch.Tensor):
    """Flat positions of all stored entries of ``rows`` (in order) and, for each, its row's slot."""
    lo = offsets[rows]
    sizes = offsets[rows + 1] - lo
    slot = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), sizes)
    start = torch.cumsum(sizes, 0) - sizes  # first output position of each row
    return lo[slot] + torch.arange(slot.numel(), device=rows.device) - start[slot], slot


def embedding_renorm_(weight, offsets, input, max_norm, norm_type=2.0, *, width, col_of_size=None):
    """In place, as ``torch.embedding_renorm_`` on the dense view: every row looked up in ``input``
    (any shape) whose ``norm_type``-norm exceeds ``max_norm`` is multiplied by
    ``max_norm / (norm + 1e-7)``. The padded zeros do not change a norm (for ``norm_type > 0``),
    so only the stored entries are touched; vectorised on the flat buffer. Returns ``weight``.
    """
    if not isinstance(input, torch.Tensor) or input.dtype not in INDEX_DTYPES:
        raise DtypeError(f"input must be an int32 or int64 tensor, got {getattr(input, 'dtype', type(input))}")
    with torch.no_grad():
        rows = torch.unique(input.reshape(-1)).long()  # sorted, as torch visits them
        if rows.numel() == 0:
            return weight
        V = offsets.numel() - 1
        if int(rows[0]) < 0 or int(rows[-1]) >= V:
            bad = int(rows[0]) if int(rows[0]) < 0 else int(rows[-1])
            raise IndexOutOfRangeError(f"pme: index out of range: {bad} but the table has {V} rows (max_norm)")
        dense = embedding(weight.detach(), offsets, rows, width=width, col_of_size=col_of_size)  # [U, width]
        norms = torch.linalg.vector_norm(dense, ord=norm_type, dim=1).double()
        over = norms > max_norm
        if not bool(over.any()):
            return weight
        scale = (max_norm / (norms[over] + 1e-7)).to(acc_dtype(weight.dtype))
        entries, slot = _entries_of_rows(offsets, rows[over])
        w = weight.data
        w[entries] = (w[entries].to(scale.dtype) * scale[slot]).to(w.dtype)
    return weight


# Sparse gradients this module produced, coalesced: (values ptr, indices ptr, nnz) -> True. See
# _keep_coalesced_flag. Bounded: entries whose hook never ran are dropped oldest first.
_COALESCED: dict = {}


def _keep_coalesced_flag(weight):
    """AccumulateGrad stores a sparse gradient as a new tensor without its coalesced flag, so
    torch.optim would sort its (one per entry) indices again; this hook, once per parameter,
    restores the flag when ``.grad`` is exactly a gradient produced here (the sum of two
    backward passes is a new tensor and stays uncoalesced, as it should)."""
    hooks = getattr(weight, "_post_accumulate_grad_hooks", None) or {}
    if weight.is_leaf and weight.requires_grad and _restore_coalesced not in hooks.values():
        weight.register_post_accumulate_grad_hook(_restore_coalesced)


def _restore_coalesced(param):
    g = param.grad
    if g is not None and g.is_sparse and not g.is_coalesced():
        if _COALESCED.pop((g._values().data_ptr(), g._indices().data_ptr(), g._nnz()), False):
            g._coalesced_(True)


def _remember_coalesced(gw):
    while len(_COALESCED) >= 64:
        _COALESCED.pop(next(iter(_COALESCED)))
    _COALESCED[(gw._values().data_ptr(), gw._indices().data_ptr(), gw._nnz())] = True


class _SparseGradLookup(torch.autograd.Function):
    """A lookup whose weight gradient comes from ``pme::bag_backward_sparse``: a coalesced sparse
    COO tensor ``[total]`` (``sparse=True``) or, with only ``scale_grad_by_freq``, its dense
    scatter. ``bag_offsets=None`` is the non-pooled lookup (nn.Embedding). ``fwd_pad`` is the
    padding row the forward skips (-1 for the non-pooled lookup, which returns it as stored),
    ``bwd_pad`` the one that gets no gradient."""

    @staticmethod
    def forward(ctx, weight, psw, offsets, indices, bag_offsets, col_of_size, width, mode, fwd_pad, bwd_pad, sparse,
                scale):
        argmax = None
        if bag_offsets is None:
            bag_offsets = torch.arange(indices.numel() + 1, dtype=indices.dtype, device=indices.device)
            if _compiled(weight):
                out = _torch_error_types(torch.ops.pme.embedding_forward, weight, offsets, indices, col_of_size,
                                         width)
            else:
                _check_reference_lookup(indices, bag_offsets, offsets, weight, col_of_size, width)
                out = reference.embedding(weight, offsets, indices, width, col_of_size)
        elif _compiled(weight):
            out, argmax = _torch_error_types(torch.ops.pme.bag_forward, weight, offsets, indices, bag_offsets, psw,
                                             col_of_size, width, mode, fwd_pad)
        else:
            _check_reference_lookup(indices, bag_offsets, offsets, weight, col_of_size, width)
            out = reference.embedding_bag(weight, offsets, indices, bag_offsets, width, col_of_size,
                                          _MODE_NAMES[mode], psw, None if fwd_pad < 0 else fwd_pad)
        ctx.save_for_backward(weight, psw, offsets, indices, bag_offsets, col_of_size, argmax)
        ctx.width, ctx.mode, ctx.bwd_pad, ctx.sparse, ctx.scale = width, mode, bwd_pad, sparse, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, psw, offsets, indices, bag_offsets, col_of_size, argmax = ctx.saved_tensors
        go = grad_out.contiguous()
        gw = gp = None
        am = argmax if argmax is not None else offsets.new_empty(0, 0)
        if ctx.needs_input_grad[0]:
            if _compiled(weight):
                ent, val = torch.ops.pme.bag_backward_sparse(go, weight, offsets, indices, bag_offsets, psw,
                                                             col_of_size, am, ctx.mode, ctx.bwd_pad, ctx.scale)
            else:
                ent, val = reference.bag_backward_sparse(go, weight, offsets, indices, bag_offsets, ctx.width,
                                                         col_of_size, _MODE_NAMES[ctx.mode], psw,
                                                         None if ctx.bwd_pad < 0 else ctx.bwd_pad, ctx.scale)
            if ctx.sparse:
                gw = torch.sparse_coo_tensor(ent.unsqueeze(0), val, (weight.numel(),), is_coalesced=True,
                                             check_invariants=False)
                _remember_coalesced(gw)
            else:
                gw = torch.zeros_like(weight).index_put_((ent,), val)
        if psw is not None and ctx.needs_input_grad[1]:
            if _compiled(weight):
                _, gp = torch.ops.pme.bag_backward(go, weight, offsets, indices, bag_offsets, psw, col_of_size, am,
                                                   ctx.mode, ctx.bwd_pad, True)
            else:
                with torch.enable_grad():
                    p = psw.detach().requires_grad_(True)
                    out = reference.embedding_bag(weight.detach(), offsets, indices, bag_offsets, ctx.width,
                                                  col_of_size, "sum", p, None if ctx.bwd_pad < 0 else ctx.bwd_pad)
                    (gp,) = torch.autograd.grad(out, p, go)
        return gw, gp, None, None, None, None, None, None, None, None, None, None


_MODE_NAMES = {v: k for k, v in MODES.items()}


class _EmbeddingPadded(torch.autograd.Function):
    """Non-pooled lookup whose backward skips the padding row."""

    @staticmethod
    def forward(ctx, weight, offsets, indices, col_of_size, width, pad):
        ctx.save_for_backward(weight, offsets, indices, col_of_size)
        ctx.pad = pad
        return torch.ops.pme.embedding_forward(weight, offsets, indices, col_of_size, width)

    @staticmethod
    def backward(ctx, grad_out):
        weight, offsets, indices, col_of_size = ctx.saved_tensors
        gw = torch.ops.pme.embedding_backward(grad_out.contiguous(), weight, offsets, indices, col_of_size, ctx.pad)
        return gw, None, None, None, None, None


def _check_reference_lookup(indices, bag_offsets, offsets, weight, col_of_size, width):
    """Value checks the compiled kernels do natively, for the reference path."""
    V = offsets.numel() - 1
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= V:
            j = int(((indices < 0) | (indices >= V)).nonzero()[0])
            raise IndexOutOfRangeError(f"pme: index out of range: indices[{j}] = {int(indices[j])} but the table has {V} rows")
    if bag_offsets.numel():
        if int(bag_offsets[0]) != 0:
            raise ValueError(f"pme: bag offsets must start at 0, got offsets[0] = {int(bag_offsets[0])}")
        if bool((bag_offsets[1:] < bag_offsets[:-1]).any()):
            raise ValueError("pme: bag offsets must be non-decreasing")
        if int(bag_offsets[-1]) > indices.numel():
            raise ValueError(f"pme: bag offsets point past the input: the last bag ends at {int(bag_offsets[-1])} "
                             f"but there are only {indices.numel()} indices")
    check_offsets(offsets, weight.numel(), width if col_of_size is None else None)


def check_offsets(offsets: torch.Tensor, total: int, max_size: int | None = None):
    """Full O(V) check of an offset table: starts at 0, non-decreasing, ends at ``total``."""
    if int(offsets[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    sizes = offsets[1:] - offsets[:-1]
    if sizes.numel() and int(sizes.min()) < 0:
        r = int((sizes < 0).nonzero()[0])
        raise ValueError(f"offsets must be non-decreasing: offsets[{r + 1}] = {int(offsets[r + 1])} < "
                         f"offsets[{r}] = {int(offsets[r])}")
    if int(offsets[-1]) != total:
        raise ValueError(f"offsets[-1] = {int(offsets[-1])} must equal the number of stored entries {total}")
    if max_size is not None and sizes.numel() and int(sizes.max()) > max_size:
        r = int((sizes > max_size).nonzero()[0])
        raise ValueError(f"row {r} has size {int(sizes[r])}, larger than the width {max_size}")


def to_dense(weight, offsets, width, col_of_size=None):
    """Dense view ``[V, width]``: each row zero-padded (or placed in its size's slot)."""
    check_table(weight, offsets, col_of_size)
    return reference.to_dense(weight, offsets, width, col_of_size)


def _opt_args(weight, offsets, input, input_offsets, per_sample_weights, mode, include_last_offset, padding_idx):
    check_table(weight, offsets)
    pad = normalize_padding_idx(padding_idx, offsets.numel() - 1)
    indices, bag_offsets, psw, m = bag_inputs(weight, input, input_offsets, per_sample_weights, mode,
                                              include_last_offset)
    return indices, bag_offsets, psw, m, pad


def sparse_update_(weight, state1, state2, grad_out, offsets, indices, bag_offsets, *, col_of_size=None,
                   argmax=None, mode="mean", per_sample_weights=None, padding_idx=None, optimizer="sgd", lr=0.01,
                   weight_decay=0.0, eps=1e-8, beta1=0.9, beta2=0.999, step=1):
    """Fused backward + optimizer step, in place, on the rows of one batch (normal-form inputs).

    ``grad_out`` ``[B, width]`` is the gradient of the lookup's output. Duplicates are summed
    first, as a dense optimizer step on the summed gradient would. ``optimizer``: ``"sgd"``,
    ``"rowwise_adagrad"`` (``state1`` ``[V]`` float32), ``"adam"`` (``state1``, ``state2``
    ``[total]`` float32; rows outside the batch keep their moments, as torch.optim.SparseAdam).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    pad = normalize_padding_idx(padding_idx, offsets.numel() - 1)
    if _compiled(weight):
        am = argmax if argmax is not None else offsets.new_empty(0, 0)
        torch.ops.pme.sparse_update_(weight, state1, state2, grad_out, offsets, indices, bag_offsets,
                                     per_sample_weights, col_of_size, am, MODES[mode], pad, OPTIMIZERS[optimizer],
                                     float(lr), float(weight_decay), float(eps), float(beta1), float(beta2),
                                     int(step))
        return
    reference.sparse_update_(weight, state1, state2, grad_out, offsets, indices, bag_offsets, grad_out.shape[1],
                             col_of_size, mode, per_sample_weights, None if pad < 0 else pad, optimizer, lr,
                             weight_decay, eps, beta1, beta2, step)


def accumulate_scores_(scores, grad_out, weight, offsets, indices, bag_offsets, *, col_of_size=None, argmax=None,
                       mode="mean", per_sample_weights=None, padding_idx=None, rule="snip"):
    """``scores [total] += |w * g|`` (``rule="snip"``) or ``g^2`` (``"grad"``) for the batch's rows."""
    if rule not in SCORE_RULES:
        raise ValueError(f"rule must be one of {sorted(SCORE_RULES)}, got {rule!r}")
    pad = normalize_padding_idx(padding_idx, offsets.numel() - 1)
    if _compiled(weight):
        am = argmax if argmax is not None else offsets.new_empty(0, 0)
        torch.ops.pme.accumulate_scores_(scores, grad_out, weight, offsets, indices, bag_offsets, per_sample_weights,
                                         col_of_size, am, MODES[mode], pad, SCORE_RULES[rule])
        return
    reference.accumulate_scores_(scores, grad_out, weight, offsets, indices, bag_offsets, grad_out.shape[1],
                                 col_of_size, mode, per_sample_weights, None if pad < 0 else pad, rule)


def topk_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of ``scores`` (any shape, float32) as a 0-d tensor, found by radix select."""
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    n = scores.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of scores), got {k}")
    if _compiled(scores):
        return torch.ops.pme.topk_threshold(scores.contiguous(), int(k))
    return reference.topk_threshold(scores, k)


def prune_counts(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per-row count of ``scores [V, D] >= threshold``: ``[V]`` int64."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [V, D], got shape {tuple(scores.shape)}")
    if scores.dtype != torch.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=scores.device).reshape(())
    if _compiled(scores):
        return torch.ops.pme.prune_counts(scores, threshold)
    return reference.prune_counts(scores, threshold)


def prune_pack(dense: torch.Tensor, scores: torch.Tensor, sizes: torch.Tensor, order: str = "position"):
    """Packs each row's ``sizes[i]`` best entries of ``dense [V, D]`` into a flat buffer.

    Returns ``(weight [sum(sizes)], offsets [V + 1])``. ``order="score"`` stores a row's kept
    entries best first; ``"position"`` keeps their original column order.
    """
    if order not in ("score", "position"):
        raise ValueError(f"order must be 'score' or 'position', got {order!r}")
    if dense.dim() != 2 or scores.shape != dense.shape:
        raise ValueError(f"dense and scores must be 2-D of the same shape, got {tuple(dense.shape)} and "
                         f"{tuple(scores.shape)}")
    sizes = torch.as_tensor(sizes, dtype=torch.int64, device=dense.device)
    if sizes.shape != (dense.shape[0],):
        raise ValueError(f"sizes must have one entry per row ({dense.shape[0]}), got shape {tuple(sizes.shape)}")
    if sizes.numel() and (int(sizes.min()) < 0 or int(sizes.max()) > dense.shape[1]):
        raise ValueError(f"sizes must be in [0, {dense.shape[1]}], got [{int(sizes.min())}, {int(sizes.max())}]")
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64, device=dense.device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    scores = scores.float()
    if _compiled(dense):
        return torch.ops.pme.prune_pack(dense, scores, offsets, order == "score"), offsets
    return reference.prune_pack(dense, scores, offsets, order == "score"), offsets
