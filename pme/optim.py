"""Fused sparse optimizers for multi-size tables.

Attach one to a table and ``loss.backward()`` applies the step straight into the flat buffer,
touching only the rows of the batch and never building a gradient the size of the table::

    emb = pme.MultiSizeEmbeddingBag(V, D, sizes, mode="sum",
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
  scaler's scale each step (the fused step divides by it); inf/NaN steps are not skipped.
- DDP: not supported for the fused path (each rank would update its own copy); shard tables
  across ranks (model parallel) or use the dense-gradient path.
- The optimizer state (``optim_state1``, ``optim_state2``, ``optim_step``) lives in the
  module's buffers, so ``state_dict`` saves it and a resumed run follows the same trajectory.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import ops

__all__ = ["SGD", "RowwiseAdagrad", "Adam", "FusedOptimizer"]


class FusedOptimizer:
    """Base class: hyperparameters, state allocation and the fused lookup."""

    name = ""

    def __init__(self, lr: float, weight_decay: float = 0.0, eps: float = 1e-8, beta1: float = 0.9,
                 beta2: float = 0.999, grad_scale: float = 1.0):
        for name, v in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps), ("beta1", beta1),
                        ("beta2", beta2)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be >= 0 and finite, got {lr}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {weight_decay}")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be >= 0 and finite, got {eps}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")
        _check_grad_scale(grad_scale)
        self.lr, self.weight_decay, self.eps, self.beta1, self.beta2 = lr, weight_decay, eps, beta1, beta2
        self.grad_scale = grad_scale

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay})"

    def state_shapes(self, module):
        """Shapes of (state1, state2) for a table."""
        return (0,), (0,)

    def attach(self, module):
        """Allocates state buffers on ``module`` and makes its lookups fused."""
        acc = ops.acc_dtype(module.weight.dtype)
        s1, s2 = self.state_shapes(module)
        dev = module.weight.device
        module.register_buffer("optim_state1", torch.zeros(s1, dtype=acc, device=dev))
        module.register_buffer("optim_state2", torch.zeros(s2, dtype=acc, device=dev))
        module.register_buffer("optim_step", torch.zeros((), dtype=torch.int64))
        module.weight.requires_grad_(False)
        module.optimizer = self

    def lookup(self, module, input, offsets=None, per_sample_weights=None, include_last_offset=None, mode=None,
               forward_padding=True):
        """Forward of a fused table: returns ``[B, width]``; its backward applies the step."""
        weight = module.weight
        mode = mode or module.mode
        last = module.include_last_offset if include_last_offset is None else include_last_offset
        indices, bag_offsets, psw, m = ops.bag_inputs(weight, input, offsets, per_sample_weights, mode, last)
        pad = -1 if module.padding_idx is None else module.padding_idx
        anchor = torch.zeros((), device=weight.device, requires_grad=True)
        return _FusedLookup.apply(anchor, self, module, indices, bag_offsets, psw, mode,
                                  pad if forward_padding else -1, pad)


    def backward_step(self, module, grad_out, indices, bag_offsets, psw, argmax, mode, pad):
        """Consumes the output gradient of one fused lookup: one optimizer step on its rows."""
        _check_grad_scale(self.grad_scale)
        module.optim_step += 1
        g = grad_out if self.grad_scale == 1.0 else grad_out / self.grad_scale
        ops.sparse_update_(module.weight.data, module.optim_state1, module.optim_state2, g.to(module.weight.dtype),
                           module.offsets, indices, bag_offsets, col_of_size=module.col_of_size, argmax=argmax,
                           mode=mode, per_sample_weights=psw, padding_idx=None if pad < 0 else pad,
                           optimizer=self.name, lr=self.lr, weight_decay=self.weight_decay, eps=self.eps,
                           beta1=self.beta1, beta2=self.beta2, step=int(module.optim_step))


def _check_grad_scale(scale):
    """grad_scale divides the gradient: a positive finite number (a GradScaler's scale)."""
    if isinstance(scale, torch.Tensor):  # its value is not read: that would synchronise a GPU
        if scale.numel() != 1:
            raise ValueError(f"grad_scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"grad_scale must be a positive finite number, got {scale!r}")


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, opt, module, indices, bag_offsets, psw, mode, fwd_pad, upd_pad):
        weight, offsets, col = module.weight, module.offsets, module.col_of_size
        argmax = None
        if ops._compiled(weight):
            out, argmax = torch.ops.pme.bag_forward(weight, offsets, indices, bag_offsets, psw, col, module.width,
                                                    ops.MODES[mode], fwd_pad)
        else:
            out = ops.embedding_bag(weight, offsets, indices, bag_offsets, width=module.width, col_of_size=col,
                                    mode=mode, per_sample_weights=psw,
                                    padding_idx=None if fwd_pad < 0 else fwd_pad, include_last_offset=True)
        ctx.opt, ctx.module, ctx.mode, ctx.pad = opt, module, mode, upd_pad
        ctx.save_for_backward(indices, bag_offsets, psw, argmax)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indices, bag_offsets, psw, argmax = ctx.saved_tensors
        # per_sample_weights that require a gradient get it (from the weights before the step).
        gp = _psw_grad(ctx.module, grad_out, indices, bag_offsets, ctx.pad) if ctx.needs_input_grad[5] else None
        ctx.opt.backward_step(ctx.module, grad_out.contiguous(), indices, bag_offsets, psw, argmax, ctx.mode, ctx.pad)
        return None, None, None, None, None, gp, None, None, None


def _psw_grad(module, grad_out, indices, bag_offsets, pad):
    """Gradient of a sum lookup w.r.t. its per_sample_weights: ``<row of lookup j, grad_out[bag of j]>``.

    ``[N]`` of the weight's dtype (accumulated in ops.acc_dtype); 0 for padding lookups and for
    lookups past the last bag, as the unfused backward gives.
    """
    n_idx = indices.numel()
    acc = ops.acc_dtype(module.weight.dtype)
    rows = ops.embedding(module.weight.detach(), module.offsets, indices, width=module.width,
                         col_of_size=module.col_of_size)  # [N, width], zero-padded
    counts = (bag_offsets[1:] - bag_offsets[:-1]).long()
    bag_of = torch.repeat_interleave(torch.arange(counts.numel(), device=indices.device), counts)
    n = bag_of.numel()
    gp = torch.zeros(n_idx, dtype=acc, device=indices.device)
    gp[:n] = (rows[:n].to(acc) * grad_out[bag_of].to(acc)).sum(1)
    if pad >= 0:
        gp = gp.masked_fill(indices == pad, 0)
    return gp.to(module.weight.dtype)


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

    def state_shapes(self, module):
        return (module.num_embeddings,), (0,)


class Adam(FusedOptimizer):
    """Lazy Adam, as torch.optim.SparseAdam (same formula, eps added to sqrt(v)), plus L2 weight
    decay: per-entry moments, bias correction by a per-table step count; rows outside the batch
    keep their moments and weights."""

    name = "adam"

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay, eps, betas[0], betas[1])

    def __repr__(self):
        return f"Adam(lr={self.lr}, betas=({self.beta1}, {self.beta2}), eps={self.eps}, weight_decay={self.weight_decay})"

    def state_shapes(self, module):
        n = module.weight.numel()
        return (n,), (n,)
