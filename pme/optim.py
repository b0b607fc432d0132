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
  scaler's scale each step (the fused step divides by it); inf/NaN steps are not skipped.
- DDP: not supported for the fused path (each rank would update its own copy); shard tables
  across ranks (model parallel) or use the dense-gradient path.
- The optimizer state (``optim_state1``, ``optim_state2``, ``optim_step``) lives in the
  module's buffers, so ``state_dict`` saves it and a resumed run follows the same trajectory.
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["SGD", "RowwiseAdagrad", "Adam", "FusedOptimizer"]


class FusedOptimizer:
    """Base class: hyperparameters, state allocation and the fused lookup."""

    name = ""

    def __init__(self, lr: float, weight_decay: float = 0.0, eps: float = 1e-8, beta1: float = 0.9,
                 beta2: float = 0.999, grad_scale: float = 1.0):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({beta1}, {beta2})")
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
        module.optim_step += 1
        g = grad_out if self.grad_scale == 1.0 else grad_out / self.grad_scale
        ops.sparse_update_(module.weight.data, module.optim_state1, module.optim_state2, g.to(module.weight.dtype),
                           module.offsets, indices, bag_offsets, col_of_size=module.col_of_size, argmax=argmax,
                           mode=mode, per_sample_weights=psw, padding_idx=None if pad < 0 else pad,
                           optimizer=self.name, lr=self.lr, weight_decay=self.weight_decay, eps=self.eps,
                           beta1=self.beta1, beta2=self.beta2, step=int(module.optim_step))


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
        ctx.opt.backward_step(ctx.module, grad_out.contiguous(), indices, bag_offsets, psw, argmax, ctx.mode, ctx.pad)
        return (None,) * 9


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
