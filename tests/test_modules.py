"""Modules: construction, repr, memory, state_dict round-trips, convert, and bad input."""

import pytest
import torch
import torch.nn.functional as F

import pme
from pme import ops

from conftest import DEVICES, make_table


def test_repr_and_memory():
    sizes = torch.tensor([8, 4, 4, 0, 8, 2])
    m = pme.MultiSizeEmbeddingBag(6, 8, sizes=sizes, mode="sum", padding_idx=3)
    r = repr(m)
    assert "MultiSizeEmbeddingBag(6, 8" in r and "mode='sum'" in r and "padding_idx=3" in r
    assert f"stored={int(sizes.sum())}" in r
    rep = m.memory_report()
    assert rep["stored_entries"] == int(sizes.sum()) == m.weight.numel()
    assert rep["dense_bytes"] == 6 * 8 * 4
    assert rep["bytes"] == int(sizes.sum()) * 4 + 7 * 8
    assert torch.equal(m.sizes, sizes)
    g = pme.MultiSizeEmbeddingBag(6, 8, sizes=sizes, layout="grouped", project=True)
    assert "layout='grouped'" in repr(g) and g.width == 14 and g.output_dim == 8
    e = pme.MultiSizeEmbedding(6, 8, sizes=sizes)
    assert repr(e).startswith("MultiSizeEmbedding(6, 8")
    fused = pme.MultiSizeEmbedding(6, 8, sizes=sizes, optimizer=pme.optim.Adam(lr=0.5))
    assert "optimizer=Adam(lr=0.5" in repr(fused)
    # the meta device holds no sizes, nor does to_empty() before a checkpoint: said, not a crash
    meta = pme.MultiSizeEmbeddingBag(6, 8, sizes=sizes, device="meta")
    assert "sizes=? (meta device)" in repr(meta) and f"stored={int(sizes.sum())}" in repr(meta)
    assert "sizes=? (to_empty: load a checkpoint)" in repr(torch.nn.Sequential(meta).to_empty(device="cpu"))


@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_state_dict_round_trip_with_other_sizes(layout, tmp_path):
    a = pme.MultiSizeEmbeddingBag(20, 16, sizes=torch.randint(1, 5, (20,)) * 4, layout=layout, mode="sum")
    b = pme.MultiSizeEmbeddingBag(20, 16, sizes=16, layout=layout, mode="sum")  # other sizes
    path = tmp_path / "t.pt"
    torch.save(a.state_dict(), path)
    b.load_state_dict(torch.load(path))
    assert torch.equal(a.sizes, b.sizes) and torch.equal(a.weight, b.weight)
    x = torch.randint(0, 20, (5, 3))
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(RuntimeError, match="rows"):
        pme.MultiSizeEmbeddingBag(21, 16, layout=layout).load_state_dict(a.state_dict())


def test_grouped_projection_starts_as_padded():
    sizes = torch.tensor([4, 8, 8, 2, 4])
    w = torch.randn(5, 8)
    p = pme.MultiSizeEmbeddingBag.from_dense(w, sizes, mode="sum")
    g = pme.MultiSizeEmbeddingBag.from_dense(w, sizes, mode="sum", layout="grouped", project=True)
    x = torch.randint(0, 5, (7, 3))
    torch.testing.assert_close(p(x), g(x))
    # and the grouped view without projection keeps each size in its own slot
    g2 = pme.MultiSizeEmbeddingBag.from_dense(w, sizes, mode="sum", layout="grouped")
    dense = g2.to_dense()
    assert dense.shape == (5, 14)
    torch.testing.assert_close(g2(x), F.embedding_bag(x, dense, mode="sum"))


def test_from_dense_keeps_first_or_best_entries():
    w = torch.randn(6, 5)
    sizes = torch.tensor([5, 3, 0, 1, 2, 5])
    m = pme.MultiSizeEmbeddingBag.from_dense(w, sizes)
    dense = m.to_dense()
    for i, s in enumerate(sizes.tolist()):
        torch.testing.assert_close(dense[i, :s], w[i, :s])
        assert bool((dense[i, s:] == 0).all())
    scores = torch.rand(6, 5)
    m2 = pme.MultiSizeEmbeddingBag.from_dense(w, sizes, scores=scores, order="score")
    for i, s in enumerate(sizes.tolist()):
        best = torch.argsort(scores[i], descending=True, stable=True)[:s]
        torch.testing.assert_close(m2.to_dense()[i, :s], w[i, best])


def test_convert_swaps_tables_in_place():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = torch.nn.ModuleDict(
                {
                    "a": torch.nn.EmbeddingBag(10, 8, mode="max", padding_idx=0),
                    "b": torch.nn.EmbeddingBag(7, 8, mode="sum"),
                }
            )
            self.tok = torch.nn.Embedding(9, 4, padding_idx=2)
            self.seq = torch.nn.Sequential(torch.nn.EmbeddingBag(5, 8))

    net = Net()
    dense_a = net.tables["a"].weight.detach().clone()
    sizes_a = torch.randint(0, 9, (10,))
    pme.convert(net, {"tables.a": sizes_a, "tables.b": 4, "tok": torch.tensor([4, 2, 4, 1, 0, 4, 4, 3, 2]), "seq.0": 8})
    assert isinstance(net.tables["a"], pme.MultiSizeEmbeddingBag) and net.tables["a"].mode == "max"
    assert net.tables["a"].padding_idx == 0
    assert isinstance(net.tok, pme.MultiSizeEmbedding) and net.tok.padding_idx == 2
    assert isinstance(net.seq[0], pme.MultiSizeEmbeddingBag)
    d = net.tables["a"].to_dense()
    for i, s in enumerate(sizes_a.tolist()):
        torch.testing.assert_close(d[i, :s], dense_a[i, :s])
    with pytest.raises(KeyError, match="not an embedding table"):
        pme.convert(net, {"nothing.here": 3})
    # fresh init keeps the scale of the original table
    big = torch.nn.EmbeddingBag(2000, 16)
    torch.nn.init.normal_(big.weight, std=0.01)
    fresh = pme.MultiSizeEmbeddingBag.from_embedding_bag(big, 8, init="fresh")
    assert 0.008 < float(fresh.weight.detach().std()) < 0.012


@pytest.mark.parametrize("init", ["kept", "fresh"])
def test_convert_resizes_pme_tables(init):
    """pme tables (padded layout) convert too: the flow of a model trained full width with a fused
    optimizer (TrainingScores), then cut to the sizes found. The new table keeps the kind, the
    nn-style options and the fused optimizer (the same object: a schedule that holds it still
    applies; its state starts at zeros), takes the dense view's first entries (kept) or draws
    values at the stored entries' scale (fresh), and trains; a frozen table stays frozen."""
    g = torch.Generator().manual_seed(3)
    opt = pme.optim.Adam(lr=0.05)
    net = torch.nn.ModuleDict(
        {
            "bag": pme.MultiSizeEmbeddingBag(
                12, 8, mode="mean", padding_idx=1, include_last_offset=True, optimizer=opt
            ),
            "tok": pme.MultiSizeEmbedding(9, 4, sizes=torch.randint(0, 5, (9,), generator=g), sparse=True),
            "frozen": pme.MultiSizeEmbeddingBag.from_pretrained(torch.randn(6, 4, generator=g), mode="sum"),
        }
    )
    net["bag"](torch.tensor([0, 3, 3, 11]), torch.tensor([0, 2, 4])).sum().backward()  # some Adam state
    before = {k: m.to_dense().detach().clone() for k, m in net.items()}
    sizes = {"bag": torch.randint(0, 9, (12,), generator=g), "tok": torch.randint(0, 5, (9,), generator=g), "frozen": 2}
    pme.convert(net, sizes, init=init)
    bag, tok, frozen = net["bag"], net["tok"], net["frozen"]
    assert type(bag) is pme.MultiSizeEmbeddingBag and type(tok) is pme.MultiSizeEmbedding
    assert (bag.mode, bag.padding_idx, bag.include_last_offset, tok.sparse) == ("mean", 1, True, True)
    assert bag.optimizer is opt and int(bag.optim_step) == 0
    assert not bag.optim_state1.any() and bag.optim_state1.numel() == bag.weight.numel()
    assert torch.equal(bag.sizes, sizes["bag"]) and torch.equal(tok.sizes, sizes["tok"])
    for name, m in net.items():
        d = m.to_dense()
        for i, s in enumerate(m.sizes.tolist()):
            if init == "kept":
                torch.testing.assert_close(d[i, :s], before[name][i, :s], rtol=0, atol=0)
            assert not d[i, s:].any()
    if init == "fresh":
        assert not torch.equal(bag.to_dense()[:, :1], before["bag"][:, :1])
    w0 = bag.weight.detach().clone()
    bag(torch.tensor([0, 3, 3, 11]), torch.tensor([0, 2, 4])).sum().backward()
    assert not torch.equal(bag.weight.detach(), w0) and int(bag.optim_step) == 1
    assert not frozen.weight.requires_grad
    grouped = pme.MultiSizeEmbeddingBag(6, 4, sizes=[1, 2, 4, 4, 2, 1], layout="grouped")
    with pytest.raises(ValueError, match="padded layout"):
        pme.convert(torch.nn.Sequential(grouped), {"0": 2})
    with pytest.raises(TypeError, match="expected an nn.Embedding or a MultiSizeEmbedding, got MultiSizeEmbeddingBag"):
        pme.MultiSizeEmbedding.from_embedding(bag, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_module_dtypes_and_devices(device):
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        m = pme.MultiSizeEmbeddingBag(30, 8, sizes=torch.randint(0, 9, (30,)), dtype=dtype, device=device, mode="sum")
        x = torch.randint(0, 30, (4, 5), device=device)
        out = m(x)
        assert out.dtype == dtype and out.device.type == device
        ref = F.embedding_bag(x, m.to_dense().double(), mode="sum").to(dtype)
        torch.testing.assert_close(out, ref)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash or a wrong answer
# ---------------------------------------------------------------------------------------------
ERRORS = (ValueError, TypeError, IndexError, RuntimeError)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_indices_and_offsets(device):
    w, offsets, col, width, _ = make_table(10, 4, device=device)
    idx = torch.tensor([1, 2, 3, 4], device=device)
    cases = [
        (torch.tensor([1, 10], device=device), torch.tensor([0], device=device), r"indices\[1\] = 10"),
        (torch.tensor([1, -1], device=device), torch.tensor([0], device=device), r"indices\[1\] = -1"),
        (idx, torch.tensor([0, 3, 2], device=device), "non-decreasing"),
        (idx, torch.tensor([1, 2], device=device), "start at 0"),
        (idx, torch.tensor([0, 9], device=device), "past the input"),
    ]
    for i, o, msg in cases:
        with pytest.raises(ERRORS, match=msg):
            ops.embedding_bag(w, offsets, i, o, width=width)
    with pytest.raises(ERRORS, match=r"indices\[0\] = 11"):
        ops.embedding(w, offsets, torch.tensor([11], device=device), width=width)


def test_bad_arguments_are_named():
    w, offsets, col, width, _ = make_table(10, 4)
    idx = torch.tensor([1, 2, 3])
    off = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="per_sample_weights are only supported with mode='sum'"):
        ops.embedding_bag(w, offsets, idx, off, width=width, mode="mean", per_sample_weights=torch.ones(3))
    with pytest.raises(ValueError, match="per_sample_weights has shape"):
        ops.embedding_bag(w, offsets, idx, off, width=width, mode="sum", per_sample_weights=torch.ones(4))
    with pytest.raises(TypeError, match="per_sample_weights"):
        ops.embedding_bag(w, offsets, idx, off, width=width, mode="sum", per_sample_weights=torch.ones(3).double())
    with pytest.raises(ValueError, match="offsets must be None when input is 2-D"):
        ops.embedding_bag(w, offsets, idx.reshape(1, 3), off, width=width)
    with pytest.raises(ValueError, match="offsets must be given"):
        ops.embedding_bag(w, offsets, idx, None, width=width)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.embedding_bag(w, offsets, idx.float(), off, width=width)
    with pytest.raises(TypeError, match="weight must be float32"):
        ops.embedding_bag(w.int(), offsets, idx, off, width=width)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.embedding_bag(w, offsets, idx, off, width=width, mode="median")
    with pytest.raises(ValueError, match="padding_idx 10 is out of range"):
        ops.embedding_bag(w, offsets, idx, off, width=width, padding_idx=10)
    with pytest.raises(ValueError, match="offsets must be a 1-D int64"):
        ops.embedding_bag(w, offsets.int(), idx, off, width=width)
    with pytest.raises(ERRORS, match="does not fit in the output width"):
        ops.embedding_bag(w, offsets, idx, off, width=2)
    bad_off = offsets.clone()
    bad_off[-1] += 1
    with pytest.raises(ERRORS, match=r"offsets\[-1\]"):
        ops.embedding_bag(w, bad_off, idx, off, width=width)
    with pytest.raises(ValueError, match="sizes\\[2\\] = 9 is outside"):
        pme.MultiSizeEmbeddingBag(4, 8, sizes=[1, 2, 9, 3])
    with pytest.raises(ValueError, match="sizes has 3 entries"):
        pme.MultiSizeEmbeddingBag(4, 8, sizes=[1, 2, 3])
    with pytest.raises(TypeError, match="sizes must be integers"):
        pme.MultiSizeEmbeddingBag(4, 8, sizes=[1.5, 2, 3, 1])
    with pytest.raises(ValueError, match="sparse=True"):
        pme.MultiSizeEmbeddingBag(4, 8, sparse=True, optimizer=pme.optim.SGD(lr=0.1))
    with pytest.raises(ValueError, match="max mode does not support sparse"):
        pme.MultiSizeEmbeddingBag(4, 8, mode="max", sparse=True)(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="size_classes"):
        pme.MultiSizeEmbeddingBag(4, 8, sizes=[2, 4, 8, 3], layout="grouped", size_classes=[2, 4, 8])
    m = pme.MultiSizeEmbeddingBag(4, 8)
    with pytest.raises(ValueError, match="input is on"):
        m(torch.tensor([1, 2], device="meta"), torch.tensor([0]))


@pytest.mark.parametrize(
    "cls,nn_cls", [(pme.MultiSizeEmbeddingBag, torch.nn.EmbeddingBag), (pme.MultiSizeEmbedding, torch.nn.Embedding)]
)
@pytest.mark.parametrize("freeze", [True, False])
def test_from_pretrained_is_nn_from_pretrained(cls, nn_cls, freeze):
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(30, 8, generator=gen)
    sizes = torch.randint(0, 9, (30,), generator=gen)
    kw = {"mode": "sum"} if cls is pme.MultiSizeEmbeddingBag else {}
    m = cls.from_pretrained(emb, sizes=sizes, freeze=freeze, padding_idx=2, **kw)
    dense = emb * (torch.arange(8) < sizes[:, None])  # each row's first sizes[i] values
    ref = nn_cls.from_pretrained(dense, freeze=freeze, padding_idx=2, **kw)
    assert m.weight.requires_grad == ref.weight.requires_grad == (not freeze)
    x = torch.randint(0, 30, (5, 4), generator=gen)
    torch.testing.assert_close(m(x), ref(x))


def test_dtype_cast_keeps_the_optimizer_state():
    # .to(bf16) casts the table but not the fused optimizer's float32 state (nor its precision)
    sizes = torch.randint(0, 9, (40,), generator=torch.Generator().manual_seed(4))
    m = pme.MultiSizeEmbeddingBag(40, 8, sizes=sizes, mode="sum", optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    m.optim_state1.copy_(torch.rand(40, dtype=torch.float64).float())
    before = m.optim_state1.clone()
    m.to(torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16 and m.optim_state1.dtype == torch.float32
    assert torch.equal(m.optim_state1, before)
    x = torch.randint(0, 40, (6, 3))
    m(x).float().sum().backward()  # trains in bf16 with the float32 state
    assert bool((m.optim_state1 >= before).all()) and not torch.equal(m.optim_state1, before)
    m.double()
    assert m.optim_state1.dtype == torch.float64 and m.weight.dtype == torch.float64
    assert m.optim_step.dtype == torch.int64 and m.optim_step.device.type == "cpu"
    # a device move takes the state along but leaves the step count on the host (the fused
    # backward reads it there; on a GPU it would cost a sync per step): "meta" stands in for cuda
    m.to("meta")
    assert m.weight.device.type == "meta" and m.optim_state1.device.type == "meta"
    assert m.optim_step.device.type == "cpu"


@pytest.mark.parametrize("cls", [pme.MultiSizeEmbeddingBag, pme.MultiSizeEmbedding])
def test_pme_keyword_options_are_shared_by_both_tables(cls):
    """pme's keyword-only options (declared once, in the base class) work by keyword on both
    tables, an unknown one is refused by name, torch's positional order is untouched, and a fused
    optimizer leaves the weight without a gradient (nn.Embedding's _freeze=False included)."""
    sizes = torch.tensor([4, 2, 4, 0, 2, 4])
    m = cls(6, 4, sizes=sizes, layout="grouped", size_classes=[2, 4], project=True, optimizer=pme.optim.SGD(lr=0.1))
    assert (m.layout, m.size_classes, m.project, m.output_dim) == ("grouped", [2, 4], True, 4)
    assert isinstance(m.optimizer, pme.optim.SGD) and not m.weight.requires_grad and m.projection is not None
    assert {"optim_state1", "optim_state2", "optim_step"} <= set(m.state_dict())
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\) got an unexpected keyword argument 'layuot' \(pme's"):
        cls(6, 4, layuot="grouped")
    with pytest.raises(ValueError, match="fused optimizer"):
        cls(6, 4, sparse=True, optimizer=pme.optim.SGD(lr=0.1))
    # nn's positional order: EmbeddingBag (V, D, max_norm, ...), Embedding (V, D, padding_idx, ...)
    third = cls(6, 4, 1)
    assert (third.max_norm, third.padding_idx) == ((1, None) if cls is pme.MultiSizeEmbeddingBag else (None, 1))
    for name in ("layout", "size_classes", "project", "optimizer"):
        assert name in pme.MultiSizeEmbeddingBag.__doc__
    if cls is pme.MultiSizeEmbedding:
        frozen = cls(6, 4, None, None, 2.0, False, False, None, True)  # _freeze=True, positionally as nn.Embedding
        assert not frozen.weight.requires_grad and cls(6, 4).weight.requires_grad


def test_size_classes_are_checked():
    """size_classes: a sequence of ints for the grouped layout; a float, bool, string or int, or
    classes given to the padded layout (which would ignore them), are refused."""
    for bad, err in (([2.5, 4], TypeError), ("24", TypeError), (4, TypeError), ([True, 4], TypeError)):
        with pytest.raises(err, match="size_classes"):
            pme.MultiSizeEmbeddingBag(3, 4, sizes=[2, 4, 4], layout="grouped", size_classes=bad)
    with pytest.raises(ValueError, match="size_classes is for layout='grouped'"):
        pme.MultiSizeEmbeddingBag(3, 4, sizes=[2, 4, 4], size_classes=[2, 4])
    ok = pme.MultiSizeEmbeddingBag(3, 4, sizes=[2, 4, 4], layout="grouped", size_classes=torch.tensor([4, 2]))
    assert ok.size_classes == [2, 4]
