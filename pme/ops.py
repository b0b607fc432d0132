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

import contextlib
import dataclasses
import math
import numbers
import operator
import os
import warnings
import weakref
from types import SimpleNamespace
from typing import NamedTuple

import torch

from . import memory, reference

__all__ = [
    "backend",
    "embedding_bag",
    "embedding",
    "embedding_renorm_",
    "to_dense",
    "sparse_update_",
    "accumulate_scores_",
    "Hyperparameters",
    "topk_threshold",
    "prune_counts",
    "prune_pack",
    "RowConsumer",
    "StateBuffer",
    "BackwardRows",
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


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """The hyperparameters of one fused optimizer step (:func:`sparse_update_`,
    ``pme.collection.collection_update_``, ``pme.reference.sparse_update_``).

    ``optimizer``: ``"sgd"``, ``"rowwise_adagrad"`` or ``"adam"`` (a key of ``OPTIMIZERS``);
    ``lr``, ``weight_decay``, ``eps`` real numbers ``>= 0`` and finite; ``beta1``, ``beta2`` (Adam's
    moment decays) in ``[0, 1)``; ``grad_scale`` (finite, ``> 0``) divides the summed gradient
    first, in the accumulation dtype (a ``GradScaler``'s scale: unscaling a 16-bit table's gradient
    in its own dtype would flush the small values it protects). Checked when built: ``ValueError``
    for a bad value, ``TypeError`` for a value that is not a real number. A ``pme.optim`` optimizer gives its own with
    ``hyperparameters()``; the step count is not one of them (it is the caller's state).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    weight_decay: float = 0.0
    eps: float = 1e-8
    beta1: float = 0.9
    beta2: float = 0.999
    grad_scale: float = 1.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        for f in dataclasses.fields(self)[1:]:
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{f.name} must be a real number, got {type(v).__name__}")
        for name in ("lr", "weight_decay", "eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {v}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if not (math.isfinite(self.grad_scale) and self.grad_scale > 0):
            raise ValueError(f"grad_scale must be > 0 and finite, got {self.grad_scale}")

    @classmethod
    def of(cls, optimizer, **fields) -> Hyperparameters:
        """``optimizer`` as the fused operators take it: a :class:`Hyperparameters`, a ``pme.optim``
        optimizer (its ``hyperparameters()``) or a name; ``fields`` (``lr=0.1``, ...) replace
        those of the first two and complete a name (the older spelling ``optimizer="adam", lr=0.1``)."""
        if isinstance(optimizer, str):
            return cls(optimizer, **fields)
        if callable(getattr(optimizer, "hyperparameters", None)):
            optimizer = optimizer.hyperparameters()
        if not isinstance(optimizer, cls):
            raise TypeError(
                f"optimizer must be a pme.ops.Hyperparameters, a pme.optim optimizer or one of "
                f"{sorted(OPTIMIZERS)}, got {type(optimizer).__name__}"
            )
        return dataclasses.replace(optimizer, **fields) if fields else optimizer

    def operator_args(self, step: int) -> tuple:
        """The fused operators' trailing arguments: ``(optimizer code, lr, weight_decay, eps, beta1,
        beta2, grad_scale, step)``."""
        return (
            OPTIMIZERS[self.optimizer],
            *(float(getattr(self, f.name)) for f in dataclasses.fields(self)[1:]),
            int(step),
        )


def _pop_hyperparameters(keywords: dict) -> dict:
    """Takes the :class:`Hyperparameters` fields given as keywords (``lr=0.1``, ...) out of ``keywords``."""
    return {f.name: keywords.pop(f.name) for f in dataclasses.fields(Hyperparameters) if f.name in keywords}


# Errors of the types PyTorch raises for the same mistake, so that code (and tests) written
# against nn.Embedding / nn.EmbeddingBag catch them; each is also the type pme raised before.
class IndexOutOfRangeError(IndexError, RuntimeError):
    """An index outside the table: nn.Embedding raises IndexError, nn.EmbeddingBag RuntimeError."""


class DtypeError(TypeError, RuntimeError):
    """A tensor of the wrong dtype (indices, offsets, per_sample_weights): torch raises RuntimeError."""


class ArgumentError(ValueError, AssertionError, RuntimeError):
    """A bad constructor argument or padding_idx: nn.Embedding / nn.EmbeddingBag assert
    (AssertionError), F.embedding_bag and a negative size raise RuntimeError."""


def _torch_error_types(fn, *args, **kwargs):
    """Runs a compiled lookup; an out-of-range index comes back as IndexOutOfRangeError."""
    try:
        return fn(*args, **kwargs)
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
    return (
        f"pip install --force-reinstall --no-deps 'pme=={__version__.split('+')[0]}+{want}' "
        f"--extra-index-url https://<WHEEL_HOST>/whl/{want}/ (see README, Wheels), or build from source "
        f"with `pip install --no-build-isolation --no-cache-dir --force-reinstall pme`"
    )


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
        return (
            f"this installation of pme has no compiled extension (installed from source without a working C++ "
            f"compiler, or with PME_NO_EXTENSION=1). For {have}: {_wheel_hint()}"
        )
    if re.search(r"lib(torch_cuda|c10_cuda|cudart)\.so", str(e)):
        return (
            f"{text}. This pme{'+' + flavour if flavour else ''} binary has CUDA kernels for another CUDA than "
            f"{have}. Install the matching pme: {_wheel_hint()}"
        )
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
            f"differ. Install the pme wheel of your CUDA flavour: {_wheel_hint()}"
        )
    return info, None


BUILD_INFO, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(
        f"pme: the compiled extension could not be loaded ({LOAD_ERROR}); running on the slow "
        "pure-PyTorch reference (pme/reference.py). pme.info() tells the backend.",
        RuntimeWarning,
        stacklevel=2,
    )


def backend() -> str:
    """``"compiled"`` when the C++/CUDA kernels are in use, ``"reference"`` otherwise."""
    return "compiled" if BUILD_INFO is not None else "reference"


# Dispatch below the Autograd keys (what torch.library's own autograd wrapper does before its
# redispatch); a no-op context on a torch without it.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def _wants_grad(*tensors) -> bool:
    """Grad mode is on and one of ``tensors`` (None allowed) requires a gradient (a loop: on every
    call, and a generator expression costs about 0.5 us more)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def forward_call(op, graded, *args, **kwargs):
    """``op(*args, **kwargs)`` for a forward operator whose autograd is registered here. When no
    gradient is wanted (grad mode off, or none of the ``graded`` tensors requires one) the call goes
    straight to the kernel, past torch.library's Python autograd wrapper (about 100 us of a small
    call, benchmarks/bench_overhead.py). Under torch.compile dynamo traces the plain call. The hot
    paths pass the resolved overload (``torch.ops.pme.<op>.default``) and positional arguments: the
    overload packet's resolution of keyword arguments cost about 6 us of a 60 us call."""
    if _wants_grad(*graded) or torch.compiler.is_compiling():
        return op(*args, **kwargs)
    with _below_autograd():
        return op(*args, **kwargs)


def _kernels_serve(t: torch.Tensor) -> bool:
    """Whether this build's compiled kernels serve tensors on ``t``'s device (False, not an error,
    for CUDA tensors under a CPU-only build: see :func:`_compiled`)."""
    if BUILD_INFO is None:
        return False
    return t.is_cpu or (t.is_cuda and BUILD_INFO.get("cuda", "none") != "none")


def _compiled(t: torch.Tensor) -> bool:
    """Whether the compiled kernels serve tensors on ``t``'s device; CUDA tensors under a CPU-only
    build are an error (pme's tables have no other path there)."""
    if _kernels_serve(t):
        return True
    if BUILD_INFO is not None and t.is_cuda:
        raise RuntimeError(
            "pme: this build of pme has no CUDA kernels (a CPU-only build) but got CUDA "
            "tensors; install a +cuXXX wheel or rebuild with FORCE_CUDA=1"
        )
    return False


# --------------------------------------------------------------------------------------------
# Fake kernels and autograd for the compiled operators
# --------------------------------------------------------------------------------------------
def _same_device(op: str, **tensors):
    """Raises unless every given tensor (None skipped) is on one device.

    The dispatcher sends a call that mixes meta (or fake) tensors with real ones to the fake
    kernel, which would return uninitialised memory for the real device: an error instead.
    """
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise RuntimeError(
            f"pme::{op}: all tensor arguments must be on one device, got "
            + ", ".join(f"{k} on {v}" for k, v in devs.items())
        )


def register_fake(name: str):
    """Decorator: ``result(a)`` becomes the fake (meta) kernel of ``pme::name``.

    ``a`` holds the call's arguments by their names in the operator's schema
    (``csrc/registration.cpp``); every tensor argument is first checked to be on one device
    (:func:`_same_device`). Also used by ``pme.collection`` for its operators.
    """
    names = [arg.name for arg in getattr(torch.ops.pme, name).default._schema.arguments]

    def register(result):
        def fake(*args, **kwargs):
            a = SimpleNamespace(**dict(zip(names, args)), **kwargs)
            _same_device(name, **{k: v for k, v in vars(a).items() if isinstance(v, torch.Tensor)})
            return result(a)

        torch.library.register_fake(f"pme::{name}")(fake)
        return result

    return register


def check_op(name: str):
    """Decorator: ``check(...) -> None`` (raises on bad input) becomes the operator ``pme::name``,
    which a traced call (torch.compile, torch.export) puts in its graph so that the check runs
    with the graph: its fake kernel returns nothing, and it is marked as having a side effect so
    that no graph drops it for an unused output. Returns the operator. The schema comes from the
    function's annotations (a schema has no list of strings: several names go as one string)."""

    def register(check):
        torch.library.custom_op(f"pme::{name}", mutates_args=())(check).register_fake(lambda *a, **k: None)
        op = getattr(torch.ops.pme, name).default
        torch.fx.node.has_side_effect(op)
        return op

    return register


class _Bags(NamedTuple):
    """A pooled lookup in the operators' normal form, less the values it reads (``weight``, or a
    tensor shaped like it, is given to each call): the fields are ``bag_forward``'s arguments after
    ``weight``, in its order, and the backward operators take the same ones around ``argmax``.

    ``mode`` is the pooling code (``MODES``), ``padding_idx`` -1 for none. ``bag_offsets=None``
    (before :class:`_SparseGradLookup` fills it in) is the non-pooled lookup.
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    bag_offsets: torch.Tensor | None
    per_sample_weights: torch.Tensor | None
    col_of_size: torch.Tensor | None
    width: int
    mode: int
    padding_idx: int

    def lookup(self, weight, table_checked=True):
        """``pme::bag_forward``: ``(out [B, width], argmax)``."""
        if _functorch_active():  # (a backward formula inside torch.func: the Function it accepts)
            return _BagLookup.apply(weight, *self)
        graded = (weight, self.per_sample_weights)
        return forward_call(torch.ops.pme.bag_forward.default, graded, weight, *self, table_checked)

    def embedding(self, weight, table_checked=True):
        """``pme::embedding_forward`` of the indices (the bags and their weights unused): ``[N, width]``."""
        args = (weight, self.offsets, self.indices, self.col_of_size, self.width, self.padding_idx, table_checked)
        return forward_call(torch.ops.pme.embedding_forward.default, (weight,), *args)

    def row_args(self, argmax):
        """The arguments every backward-side operator (``bag_backward``, ``bag_backward_sparse``,
        ``sparse_update_``, ``accumulate_scores_``) takes after its leading tensors."""
        return (*self[:5], argmax, self.mode, self.padding_idx)

    def backward(self, grad_out, weight, argmax, psw_grad):
        """``pme::bag_backward`` on a checked table: ``(weight grad, per_sample_weights grad)``."""
        if _functorch_active():
            return _BagBackward.apply(grad_out, weight, *self.row_args(argmax), psw_grad, True)
        return torch.ops.pme.bag_backward(grad_out, weight, *self.row_args(argmax), psw_grad, table_checked=True)

    def weighted(self, psw):
        """The sum lookup weighted by ``psw`` (what a lookup is linear in, besides the weight)."""
        return self._replace(per_sample_weights=psw.contiguous(), mode=MODES["sum"])

    def reference_args(self) -> reference.Lookup:
        """This lookup as the ``pme.reference`` functions take it (``embedding_bag(weight, *it)``)."""
        pad = None if self.padding_idx < 0 else self.padding_idx
        psw, mode = self.per_sample_weights, _MODE_NAMES[self.mode]
        return reference.Lookup(
            self.offsets, self.indices, self.bag_offsets, self.width, self.col_of_size, mode, psw, pad
        )

    def memo_call(self, weight, fn, trusted=False):
        """``fn(table_checked)`` through the whole-table-check memo (:func:`_table_call`)."""
        return _table_call(fn, weight, self.offsets, self.col_of_size, self.width, trusted)


def _save_tensors(ctx, tensors):
    """``ctx.save_for_backward(*tensors)``, except for a table built under ``torch.inference_mode()``:
    inference tensors have no version counter, so autograd refuses to save them, while
    nn.EmbeddingBag built so still computes gradients outside inference mode (it saves only the
    batch). Those are kept on ``ctx`` as they are (a table changed in place before the backward is
    then not noticed, as for any inference tensor). Read back with :func:`_saved_tensors`. (Not
    asked while tracing: dynamo cannot trace ``is_inference()``.)"""
    if not torch.compiler.is_compiling():
        for t in tensors:  # (a loop: on every graded call, a generator costs more)
            if t is not None and t.is_inference():
                ctx.unversioned = tuple(tensors)
                return
    ctx.save_for_backward(*tensors)


def _saved_tensors(ctx):
    unversioned = getattr(ctx, "unversioned", None)
    return unversioned if unversioned is not None else ctx.saved_tensors


def _save(ctx, bags: _Bags, *tensors):
    """Saves a lookup and more tensors (weight, argmax, ...; None allowed) for backward; returns
    the tensors saved (for ``save_for_forward``)."""
    saved = (*bags[:5], *tensors)
    _save_tensors(ctx, saved)
    ctx.bag_args = bags[5:]
    return saved


def _saved(ctx):
    """What :func:`_save` saved: ``(the lookup, (the further tensors))``."""
    t = _saved_tensors(ctx)
    return _Bags(*t[:5], *ctx.bag_args), t[5:]


def _bag_setup(ctx, inputs, output):
    weight, *args = inputs[:9]
    bags = _Bags(*args)
    ctx.psw_grad = bags.per_sample_weights is not None and ctx.needs_input_grad[4]
    return _save(ctx, bags, weight, output[1])


def _bag_backward(ctx, grad_out, _grad_argmax=None):
    """Backward of ``pme::bag_forward``: gradients of (weight, its 8 normal-form arguments, table_checked)."""
    bags, (weight, argmax) = _saved(ctx)
    gw, gp = bags.backward(grad_out.contiguous(), weight, argmax, ctx.psw_grad)
    return gw, None, None, None, (gp if ctx.psw_grad else None), None, None, None, None, None


def _emb_setup(ctx, inputs, output):
    weight, offsets, indices, col_of_size, out_width, padding_idx = inputs[:6]
    ctx.width, ctx.padding_idx = out_width, padding_idx
    saved = (weight, offsets, indices, col_of_size)
    _save_tensors(ctx, saved)
    return saved


def _emb_backward(ctx, grad_out):
    """Backward of ``pme::embedding_forward``: gradients of its 7 arguments."""
    weight, offsets, indices, col_of_size = _saved_tensors(ctx)
    args = (grad_out.contiguous(), weight, offsets, indices, col_of_size, ctx.padding_idx, True)
    gw = _EmbeddingBackward.apply(*args) if _functorch_active() else torch.ops.pme.embedding_backward(*args)
    return gw, None, None, None, None, None, None


if BUILD_INFO is not None:

    @register_fake("bag_forward")
    def _(a):
        B = a.bag_offsets.shape[0] - 1
        argmax_shape = (B, a.out_width) if a.pooling == 2 else (0, 0)
        return a.weight.new_empty(B, a.out_width), a.offsets.new_empty(argmax_shape)

    @register_fake("bag_backward")
    def _(a):
        return torch.empty_like(a.weight), a.weight.new_empty(a.indices.shape[0] if a.psw_grad else 0)

    @register_fake("bag_backward_sparse")
    def _(a):
        nnz = torch.library.get_ctx().new_dynamic_size()
        return a.offsets.new_empty(nnz), a.weight.new_empty(nnz)

    @register_fake("embedding_forward")
    def _(a):
        return a.weight.new_empty(a.indices.shape[0], a.out_width)

    @register_fake("embedding_backward")
    def _(a):
        return torch.empty_like(a.weight)

    @register_fake("sparse_update_")
    @register_fake("accumulate_scores_")
    def _(a):
        return None

    @register_fake("topk_threshold")
    def _(a):
        return a.scores.new_empty(())

    @register_fake("prune_counts")
    def _(a):
        return a.scores.new_empty(a.scores.shape[0], dtype=torch.int64)

    @register_fake("prune_pack")
    def _(a):
        return a.dense.new_empty(torch.library.get_ctx().new_dynamic_size())

    torch.library.register_autograd("pme::bag_forward", _bag_backward, setup_context=_bag_setup)

    torch.library.register_autograd("pme::embedding_forward", _emb_backward, setup_context=_emb_setup)


# Double backward. The lookups are linear in the weight, so their backward is linear in
# the output gradient: the backward of the backward is the lookup of the incoming
# gradient-gradient (max: gathered through the forward's argmax). With per_sample_weights
# the backward is also linear in them (and their gradient linear in weight and grad_out),
# which gives the other terms.
def _bagbwd_setup(ctx, inputs, output):
    grad_out, weight, offsets, indices, bag_offsets, psw, col, argmax, mode, pad, psw_grad = inputs[:11]
    ctx.psw_grad = psw_grad
    bags = _Bags(offsets, indices, bag_offsets, psw, col, grad_out.shape[1], mode, pad)
    return _save(ctx, bags, grad_out, weight, argmax)


def _bagbwd_backward(ctx, gg_w, gg_p):
    bags, (grad_out, weight, argmax) = _saved(ctx)
    g_go = g_w = g_psw = None
    by_p = ctx.psw_grad and gg_p is not None  # the incoming gradient of per_sample_weights' gradient
    if ctx.needs_input_grad[0]:
        g_go = _linear_lookup(gg_w, bags, argmax) if gg_w is not None else grad_out.new_zeros(grad_out.shape)
        if by_p:
            g_go = g_go + bags.weighted(gg_p).lookup(weight)[0]
    if ctx.needs_input_grad[1] and by_p:
        g_w = bags.weighted(gg_p).backward(grad_out, weight, argmax, False)[0]
    if ctx.needs_input_grad[5] and bags.per_sample_weights is not None and gg_w is not None:
        g_psw = bags.backward(grad_out, gg_w.contiguous(), argmax, True)[1]
    return g_go, g_w, None, None, None, g_psw, None, None, None, None, None, None


def _bagbwd_jvp(ctx, go_t, w_t, _o, _i, _b, psw_t, *_rest):
    """Forward-mode derivative of ``pme::bag_backward`` (torch.func.hessian: forward over reverse).
    The weight gradient is linear in grad_out (and, weighted, in per_sample_weights); the
    per_sample_weights gradient is bilinear in grad_out and the weight."""
    bags, (grad_out, weight, argmax) = _saved(ctx)
    gw_t = gp_t = None
    if go_t is not None:
        gw_t, gp = bags.backward(go_t.contiguous(), weight, argmax, ctx.psw_grad)
        gp_t = gp if ctx.psw_grad else None
    if psw_t is not None and bags.per_sample_weights is not None:
        extra = bags.weighted(psw_t).backward(grad_out, weight, argmax, False)[0]
        gw_t = extra if gw_t is None else gw_t + extra
    if w_t is not None and ctx.psw_grad:
        extra = bags.backward(grad_out, w_t.contiguous(), argmax, True)[1]
        gp_t = extra if gp_t is None else gp_t + extra
    n = bags.indices.shape[0] if ctx.psw_grad else 0
    return (torch.zeros_like(weight) if gw_t is None else gw_t), (weight.new_zeros(n) if gp_t is None else gp_t)


def _embbwd_setup(ctx, inputs, output):
    grad_out, weight, offsets, indices, col_of_size, padding_idx = inputs[:6]
    ctx.pad = padding_idx
    saved = (grad_out, offsets, indices, col_of_size, weight)
    ctx.save_for_backward(*saved)
    return saved


def _embbwd_jvp(ctx, go_t, *_rest):
    """Forward-mode derivative of ``pme::embedding_backward``: it is linear in grad_out (and does
    not depend on the weight's values)."""
    grad_out, offsets, indices, col, weight = ctx.saved_tensors
    if go_t is None:
        return torch.zeros_like(weight)
    return _EmbeddingBackward.apply(go_t.contiguous(), weight, offsets, indices, col, ctx.pad, True)


def _embbwd_backward(ctx, gg_w):
    grad_out, offsets, indices, col, _weight = ctx.saved_tensors
    if gg_w is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    args = (gg_w.contiguous(), offsets, indices, col, grad_out.shape[1], ctx.pad)
    out = _EmbeddingLookup.apply(*args) if _functorch_active() else torch.ops.pme.embedding_forward(*args, True)
    if ctx.pad >= 0:  # the padding row got no gradient: its lookups pass none back
        out = out.masked_fill((indices == ctx.pad).unsqueeze(1), 0)
    return out, None, None, None, None, None, None


if BUILD_INFO is not None:
    torch.library.register_autograd("pme::bag_backward", _bagbwd_backward, setup_context=_bagbwd_setup)

    torch.library.register_autograd("pme::embedding_backward", _embbwd_backward, setup_context=_embbwd_setup)


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, ...) is open: the backward operators are then
    called through :class:`_BagBackward` / :class:`_EmbeddingBackward`, since torch.library's autograd
    wrapper (a Function without ``setup_context``) is refused inside such transforms."""
    return torch._C._functorch.maybe_current_level() is not None


def _vmap_by_loop(function):
    """A ``vmap`` staticmethod for ``function`` (an autograd.Function whose operators have no
    batching rule): the call once per batch element, the results stacked on dim 0. Correct under
    every torch.func transform (``vmap``, ``jacrev``, per-sample gradients), one call per element."""

    def vmap(info, in_dims, *args):
        def element(i):
            return function.apply(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))

        outs = [element(i) for i in range(info.batch_size)]
        if isinstance(outs[0], tuple):
            stacked = tuple(torch.stack(parts) for parts in zip(*outs))
            return stacked, (0,) * len(stacked)
        return torch.stack(outs), 0

    return staticmethod(vmap)


def backward_function(name: str, setup_context, backward, doc: str, jvp=None):
    """The backward operator ``pme::name`` as an autograd.Function for torch.func transforms (called
    with the schema's arguments, positionally): ``setup_context`` and ``backward`` its derivative
    (the registered formula's), ``vmap`` one call per batch element; with ``jvp`` also a
    forward-mode derivative, reading what ``setup_context`` saved (it returns those tensors, which
    are saved for the forward too). Also used by pme.collection."""

    def forward(*args):
        with _below_autograd():
            return getattr(torch.ops.pme, name).default(*args)

    def setup(ctx, inputs, output):
        saved = setup_context(ctx, inputs, output)
        if jvp is not None:
            ctx.save_for_forward(*saved)

    body = {"forward": staticmethod(forward), "setup_context": staticmethod(setup), "__doc__": doc}
    if jvp is not None:
        body["jvp"] = staticmethod(jvp)
    function = type(f"_{name}_function", (torch.autograd.Function,), {**body, "backward": staticmethod(backward)})
    function.vmap = _vmap_by_loop(function)
    return function


_BagBackward = backward_function(
    "bag_backward", _bagbwd_setup, _bagbwd_backward, "pme::bag_backward with its derivatives", _bagbwd_jvp
)
_EmbeddingBackward = backward_function(
    "embedding_backward", _embbwd_setup, _embbwd_backward, "pme::embedding_backward with its derivatives", _embbwd_jvp
)


def _linear_lookup(t, bags: _Bags, argmax):
    """The pooled lookup of ``t`` (a ``[total]`` tensor shaped like weight) as a linear map.

    sum / mean: the lookup itself. max: the entries the forward's argmax picked (0 where the
    implicit zero of the dense view won), i.e. the derivative of the max at that point.
    """
    t = t.contiguous()
    if bags.mode != MODES["max"]:
        return bags.lookup(t)[0]
    B, width = bags.bag_offsets.numel() - 1, bags.width
    if bags.indices.numel() == 0 or B == 0:
        return t.new_zeros(B, width)
    hit = argmax >= 0
    rows = bags.indices.long()[argmax.clamp(min=0)]
    lo = bags.offsets[rows]
    col0 = 0 if bags.col_of_size is None else bags.col_of_size[bags.offsets[rows + 1] - lo]
    entry = lo + torch.arange(width, device=t.device) - col0
    return torch.where(hit, t[entry.masked_fill(~hit, 0)], t.new_zeros(()))


def _eager_grad(*tensors) -> bool:
    """Whether an eager call (not traced by torch.compile) wants a gradient of one of ``tensors``.
    Such calls take light autograd.Functions in the ``forward(ctx, ...)`` form (:class:`_BagLookupEager`,
    :class:`_EmbeddingLookupEager`, ``pme.collection._CollectionLookupEager``) instead of the
    operators' registered autograd: torch.library's wrapper fills the schema's defaults in Python on
    every call, about 100 us of a small call (benchmarks/bench_overhead.py). Traced calls keep the
    registered autograd (the operator-level formula torch.compile and opcheck see); both run the
    same backward operators."""
    return not torch.compiler.is_compiling() and _wants_grad(*tensors)


def _forward_ad_active() -> bool:
    """Whether a forward-mode AD level (torch.autograd.forward_ad or a torch.func transform) is open."""
    if torch.compiler.is_compiling():
        return False
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


class _BagLookup(torch.autograd.Function):
    """The pooled lookup with a forward-mode derivative (used while forward AD is active; other
    eager calls that want a gradient take :class:`_BagLookupEager`), called as ``apply(weight, *bags)``.

    The lookup is linear in the weight: its tangent is the lookup of the weight's tangent (max:
    gathered through the argmax), plus, for per_sample_weights, the lookup weighted by theirs.
    The backward is the operator's own (twice differentiable, see the registrations above).
    """

    @staticmethod
    def forward(weight, *args):
        bags = _Bags(*args)
        return bags.memo_call(weight, lambda checked: bags.lookup(weight, checked))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*_bag_setup(ctx, inputs, output))
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_argmax):
        return _bag_backward(ctx, grad_out)[:9]  # no table_checked argument here

    @staticmethod
    def jvp(ctx, w_t, _o, _i, _b, psw_t, _c, _w, _m, _p):
        bags, (weight, argmax) = _saved(ctx)
        out_t = None
        if w_t is not None:
            out_t = _linear_lookup(w_t, bags, argmax)
        if psw_t is not None:
            extra = bags.weighted(psw_t).lookup(weight)[0]
            out_t = extra if out_t is None else out_t + extra
        return out_t, None


_BagLookup.vmap = _vmap_by_loop(_BagLookup)


class _BagLookupEager(torch.autograd.Function):
    """:class:`_BagLookup` for eager calls that want a gradient (:func:`_eager_grad`), written with
    ``forward(ctx, ...)``: ``Function.apply`` binds a separate ``setup_context``'s default arguments
    through ``inspect.signature`` on every call (about 40 us), this form skips that. No forward-mode
    derivative and no functorch transforms (those take :class:`_BagLookup`)."""

    @staticmethod
    def forward(ctx, weight, *args):
        out = _BagLookup.forward(weight, *args)
        _bag_setup(ctx, (weight, *args), out)
        ctx.mark_non_differentiable(out[1])
        return out

    backward = _BagLookup.backward


# --------------------------------------------------------------------------------------------
# Argument normalisation (shared by every public lookup function)
# --------------------------------------------------------------------------------------------
def check_table(weight: torch.Tensor, offsets: torch.Tensor, col_of_size: torch.Tensor | None = None):
    """Checks dtypes, shapes and devices of a flat table (cheap: no data is read)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"weight must be a 1-D tensor (the flat buffer), got shape {tuple(weight.shape)}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    check_offsets_form(offsets)
    if offsets.device != weight.device:
        raise ValueError(f"offsets is on {offsets.device} but weight is on {weight.device}")
    if col_of_size is not None and (col_of_size.device != weight.device or col_of_size.dtype != torch.int64):
        raise ValueError("col_of_size must be int64 on the device of weight")


# --------------------------------------------------------------------------------------------
# The whole-table check, once per version of a table
# --------------------------------------------------------------------------------------------
# Every operator that reads a table checks all of its offsets (O(V): start 0, non-decreasing,
# end at the buffer's length, every size fits) unless it is called with table_checked=True.
# The wrappers here remember, per offsets tensor, the state in which a call passed that check
# (the tensor itself by weak reference, its version counter, its storage, the buffer's length,
# col_of_size's identity and version, the width) and pass table_checked=True while none of it
# has changed, so a lookup of an unchanged table costs O(batch), not O(V). Any in-place write
# bumps the version and brings the check back. Writes that bypass the version counter (through
# ``.data`` or a numpy view) are not seen; the per-lookup bound checks that every call runs
# still stand then: wrong values are possible, an access out of bounds is not.
_TABLES_PASSED: dict = {}


def _table_state(weight, offsets, col_of_size):
    """What a passed check depends on, or None where no memo applies (tracing, inference tensors)."""
    if torch.compiler.is_compiling():
        return None
    try:
        cos = None if col_of_size is None else (id(col_of_size), col_of_size._version, col_of_size.data_ptr())
        return offsets._version, offsets.data_ptr(), offsets.numel(), weight.numel(), cos
    except (RuntimeError, NotImplementedError):  # inference, fake or meta tensors: no version or storage
        return None


def _table_call(fn, weight, offsets, col_of_size, width, trusted=False):
    """``fn(table_checked)``, with ``table_checked`` True when this table passed the whole-table
    check before (at this width or a smaller one) and has not changed since; a call that then
    returns normally records that the table passed.

    Where there is no memo to consult (a traced call: torch.compile, torch.export; inference-mode
    tensors, which have no version counter) the whole table is checked on every call (O(V)),
    unless ``trusted``: the table is a pme module's own, which the module keeps valid (built
    valid, checkpoints checked on load, other eager calls checked once per version). Such calls
    skip the scan; every lookup's span is still checked, so a table broken behind the module's
    back gives wrong rows, never an access out of bounds."""
    state = _table_state(weight, offsets, col_of_size)
    if state is None:
        return fn(bool(trusted))
    key = id(offsets)
    seen = _TABLES_PASSED.get(key)
    checked = (
        seen is not None
        and seen[0]() is offsets
        and seen[1] == state
        and int(width) >= seen[2]
        and (col_of_size is None or seen[3]() is col_of_size)
    )
    out = fn(checked)
    if not checked:
        cos_ref = (lambda: None) if col_of_size is None else weakref.ref(col_of_size)
        _TABLES_PASSED[key] = (
            weakref.ref(offsets, lambda _r, k=key: _TABLES_PASSED.pop(k, None)),
            state,
            int(width),
            cos_ref,
        )
    return out


def normalize_padding_idx(padding_idx, num_embeddings: int) -> int:
    """nn.EmbeddingBag's padding_idx (None, or a row index that may be negative) -> -1 or a row."""
    if padding_idx is None:
        return -1
    if not isinstance(padding_idx, int) or isinstance(padding_idx, bool):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ArgumentError(
            f"padding_idx {padding_idx} is out of range for {num_embeddings} embeddings "
            f"(valid: {-num_embeddings} to {num_embeddings - 1})"
        )
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


class PerSampleWeightsModeError(ValueError, NotImplementedError):
    """per_sample_weights with a mode other than sum (torch raises NotImplementedError)."""


def as_int(value, name: str, least: int | None = None) -> int:
    """``value`` as an int (an integer of any kind: int, numpy or 0-d integer tensor, SymInt;
    never a bool, never a float cut down), ``>= least`` when given; else TypeError / ValueError
    naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if least is not None and v < least:
        raise ValueError(f"{name} must be >= {least}, got {v}")
    return v


def _unnest_bags(input, offsets, per_sample_weights):
    """A jagged nested tensor of bags ``[B, j]`` -> (flat indices, ``[B + 1]`` offsets, flat weights)."""
    if input.layout != torch.jagged:
        raise ValueError(
            "a nested input must have layout=torch.jagged (one bag per component), as "
            "nn.EmbeddingBag takes it; build it with torch.nested.nested_tensor(..., layout=torch.jagged)"
        )
    if offsets is not None:
        raise ValueError("offsets must be None when input is a nested tensor (its own offsets give the bags)")
    if input.dim() != 2:
        raise ValueError(
            f"a nested input must be [B, j] (one bag of indices per component), got {input.dim()} dimensions"
        )
    input = _packed(input)  # a view with holes (torch.nested.narrow): its bags packed first
    if per_sample_weights is not None:
        if not per_sample_weights.is_nested:
            raise ValueError("if input is nested, per_sample_weights must be nested too (as in torch)")
        per_sample_weights = _packed(per_sample_weights)
        po, io = per_sample_weights.offsets(), input.offsets()
        # (weights built on the input's offsets share the tensor: no comparison, no device read;
        # weights on another device are refused by bag_inputs' device check)
        same = po is io or po.device != io.device or (po.shape == io.shape and torch.equal(po, io))
        if per_sample_weights.dim() != 2 or not same:
            lens = (po.diff().tolist(), io.diff().tolist())
            raise ValueError(
                f"per_sample_weights has bags of lengths {lens[0]} but input has {lens[1]}; they must match "
                "(one weight per index)"
            )
        per_sample_weights = per_sample_weights.values().reshape(-1)
    values = input.values().reshape(-1)
    return values, input.offsets().to(values.dtype), per_sample_weights


def _packed(nt):
    """A jagged nested tensor whose components lie back to back in ``values()`` (``.contiguous()``
    of a view with holes, e.g. from ``torch.nested.narrow``, whose ``offsets()`` alone do not give
    its components)."""
    return nt.contiguous() if nt.lengths() is not None else nt


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
        if not isinstance(per_sample_weights, torch.Tensor):
            raise TypeError(f"per_sample_weights must be a tensor, got {type(per_sample_weights).__name__}")
        if mode != "sum":
            raise PerSampleWeightsModeError(f"per_sample_weights are only supported with mode='sum', got mode={mode!r}")
        if per_sample_weights.shape != input.shape:
            raise ValueError(
                f"per_sample_weights has shape {tuple(per_sample_weights.shape)} but input has "
                f"shape {tuple(input.shape)}; they must match"
            )
        if per_sample_weights.dtype != weight.dtype:
            raise DtypeError(
                f"per_sample_weights ({per_sample_weights.dtype}) must have the dtype of the table ({weight.dtype})"
            )
        if per_sample_weights.device != weight.device:
            raise ValueError(
                f"per_sample_weights is on {per_sample_weights.device} but the table is on {weight.device}"
            )
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
            raise ValueError(
                f"offsets must be a 1-D tensor, got {type(offsets).__name__} of shape "
                f"{tuple(getattr(offsets, 'shape', ()))}"
            )
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
            _check_last_offset(offsets, indices.numel())
            bag_offsets = offsets
        elif offsets.numel() == 0:
            # no bag starts: zero bags, as nn.EmbeddingBag ([0, D] out); the indices all lie past
            # the last bag, where they are range-checked but not read
            bag_offsets = offsets.new_zeros(1)
        else:
            bag_offsets = torch.cat([offsets, offsets.new_full((1,), indices.numel())])
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D [B, L], got {input.dim()} dimensions")
    return indices.contiguous(), bag_offsets.contiguous(), (psw.contiguous() if psw is not None else None), MODES[mode]


def _check_last_offset(offsets: torch.Tensor, n: int):
    """include_last_offset=True: the last offset must be ``len(input)`` (the CSR convention).

    torch's documentation says so; with a smaller last offset nn.EmbeddingBag's own answers
    disagree with each other (sum ends the last bag at ``offsets[-1]``, max and any padding_idx
    run it to the end of the input, mean sums the short bag but divides by the long one), so
    there is nothing consistent to match: pme raises. On CUDA the check reads one value back
    (a synchronisation); it is skipped with ``PME_CUDA_VALIDATE=0`` and during graph capture,
    and then the bags end where the offsets say (lookups past ``offsets[-1]`` are ignored). A
    traced call (torch.compile, torch.export) puts ``pme::check_last_offset`` in its graph, which
    makes the same check when the graph runs.
    """
    if torch.compiler.is_compiling():
        _check_last_offset_op(offsets, n)
        return
    if offsets.device.type == "meta" or torch._guards.detect_fake_mode(offsets) is not None:
        return
    _raise_bad_last_offset(offsets, n)


def _device_reads_off(t: torch.Tensor) -> bool:
    """Whether a Python-side check must not read ``t``'s values back: a CUDA tensor while
    ``PME_CUDA_VALIDATE=0`` or while a CUDA graph is being captured (a read would synchronise, or
    break the capture)."""
    if t.device.type != "cuda":
        return False
    return os.environ.get("PME_CUDA_VALIDATE", "1") == "0" or torch.cuda.is_current_stream_capturing()


def _raise_bad_last_offset(offsets: torch.Tensor, n: int):
    """:func:`_check_last_offset` on the data (CUDA: unless validation is off or a graph is being captured)."""
    if _device_reads_off(offsets):
        return
    last = int(offsets[-1])
    if last != n:
        raise ValueError(
            f"include_last_offset=True: offsets[-1] = {last} must equal the number of indices {n} "
            f"(the last bag ends at the end of the input); nn.EmbeddingBag's results for "
            f"offsets[-1] < len(input) contradict its documentation and each other, so pme refuses them"
        )


@check_op("check_last_offset")
def _check_last_offset_op(offsets: torch.Tensor, n: int) -> None:
    """:func:`_check_last_offset` inside a traced graph."""
    _raise_bad_last_offset(offsets, n)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def embedding_bag(
    weight,
    offsets,
    input,
    input_offsets=None,
    *,
    width,
    col_of_size=None,
    mode="mean",
    per_sample_weights=None,
    padding_idx=None,
    include_last_offset=False,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    sparse=False,
    _trusted=False,
):
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
        _trusted: internal (pme's modules): the table is a module's own, so a traced call skips
            the whole-table check (:func:`_table_call`).

    Returns:
        ``[B, width]`` tensor of ``weight``'s dtype (accumulated in float32, or float64).
    """
    check_table(weight, offsets, col_of_size)
    width = as_int(width, "width", 0)
    V = offsets.numel() - 1
    pad = normalize_padding_idx(padding_idx, V)
    indices, bag_offsets, psw, m = bag_inputs(
        weight, input, input_offsets, per_sample_weights, mode, include_last_offset
    )
    if weight.is_meta:  # shapes only (a model built on the meta device, as TorchRec does): no data to read
        return weight.new_empty(bag_offsets.numel() - 1, width)
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency (as in torch)")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights (as in torch)")
    if max_norm is not None:
        embedding_renorm_(weight, offsets, indices, max_norm, norm_type, width=width, col_of_size=col_of_size)
    bags = _Bags(offsets, indices, bag_offsets, psw, col_of_size, int(width), m, pad)
    if (sparse or scale_grad_by_freq) and torch.is_grad_enabled() and weight.requires_grad:
        if sparse:
            _keep_coalesced_flag(weight)
        return _SparseGradLookup.apply(weight, *bags, pad, bool(sparse), bool(scale_grad_by_freq))
    if _compiled(weight):
        if _forward_ad_active():
            return _torch_error_types(_BagLookup.apply, weight, *bags)[0]
        if _eager_grad(weight, psw):
            return _torch_error_types(_BagLookupEager.apply, weight, *bags)[0]
        return bags.memo_call(weight, lambda checked: _torch_error_types(bags.lookup, weight, checked), _trusted)[0]
    return _reference_bag(weight, bags)


def embedding(
    weight,
    offsets,
    input,
    *,
    width,
    col_of_size=None,
    padding_idx=None,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    sparse=False,
    _trusted=False,
):
    """Non-pooled lookup ``[*input.shape, width]``, like ``F.embedding`` on the dense view.

    The padding row is returned as stored and receives no gradient, as in ``F.embedding``.
    ``input`` may be a jagged nested tensor ``[B, j]`` (the output is then ``[B, j, width]``,
    nested). ``max_norm``, ``norm_type``, ``scale_grad_by_freq``, ``sparse`` and ``_trusted`` as
    in :func:`embedding_bag`.
    """
    check_table(weight, offsets, col_of_size)
    width = as_int(width, "width", 0)
    pad = normalize_padding_idx(padding_idx, offsets.numel() - 1)
    if isinstance(input, torch.Tensor) and input.is_nested:
        if input.layout != torch.jagged:
            raise ValueError(
                "a nested input must have layout=torch.jagged; build it with "
                "torch.nested.nested_tensor(..., layout=torch.jagged)"
            )
        input = _packed(input)
        out = embedding(
            weight,
            offsets,
            input.values(),
            width=width,
            col_of_size=col_of_size,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            _trusted=_trusted,
        )
        return torch.nested.nested_tensor_from_jagged(out, input.offsets())
    if not isinstance(input, torch.Tensor) or input.dtype not in INDEX_DTYPES:
        raise DtypeError(f"input must be an int32 or int64 tensor, got {getattr(input, 'dtype', type(input))}")
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but the table is on {weight.device}")
    if weight.is_meta:  # shapes only (see embedding_bag)
        return weight.new_empty(*input.shape, width)
    flat = input.reshape(-1).contiguous()
    if max_norm is not None:
        embedding_renorm_(weight, offsets, flat, max_norm, norm_type, width=width, col_of_size=col_of_size)
    bags = _Bags(offsets, flat, None, None, col_of_size, int(width), MODES["sum"], pad)
    if (sparse or scale_grad_by_freq) and torch.is_grad_enabled() and weight.requires_grad:
        if sparse:
            _keep_coalesced_flag(weight)
        out = _SparseGradLookup.apply(weight, *bags, pad, bool(sparse), bool(scale_grad_by_freq))
        return out.reshape(*input.shape, width)
    if _compiled(weight):
        fn = _EmbeddingLookup if _forward_ad_active() else _EmbeddingLookupEager if _eager_grad(weight) else None
        if fn is not None:
            out = _torch_error_types(fn.apply, weight, offsets, flat, col_of_size, int(width), pad)
        else:
            out = bags.memo_call(weight, lambda checked: _torch_error_types(bags.embedding, weight, checked), _trusted)
        return out.reshape(*input.shape, width)
    bo = torch.arange(flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    _check_reference_lookup(weight, bags._replace(bag_offsets=bo))
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
    scatter. Called as ``apply(weight, *bags, bwd_pad, sparse, scale)``: the lookup (a
    :class:`_Bags`, whose padding row the forward skips), then the padding row that gets no
    gradient. ``bag_offsets=None`` is the non-pooled lookup (nn.Embedding), which returns the
    padding row as stored."""

    @staticmethod
    def forward(ctx, weight, *args):
        bags, (bwd_pad, sparse, scale) = _Bags(*args[:8]), args[8:]
        pooled = bags.bag_offsets is not None
        if not pooled:
            idx = bags.indices
            bags = bags._replace(bag_offsets=torch.arange(idx.numel() + 1, dtype=idx.dtype, device=idx.device))
        argmax = None
        if _compiled(weight):
            call = bags.lookup if pooled else bags.embedding
            out = bags.memo_call(weight, lambda checked: _torch_error_types(call, weight, checked))
            if pooled:
                out, argmax = out
        elif pooled:
            out = _reference_bag(weight, bags)
        else:
            _check_reference_lookup(weight, bags)
            out = reference.embedding(weight, bags.offsets, bags.indices, bags.width, bags.col_of_size)
        _save(ctx, bags._replace(padding_idx=bwd_pad), weight, argmax)
        ctx.sparse, ctx.scale = sparse, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        bags, (weight, argmax) = _saved(ctx)
        go = grad_out.contiguous()
        gw = gp = None
        am = argmax if argmax is not None else bags.offsets.new_empty(0, 0)
        if ctx.needs_input_grad[0]:
            if _compiled(weight):
                ent, val = torch.ops.pme.bag_backward_sparse(
                    go, weight, *bags.row_args(am), ctx.scale, table_checked=True
                )
            else:
                ent, val = reference.bag_backward_sparse(go, weight, bags.reference_args(), ctx.scale)
            if ctx.sparse:
                gw = torch.sparse_coo_tensor(
                    ent.unsqueeze(0), val, (weight.numel(),), is_coalesced=True, check_invariants=False
                )
                _remember_coalesced(gw)
            else:
                gw = torch.zeros_like(weight).index_put_((ent,), val)
        psw = bags.per_sample_weights
        if psw is not None and ctx.needs_input_grad[4]:
            if _compiled(weight):
                gp = bags.backward(go, weight, am, True)[1]
            else:
                with torch.enable_grad():
                    p = psw.detach().requires_grad_(True)
                    out = reference.embedding_bag(weight.detach(), *bags.weighted(p).reference_args())
                    (gp,) = torch.autograd.grad(out, p, go)
        return (gw, None, None, None, gp) + (None,) * 7


_MODE_NAMES = {v: k for k, v in MODES.items()}


# --------------------------------------------------------------------------------------------
# The fused path: a lookup whose backward hands its rows to a consumer instead of a gradient
# --------------------------------------------------------------------------------------------
class StateBuffer(NamedTuple):
    """One buffer of a :class:`RowConsumer`'s state, registered on the table it is attached to.

    ``dtype=None`` means the accumulation dtype of the table (``acc_dtype``: float32, float64
    for a float64 table); such a buffer follows the table's device and that rule through
    ``.to(dtype)`` / ``.half()`` (no precision lost on the way). ``host=True`` keeps the buffer
    a CPU tensor through device moves (a scalar the host reads every step: reading it from a
    GPU would synchronise and break graph capture); a checkpoint must give it as a step count
    (a non-negative integer below 2**62). Other buffers follow the table's device and keep their
    dtype.

    ``per`` says how the buffer splits over rows: ``"row"`` (one value per row, ``[V]``),
    ``"entry"`` (one per stored entry, ``[total]``) or None (neither: a scalar or an empty
    buffer); a collection of tables saves the row and entry buffers table by table.
    ``nonnegative=True`` (a sum of squares) refuses a checkpoint with negative values.
    """

    name: str
    shape: tuple
    dtype: torch.dtype | None = None
    host: bool = False
    per: str | None = None
    nonnegative: bool = False

    def check(self, t) -> None:
        """Raises ValueError unless ``t`` (from a checkpoint) is a valid value of this buffer."""
        if self.host:  # a step count: a non-negative integer scalar
            if (
                not isinstance(t, torch.Tensor)
                or t.numel() != 1
                or t.is_floating_point()
                or t.dtype == torch.bool
                or not 0 <= int(t) < 2**62
            ):
                raise ValueError(
                    f"{self.name} must be a non-negative integer scalar tensor below 2**62 (a step "
                    f"count that can still be incremented), got {t!r}"
                )
            return
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != tuple(self.shape):
            raise ValueError(
                f"{self.name} must be a float tensor of shape {tuple(self.shape)}, got "
                f"{getattr(t, 'dtype', type(t))} of shape {tuple(getattr(t, 'shape', ()))} (a checkpoint "
                "of another optimizer? drop its optim_* keys to load the values with a fresh state)"
            )
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{self.name} holds non-finite values")
        if self.nonnegative and t.numel() and bool((t < 0).any()):
            raise ValueError(f"{self.name} holds negative values (a sum of squared gradients cannot be)")


class BackwardRows(NamedTuple):
    """What the backward of one fused lookup hands to its consumer (the operators' normal form).

    ``grad_out`` ``[B, width]`` contiguous, the output's gradient in the table's dtype;
    ``indices`` ``[N]`` / ``bag_offsets`` ``[B + 1]`` (int32 or int64); ``per_sample_weights``
    ``[N]`` or None; ``argmax`` ``[B, width]`` int64 (mode ``"max"``) or None; ``mode`` a key of
    ``MODES``; ``padding_idx`` the row the update skips, or None.
    """

    grad_out: torch.Tensor
    indices: torch.Tensor
    bag_offsets: torch.Tensor
    per_sample_weights: torch.Tensor | None
    argmax: torch.Tensor | None
    mode: str
    padding_idx: int | None

    def update_(self, module, state1, state2, grad_out, **step) -> None:
        """One fused optimizer step of ``module``'s table on these rows (:func:`sparse_update_`).

        ``grad_out`` replaces the rows' own (e.g. unscaled); ``step`` holds :func:`sparse_update_`'s
        keywords ``optimizer`` (a :class:`Hyperparameters`, ...) and ``step``.
        """
        args, kwargs = self.operator_args(module)
        sparse_update_(module.weight.data, state1, state2, grad_out, *args, **kwargs, **step)

    def operator_args(self, module):
        """These rows of ``module``'s table as :func:`sparse_update_` and :func:`accumulate_scores_`
        take them after their leading tensors: ``(offsets, indices, bag_offsets)`` and the keywords."""
        kwargs = {"col_of_size": module.col_of_size, "per_sample_weights": self.per_sample_weights}
        kwargs.update(argmax=self.argmax, mode=self.mode, padding_idx=self.padding_idx)
        return (module.offsets, self.indices, self.bag_offsets), kwargs


class RowConsumer:
    """Receives the rows of a table's lookups in backward, in place of a weight gradient.

    The seam of the fused path: ``attach(module)`` registers the consumer's state buffers
    (:meth:`state`) on a ``pme`` table and sets ``module.optimizer``; the table's training
    forward then goes through :meth:`lookup`, whose backward calls :meth:`consume` with the
    batch's :class:`BackwardRows`. The table's ``weight`` no longer requires a gradient. The
    fused optimizers (``pme.optim``) and the search's score accumulator are two kinds of it.
    A collection of tables (``pme.collection``) has its own fused lookup, whose backward hands
    its consumer ``pme.collection.CollectionRows``; like :class:`BackwardRows`, they apply an
    optimizer step to themselves with ``update_``.
    """

    def state(self, module) -> list[StateBuffer]:
        """The buffers this consumer keeps on ``module`` (names, shapes, dtypes)."""
        return []

    def consume(self, module, rows: BackwardRows) -> None:
        """Takes one batch's rows (called from backward, under no_grad)."""
        raise NotImplementedError

    def check_attached(self, module):
        """Raises a clear error when this consumer's state is not on ``module``: it was assigned to
        ``module.optimizer`` instead of attached (which allocates the state)."""
        missing = [b.name for b in self.state(module) if module._buffers.get(b.name) is None]
        if missing:
            raise RuntimeError(
                f"{self!r} is not attached to this {type(module).__name__}: its state {missing} is missing. "
                "Pass optimizer=... when building the table, or call optimizer.attach(table) "
                "(assigning table.optimizer does not allocate the state)"
            )

    def attach(self, module):
        """Allocates the state buffers (zeros) on ``module`` and makes its lookups fused."""
        if not hasattr(module, "_fused_step") and not hasattr(module, "table_rows"):
            raise TypeError(
                f"{type(self).__name__}.attach() takes a pme table or collection (MultiSizeEmbeddingBag, "
                f"MultiSizeEmbedding, MultiSizeEmbeddingBagCollection), got {type(module).__name__}; convert it "
                "first (pme.convert, MultiSizeEmbeddingBag.from_embedding_bag)"
            )
        acc = acc_dtype(module.weight.dtype)
        for b in self.state(module):
            dev = torch.device("cpu") if b.host else module.weight.device
            module.register_buffer(b.name, memory.empty(b.shape, b.dtype or acc, dev).zero_())  # huge pages
        module.weight.requires_grad_(False)
        module.optimizer = self

    def share_state(self, module):
        """``share_memory_()`` on the state buffers (``module.share_memory()`` skips them, as every
        ``_apply``: :meth:`state_kept`), so processes that share a model share its optimizer's state."""
        for b in self.state(module):
            t = module._buffers.get(b.name)
            if t is not None:
                t.share_memory_()

    @contextlib.contextmanager
    def state_kept(self, module):
        """Around ``module._apply(fn)``: the state skips ``fn`` and is re-placed by its own rules."""
        specs = [b for b in self.state(module) if module._buffers.get(b.name) is not None]
        held = {b.name: module._buffers[b.name] for b in specs}
        for name in held:
            module._buffers[name] = None
        try:
            yield
        finally:
            acc = acc_dtype(module.weight.dtype)
            for b in specs:
                t = held[b.name]
                if t.is_meta and not module.weight.is_meta:  # to_empty(): a fresh state where the weight went
                    dev = torch.device("cpu") if b.host else module.weight.device
                    t = torch.zeros(t.shape, dtype=t.dtype if b.host else (b.dtype or acc), device=dev)
                module._buffers[b.name] = t if b.host else t.to(device=module.weight.device, dtype=b.dtype or acc)

    def lookup(
        self,
        module,
        input,
        offsets=None,
        per_sample_weights=None,
        include_last_offset=None,
        mode=None,
        forward_padding=True,
    ):
        """Training forward of ``module`` ``[B, width]``; its backward feeds :meth:`consume`.

        nn.EmbeddingBag-style inputs; ``mode`` and ``include_last_offset`` default to the
        module's. ``forward_padding=False`` returns the padding row as stored (nn.Embedding)
        while the update still skips it.
        """
        self.check_attached(module)
        weight = module.weight
        mode = mode or module.mode
        last = module.include_last_offset if include_last_offset is None else include_last_offset
        indices, bag_offsets, psw, m = bag_inputs(weight, input, offsets, per_sample_weights, mode, last)
        pad = -1 if module.padding_idx is None else module.padding_idx
        anchor = torch.zeros((), device=weight.device, requires_grad=True)  # makes the output need a gradient
        return _ConsumedLookup.apply(
            anchor, self, module, indices, bag_offsets, psw, mode, pad if forward_padding else -1, pad
        )


class _ConsumedLookup(torch.autograd.Function):
    """Pooled lookup of ``module``'s table whose backward hands the rows to a RowConsumer."""

    @staticmethod
    def forward(ctx, anchor, consumer, module, indices, bag_offsets, psw, mode, fwd_pad, upd_pad):
        weight = module.weight
        bags = _Bags(module.offsets, indices, bag_offsets, psw, module.col_of_size, module.width, MODES[mode], fwd_pad)
        argmax = None
        if _compiled(weight):
            out, argmax = bags.memo_call(weight, lambda checked: _torch_error_types(bags.lookup, weight, checked))
        else:
            check_table(weight, module.offsets, module.col_of_size)
            out = _reference_bag(weight, bags)
        ctx.consumer, ctx.module, ctx.mode, ctx.pad = consumer, module, mode, upd_pad
        ctx.save_for_backward(indices, bag_offsets, psw, argmax)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, bag_offsets, psw, argmax = ctx.saved_tensors
        # per_sample_weights that require a gradient get it, from the weights before the consumer's step.
        gp = _psw_grad(ctx.module, grad_out, indices, bag_offsets, ctx.pad) if ctx.needs_input_grad[5] else None
        rows = BackwardRows(
            grad_out.contiguous().to(ctx.module.weight.dtype),
            indices,
            bag_offsets,
            psw,
            argmax,
            ctx.mode,
            None if ctx.pad < 0 else ctx.pad,
        )
        ctx.consumer.consume(ctx.module, rows)
        return None, None, None, None, None, gp, None, None, None


def _psw_grad(module, grad_out, indices, bag_offsets, pad):
    """Gradient of a sum lookup w.r.t. its per_sample_weights: ``<row of lookup j, grad_out[bag of j]>``.

    ``[N]`` of the weight's dtype (accumulated in acc_dtype); 0 for padding lookups and for
    lookups past the last bag, as the unfused backward gives.
    """
    acc = acc_dtype(module.weight.dtype)
    rows = embedding(
        module.weight.detach(), module.offsets, indices, width=module.width, col_of_size=module.col_of_size
    )  # [N, width], zero-padded
    counts = (bag_offsets[1:] - bag_offsets[:-1]).long()
    bag_of = torch.repeat_interleave(torch.arange(counts.numel(), device=indices.device), counts)
    n = bag_of.numel()
    gp = torch.zeros(indices.numel(), dtype=acc, device=indices.device)
    gp[:n] = (rows[:n].to(acc) * grad_out[bag_of].to(acc)).sum(1)
    if pad >= 0:
        gp = gp.masked_fill(indices == pad, 0)
    return gp.to(module.weight.dtype)


class _EmbeddingLookup(torch.autograd.Function):
    """Non-pooled lookup with a forward-mode derivative (used while forward AD is active; other
    eager calls that want a gradient take :class:`_EmbeddingLookupEager`): the tangent is the
    lookup of the weight's tangent (the padding row included, as ``F.embedding``'s).
    The backward is the operator's own (twice differentiable)."""

    @staticmethod
    def forward(weight, offsets, indices, col_of_size, width, pad):
        # (through forward_call: inside a Function's forward no gradient is wanted, so the call skips
        # torch.library's autograd wrapper, about 20 us of a small lookup)
        op = torch.ops.pme.embedding_forward.default
        return _table_call(
            lambda checked: forward_call(op, (weight,), weight, offsets, indices, col_of_size, width, pad, checked),
            weight,
            offsets,
            col_of_size,
            width,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*_emb_setup(ctx, inputs, output))

    @staticmethod
    def backward(ctx, grad_out):
        return _emb_backward(ctx, grad_out)[:6]  # no table_checked argument here

    @staticmethod
    def jvp(ctx, w_t, _o, _i, _c, _w, _p):
        _weight, offsets, indices, col_of_size = ctx.saved_tensors
        if w_t is None:
            return None
        args = (w_t.contiguous(), offsets, indices, col_of_size, ctx.width, ctx.padding_idx)
        if _functorch_active():  # (inside a transform: the Function, batched by its vmap rule)
            return _EmbeddingLookup.apply(*args)
        return torch.ops.pme.embedding_forward(*args, table_checked=True)


_EmbeddingLookup.vmap = _vmap_by_loop(_EmbeddingLookup)


class _EmbeddingLookupEager(torch.autograd.Function):
    """:class:`_EmbeddingLookup` for eager calls that want a gradient, in the ``forward(ctx, ...)``
    form (see :class:`_BagLookupEager`)."""

    @staticmethod
    def forward(ctx, weight, *args):
        out = _EmbeddingLookup.forward(weight, *args)
        _emb_setup(ctx, (weight, *args), out)
        return out

    backward = _EmbeddingLookup.backward


def _check_reference_lookup(weight, bags: _Bags):
    """Value checks the compiled kernels do natively, for the reference path."""
    offsets, indices, bag_offsets = bags.offsets, bags.indices, bags.bag_offsets
    V = offsets.numel() - 1
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= V:
            j = int(((indices < 0) | (indices >= V)).nonzero()[0])
            raise IndexOutOfRangeError(
                f"pme: index out of range: indices[{j}] = {int(indices[j])} but the table has {V} rows"
            )
    if bag_offsets.numel():
        if int(bag_offsets[0]) != 0:
            raise ValueError(f"pme: bag offsets must start at 0, got offsets[0] = {int(bag_offsets[0])}")
        if bool((bag_offsets[1:] < bag_offsets[:-1]).any()):
            raise ValueError("pme: bag offsets must be non-decreasing")
        if int(bag_offsets[-1]) > indices.numel():
            raise ValueError(
                f"pme: bag offsets point past the input: the last bag ends at {int(bag_offsets[-1])} "
                f"but there are only {indices.numel()} indices"
            )
    _check_whole_table(weight, offsets, bags.width, bags.col_of_size)


def _reference_bag(weight, bags: _Bags):
    """The pooled lookup on the reference, after the value checks the kernels make."""
    _check_reference_lookup(weight, bags)
    return reference.embedding_bag(weight, *bags.reference_args())


def _check_whole_table(weight, offsets, width: int, col_of_size):
    """The O(V) check of a table that every operator makes (unless told it passed before)."""
    check_offsets(offsets, weight.numel(), width if col_of_size is None else None)
    if col_of_size is not None:
        check_col_of_size(col_of_size, offsets, width)


def check_col_of_size(col_of_size: torch.Tensor, offsets: torch.Tensor, width: int):
    """Full check of a grouped layout's column map against the table and the output width.

    Entry ``s`` is -1 (no row has size ``s``) or a column with ``s <= width`` and
    ``col <= width - s`` (written so that nothing can overflow); every row's size has a slot.
    The compiled operators make the same check in C++ (and on the device).
    """
    cos = col_of_size.detach().cpu().tolist()
    for s_, c in enumerate(cos):
        if not (c == -1 or (c >= 0 and s_ <= width and c <= width - s_)):
            raise ValueError(
                f"col_of_size[{s_}] = {c} is not a slot of the output width {width} for rows of size "
                f"{s_} (a column in [0, width - size], or -1 for a size that has no slot)"
            )
    sizes = (offsets[1:] - offsets[:-1]).cpu()
    bad = (sizes >= len(cos)) | (sizes < 0)
    if not bool(bad.any()) and sizes.numel():
        bad = torch.as_tensor(cos, dtype=torch.int64)[sizes] < 0
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(
            f"row {r} has size {int(sizes[r])}, which has no slot in col_of_size: it does not fit in "
            f"the output width {width}"
        )


def check_offsets_form(offsets):
    """An offset table's form (no values read): a 1-D int64 tensor of ``V + 1 >= 1`` entries."""
    if (
        not isinstance(offsets, torch.Tensor)
        or offsets.dim() != 1
        or offsets.dtype != torch.int64
        or not offsets.numel()
    ):
        raise ValueError(
            f"offsets must be a 1-D int64 tensor of V + 1 >= 1 entries, got {getattr(offsets, 'dtype', type(offsets))} "
            f"of shape {tuple(getattr(offsets, 'shape', ()))}"
        )


def check_offsets(offsets: torch.Tensor, total: int, max_size: int | None = None):
    """Full O(V) check of an offset table: starts at 0, non-decreasing, ends at ``total``."""
    check_offsets_form(offsets)
    if int(offsets[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    decreasing = offsets[1:] < offsets[:-1]  # (compared, not subtracted: a difference may wrap)
    if bool(decreasing.any()):
        r = int(decreasing.nonzero()[0])
        raise ValueError(
            f"offsets must be non-decreasing: offsets[{r + 1}] = {int(offsets[r + 1])} < "
            f"offsets[{r}] = {int(offsets[r])}"
        )
    if int(offsets[-1]) != total:
        raise ValueError(f"offsets[-1] = {int(offsets[-1])} must equal the number of stored entries {total}")
    sizes = offsets[1:] - offsets[:-1]  # (non-decreasing from 0: no wrap)
    if max_size is not None and sizes.numel() and int(sizes.max()) > max_size:
        r = int((sizes > max_size).nonzero()[0])
        raise ValueError(f"row {r} has size {int(sizes[r])}, larger than the width {max_size}")


def to_dense(weight, offsets, width, col_of_size=None):
    """Dense view ``[V, width]``: each row zero-padded (or placed in its size's slot).

    The table is checked whole first (offsets, sizes against the width, col_of_size's slots),
    as every lookup operator does.
    """
    check_table(weight, offsets, col_of_size)
    _check_whole_table(weight, offsets, int(width), col_of_size)
    return reference.to_dense(weight, offsets, width, col_of_size)


def sparse_update_(
    weight, state1, state2, grad_out, offsets, indices, bag_offsets, *, optimizer="sgd", step=1, **lookup
):
    """Fused backward + optimizer step, in place, on the rows of one batch (normal-form inputs).

    ``grad_out`` ``[B, width]`` is the gradient of the output of the lookup ``offsets`` ``[V + 1]``
    int64, ``indices`` ``[N]`` and ``bag_offsets`` ``[B + 1]`` (int32/int64), and the keywords in
    ``lookup``: ``col_of_size`` (``[D + 1]`` int64, grouped layout, or None), ``argmax`` (``[B,
    width]`` int64, the forward's, for ``mode="max"``), ``mode`` (``"sum"``, ``"mean"`` (default)
    or ``"max"``), ``per_sample_weights`` (``[N]``, sum, or None), ``padding_idx`` (a row the update
    skips, or None). Duplicates are summed first, as a dense optimizer step on the summed gradient
    would.

    ``optimizer``: a :class:`Hyperparameters`, a ``pme.optim`` optimizer or a name, whose fields
    keywords such as ``lr=0.1`` complete or replace (:meth:`Hyperparameters.of`); ``step`` the
    step count (1 for the first; Adam's bias correction). ``"sgd"`` needs no state,
    ``"rowwise_adagrad"`` ``state1`` ``[V]``, ``"adam"`` ``state1``, ``state2`` ``[total]`` (rows
    outside the batch keep their moments, as torch.optim.SparseAdam), in the table's
    accumulation dtype (float32; float64 for a float64 table).
    """
    hyper = Hyperparameters.of(optimizer, **_pop_hyperparameters(lookup))
    _check_lookup_keywords("sparse_update_", lookup)
    step = as_int(step, "step", 1)
    if step >= 2**62:
        raise ValueError(f"step must be below 2**62, got {step}")
    bags, argmax = _fused_lookup(offsets, indices, bag_offsets, grad_out, **lookup)
    lead = (weight, state1, state2, grad_out)
    _row_operator("sparse_update_", lead, weight, bags, argmax, hyper.operator_args(step), (hyper, int(step)), grad_out)


def accumulate_scores_(scores, grad_out, weight, offsets, indices, bag_offsets, *, rule="snip", **lookup):
    """``scores [total] += |w * g|`` (``rule="snip"``) or ``g^2`` (``"grad"``) for the batch's rows.

    The lookup as :func:`sparse_update_` takes it (``lookup``: ``col_of_size``, ``argmax``, ``mode``,
    ``per_sample_weights``, ``padding_idx``).
    """
    if rule not in SCORE_RULES:
        raise ValueError(f"rule must be one of {sorted(SCORE_RULES)}, got {rule!r}")
    _check_lookup_keywords("accumulate_scores_", lookup)
    bags, argmax = _fused_lookup(offsets, indices, bag_offsets, grad_out, **lookup)
    lead = (scores, grad_out, weight)
    _row_operator("accumulate_scores_", lead, weight, bags, argmax, (SCORE_RULES[rule],), (rule,), grad_out)


_LOOKUP_KEYWORDS = ("col_of_size", "argmax", "mode", "per_sample_weights", "padding_idx")


def _check_lookup_keywords(who: str, lookup: dict) -> None:
    """Unknown keywords of the fused row operators, named with what they take."""
    unknown = sorted(set(lookup) - set(_LOOKUP_KEYWORDS))
    if unknown:
        hyper = [f.name for f in dataclasses.fields(Hyperparameters)[1:]]
        raise TypeError(
            f"{who}() got unexpected keyword(s) {unknown}; it takes the lookup's {list(_LOOKUP_KEYWORDS)} "
            f"and the optimizer's {hyper}"
        )


def _fused_lookup(
    offsets,
    indices,
    bag_offsets,
    grad_out,
    *,
    col_of_size=None,
    argmax=None,
    mode="mean",
    per_sample_weights=None,
    padding_idx=None,
):
    """The lookup whose output gradient ``grad_out`` ``[B, width]`` a fused row operator
    (:func:`sparse_update_`, :func:`accumulate_scores_`) takes, checked: ``(the lookup, argmax)``.
    The one declaration of those operators' lookup keywords (documented in :func:`sparse_update_`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    pad = normalize_padding_idx(padding_idx, offsets.numel() - 1)
    if isinstance(indices, torch.Tensor) and isinstance(bag_offsets, torch.Tensor):
        if indices.dtype != bag_offsets.dtype and {indices.dtype, bag_offsets.dtype} <= set(INDEX_DTYPES):
            indices, bag_offsets = indices.long(), bag_offsets.long()  # as embedding_bag (and torch): both int64
        indices, bag_offsets = indices.contiguous(), bag_offsets.contiguous()
    if isinstance(per_sample_weights, torch.Tensor):
        per_sample_weights = per_sample_weights.contiguous()
    if isinstance(argmax, torch.Tensor):
        argmax = argmax.contiguous()  # the kernels read argmax [B, width] as contiguous rows
    bags = _Bags(offsets, indices, bag_offsets, per_sample_weights, col_of_size, grad_out.shape[-1], MODES[mode], pad)
    return bags, argmax


def _row_operator(name, lead, weight, bags: _Bags, argmax, compiled_tail, reference_tail, grad_out):
    """Runs the fused row operator ``name`` (``sparse_update_`` or ``accumulate_scores_``) on the
    compiled kernels or the reference: ``lead`` are its tensors before the lookup (the in-place
    ones and ``grad_out``), the tails its own arguments (codes for the operator, as the reference
    takes them for the reference); ``grad_out`` (in ``lead``) is named in a width error."""
    if _compiled(weight):
        am = argmax if argmax is not None else bags.offsets.new_empty(0, 0)
        args = (*lead, *bags.row_args(am), *compiled_tail)
        op = getattr(torch.ops.pme, name)
        try:
            bags.memo_call(weight, lambda checked: op(*args, table_checked=checked))
        except RuntimeError as e:
            if "does not fit in the output width" not in str(e):
                raise
            raise type(e)(  # the width here is grad_out's: say so, not only that the row is too wide
                f"{e} (the output width of {name} is grad_out's: grad_out has shape {tuple(grad_out.shape)}; it "
                "must be the lookup's output, as wide as the table)"
            ) from None
        return
    check_table(weight, bags.offsets, bags.col_of_size)
    _check_reference_lookup(weight, bags)
    getattr(reference, name)(*lead, bags.reference_args(), *reference_tail)


def _float_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores as the pruning operators read them: float32 (other float dtypes converted)."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {getattr(scores, 'dtype', type(scores))}")
    return scores.detach().float()


def topk_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest of ``scores`` (any shape; float32, or float16 / bfloat16 / float64
    read as float32) as a 0-d float32 tensor, found by radix select. ``k`` an integer."""
    scores = _float_scores(scores)
    k = as_int(k, "k")
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
    scores = _float_scores(scores)
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=scores.device)
    if threshold.numel() != 1:
        raise ValueError(f"threshold must be one number, got shape {tuple(threshold.shape)}")
    threshold = threshold.reshape(())
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
        raise ValueError(
            f"dense and scores must be 2-D of the same shape, got {tuple(dense.shape)} and {tuple(scores.shape)}"
        )
    sizes = torch.as_tensor(sizes, device=dense.device)
    if sizes.numel() == 0:
        sizes = sizes.to(torch.int64)  # no rows (an empty list is float32 to torch.as_tensor)
    if sizes.is_floating_point() or sizes.is_complex() or sizes.dtype == torch.bool:
        raise TypeError(f"sizes must be integers, got {sizes.dtype}")
    sizes = sizes.to(torch.int64)
    if sizes.shape != (dense.shape[0],):
        raise ValueError(f"sizes must have one entry per row ({dense.shape[0]}), got shape {tuple(sizes.shape)}")
    if sizes.numel() and (int(sizes.min()) < 0 or int(sizes.max()) > dense.shape[1]):
        raise ValueError(f"sizes must be in [0, {dense.shape[1]}], got [{int(sizes.min())}, {int(sizes.max())}]")
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64, device=dense.device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    dense = dense.detach()  # packing is not differentiable (the operator has no autograd formula)
    scores = scores.detach().float()
    if _compiled(dense):
        return torch.ops.pme.prune_pack(dense, scores, offsets, order == "score"), offsets
    return reference.prune_pack(dense, scores, offsets, order == "score"), offsets
