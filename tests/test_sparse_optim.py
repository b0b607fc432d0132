"""pme.optim.SparseAdam: torch.optim.SparseAdam with a fast step (pme/sparse_optim.py and the
pme::sparse_adam_ operator, csrc/cpu/sparse_adam_cpu.cpp / csrc/cuda/sparse_adam_cuda.cu)."""

import copy

import pytest
import torch

import pme

from conftest import DEVICES, random_bags


def _tables(kind, V, D, dtype, device, gen):
    if kind == "pme":
        sizes = torch.randint(0, D + 1, (V,), generator=gen)
        sizes[-1] = D  # the largest index has a full row
        m = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", sparse=True, dtype=dtype, device=device)
    else:
        m = torch.nn.EmbeddingBag(V, D, mode="sum", sparse=True, dtype=dtype, device=device)
    return m, copy.deepcopy(m)


def _train(pairs, V, D, steps, gen, device, dtype, index_dtype=torch.int64):
    """The same batches (duplicates, empty bags, the largest index) through each (module, optimizer)."""
    for _ in range(steps):
        idx, offsets = random_bags(V, 12, 9, gen, index_dtype, device)
        g = torch.randn(12, D, generator=gen).to(device=device, dtype=dtype)
        for m, opt in pairs:
            opt.zero_grad()
            m(idx, offsets).backward(g)
            opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["pme", "nn"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_sparse_adam_follows_torch(device, kind, maximize, index_dtype):
    """Five steps on pme's flat buffer (one index per entry) and on nn.EmbeddingBag's [V, D]
    table: weights and moments equal torch.optim.SparseAdam's within float32 rounding (the
    kernel's sqrt is correctly rounded, torch's CPU sqrt may differ by an ulp), and the float64
    run equal to 1e-12."""
    V, D = 40, 12
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        gen = torch.Generator().manual_seed(7)
        ref, ours = _tables(kind, V, D, dtype, device, gen)
        o_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.05, maximize=maximize)
        o_ours = pme.optim.SparseAdam(ours.parameters(), lr=0.05, maximize=maximize)
        _train([(ref, o_ref), (ours, o_ours)], V, D, 5, gen, device, dtype, index_dtype)
        assert not torch.equal(
            ref.weight, _tables(kind, V, D, dtype, device, torch.Generator().manual_seed(7))[0].weight
        )
        torch.testing.assert_close(ours.weight, ref.weight, rtol=tol, atol=tol)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o_ours.state[ours.weight][key], o_ref.state[ref.weight][key], rtol=tol, atol=tol)
        assert o_ours.state[ours.weight]["step"] == o_ref.state[ref.weight]["step"] == 5


def test_sparse_adam_indexed_path_is_bitwise_torch():
    """Where the operator does not serve (bfloat16 here), the step is gathers and indexed writes of
    torch's own operations, in torch's order: bitwise equal to torch.optim.SparseAdam."""
    gen = torch.Generator().manual_seed(3)
    V, D = 30, 8
    ref, ours = _tables("pme", V, D, torch.bfloat16, "cpu", gen)
    o_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.05)
    o_ours = pme.optim.SparseAdam(ours.parameters(), lr=0.05)
    _train([(ref, o_ref), (ours, o_ours)], V, D, 4, gen, "cpu", torch.bfloat16)
    assert torch.equal(ours.weight, ref.weight)
    assert torch.equal(o_ours.state[ours.weight]["exp_avg_sq"], o_ref.state[ref.weight]["exp_avg_sq"])


def test_sparse_adam_state_dict_round_trips_with_torch():
    """The same state entries as torch's: a torch SparseAdam checkpoint resumes in ours (and the
    other way) on the same trajectory."""
    gen = torch.Generator().manual_seed(5)
    V, D = 25, 6
    a, b = _tables("pme", V, D, torch.float64, "cpu", gen)
    o_a = torch.optim.SparseAdam(a.parameters(), lr=0.02)
    _train([(a, o_a)], V, D, 2, gen, "cpu", torch.float64)
    b.load_state_dict(a.state_dict())
    o_b = pme.optim.SparseAdam(b.parameters(), lr=0.02)
    o_b.load_state_dict(copy.deepcopy(o_a.state_dict()))  # as from a file: no shared tensors
    _train([(a, o_a), (b, o_b)], V, D, 3, gen, "cpu", torch.float64)
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-12, atol=1e-12)
    back = torch.optim.SparseAdam(a.parameters(), lr=0.02)
    back.load_state_dict(copy.deepcopy(o_b.state_dict()))
    assert back.state[a.weight]["step"] == 5


def test_sparse_adam_refuses_dense_gradients_and_keeps_torch_checks():
    m = pme.MultiSizeEmbeddingBag(10, 4, sizes=2, mode="sum")  # dense gradient
    opt = pme.optim.SparseAdam(m.parameters(), lr=0.1)
    m(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    with pytest.raises(RuntimeError, match=r"dense gradients \(parameter 0 of group 0, shape \(20,\)\).*sparse=True"):
        opt.step()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        pme.optim.SparseAdam(m.parameters(), lr=-1.0)
    assert isinstance(opt, torch.optim.SparseAdam)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_adam_operator_refuses_bad_calls_before_writing(device):
    p, m, v = (torch.zeros(5, 3, device=device) for _ in range(3))
    rows = torch.tensor([0, 4], device=device)
    vals = torch.ones(2, 3, device=device)
    op = torch.ops.pme.sparse_adam_
    with pytest.raises(RuntimeError, match="values must hold 3 entries per row"):
        op(p, m, v, rows, torch.ones(2, 2, device=device), 0.9, 0.999, 1e-8, 0.1)
    with pytest.raises(RuntimeError, match="exp_avg must be contiguous float32"):
        op(p, m.double(), v, rows, vals, 0.9, 0.999, 1e-8, 0.1)
    with pytest.raises(RuntimeError, match="param must be float32 or float64"):
        op(p.half(), m.half(), v.half(), rows, vals.half(), 0.9, 0.999, 1e-8, 0.1)
    with pytest.raises(RuntimeError, match="must not share memory"):
        op(p, p, v, rows, vals, 0.9, 0.999, 1e-8, 0.1)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"rows\[1\] = 5 is out of range for 5 rows"):
            op(p, m, v, torch.tensor([0, 5]), vals, 0.9, 0.999, 1e-8, 0.1)
        with pytest.raises(RuntimeError, match=r"rows must be increasing.*rows\[1\] = 0 follows 0"):
            op(p, m, v, torch.tensor([0, 0]), vals, 0.9, 0.999, 1e-8, 0.1)
    assert not p.any() and not m.any() and not v.any()  # nothing was written
    op(p, m, v, rows, vals, 0.9, 0.999, 1e-8, 0.1)
    assert p[[0, 4]].lt(0).all() and not p[1:4].any()


def test_opcheck_sparse_adam():
    p, m, v = (
        torch.randn(6, 4, dtype=torch.float64),
        torch.rand(6, 4, dtype=torch.float64),
        torch.rand(6, 4, dtype=torch.float64),
    )
    torch.library.opcheck(
        torch.ops.pme.sparse_adam_,
        (p, m, v, torch.tensor([1, 3]), torch.randn(2, 4, dtype=torch.float64), 0.9, 0.99, 1e-8, 0.01),
    )


def test_sparse_adam_takes_torch_step_for_several_sparse_dims():
    """A gradient with two sparse dimensions (not a table's) goes through torch's own step: the
    same result as torch.optim.SparseAdam."""
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(4, 5, generator=gen, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    o_a, o_b = torch.optim.SparseAdam([a], lr=0.1), pme.optim.SparseAdam([b], lr=0.1)
    for _ in range(3):
        idx = torch.tensor([[0, 1, 3], [2, 4, 0]])
        grad = torch.sparse_coo_tensor(idx, torch.randn(3, generator=gen), (4, 5))
        a.grad, b.grad = grad.clone(), grad.clone()
        o_a.step()
        o_b.step()
    assert b.grad.sparse_dim() == 2 and torch.equal(b, a)
