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


@pytest.mark.parametrize("seed", range(4))
def test_sparse_adam_follows_torch_on_groups_accumulation_and_schedules(seed):
    """Random draws, float64, against torch.optim.SparseAdam: two groups (a pme table and an
    nn.Embedding with its own lr and maximize), gradients accumulated over two backward passes
    (uncoalesced, duplicate entries), zero_grad(set_to_none=False) (empty gradients), steps where
    one table has no gradient, a closure, a tensor lr and an lr schedule."""
    gen = torch.Generator().manual_seed(100 + seed)
    V, D = 20, 6
    tensor_lr = seed % 2 == 1
    pairs = []
    for cls in (torch.optim.SparseAdam, pme.optim.SparseAdam):
        torch.manual_seed(seed)
        bag = pme.MultiSizeEmbeddingBag(
            V,
            D,
            sizes=torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(seed)),
            mode="sum",
            sparse=True,
            dtype=torch.float64,
        )
        emb = torch.nn.Embedding(V, D, sparse=True, dtype=torch.float64)
        lr = torch.tensor(0.03) if tensor_lr else 0.03
        opt = cls([{"params": bag.parameters()}, {"params": emb.parameters(), "lr": 0.2, "maximize": True}], lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
        pairs.append((bag, emb, opt, sched))
    for step in range(6):
        draws = [torch.randint(0, V, (int(torch.randint(1, 12, (), generator=gen)),), generator=gen) for _ in range(2)]
        use_emb = step % 3 != 2
        for bag, emb, opt, sched in pairs:
            opt.zero_grad(set_to_none=step % 2 == 0)

            def closure():
                loss = 0
                for idx in draws:  # accumulated: the gradient is not coalesced
                    part = bag(idx, torch.tensor([0, len(idx) // 2])).pow(2).sum()
                    if use_emb:
                        part = part + emb(idx).sin().sum()
                    part.backward()
                    loss = loss + part.detach()
                return loss

            opt.step(closure)
            sched.step()
    (b_ref, e_ref, o_ref, _), (b_ours, e_ours, o_ours, _) = pairs
    for ref, ours in ((b_ref.weight, b_ours.weight), (e_ref.weight, e_ours.weight)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o_ours.state[ours][key], o_ref.state[ref][key], rtol=1e-12, atol=1e-12)
        assert o_ours.state[ours]["step"] == o_ref.state[ref]["step"] > 0


def test_sparse_adam_tensor_lr_takes_torch_step_size():
    """A tensor lr (float32 0-dim, as torch.tensor(0.01) is): torch computes the step size in the
    tensor's dtype; so does pme's step (once 1.5e-9 off torch's float64 trajectory), and its
    indexed path stays bitwise torch's."""
    for dtype, tol in ((torch.float64, 0.0), (torch.bfloat16, 0.0)):
        gen = torch.Generator().manual_seed(11)
        V, D = 30, 8
        ref, ours = _tables("pme", V, D, dtype, "cpu", gen)
        o_ref = torch.optim.SparseAdam(ref.parameters(), lr=torch.tensor(0.01))
        o_ours = pme.optim.SparseAdam(ours.parameters(), lr=torch.tensor(0.01))
        _train([(ref, o_ref), (ours, o_ours)], V, D, 4, gen, "cpu", dtype)
        torch.testing.assert_close(ours.weight, ref.weight, rtol=tol, atol=tol)


def test_sparse_adam_refuses_a_state_of_another_shape_before_any_step():
    """An optimizer checkpoint of a table of other sizes: torch's step refuses it (sparse_mask);
    pme's named the operator, or (bfloat16, the indexed path) read and wrote the wrong-sized
    moments silently. Now a clear error naming the parameter, before any parameter moves."""
    gen = torch.Generator().manual_seed(4)
    first = pme.MultiSizeEmbeddingBag(10, 4, sizes=torch.full((10,), 4), mode="sum", sparse=True, dtype=torch.float64)
    second = pme.MultiSizeEmbeddingBag(10, 4, sizes=torch.full((10,), 2), mode="sum", sparse=True, dtype=torch.bfloat16)
    other = pme.MultiSizeEmbeddingBag(10, 4, sizes=torch.full((10,), 3), mode="sum", sparse=True, dtype=torch.bfloat16)
    opt = pme.optim.SparseAdam([*first.parameters(), *second.parameters()], lr=0.1)
    o_other = pme.optim.SparseAdam([*first.parameters(), *other.parameters()], lr=0.1)
    _train([(first, o_other), (other, o_other)], 10, 4, 1, gen, "cpu", torch.float64)
    opt.load_state_dict(copy.deepcopy(o_other.state_dict()))  # second's state has other's 30 entries
    before = first.weight.detach().clone(), second.weight.detach().clone()
    idx, off = torch.tensor([0, 3, 3, 9]), torch.tensor([0, 2])
    opt.zero_grad()
    (first(idx, off).sum() + second(idx, off).float().sum()).backward()
    with pytest.raises(
        RuntimeError, match=r"state of parameter 1 of group 0, shape \(20,\) has exp_avg of shape \(30,\)"
    ):
        opt.step()
    assert torch.equal(first.weight, before[0]) and torch.equal(second.weight, before[1])
    assert opt.state[first.weight]["step"] == 1  # not counted either
    opt.state[second.weight] = {}  # a fresh state for the second; the first's moved off its device
    opt.state[first.weight]["exp_avg"] = torch.zeros(first.weight.shape, device="meta")
    with pytest.raises(
        RuntimeError, match=r"parameter 0 of group 0, shape \(40,\) has exp_avg on meta, the parameter is on cpu"
    ):
        opt.step()
    assert torch.equal(first.weight, before[0]) and torch.equal(second.weight, before[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA variant: no GPU")
def test_sparse_adam_serves_cuda_nn_tables_under_a_cpu_only_build(monkeypatch):
    """A CPU-only build of pme has no CUDA kernels; pme.optim.SparseAdam on a CUDA nn.Embedding
    once raised "this build of pme has no CUDA kernels" where torch.optim.SparseAdam works. It
    takes the indexed step (torch's operations) instead, bitwise torch's."""
    from pme import ops

    if ops.BUILD_INFO is None:
        pytest.skip("the pure-Python backend")
    monkeypatch.setattr(ops, "BUILD_INFO", {**ops.BUILD_INFO, "cuda": "none"})
    gen = torch.Generator().manual_seed(8)
    ref, ours = _tables("nn", 30, 8, torch.float32, "cuda", gen)
    o_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.05)
    o_ours = pme.optim.SparseAdam(ours.parameters(), lr=0.05)
    _train([(ref, o_ref), (ours, o_ours)], 30, 8, 3, gen, "cuda", torch.float32)
    assert torch.equal(ours.weight, ref.weight)


@pytest.mark.parametrize("kind", ["pme", "nn"])
@pytest.mark.parametrize("cast", [torch.float64, torch.bfloat16], ids=str)
def test_sparse_adam_after_the_model_is_cast(kind, cast):
    """A model cast after the optimizer's first step (``.double()``, ``.bfloat16()``: the same
    Parameter, its state still float32): torch's step goes on, casting as it adds; pme's raised
    ("exp_avg must be contiguous float64 like param") or, on the indexed path, failed in
    index_copy_. It now takes torch's step for that parameter, as torch.optim.SparseAdam does."""
    gen = torch.Generator().manual_seed(17)
    V, D = 20, 6
    ref, ours = _tables(kind, V, D, torch.float32, "cpu", gen)
    o_ref = torch.optim.SparseAdam(ref.parameters(), lr=0.05)
    o_ours = pme.optim.SparseAdam(ours.parameters(), lr=0.05)
    _train([(ref, o_ref), (ours, o_ours)], V, D, 2, gen, "cpu", torch.float32)
    ref.to(cast), ours.to(cast)
    assert o_ours.state[ours.weight]["exp_avg"].dtype == torch.float32
    _train([(ref, o_ref), (ours, o_ours)], V, D, 2, gen, "cpu", cast)
    assert ours.weight.dtype == cast
    # (the float32 steps before the cast may differ by an ulp: the kernel's sqrt is correctly rounded)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-6, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(o_ours.state[ours.weight][key], o_ref.state[ref.weight][key], rtol=1e-6, atol=1e-6)
