"""Fused sparse updates against torch optimizers on the dense view and the float64 reference."""

import dataclasses
import math

import pytest
import torch

import pme
from pme import ops, reference

from conftest import DEVICES, make_table, random_bags


def _batches(V, steps, seed, device, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    return [random_bags(V, 12, 6, gen, index_dtype, device) for _ in range(steps)]


def _grad_out(B, width, step, device, dtype):
    return torch.randn(B, width, generator=torch.Generator().manual_seed(1000 + step)).to(dtype).to(device)


def run_fused(opt, sizes, D, batches, mode, device, dtype=torch.float32, padding_idx=None, w0=None):
    """Trains a module with a fused optimizer on `batches` with fixed output gradients."""
    m = pme.MultiSizeEmbeddingBag(
        len(sizes), D, sizes=sizes, mode=mode, padding_idx=padding_idx, device=device, dtype=dtype, optimizer=opt
    )
    if w0 is not None:
        m.weight.data.copy_(w0)
    for step, (idx, off) in enumerate(batches):
        out = m(idx, off)
        out.backward(_grad_out(out.shape[0], out.shape[1], step, device, dtype))
    return m


def run_torch(make_opt, sizes, D, batches, mode, device, dtype, w0, padding_idx=None, sparse_grad=False):
    """Same training with a torch optimizer on the flat parameter, gradient through the dense view."""
    m = pme.MultiSizeEmbeddingBag(
        len(sizes), D, sizes=sizes, mode=mode, padding_idx=padding_idx, device=device, dtype=dtype
    )
    w = torch.nn.Parameter(w0.clone())
    opt = make_opt([w])
    for step, (idx, off) in enumerate(batches):
        opt.zero_grad()
        bo = torch.cat([off, off.new_tensor([idx.numel()])])
        out = reference.embedding_bag(w, m.offsets, idx, bo, D, None, mode, None, padding_idx)
        out.backward(_grad_out(out.shape[0], out.shape[1], step, device, dtype))
        if sparse_grad:
            # every entry of the rows in the batch, explicit zeros included (lazy Adam's rows)
            rows = idx.long().unique()
            if padding_idx is not None:
                rows = rows[rows != padding_idx]
            entry = torch.isin(reference.row_ids(m.offsets), rows).nonzero().reshape(1, -1)
            w.grad = torch.sparse_coo_tensor(entry, w.grad[entry[0]], w.shape)
        opt.step()
    return w.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_sgd_matches_torch_sgd(device, mode):
    V, D = 40, 8
    sizes = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(0))
    batches = _batches(V, 5, 1, device)
    w0 = torch.randn(int(sizes.sum()), generator=torch.Generator().manual_seed(2)).to(device)
    fused = run_fused(pme.optim.SGD(lr=0.1), sizes, D, batches, mode, device, w0=w0, padding_idx=3)
    ref = run_torch(
        lambda p: torch.optim.SGD(p, lr=0.1), sizes, D, batches, mode, device, torch.float32, w0, padding_idx=3
    )
    torch.testing.assert_close(fused.weight, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_rowwise_adagrad_with_unit_rows_is_torch_adagrad(device):
    """With every row of size 1, row-wise Adagrad is exactly torch.optim.Adagrad."""
    V = 50
    sizes = torch.ones(V, dtype=torch.long)
    sizes[7] = 0
    batches = _batches(V, 6, 3, device)
    w0 = torch.randn(int(sizes.sum()), generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)
    fused = run_fused(
        pme.optim.RowwiseAdagrad(lr=0.3, eps=1e-10), sizes, 1, batches, "sum", device, dtype=torch.float64, w0=w0
    )
    ref = run_torch(
        lambda p: torch.optim.Adagrad(p, lr=0.3, eps=1e-10), sizes, 1, batches, "sum", device, torch.float64, w0
    )
    torch.testing.assert_close(fused.weight, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adam_matches_torch_sparse_adam(device, mode, dtype):
    V, D = 30, 8
    sizes = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(5))
    batches = _batches(V, 6, 6, device)
    w0 = torch.randn(int(sizes.sum()), generator=torch.Generator().manual_seed(7)).to(dtype).to(device)
    fused = run_fused(pme.optim.Adam(lr=0.05), sizes, D, batches, mode, device, dtype=dtype, w0=w0)
    ref = run_torch(
        lambda p: torch.optim.SparseAdam(p, lr=0.05), sizes, D, batches, mode, device, dtype, w0, sparse_grad=True
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fused.weight, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("betas", [(0.9, 0.99999), (0.99999, 0.999), (0.999999, 0.9999999)])
def test_adam_betas_near_one_float32_follows_float64(device, betas):
    """1 - beta and the bias corrections are formed in double, as torch forms them: a float32
    table's Adam updates stay within float32 rounding of torch's float64 SparseAdam when a beta is
    near 1 (formed in float32 they cancelled: 4e-4 to 7e-2 of the update off)."""
    V, D = 30, 8
    sizes = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(5))
    batches = _batches(V, 4, 6, device)
    w0 = torch.randn(int(sizes.sum()), generator=torch.Generator().manual_seed(7)).to(device)  # float32 values
    fused = run_fused(pme.optim.Adam(lr=0.05, betas=betas), sizes, D, batches, "sum", device, w0=w0)
    ref = run_torch(
        lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=betas),
        sizes,
        D,
        batches,
        "sum",
        device,
        torch.float64,
        w0.double(),
        sparse_grad=True,
    )
    moved, want = fused.weight.detach().double() - w0.double(), ref - w0.double()
    assert want.abs().max() > 0.05
    assert (moved - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("layout", ["padded", "grouped"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_fused_update_matches_reference_float64(device, optimizer, layout, mode):
    """The operator against pme.reference (dense optimizer step on the summed gradient), weight decay on."""
    V, D = 25, 8
    w, offsets, col, width, sizes = make_table(V, D, torch.float64, device, layout, seed=9)
    gen = torch.Generator().manual_seed(10)
    n_state = {"sgd": (0, 0), "rowwise_adagrad": (V, 0), "adam": (w.numel(), w.numel())}[optimizer]
    s = [torch.rand(n, dtype=torch.float64, generator=gen).to(device) for n in n_state]
    w_ref, s_ref = w.clone(), [t.clone() for t in s]
    for step in range(1, 4):
        idx, off = random_bags(V, 9, 6, gen, torch.int64, device, padding_idx=4)
        bo = torch.cat([off, off.new_tensor([idx.numel()])])
        psw = torch.randn(idx.shape, generator=gen, dtype=torch.float64).to(device) if mode == "sum" else None
        out, argmax = (
            torch.ops.pme.bag_forward(w, offsets, idx, bo, psw, col, width, ops.MODES[mode], 4)
            if ops.backend() == "compiled"
            else (None, None)
        )
        go = torch.randn(bo.numel() - 1, width, generator=gen, dtype=torch.float64).to(device)
        kw = dict(optimizer=optimizer, lr=0.1, weight_decay=0.01, eps=1e-8, beta1=0.8, beta2=0.9, step=step)
        ops.sparse_update_(
            w,
            s[0],
            s[1],
            go,
            offsets,
            idx,
            bo,
            col_of_size=col,
            argmax=argmax,
            mode=mode,
            per_sample_weights=psw,
            padding_idx=4,
            **kw,
        )
        hyper = ops.Hyperparameters(optimizer, lr=0.1, weight_decay=0.01, eps=1e-8, beta1=0.8, beta2=0.9)
        lookup = reference.Lookup(offsets, idx, bo, width, col, mode, psw, 4)
        reference.sparse_update_(w_ref, s_ref[0], s_ref[1], go, lookup, hyper, step)
        torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(s, s_ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt", [lambda: pme.optim.RowwiseAdagrad(lr=0.1), lambda: pme.optim.Adam(lr=0.01)])
def test_state_dict_resume_gives_the_same_trajectory(device, opt, tmp_path):
    V, D = 40, 16
    sizes = torch.randint(1, D + 1, (V,), generator=torch.Generator().manual_seed(0))
    batches = _batches(V, 6, 8, device)
    w0 = torch.randn(int(sizes.sum()), generator=torch.Generator().manual_seed(1)).to(device)
    full = run_fused(opt(), sizes, D, batches, "sum", device, w0=w0)
    half = run_fused(opt(), sizes, D, batches[:3], "sum", device, w0=w0)
    torch.save(half.state_dict(), tmp_path / "ckpt.pt")
    resumed = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", device=device, optimizer=opt())
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert int(resumed.optim_step) == 3
    for step, (idx, off) in enumerate(batches[3:], start=3):
        out = resumed(idx, off)
        out.backward(_grad_out(out.shape[0], out.shape[1], step, device, torch.float32))
    assert torch.equal(resumed.weight, full.weight)
    assert torch.equal(resumed.optim_state1, full.optim_state1)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_update_is_deterministic(device):
    V, D = 30, 32
    sizes = torch.full((V,), D)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (3000,), generator=gen).to(device)  # heavy duplicates
    off = torch.arange(0, 3000, 10, device=device)
    w0 = torch.randn(V * D, generator=gen).to(device)
    results = []
    for _ in range(3):
        m = run_fused(pme.optim.Adam(lr=0.01), sizes, D, [(idx, off)] * 2, "mean", device, w0=w0)
        results.append(m.weight.clone())
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_fused_table_has_no_dense_grad_and_eval_is_plain():
    m = pme.MultiSizeEmbeddingBag(10, 4, sizes=4, mode="sum", optimizer=pme.optim.SGD(lr=1.0))
    assert not m.weight.requires_grad and "optimizer=SGD" in repr(m)
    before = m.weight.clone()
    x = torch.tensor([[1, 2]])
    m(x).sum().backward()
    assert m.weight.grad is None
    changed = (m.weight != before).nonzero().reshape(-1)
    assert set(changed.tolist()) == set(range(4, 12))  # rows 1 and 2 only
    m.eval()
    assert not m(x).requires_grad


def test_embedding_fused_update_skips_padding():
    m = pme.MultiSizeEmbedding(10, 4, sizes=4, padding_idx=2, optimizer=pme.optim.SGD(lr=1.0))
    with torch.no_grad():
        m.weight[8:12] = 5.0
    out = m(torch.tensor([[2, 3], [2, 2]]))
    assert out.shape == (2, 2, 4) and bool((out[0, 0] == 5.0).all())  # padding row returned as stored
    out.sum().backward()
    assert bool((m.weight[8:12] == 5.0).all())  # ...but never updated


def test_bad_optimizer_arguments():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        pme.optim.SGD(lr=-1)
    with pytest.raises(ValueError, match="betas"):
        pme.optim.Adam(betas=(1.0, 0.9))
    w, offsets, col, width, _ = make_table(10, 4)
    idx, bo = torch.tensor([1, 2]), torch.tensor([0, 2])
    go = torch.randn(1, width)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ops.sparse_update_(w, torch.empty(0), torch.empty(0), go, offsets, idx, bo, optimizer="lamb")
    with pytest.raises(RuntimeError, match="state1"):
        ops.sparse_update_(w, torch.zeros(3), torch.empty(0), go, offsets, idx, bo, optimizer="rowwise_adagrad")


class _GradientCollector(ops.RowConsumer):
    """A RowConsumer of our own: turns every batch's rows back into the flat weight gradient
    (through the dense-view oracle) and sums it, plus a host-side call count and an int buffer."""

    def state(self, module):
        return [
            ops.StateBuffer("grad_sum", (module.weight.numel(),)),
            ops.StateBuffer("rows_seen", (module.num_embeddings,), torch.int64),
            ops.StateBuffer("calls", (), torch.int64, host=True),
        ]

    def consume(self, module, rows):
        assert rows.grad_out.is_contiguous() and rows.grad_out.dtype == module.weight.dtype
        module.calls += 1
        module.rows_seen[rows.indices.long()] += 1
        w = module.weight.detach().double().requires_grad_(True)
        with torch.enable_grad():
            out = reference.embedding_bag(
                w,
                module.offsets,
                rows.indices,
                rows.bag_offsets,
                module.width,
                module.col_of_size,
                rows.mode,
                rows.per_sample_weights,
                rows.padding_idx,
            )
            out.backward(rows.grad_out.double())
        module.grad_sum += w.grad.to(module.grad_sum.dtype)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_row_consumer_receives_the_rows_of_the_plain_backward(mode, index_dtype, layout):
    # The seam's contract: what consume() gets is enough to rebuild the plain lookup's weight
    # gradient exactly (indices, bag offsets, per-sample weights, argmax mode, padding row).
    gen = torch.Generator().manual_seed(7)
    V, D = 30, 8
    sizes = (
        torch.randint(0, 3, (V,), generator=gen) * 4
        if layout == "grouped"
        else torch.randint(0, D + 1, (V,), generator=gen)
    )
    kw = dict(mode=mode, padding_idx=V - 1, layout=layout, dtype=torch.float64)
    plain = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, **kw)
    fused = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, optimizer=_GradientCollector(), **kw)
    fused.weight.data.copy_(plain.weight.data)
    assert fused.grad_sum.dtype == torch.float64 and fused.rows_seen.dtype == torch.int64
    for _ in range(3):
        idx, off = random_bags(V, 9, 5, gen, index_dtype, padding_idx=V - 1)
        psw = torch.rand(idx.shape, generator=gen, dtype=torch.float64) if mode == "sum" else None
        out_p, out_f = plain(idx, off, psw), fused(idx, off, psw)
        torch.testing.assert_close(out_f, out_p)
        g = torch.randn(out_p.shape, generator=gen, dtype=torch.float64)
        out_p.backward(g)
        out_f.backward(g)
    torch.testing.assert_close(fused.grad_sum, plain.weight.grad)
    assert int(fused.calls) == 3 and int(fused.rows_seen.sum()) > 0
    # the consumer's buffers follow its declared rules through casts and moves
    fused.to(torch.float16)
    assert fused.weight.dtype == torch.float16 and fused.grad_sum.dtype == torch.float32
    assert fused.rows_seen.dtype == torch.int64
    fused.to("meta")
    assert fused.grad_sum.device.type == "meta" and fused.rows_seen.device.type == "meta"
    assert fused.calls.device.type == "cpu"
    assert set(fused.state_dict()) >= {"grad_sum", "rows_seen", "calls"}


def test_fused_optimizer_state_dict_keys_are_unchanged():
    # checkpoints written before the RowConsumer seam name the state optim_state1/2 and optim_step
    m = pme.MultiSizeEmbeddingBag(6, 4, sizes=4, mode="sum", optimizer=pme.optim.Adam(lr=0.1))
    assert set(m.state_dict()) == {"weight", "offsets", "optim_state1", "optim_state2", "optim_step"}
    assert m.optim_state1.shape == m.optim_state2.shape == (24,) and m.optim_step.device.type == "cpu"


@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_functional_row_operators_agree_across_backends(layout, monkeypatch):
    """ops.sparse_update_ and ops.accumulate_scores_ run the compiled kernels or, without them,
    the reference, through one dispatch: both give the same state and scores (float64)."""
    w, off, col, width, _ = make_table(20, 8, dtype=torch.float64, layout=layout, seed=11)
    gen = torch.Generator().manual_seed(11)
    idx, bo = random_bags(20, 6, 4, gen)
    bo = torch.cat([bo, torch.tensor([idx.numel()])])
    g = torch.randn(6, width, generator=gen, dtype=torch.float64)
    psw = torch.randn(idx.numel(), generator=gen, dtype=torch.float64)

    def run():
        wt, s1, s2 = w.clone(), torch.zeros(w.numel(), dtype=torch.float64), torch.zeros(w.numel(), dtype=torch.float64)
        ops.sparse_update_(wt, s1, s2, g, off, idx, bo, col_of_size=col, mode="sum", per_sample_weights=psw,
                           optimizer="adam", lr=0.1, step=2)  # fmt: skip
        sc = torch.zeros(w.numel(), dtype=torch.float64)
        ops.accumulate_scores_(sc, g, w, off, idx, bo, col_of_size=col, mode="mean", rule="snip")
        return wt, s1, s2, sc

    compiled = run()
    monkeypatch.setattr(ops, "_compiled", lambda t: False)
    for a, b in zip(compiled, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(compiled[0], w) and compiled[3].abs().sum() > 0  # both did something


# --------------------------------------------------------------------------------------------
# pme.ops.Hyperparameters: the one object for a fused step's hyperparameters
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("compiled", [True, False])
def test_hyperparameters_object_optimizer_and_keywords_take_the_same_step(optimizer, compiled, monkeypatch):
    """sparse_update_ with a Hyperparameters, with a pme.optim optimizer and with the older
    keywords (optimizer name, lr=..., ...) takes the same step, bit for bit, on the kernels and on
    the reference; and the step is the dense-view oracle's (so the three cannot all ignore it)."""
    if not compiled:
        monkeypatch.setattr(ops, "_compiled", lambda t: False)
    elif ops.backend() != "compiled":
        pytest.skip("no compiled extension")
    V, D = 30, 8
    w, offsets, col, width, _ = make_table(V, D, torch.float64, layout="grouped", seed=21)
    gen = torch.Generator().manual_seed(22)
    idx, off = random_bags(V, 7, 5, gen, torch.int32, padding_idx=3)
    bo = torch.cat([off, off.new_tensor([idx.numel()])])
    go = torch.randn(7, width, generator=gen, dtype=torch.float64)
    n1, n2 = {"sgd": (0, 0), "rowwise_adagrad": (V, 0), "adam": (w.numel(), w.numel())}[optimizer]
    s0 = (torch.rand(n1, generator=gen, dtype=torch.float64), torch.rand(n2, generator=gen, dtype=torch.float64))
    values = dict(lr=0.2, weight_decay=0.05, eps=1e-6, beta1=0.7, beta2=0.8)
    fused_opt = {
        "sgd": lambda: pme.optim.SGD(lr=0.2, weight_decay=0.05),
        "rowwise_adagrad": lambda: pme.optim.RowwiseAdagrad(lr=0.2, weight_decay=0.05, eps=1e-6),
        "adam": lambda: pme.optim.Adam(lr=0.2, betas=(0.7, 0.8), eps=1e-6, weight_decay=0.05),
    }[optimizer]()
    if optimizer != "adam":  # what SGD and Adagrad leave at the defaults (unused by their steps)
        values.update(beta1=0.9, beta2=0.999, **({"eps": 1e-8} if optimizer == "sgd" else {}))
    spellings = {
        "keywords": dict(optimizer=optimizer, **values),
        "object": dict(optimizer=ops.Hyperparameters(optimizer, **values)),
        "optimizer": dict(optimizer=fused_opt),
    }
    lookup = dict(col_of_size=col, mode="mean", padding_idx=3)
    results = {}
    for name, kw in spellings.items():
        wt, s1, s2 = w.clone(), s0[0].clone(), s0[1].clone()
        ops.sparse_update_(wt, s1, s2, go, offsets, idx, bo, step=3, **lookup, **kw)
        results[name] = (wt, s1, s2)
    for name in ("object", "optimizer"):
        for a, b in zip(results["keywords"], results[name], strict=True):
            assert torch.equal(a, b), name
    wr, s1, s2 = w.clone(), s0[0].clone(), s0[1].clone()
    oracle = reference.Lookup(offsets, idx, bo, width, col, "mean", None, 3)
    reference.sparse_update_(wr, s1, s2, go, oracle, ops.Hyperparameters(optimizer, **values), 3)
    torch.testing.assert_close(results["object"][0], wr, rtol=1e-12, atol=1e-12)
    assert not torch.equal(wr, w)


def test_collection_update_takes_hyperparameters_and_keywords_alike():
    """collection_update_ with a Hyperparameters equals the keyword spelling, and a field given
    as a keyword next to an object replaces that field."""
    import pme.collection as pc

    tables = [pc.EmbeddingBagConfig(20, 8, "a", ["fa"]), pc.EmbeddingBagConfig(15, 4, "b", ["fb"], pooling="mean")]
    m = pc.MultiSizeEmbeddingBagCollection(tables, sizes={"a": 5, "b": 3}, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    inp = {
        "fa": (torch.randint(0, 20, (7,), generator=gen), torch.tensor([0, 3, 3, 7])),
        "fb": (torch.randint(0, 15, (4,), generator=gen), torch.tensor([0, 1, 4, 4])),
    }
    keys, idx, bo, psw, B = m._normal_form(inp)
    batch = pc.Batch(m.table_rows, m._features(keys), idx, bo, psw, B)
    go = torch.randn(B, m.out_width, generator=gen, dtype=torch.float64)
    V = m.offsets.numel() - 1

    def step(**kw):
        w, s1 = m.weight.detach().clone(), torch.zeros(V, dtype=torch.float64)
        pc.collection_update_(w, s1, torch.zeros(0, dtype=torch.float64), go, m.offsets, batch, step=1, **kw)
        return w, s1

    by_keywords = step(optimizer="rowwise_adagrad", lr=0.3, eps=1e-5)
    by_object = step(optimizer=ops.Hyperparameters("rowwise_adagrad", lr=0.3, eps=1e-5))
    by_both = step(optimizer=ops.Hyperparameters("rowwise_adagrad", lr=9.0, eps=1e-5), lr=0.3)
    for a, b, c in zip(by_keywords, by_object, by_both, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(by_keywords[0], m.weight.detach())


def test_hyperparameters_refuse_bad_values_clearly():
    H = ops.Hyperparameters
    assert pme.optim.Hyperparameters is H
    h = H("adam", lr=0.1)
    assert (h.optimizer, h.lr, h.weight_decay, h.eps, h.beta1, h.beta2) == ("adam", 0.1, 0.0, 1e-8, 0.9, 0.999)
    assert h.operator_args(4) == (ops.OPTIMIZERS["adam"], 0.1, 0.0, 1e-8, 0.9, 0.999, 1.0, 4)
    assert H.of(h) is h and H.of(h, lr=0.5) == H("adam", lr=0.5) and H.of("sgd", lr=2.0) == H("sgd", 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.lr = 1.0
    for kwargs, err, msg in [
        (dict(optimizer="lamb"), ValueError, "optimizer must be one of"),
        (dict(lr=-0.1), ValueError, "lr must be >= 0 and finite, got -0.1"),
        (dict(lr=math.nan), ValueError, "lr must be >= 0 and finite"),
        (dict(weight_decay=math.inf), ValueError, "weight_decay must be >= 0 and finite"),
        (dict(eps=-1e-8), ValueError, "eps must be >= 0"),
        (dict(beta1=1.0), ValueError, r"betas must be in \[0, 1\), got \(1.0, 0.999\)"),
        (dict(beta2=-0.5), ValueError, "betas must be in"),
        (dict(lr="0.1"), TypeError, "lr must be a real number, got str"),
        (dict(eps=True), TypeError, "eps must be a real number, got bool"),
    ]:
        with pytest.raises(err, match=msg):
            H(**kwargs)
    with pytest.raises(TypeError, match="optimizer must be a pme.ops.Hyperparameters"):
        H.of(42)
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
        H.of("sgd", momentum=0.9)
    # through the operator: refused before anything is written
    w, offsets, col, width, _ = make_table(10, 4)
    w0 = w.clone()
    idx, bo, go = torch.tensor([1, 2]), torch.tensor([0, 2]), torch.randn(1, width)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ops.sparse_update_(w, torch.empty(0), torch.empty(0), go, offsets, idx, bo, optimizer=H(), lr=-1.0)
    assert torch.equal(w, w0)


def test_fused_optimizer_hyperparameters_follow_its_attributes():
    """A pme.optim optimizer's hyperparameters() reflect later changes (a schedule), and a bad
    value set later is refused at the next step, before the step count or the table moves."""
    opt = pme.optim.RowwiseAdagrad(lr=0.1, eps=1e-6)
    assert opt.hyperparameters() == ops.Hyperparameters("rowwise_adagrad", lr=0.1, eps=1e-6)
    m = pme.MultiSizeEmbeddingBag(6, 4, mode="sum", optimizer=opt)
    opt.lr = 0.05
    assert opt.hyperparameters().lr == 0.05
    opt.lr = -1.0
    w0 = m.weight.detach().clone()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        m(torch.tensor([[1, 2]])).sum().backward()
    assert int(m.optim_step) == 0 and torch.equal(m.weight, w0)
    # a step the operator refuses (its state corrupted) leaves the count too
    opt.lr = 0.05
    good = m.optim_state1.clone()
    m.optim_state1 = torch.zeros(2, dtype=good.dtype)
    with pytest.raises(RuntimeError, match="pme: "):
        m(torch.tensor([[1, 2]])).sum().backward()
    assert int(m.optim_step) == 0 and torch.equal(m.weight, w0)
    m.optim_state1 = good
    m(torch.tensor([[1, 2]])).sum().backward()
    assert int(m.optim_step) == 1 and not torch.equal(m.weight, w0)


@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad", "adam"])
def test_weights_only_checkpoint_loads_with_a_fresh_optimizer_state(opt):
    """Pretrained weights (a table without a fused optimizer, same or other sizes) load into a table
    with one: the values are taken, the optimizer's state starts fresh, no key is missing; a
    checkpoint with part of the state is still refused whole."""
    make = {
        "sgd": lambda: pme.optim.SGD(lr=0.1),
        "rowwise_adagrad": lambda: pme.optim.RowwiseAdagrad(lr=0.1),
        "adam": lambda: pme.optim.Adam(lr=0.1),
    }[opt]
    dst = pme.MultiSizeEmbeddingBag(5, 4, mode="sum", optimizer=make())
    dst(torch.tensor([0, 1, 1]), torch.tensor([0, 2])).sum().backward()  # some state, step 1
    for sizes in (None, torch.tensor([4, 1, 0, 2, 3])):
        src = pme.MultiSizeEmbeddingBag(5, 4, mode="sum", sizes=sizes)
        got = dst.load_state_dict(src.state_dict())
        assert not got.missing_keys and not got.unexpected_keys
        assert torch.equal(dst.weight, src.weight) and torch.equal(dst.offsets, src.offsets)
        assert int(dst.optim_step) == 0 and float(dst.optim_state1.abs().sum()) == 0
        assert float(dst.optim_state2.abs().sum()) == 0
        w = dst.weight.detach().clone()
        dst(torch.tensor([0]), torch.tensor([0])).sum().backward()
        assert int(dst.optim_step) == 1 and not torch.equal(dst.weight, w)
    dense = torch.nn.EmbeddingBag(5, 4, mode="sum")  # a dense nn checkpoint: values too, state fresh
    got = dst.load_state_dict(dense.state_dict())
    assert not got.missing_keys and not got.unexpected_keys
    kept = torch.arange(4) < dst.sizes.unsqueeze(1)  # each row keeps its first sizes[i] values
    assert torch.equal(dst.to_dense(), dense.weight.detach() * kept)
    assert int(dst.optim_step) == 0 and float(dst.optim_state1.abs().sum()) == 0
    assert float(dst.optim_state2.abs().sum()) == 0
    full = pme.MultiSizeEmbeddingBag(5, 4, mode="sum", optimizer=make())
    part = {k: v for k, v in full.state_dict().items() if k != "optim_step"}
    before = dst.weight.detach().clone()
    with pytest.raises(RuntimeError, match="Missing key.*optim_step"):
        dst.load_state_dict(part)
    assert torch.equal(dst.weight, before)


@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_grad_scale_is_divided_out_in_the_accumulation_dtype(opt, dtype):
    """A GradScaler's scale on a 16-bit table: the scaled gradient is exact in the table's dtype, the
    unscaled one would be flushed to zero or subnormals there; the step must equal a float64 step on
    the unscaled gradient (to the table's rounding), and equal the functional form with the same
    Hyperparameters (grad_scale included)."""
    scale = 2.0**16
    true = torch.tensor([[3e-8, 1e-7, 2.5e-7, 1e-6], [2e-7, -5e-8, 0.0, 4e-6]], dtype=torch.float64)
    make = {
        "sgd": lambda: pme.optim.SGD(lr=1000.0, weight_decay=0.01),
        "rowwise_adagrad": lambda: pme.optim.RowwiseAdagrad(lr=0.01, eps=1e-10),
        "adam": lambda: pme.optim.Adam(lr=0.01, eps=1e-10),
    }[opt]
    o = make()
    o.grad_scale = scale
    m = pme.MultiSizeEmbeddingBag(3, 4, mode="sum", dtype=dtype, optimizer=o)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(-0.5, 0.5, 12))
    w0 = m.weight.detach().double().clone()
    idx, off = torch.tensor([0, 2, 2]), torch.tensor([0, 1])
    m(idx, off).backward((true * scale).to(dtype))
    # float64: the same step on the unscaled gradient (rows 0 and 2 get bags 0 and 2 x bag 1)
    ref = pme.MultiSizeEmbeddingBag(3, 4, mode="sum", dtype=torch.float64, optimizer=make())
    with torch.no_grad():
        ref.weight.copy_(w0)
    ref(idx, off).backward((true * scale).to(dtype).double() / scale)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(m.weight.double(), ref.weight.detach(), rtol=tol, atol=tol * 1e-2)
    if dtype == torch.float16:  # unscaled in fp16, 3e-8 * lr was flushed: the first entry stayed
        assert bool(((m.weight.double() - w0).abs()[[0, 1, 2, 3]] > 0).all())
    # functional form, same hyperparameters (grad_scale in them)
    w = w0.to(dtype).clone()
    s1, s2 = m.optim_state1.new_zeros(m.optim_state1.shape), m.optim_state2.new_zeros(m.optim_state2.shape)
    bags = torch.tensor([0, 1, 3])  # the normal form: B + 1 bag offsets
    ops.sparse_update_(w, s1, s2, (true * scale).to(dtype), m.offsets, idx, bags, mode="sum", optimizer=o, step=1)
    torch.testing.assert_close(w, m.weight.detach(), rtol=0, atol=0)


def test_functional_update_refuses_unknown_keywords_and_a_bad_step():
    """sparse_update_'s keywords are the lookup's and the optimizer's: another one (momentum) is named
    in a TypeError with the ones it takes; the step count is an integer >= 1."""
    w, off, g = torch.randn(8), torch.tensor([0, 4, 8]), torch.randn(1, 4)
    none = torch.zeros(0)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['momentum'\].*'grad_scale'"):
        ops.sparse_update_(w, none, none, g, off, torch.tensor([0]), torch.tensor([0, 1]), momentum=0.9)
    for bad, err in ((1.5, TypeError), (True, TypeError), (0, ValueError)):
        with pytest.raises(err, match="step must be"):
            ops.sparse_update_(w, none, none, g, off, torch.tensor([0]), torch.tensor([0, 1]), step=bad)


def test_optimizer_attributes_reach_the_step_through_training_scores():
    """TrainingScores wraps a fused table's optimizer: a schedule's lr, a GradScaler's grad_scale
    and Adam's betas set on ``table.optimizer`` must reach the step (they used to land on the
    wrapper), and its name stays the optimizer's."""
    m = pme.MultiSizeEmbeddingBag(6, 4, mode="sum", optimizer=pme.optim.SGD(lr=0.1))
    plain = pme.MultiSizeEmbeddingBag(6, 4, mode="sum", optimizer=pme.optim.SGD(lr=0.1))
    with torch.no_grad():
        plain.weight.copy_(m.weight)
    acc = pme.search.TrainingScores(torch.nn.ModuleDict({"t": m}))
    assert m.optimizer.name == "sgd"
    idx, off = torch.tensor([1, 2, 2]), torch.tensor([0, 1])
    for lr, scale in [(0.0, 1.0), (1.0, 1.0), (0.5, 1000.0)]:
        for table in (m, plain):
            table.optimizer.lr, table.optimizer.grad_scale = lr, scale
            table(idx, off).sum().backward()
        assert torch.equal(m.weight, plain.weight), (lr, scale)
    assert acc.steps["t"] == 3
    acc.remove()
    assert isinstance(m.optimizer, pme.optim.SGD) and m.optimizer.lr == 0.5


def test_adam_betas_attribute_and_unattached_optimizer():
    """``betas`` reads and sets beta1 / beta2 (as torch.optim.Adam names them); an optimizer
    assigned to ``table.optimizer`` without being attached (no state) is a clear error at the
    next training forward, and ``opt.attach(table)`` makes it work."""
    opt = pme.optim.Adam(lr=0.1, betas=(0.8, 0.9))
    assert opt.betas == (0.8, 0.9)
    opt.betas = (0.5, 0.6)
    assert (opt.beta1, opt.beta2) == (0.5, 0.6) and opt.hyperparameters().beta2 == 0.6
    m = pme.MultiSizeEmbeddingBag(5, 4, mode="sum")
    m.optimizer = opt
    with pytest.raises(RuntimeError, match=r"not attached.*optimizer\.attach\(table\)"):
        m(torch.tensor([1]), torch.tensor([0]))
    opt.attach(m)
    w0 = m.weight.detach().clone()
    m(torch.tensor([1]), torch.tensor([0])).sum().backward()
    assert int(m.optim_step) == 1 and not torch.equal(m.weight, w0)


def test_tensor_grad_scale_is_checked_when_read():
    """A one-element tensor grad_scale is read at the step; a non-positive or non-finite value is
    refused there, and the step count stays."""
    m = pme.MultiSizeEmbeddingBag(5, 4, mode="sum", optimizer=pme.optim.SGD(lr=0.1))
    for bad in (torch.tensor(0.0), torch.tensor(float("inf")), torch.tensor([-2.0])):
        m.optimizer.grad_scale = bad
        with pytest.raises(ValueError, match="grad_scale must be a positive finite number"):
            m(torch.tensor([1]), torch.tensor([0])).sum().backward()
        assert int(m.optim_step) == 0
    m.optimizer.grad_scale = torch.tensor(4.0)
    m(torch.tensor([1]), torch.tensor([0])).sum().backward()
    assert int(m.optim_step) == 1


def test_share_memory_shares_the_fused_optimizer_state():
    """``share_memory()`` (Hogwild-style training) puts the optimizer's state in shared memory with
    the weight, table and collection alike: a step taken in another process moves both."""
    import torch.multiprocessing as mp

    from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

    m = pme.MultiSizeEmbeddingBag(10, 4, mode="sum", optimizer=pme.optim.Adam(lr=0.1)).share_memory()
    c = MultiSizeEmbeddingBagCollection(
        [EmbeddingBagConfig(10, 4, "t0", ["f0"])], None, optimizer=pme.optim.RowwiseAdagrad(lr=0.1)
    ).share_memory()
    for mod in (m, c):
        assert all(getattr(mod, n).is_shared() for n in ("weight", "optim_state1", "optim_state2", "optim_step"))
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_step_both, args=(m, c))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
    assert p.exitcode == 0
    assert int(m.optim_step) == 1 and float(m.optim_state2.abs().sum()) > 0
    assert int(c.optim_step) == 1 and float(c.optim_state1.abs().sum()) > 0


def _step_both(m, c):
    m(torch.tensor([1, 2]), torch.tensor([0])).sum().backward()
    c({"f0": (torch.tensor([1, 2]), torch.tensor([0, 2]))}).values().sum().backward()


def test_frozen_fused_tables_take_no_step():
    """A fused table that is frozen (``from_pretrained(freeze=True)``, ``_freeze``, a frozen nn table
    converted with an optimizer, ``requires_grad_(False)``; a collection too) takes no step in
    backward, as a frozen nn table with a dense optimizer does; ``requires_grad_(True)`` lets it
    train again. (The fused step used to run whatever the flag said.)"""
    from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

    idx, off = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
    nn_frozen = torch.nn.ModuleDict({"t": torch.nn.EmbeddingBag.from_pretrained(torch.randn(6, 4), mode="sum")})
    pme.convert(nn_frozen, {"t": torch.tensor([4, 1, 2, 3, 4, 0])}, optimizer=pme.optim.SGD(lr=1.0))
    tables = [
        pme.MultiSizeEmbeddingBag.from_pretrained(
            torch.randn(6, 4), mode="sum", sizes=3, optimizer=pme.optim.SGD(lr=1.0)
        ),
        pme.MultiSizeEmbedding(6, 4, None, None, 2.0, False, False, None, True, optimizer=pme.optim.Adam(lr=1.0)),
        nn_frozen["t"],
        pme.MultiSizeEmbeddingBag(6, 4, mode="sum", optimizer=pme.optim.RowwiseAdagrad(lr=1.0)).requires_grad_(False),
    ]
    for m in tables:
        w0 = m.weight.detach().clone()
        out = m(idx) if isinstance(m, pme.MultiSizeEmbedding) else m(idx, off)
        if out.requires_grad:
            out.sum().backward()
        assert torch.equal(m.weight, w0) and not m.weight.requires_grad, type(m).__name__
        m.requires_grad_(True)
        out = m(idx) if isinstance(m, pme.MultiSizeEmbedding) else m(idx, off)
        out.sum().backward()
        assert not torch.equal(m.weight, w0) and not m.weight.requires_grad, type(m).__name__
    c = MultiSizeEmbeddingBagCollection(
        [EmbeddingBagConfig(6, 4, "t0", ["f0"])], None, optimizer=pme.optim.SGD(lr=1.0)
    ).requires_grad_(False)
    w0 = c.weight.detach().clone()
    out = c({"f0": (idx, torch.tensor([0, 2, 3]))}).values()
    assert not out.requires_grad and torch.equal(c.weight, w0)
    c.requires_grad_(True)
    c({"f0": (idx, torch.tensor([0, 2, 3]))}).values().sum().backward()
    assert not torch.equal(c.weight, w0)


@pytest.mark.parametrize("cls", [pme.MultiSizeEmbedding, pme.MultiSizeEmbeddingBag])
def test_fused_lookup_bad_index_is_an_index_error(cls):
    """The fused training lookup raises what the plain one raises for a bad index (an IndexError,
    as torch's), not a bare RuntimeError; nothing is stepped."""
    m = cls(5, 4, optimizer=pme.optim.SGD(lr=0.1))
    w0 = m.weight.detach().clone()
    with pytest.raises(IndexError, match="out of range"):
        m(torch.tensor([[1, 7]]))
    assert torch.equal(m.weight, w0) and int(m.optim_step) == 0


@pytest.mark.parametrize("op", ["sparse_update_", "accumulate_scores_"])
def test_functional_row_operators_name_grad_out_when_it_is_too_narrow(op):
    """The row operators take their output width from grad_out: one narrower than the table's rows
    is named as the cause (the kernel's message alone blames a row), and nothing is written."""
    t = pme.MultiSizeEmbeddingBag(10, 4, mode="sum", sizes=[1, 2, 3, 4, 4, 4, 4, 4, 0, 4])
    idx, bo = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    w = t.weight.detach().clone()
    scores = torch.zeros(w.numel())
    narrow = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match=rf"output width of {op} is grad_out's: grad_out has shape \(2, 3\)"):
        if op == "sparse_update_":
            ops.sparse_update_(
                w, torch.zeros(0), torch.zeros(0), narrow, t.offsets, idx, bo, mode="sum", optimizer="sgd", lr=0.1
            )
        else:
            ops.accumulate_scores_(scores, narrow, w, t.offsets, idx, bo, mode="sum")
    assert torch.equal(w, t.weight.detach()) and not scores.any()
