"""``torch.optim.SparseAdam`` with a fast step for the sparse gradients of flat buffers.

A table built with ``sparse=True`` gives its flat ``weight [total]`` a sparse COO gradient with
one index per stored entry (pme keeps it coalesced). ``torch.optim.SparseAdam`` takes it, but its
step adds each update back through a sparse tensor it rebuilds without the coalesced flag, and
dense += sparse then runs one BLAS ``axpy`` call per entry: about 140 ns an entry, against 9 ns an
entry for nn.EmbeddingBag's ``[rows, D]`` gradient, whose calls each cover a whole row.

``pme.optim.SparseAdam`` is the same optimizer (a subclass: the same constructor, defaults,
``param_groups`` and ``state`` entries, so its ``state_dict`` loads into torch's and back) whose
step computes the update at the gradient's entries as torch does, operation for operation: in
one pass by the ``pme::sparse_adam_`` operator (float32 and float64, CPU and CUDA; equal to
torch's within an ulp, as torch's CPU ``sqrt`` is not always correctly rounded and the kernel's
is), else (other dtypes, the pure-Python backend) by gathers, ``index_copy_`` and ``index_add_``
(bitwise torch's). It serves any parameter whose sparse gradient has one sparse dimension (pme's
flat buffers and nn.Embedding/EmbeddingBag tables alike); another one, or one whose state has
another dtype (a model cast after a step), takes torch's own step. A
tensor ``lr`` gives torch's step size (computed in the tensor's dtype). Before it moves anything,
a step checks every gradient (sparse) and every state (the parameter's shape and device: a
checkpoint of a table of other sizes is refused, naming the parameter), so that a step is taken
on all parameters or none.

    emb = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", sparse=True)
    opt = pme.optim.SparseAdam(emb.parameters(), lr=1e-3)   # was torch.optim.SparseAdam
"""

from __future__ import annotations

import math

import torch
from torch.optim import _functional

from . import ops

__all__ = ["SparseAdam"]

if ops.BUILD_INFO is not None:

    @ops.register_fake("sparse_adam_")
    def _(a):
        return None


class SparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` (lazy Adam: only the gradient's entries move) with a one-pass
    step: the same arguments and state, the same results within float rounding; much faster on
    the one-index-per-entry gradients of pme's flat buffers (see the module docstring).

    Args:
        params: the parameters (dense tensors whose gradients are sparse COO).
        lr, betas, eps, maximize: as ``torch.optim.SparseAdam``.
    """

    @torch.no_grad()
    def step(self, closure=None):
        """One step on every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_before_step()  # every gradient and state checked before any step is taken
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(
                eps=group["eps"], beta1=beta1, beta2=beta2, lr=group["lr"], maximize=group.get("maximize", False)
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                args = (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])
                if p.grad.sparse_dim() == 1 and all(t.dtype == p.dtype for t in args[1:4]):
                    _indexed_step(*args, **hyper)
                else:  # several sparse dimensions, or a state of another dtype (the model cast after
                    # a step: torch's step casts as it adds): torch's own step (it takes lists)
                    hyper["lr"] = _to_scalar(hyper["lr"])
                    _functional.sparse_adam(*([a] for a in args), **hyper)
        return loss

    def _check_before_step(self):
        """Raises, naming the parameter, on what torch's step would refuse part-way (a dense
        gradient; a state of another shape, e.g. an optimizer checkpoint of a table of other sizes,
        which the indexed step could otherwise read and write silently), so that a step is taken
        on all parameters or on none."""
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"parameter {i} of group {g}, shape {tuple(p.shape)}"
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        f"SparseAdam does not support dense gradients ({where}), please consider Adam instead: "
                        "give SparseAdam the parameters with sparse gradients (a pme table built with "
                        "sparse=True; not its projection)"
                    )
                state = self.state.get(p)
                if not state:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    t = state.get(key)
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(type(t).__name__)
                        raise RuntimeError(
                            f"SparseAdam: the state of {where} has {key} of {got}, not the parameter's "
                            "(an optimizer state_dict of another model or of a table of other sizes? "
                            "build the optimizer after the model's checkpoint is loaded)"
                        )
                    if t.device != p.device:
                        raise RuntimeError(
                            f"SparseAdam: the state of {where} has {key} on {t.device}, the parameter is on "
                            f"{p.device} (the model moved after the optimizer's first step? move the model "
                            "before building the optimizer, or load its state_dict again, which moves the state)"
                        )
                if "step" not in state:
                    raise RuntimeError(f"SparseAdam: the state of {where} has no 'step'")


def _to_scalar(lr):
    """``lr`` as torch's step takes it: a number, or a 0-dim tensor (a 1-element tensor squeezed)."""
    return lr.squeeze() if isinstance(lr, torch.Tensor) and lr.dim() != 0 else lr


def _indexed_step(param, grad, exp_avg, exp_avg_sq, step, *, eps, beta1, beta2, lr, maximize):
    """torch's ``sparse_adam`` for one parameter whose gradient has one sparse dimension, with
    one pass over the entries (or gathers and indexed writes) in place of its sparse adds: the
    same float operations in the same order; ``rows`` are unique and increasing once the gradient
    is coalesced, so the writes do not collide."""
    grad = (-grad if maximize else grad).coalesce()  # a no-op on pme's gradients (flagged coalesced)
    rows = grad._indices()[0]
    values = grad._values()
    if values.numel() == 0:
        return
    # as torch computes it: with a tensor lr, a 0-dim tensor of lr's dtype (float32 for torch.tensor(0.01))
    step_size = _to_scalar(lr) * math.sqrt(1 - beta2**step) / (1 - beta1**step)
    state = (param, exp_avg, exp_avg_sq)
    if (
        ops._kernels_serve(param)
        and param.dtype in (torch.float32, torch.float64)
        and all(t.is_contiguous() for t in state)
    ):  # one pass over the entries in C++/CUDA (csrc/cpu/sparse_adam_cpu.cpp)
        torch.ops.pme.sparse_adam_(*state, rows, values.contiguous(), beta1, beta2, eps, float(step_size))
        return
    old_avg = exp_avg.index_select(0, rows)
    avg = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)  # torch: old + (g - old) * (1 - beta1)
    old_sq = exp_avg_sq.index_select(0, rows)
    sq = values.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
    exp_avg.index_copy_(0, rows, avg)
    exp_avg_sq.index_copy_(0, rows, sq)
    param.index_add_(0, rows, -step_size * avg.div_(sq.sqrt_().add_(eps)))  # torch's order (a tensor lr first)
