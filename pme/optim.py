"""Fused sparse optimizers for multi-size tables.

Attach one to a table and ``loss.backward()`` applies the step straight into the flat buffer,
touching only the rows of the batch and never building a gradient the size of the table::

    emb = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum",
                                    optimizer=pme.optim.RowwiseAdagrad(lr=0.05))
    dense_opt = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    loss.backward()      # emb is updated here
    dense_opt.step()     # the rest of the model, as usual

Semantics: the gradients of duplicate rows in a batch are summed first, then one step of the
optimizer is taken on the summed gradient, exactly as the dense optimizer would on the dense
view (SGD; row-wise Adagrad = Adagrad with one accumulator per row, the mean of g^2 over the
row's entries; Adam = torch.optim.SparseAdam's lazy Adam: rows outside the batch keep their
moments) plus L2 ``weight_decay`` added to the gradient as torch's optimizers do.

Interaction with PyTorch habits (see README "Fused sparse update"):

- ``weight.requires_grad`` is False: dense optimizers skip it, ``zero_grad`` has nothing to do.
- Gradient clipping does not see the table's gradient (it is consumed in backward).
- AMP: fine with bf16 autocast; with ``GradScaler`` set ``optimizer.grad_scale`` to the
  scaler's scale each step (the fused step divides the summed gradient by it in float32, not in
  a 16-bit table's dtype); inf/NaN steps are not skipped.
- DDP: not supported for the fused path (each rank would update its own copy); shard tables
  across ranks (model parallel) or use the dense-gradient path.
- The optimizer state (``optim_state1``, ``optim_state2``, ``optim_step``) lives in the
  module's buffers, so ``state_dict`` saves it and a resumed run follows the same trajectory.

Not fused: ``SparseAdam`` is ``torch.optim.SparseAdam`` (for tables built with ``sparse=True``)
with a step that is fast on the flat buffer's gradient (``pme/sparse_optim.py``).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import ops
from .sparse_optim import SparseAdam  # torch.optim's, with a fast step for flat buffers

__all__ = ["SGD", "RowwiseAdagrad", "Adam", "FusedOptimizer", "Hyperparameters", "SparseAdam"]

Hyperparameters = ops.Hyperparameters  # what an optimizer's hyperparameters() gives


class FusedOptimizer(ops.RowConsumer):
    """Base class: hyperparameters and state; the fused lookup is ``pme.ops.RowConsumer``'s."""

    name = ""

    def __init__(
        self,
        lr: float,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        beta1: float = 0.9,
        beta2: float = 0.999,
        grad_scale: float = 1.0,
    ):
        if not isinstance(lr, numbers.Real) and hasattr(lr, "__iter__"):
            raise TypeError(
                f"{type(self).__name__} takes no parameters (got {type(lr).__name__} as lr): a fused optimizer is "
                "attached to a pme table with optimizer=... when the table is built (for a parameter-based "
                "optimizer use pme.optim.SparseAdam or torch.optim)"
            )
        ops.Hyperparameters(lr=lr, weight_decay=weight_decay, eps=eps, beta1=beta1, beta2=beta2)  # checks them
        _check_grad_scale(grad_scale)
        self.lr, self.weight_decay, self.eps, self.beta1, self.beta2 = lr, weight_decay, eps, beta1, beta2
        self.grad_scale = grad_scale

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay})"

    def hyperparameters(self) -> ops.Hyperparameters:
        """This optimizer's step as ``pme.ops.sparse_update_`` takes it (checked again: the attributes
        may have been changed since, e.g. by a learning-rate schedule). A one-element tensor
        ``grad_scale`` is read here, once a step (on CUDA a synchronisation)."""
        scale = float(self.grad_scale)
        _check_grad_scale(scale)
        return ops.Hyperparameters(self.name, self.lr, self.weight_decay, self.eps, self.beta1, self.beta2, scale)

    def state(self, module):
        """``optim_state1``/``optim_state2`` in the table's accumulation dtype, ``optim_step`` on the host."""
        return [
            ops.StateBuffer("optim_state1", (0,)),
            ops.StateBuffer("optim_state2", (0,)),
            ops.StateBuffer("optim_step", (), torch.int64, host=True),
        ]

    def consume(self, module, rows):
        """One optimizer step on the rows of one fused lookup (``pme.ops.BackwardRows`` of a table, or
        ``pme.collection.CollectionRows`` of a collection: both apply it with ``update_``)."""
        _check_grad_scale(self.grad_scale)
        hyper = self.hyperparameters()
        step = int(module.optim_step) + 1
        # (grad_scale is in hyper: the operators unscale the summed gradient in the accumulation dtype)
        rows.update_(module, module.optim_state1, module.optim_state2, rows.grad_out, optimizer=hyper, step=step)
        module.optim_step += 1  # only once the step has been taken (a refused step leaves the count)


def _rows(module) -> int:
    """Rows of a table or of all tables of a collection (``offsets`` is ``[V + 1]``)."""
    return module.offsets.numel() - 1


def _pair(betas):
    """Adam's ``betas``: exactly two values (``(beta1, beta2)``)."""
    try:
        b = tuple(betas)
    except TypeError:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    if len(b) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {len(b)} values")
    return b


def _check_grad_scale(scale):
    """grad_scale divides the gradient: a positive finite number (a GradScaler's scale), or a
    one-element tensor holding one (its value is checked where the step reads it)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"grad_scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"grad_scale must be a positive finite number, got {scale!r}")


class SGD(FusedOptimizer):
    """Plain SGD: ``w -= lr * (g + weight_decay * w)`` on the rows of the batch."""

    name = "sgd"

    def __init__(self, lr: float, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)


class RowwiseAdagrad(FusedOptimizer):
    """Adagrad with one accumulator per row: ``s_r += mean(g_r^2)``, ``w_r -= lr * g_r / (sqrt(s_r) + eps)``.

    State: ``[V]`` floats (4 bytes a row), the usual choice for recommendation tables (FBGEMM).
    """

    name = "rowwise_adagrad"

    def __init__(self, lr: float, weight_decay: float = 0.0, eps: float = 1e-8):
        super().__init__(lr, weight_decay, eps)

    def state(self, module):
        """``optim_state1`` ``[V]`` (one sum of squares per row), ``optim_state2`` empty, ``optim_step``."""
        s1, s2, step = super().state(module)
        return [s1._replace(shape=(_rows(module),), per="row", nonnegative=True), s2, step]


class Adam(FusedOptimizer):
    """Lazy Adam, as torch.optim.SparseAdam (same formula, eps added to sqrt(v)), plus L2 weight
    decay: per-entry moments, bias correction by a per-table step count; rows outside the batch
    keep their moments and weights."""

    name = "adam"

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay, eps, *_pair(betas))

    @property
    def betas(self):
        """``(beta1, beta2)``, as torch.optim.Adam names them; setting it sets both (checked at the step)."""
        return (self.beta1, self.beta2)

    @betas.setter
    def betas(self, value):
        self.beta1, self.beta2 = _pair(value)

    def __repr__(self):
        return (
            f"Adam(lr={self.lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps}, weight_decay={self.weight_decay})"
        )

    def state(self, module):
        """``optim_state1`` (first moments) and ``optim_state2`` (second moments) ``[total]``, ``optim_step``."""
        s1, s2, step = super().state(module)
        n = module.weight.numel()
        return [s1._replace(shape=(n,), per="entry"), s2._replace(shape=(n,), per="entry", nonnegative=True), step]
