"""pme as a drop-in for nn.EmbeddingBag / nn.Embedding: torch's constructor order, sparse=True
gradients (the bag_backward_sparse operator) and training with torch.optim's sparse optimizers,
max_norm, scale_grad_by_freq, dense checkpoints, row accessors, nested input, error types.
PyTorch's own test cases are in test_torch_port.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import pme
from pme import ops, reference

from conftest import make_table, random_bags

warnings.filterwarnings("ignore", message="Sparse invariant checks")


def _mask(sizes, D):
    return torch.arange(D) < sizes[:, None]


def test_positional_order_is_torchs():
    # nn.EmbeddingBag(4, 3, None, 2., False, 'sum') as common_nn.py writes it
    m = pme.MultiSizeEmbeddingBag(4, 3, None, 2.0, False, "sum")
    assert m.mode == "sum" and m.max_norm is None and m.norm_type == 2.0 and not m.scale_grad_by_freq
    assert torch.equal(m.sizes, torch.full((4,), 3))
    m = pme.MultiSizeEmbeddingBag(4, 3, 1.5, 1.0, True, "mean", True, None, True, 2)
    assert (m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse, m.include_last_offset, m.padding_idx) == (
        1.5,
        1.0,
        True,
        True,
        True,
        2,
    )
    e = pme.MultiSizeEmbedding(4, 3, 1, 2.0, 1.0, True, True)
    assert (e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse) == (1, 2.0, 1.0, True, True)
    with pytest.raises(TypeError):
        pme.MultiSizeEmbeddingBag(4, 3, None, 2.0, False, "sum", False, None, False, None, None, None, [1, 2, 3, 3])
    r = repr(pme.MultiSizeEmbeddingBag(4, 3, 1.0, 1.0, True, "sum", True))
    assert "max_norm=1.0" in r and "norm_type=1.0" in r and "scale_grad_by_freq=True" in r and "sparse=True" in r


@pytest.mark.parametrize("cls", [pme.MultiSizeEmbeddingBag, pme.MultiSizeEmbedding])
def test_from_pretrained_positional_and_default_sizes(cls):
    w = torch.randn(6, 4)
    m = cls.from_pretrained(w)
    assert torch.equal(m.to_dense(), w) and not m.weight.requires_grad
    if cls is pme.MultiSizeEmbeddingBag:
        m = cls.from_pretrained(w, False, 1.0, 1.0, False, "sum", False, False, 2)
        assert (m.max_norm, m.mode, m.padding_idx, m.weight.requires_grad) == (1.0, "sum", 2, True)
    else:
        m = cls.from_pretrained(w, False, 2, 1.0, 1.0, True, True)
        assert (m.padding_idx, m.max_norm, m.scale_grad_by_freq, m.sparse) == (2, 1.0, True, True)
    with pytest.raises(TypeError, match="integer tables are not supported"):
        cls.from_pretrained(torch.ones(3, 2, dtype=torch.int64))


def _sparse_grad(m):
    g = m.weight.grad
    assert g.is_sparse and g.shape == m.weight.shape
    return g.coalesce()


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["padded", "grouped"])
@pytest.mark.parametrize("scale", [False, True])
def test_bag_backward_sparse_matches_reference(index_dtype, mode, layout, scale):
    V, D = 40, 12
    w, offsets, col, width, sizes = make_table(V, D, torch.float64, layout=layout, seed=3)
    gen = torch.Generator().manual_seed(5)
    idx, bags = random_bags(V, 9, 6, gen, index_dtype, padding_idx=7)
    bo = torch.cat([bags, bags.new_tensor([idx.numel()])])
    psw = torch.randn(idx.shape, generator=gen, dtype=torch.float64) if mode == "sum" else None
    out, argmax = torch.ops.pme.bag_forward(w, offsets, idx, bo, psw, col, width, ops.MODES[mode], 7)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ent, val = torch.ops.pme.bag_backward_sparse(go, w, offsets, idx, bo, psw, col, argmax, ops.MODES[mode], 7, scale)
    lookup = reference.Lookup(offsets, idx, bo, width, col, mode, psw, 7)
    rent, rval = reference.bag_backward_sparse(go, w, lookup, scale)
    assert torch.equal(ent, rent)
    torch.testing.assert_close(val, rval)
    # entries: increasing, unique, every stored entry of every non-padding row looked up
    assert bool((ent[1:] > ent[:-1]).all())
    rows = set(idx.long().tolist()) - {7}
    assert ent.numel() == int(sum(int(sizes[r]) for r in rows))
    # the dense backward restricted to those entries, divided by the count when scaled
    dense_gw, _ = torch.ops.pme.bag_backward(go, w, offsets, idx, bo, psw, col, argmax, ops.MODES[mode], 7, False)
    if not scale:
        torch.testing.assert_close(val, dense_gw[ent])
        assert int(dense_gw.ne(0).sum()) <= ent.numel()


def _bag_by_embedding(idx, weight, bags, mode, scale):
    """Sum/mean bags through F.embedding: the oracle for scale_grad_by_freq. (torch's CPU
    nn.EmbeddingBag miscounts: with duplicates in the batch, the largest index gets count 2 even
    when it occurs once, e.g. [0, 1, 1, 2]; F.embedding counts right.)"""
    emb = F.embedding(idx, weight, scale_grad_by_freq=scale)
    ends = torch.cat([bags[1:], bags.new_tensor([idx.numel()])])
    lens = ends - bags
    bag_of = torch.repeat_interleave(torch.arange(bags.numel()), lens)
    out = torch.zeros(bags.numel(), weight.shape[1], dtype=weight.dtype).index_add(0, bag_of, emb)
    return out / lens.clamp(min=1)[:, None].to(out.dtype) if mode == "mean" else out


def test_torch_embedding_bag_scale_grad_by_freq_miscount_is_torchs():
    # the case behind _bag_by_embedding's note, so the day torch fixes it this test says so
    w = torch.zeros(3, 1, dtype=torch.float64, requires_grad=True)
    F.embedding_bag(
        torch.tensor([0, 1, 1, 2]), w, torch.tensor([0]), mode="sum", scale_grad_by_freq=True
    ).sum().backward()
    m = pme.MultiSizeEmbeddingBag(3, 1, mode="sum", scale_grad_by_freq=True, dtype=torch.float64)
    m(torch.tensor([0, 1, 1, 2]), torch.tensor([0])).sum().backward()
    assert w.grad.flatten().tolist() == [1.0, 1.0, 0.5]  # torch: row 2 occurs once
    assert m.weight.grad.tolist() == [1.0, 1.0, 1.0]  # pme: 1 / count, as F.embedding


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 30),
    st.integers(0, 9),
    st.integers(0, 6),
    st.sampled_from(["sum", "mean"]),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_bag_backward_sparse_property(V, D, B, mode, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, D + 1, (V,), generator=gen)
    m = pme.MultiSizeEmbeddingBag(
        V, D, mode=mode, sparse=True, scale_grad_by_freq=scale, sizes=sizes, dtype=torch.float64
    )
    empty = torch.zeros(0, dtype=torch.int64)
    idx, bags = random_bags(V, B, 5, gen) if B else (empty, empty)
    out = m(idx, bags)
    ref_w = m.to_dense().detach().requires_grad_(True)
    ref = _bag_by_embedding(idx, ref_w, bags, mode, scale) if B and idx.numel() else None
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(go)
    g = _sparse_grad(m)
    assert g.is_coalesced()
    dense_g = ops.to_dense(g.to_dense(), m.offsets, D)
    if ref is not None:
        torch.testing.assert_close(out, ref)
        ref.backward(go)
        torch.testing.assert_close(dense_g, ref_w.grad * _mask(sizes, D))
    else:
        assert g._nnz() == 0


def test_sparse_gradient_is_deterministic():
    V, D = 200, 16
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(0, D + 1, (V,), generator=gen)
    m = pme.MultiSizeEmbeddingBag(V, D, mode="mean", sparse=True, sizes=sizes)
    idx = torch.randint(0, 4, (20000,), generator=gen)  # 4 hot rows, thousands of duplicates
    bags = torch.arange(0, 20000, 7)
    go = torch.randn(bags.numel(), D, generator=gen)
    grads = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        m.weight.grad = None
        m(idx, bags).backward(go)
        grads.append(m.weight.grad.coalesce())
    torch.set_num_threads(1)
    for g in grads[1:]:
        assert torch.equal(g.indices(), grads[0].indices()) and torch.equal(g.values(), grads[0].values())


def test_bag_backward_sparse_opcheck():
    w, offsets, col, width, _ = make_table(20, 8, torch.float32, seed=1)
    idx, bags = random_bags(20, 5, 4, torch.Generator().manual_seed(2))
    bo = torch.cat([bags, bags.new_tensor([idx.numel()])])
    go = torch.randn(5, width)
    torch.library.opcheck(
        torch.ops.pme.bag_backward_sparse,
        (go, w, offsets, idx, bo, None, col, offsets.new_empty(0, 0), 1, -1, True),
        test_utils=("test_schema", "test_faketensor"),
    )


def _mask_sparse_grad(weight, mask):
    """Hook: nn's sparse gradient of the dense view, restricted to the stored entries."""

    def hook(g):
        g = g.coalesce()
        return torch.sparse_coo_tensor(g.indices(), g.values() * mask[g.indices()[0]], g.shape)

    weight.register_hook(hook)


OPTIMIZERS = {
    "SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=0.05),
    "SGD": lambda p: torch.optim.SGD(p, lr=0.3),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.3),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("full", [True, False])
def test_sparse_training_trajectory_equals_nn(opt, mode, full):
    V, D = 60, 8
    gen = torch.Generator().manual_seed(11)
    sizes = torch.full((V,), D) if full else torch.randint(0, D + 1, (V,), generator=gen)
    dense = torch.randn(V, D, generator=gen, dtype=torch.float64) * _mask(sizes, D)
    ref = torch.nn.EmbeddingBag.from_pretrained(dense.clone(), freeze=False, mode=mode, sparse=True, padding_idx=5)
    m = pme.MultiSizeEmbeddingBag.from_pretrained(dense, False, mode=mode, sparse=True, padding_idx=5, sizes=sizes)
    if not full:
        _mask_sparse_grad(ref.weight, _mask(sizes, D).to(dense.dtype))
    o_ref, o_m = OPTIMIZERS[opt](ref.parameters()), OPTIMIZERS[opt](m.parameters())
    for _step in range(6):
        x = torch.randint(0, V, (7, 5), generator=gen)
        x[0, :3] = x[0, 0]  # duplicates
        x[1, 1] = 5  # padding
        target = torch.randn(7, D, generator=gen, dtype=torch.float64)
        for mod, o in ((ref, o_ref), (m, o_m)):
            o.zero_grad()
            ((mod(x) - target) ** 2).sum().backward()
            o.step()
        assert m.weight.grad.is_sparse
        torch.testing.assert_close(m.to_dense(), ref.weight.detach(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(m.to_dense(), dense)  # it did train


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.5, float("inf")])
@pytest.mark.parametrize("full", [True, False])
def test_max_norm_renormalises_as_torch(norm_type, full):
    V, D = 30, 6
    gen = torch.Generator().manual_seed(4)
    sizes = torch.full((V,), D) if full else torch.randint(0, D + 1, (V,), generator=gen)
    dense = 2 * torch.randn(V, D, generator=gen) * _mask(sizes, D)
    ref = torch.nn.Embedding.from_pretrained(dense.clone(), freeze=False, max_norm=1.0, norm_type=norm_type)
    m = pme.MultiSizeEmbedding.from_pretrained(dense, False, None, 1.0, norm_type, sizes=sizes)
    x = torch.randint(0, V, (4, 5), generator=gen)
    out, ref_out = m(x), ref(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(m.to_dense(), ref.weight.detach())  # only the looked-up rows changed
    out.sum().backward()
    ref_out.sum().backward()
    torch.testing.assert_close(ops.to_dense(m.weight.grad, m.offsets, D), ref.weight.grad * _mask(sizes, D))


def test_scale_grad_by_freq_as_torch():
    V, D = 20, 5
    gen = torch.Generator().manual_seed(6)
    sizes = torch.randint(0, D + 1, (V,), generator=gen)
    dense = torch.randn(V, D, generator=gen, dtype=torch.float64) * _mask(sizes, D)
    x = torch.tensor([[1, 1, 1, 2], [3, 1, 2, 0]])
    for sparse in (False, True):
        ref = torch.nn.Embedding.from_pretrained(dense.clone(), freeze=False, scale_grad_by_freq=True, padding_idx=0)
        m = pme.MultiSizeEmbedding.from_pretrained(dense, False, 0, None, 2.0, True, sparse, sizes=sizes)
        go = torch.randn(2, 4, D, generator=gen, dtype=torch.float64)
        m(x).backward(go)
        ref(x).backward(go)
        g = m.weight.grad.to_dense() if sparse else m.weight.grad
        torch.testing.assert_close(ops.to_dense(g, m.offsets, D), ref.weight.grad * _mask(sizes, D))


def test_dense_state_dict_loads_first_entries():
    V, D = 12, 6
    sizes = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(1))
    for cls, nn_cls in (
        (pme.MultiSizeEmbeddingBag, torch.nn.EmbeddingBag),
        (pme.MultiSizeEmbedding, torch.nn.Embedding),
    ):
        dense = nn_cls(V, D)
        for layout in ("padded", "grouped"):
            m = cls(V, D, sizes=sizes, layout=layout, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
            off = m.offsets.clone()
            m.load_state_dict(dense.state_dict())
            assert torch.equal(m.offsets, off)
            assert torch.equal(ops.to_dense(m.weight, m.offsets, D), dense.weight.detach() * _mask(sizes, D))
        with pytest.raises(RuntimeError, match="from_embedding_bag"):
            cls(V + 1, D, sizes=None).load_state_dict(dense.state_dict())
        with pytest.raises(RuntimeError, match="from_embedding_bag"):
            cls(V, D).load_state_dict({"weight": torch.ones(V, D, dtype=torch.int64)})
    # a projected grouped table keeps its projection
    m = pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), D), layout="grouped", project=True)
    proj = m.projection.detach().clone()
    m.load_state_dict(torch.nn.EmbeddingBag(V, D).state_dict())
    assert torch.equal(m.projection, proj)
    # _weight may be dense [V, D] too (nn.Embedding's form)
    w = torch.randn(V, D)
    m = pme.MultiSizeEmbedding(V, D, _weight=w, sizes=sizes)
    assert torch.equal(m.to_dense(), w * _mask(sizes, D))


def test_row_accessors():
    sizes = torch.tensor([3, 0, 5, 1])
    w = torch.randn(4, 5)
    for layout in ("padded", "grouped"):
        m = pme.MultiSizeEmbedding.from_pretrained(w, sizes=sizes, layout=layout)
        dense = m.to_dense()
        assert torch.equal(m.row(2), dense[2]) and torch.equal(m.row(-1), dense[3])
        assert torch.equal(m.rows(torch.tensor([[0, 1], [3, 3]])), dense[torch.tensor([[0, 1], [3, 3]])])
        with pytest.raises(IndexError):
            m.row(4)
    m = pme.MultiSizeEmbeddingBag(4, 5, sizes=sizes)
    m.rows([0, 2]).sum().backward()  # differentiable
    assert int(m.weight.grad.ne(0).sum()) == 8


def test_nested_input():
    nt = torch.nested.nested_tensor(
        [torch.tensor([1, 2, 2]), torch.tensor([], dtype=torch.int64), torch.tensor([3])], layout=torch.jagged
    )
    sizes = torch.tensor([4, 2, 0, 3, 1])
    w = torch.randn(5, 4)
    for mode in ("sum", "mean", "max"):
        m = pme.MultiSizeEmbeddingBag.from_pretrained(w, mode=mode, sizes=sizes)
        ref = torch.nn.EmbeddingBag.from_pretrained(m.to_dense(), mode=mode)
        torch.testing.assert_close(m(nt), ref(nt))
    psw = torch.nested.nested_tensor_from_jagged(torch.rand(4), nt.offsets())
    m = pme.MultiSizeEmbeddingBag.from_pretrained(w, mode="sum", sizes=sizes)
    ref = torch.nn.EmbeddingBag.from_pretrained(m.to_dense(), mode="sum")
    torch.testing.assert_close(m(nt, per_sample_weights=psw), ref(nt, per_sample_weights=psw))
    with pytest.raises(ValueError, match="nested"):
        m(nt, per_sample_weights=torch.rand(4))
    e = pme.MultiSizeEmbedding.from_pretrained(w, sizes=sizes)
    out = e(nt)
    assert out.is_nested
    torch.testing.assert_close(out.values(), F.embedding(nt.values(), e.to_dense()))
    strided = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])])
    with pytest.raises(ValueError, match="jagged"):
        m(strided)
    # weights of another bag structure with the same total are refused (as torch does)
    other = torch.nested.nested_tensor([torch.rand(2), torch.rand(1), torch.rand(1)], layout=torch.jagged)
    with pytest.raises(ValueError, match=r"bags of lengths \[2, 1, 1\] but input has \[3, 0, 1\]"):
        m(nt, per_sample_weights=other)


def test_nested_input_with_holes():
    """A jagged view with holes (torch.nested.narrow: its offsets() alone do not give its bags)
    is read bag by bag, as its packed copy, for the bag, the non-pooled and the fused paths."""
    full = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [0, 9, 9, 2]])
    nt = torch.nested.narrow(full, 1, torch.tensor([0, 1, 2]), torch.tensor([2, 3, 0]), layout=torch.jagged)
    assert nt.lengths() is not None
    packed = nt.contiguous()
    sizes = torch.tensor([4, 2, 0, 3, 1, 4, 4, 2, 1, 3])
    w = torch.randn(10, 4)
    for mode in ("sum", "mean", "max"):
        m = pme.MultiSizeEmbeddingBag.from_pretrained(w, mode=mode, sizes=sizes)
        ref = F.embedding_bag(packed.values(), m.to_dense(), packed.offsets(), mode=mode, include_last_offset=True)
        torch.testing.assert_close(m(nt), ref)
    e = pme.MultiSizeEmbedding.from_pretrained(w, sizes=sizes)
    got = e(nt)
    assert [t.shape[0] for t in got.unbind()] == [2, 3, 0]
    torch.testing.assert_close(got.values(), F.embedding(packed.values(), e.to_dense()))
    fused = pme.MultiSizeEmbedding.from_pretrained(w, sizes=sizes, freeze=False, optimizer=pme.optim.SGD(lr=0.1))
    assert [t.shape[0] for t in fused(nt).unbind()] == [2, 3, 0]


def test_error_types_are_torchs():
    m = pme.MultiSizeEmbedding(10, 3)
    with pytest.raises(IndexError):  # nn.Embedding: IndexError
        m(torch.tensor([0, 5, 15]))
    with pytest.raises(RuntimeError):  # nn.EmbeddingBag: RuntimeError
        pme.MultiSizeEmbeddingBag(10, 3)(torch.tensor([[0, 15]]))
    with pytest.raises(RuntimeError):  # float indices
        m(torch.tensor([1.5, 2.5]))
    with pytest.raises(AssertionError):
        pme.MultiSizeEmbedding(10, 3, padding_idx=25)
    with pytest.raises(RuntimeError):
        pme.MultiSizeEmbedding(-1, 3)
    with pytest.raises(NotImplementedError, match="only supported with mode='sum'"):
        pme.MultiSizeEmbeddingBag(5, 2, mode="mean")(torch.tensor([[1, 2]]), None, torch.rand(1, 2))
    with pytest.raises(ValueError, match="max mode does not support scaling"):
        pme.MultiSizeEmbeddingBag(5, 2, mode="max", scale_grad_by_freq=True)(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="fused optimizer"):
        pme.MultiSizeEmbedding(5, 2, sparse=True, optimizer=pme.optim.SGD(lr=0.1))


def test_fused_optimizer_with_max_norm():
    w = 3 * torch.randn(10, 4)
    m = pme.MultiSizeEmbeddingBag.from_pretrained(w, False, 1.0, mode="sum", optimizer=pme.optim.SGD(lr=0.0))
    m(torch.tensor([[1, 2]])).sum().backward()
    norms = m.to_dense().norm(dim=1)
    assert bool((norms[1:3] <= 1.0 + 1e-5).all()) and torch.equal(m.to_dense()[3:], w[3:])


def test_sizes_passed_where_max_norm_goes_is_refused():
    # pme's old order had sizes third; torch's third positional argument is max_norm
    with pytest.raises(TypeError, match="sizes is a keyword argument"):
        pme.MultiSizeEmbeddingBag(4, 3, torch.tensor([1, 2, 3, 3]))
    with pytest.raises(TypeError, match="max_norm must be a number"):
        pme.MultiSizeEmbedding(4, 3, None, [1, 2, 3, 3])


def test_meta_device_gives_shapes():
    """Built on (or moved to) the meta device, as TorchRec builds large models before placing
    them, a table's forward gives the output's shape, as nn.EmbeddingBag / nn.Embedding do."""
    meta = torch.device("meta")
    idx, off = torch.tensor([1, 2, 3], device=meta), torch.tensor([0, 1], device=meta)
    two_d = torch.zeros(3, 5, dtype=torch.long, device=meta)
    for m in (
        pme.MultiSizeEmbeddingBag(10, 4, device=meta),
        pme.MultiSizeEmbeddingBag(10, 4, sizes=torch.tensor([4, 2] * 5)).to(meta),
        pme.MultiSizeEmbeddingBag(10, 4, device=meta, optimizer=pme.optim.SGD(lr=0.1)),
    ):
        ref = torch.nn.EmbeddingBag(10, 4, device=meta)
        assert m(idx, off).shape == ref(idx, off).shape == (2, 4) and m(idx, off).is_meta
        assert m(two_d).shape == ref(two_d).shape == (3, 4)
    grouped = pme.MultiSizeEmbedding(3, 8, sizes=[2, 4, 4], layout="grouped", project=True, device=meta)
    assert grouped(two_d[:, :2]).shape == (3, 2, 8)
    e = pme.MultiSizeEmbedding(10, 4, padding_idx=2, device=meta)
    assert e(two_d).shape == torch.nn.Embedding(10, 4, device=meta)(two_d).shape == (3, 5, 4)
    c = pme.MultiSizeEmbeddingBagCollection(
        [
            pme.collection.EmbeddingBagConfig(10, 4, "a", ["f", "g"]),
            pme.collection.EmbeddingBagConfig(7, 2, "b", ["h"]),
        ],
        device=meta,
    )
    out = c({k: (idx, torch.tensor([0, 1, 3], device=meta)) for k in ("f", "g", "h")})
    assert out.values().shape == (2, 10) and out.keys() == ["f", "g", "h"] and out.values().is_meta


def test_strict_false_loads_what_matches_and_strict_true_changes_nothing():
    """torch passes strict=True to every module whatever load_state_dict was called with; a table
    reads the caller's own: strict=False loads the table from a checkpoint with extra keys (a fused
    optimizer's state into a plain table), strict=True refuses it and leaves the table bitwise."""
    src = pme.MultiSizeEmbeddingBag(4, 8, sizes=[2, 4, 8, 4], mode="sum", optimizer=pme.optim.Adam(lr=0.1))
    dst = pme.MultiSizeEmbeddingBag(4, 8, mode="sum")
    w = dst.weight.detach().clone()
    with pytest.raises(RuntimeError, match="Unexpected key.*optim_state1"):
        dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.weight, w) and dst.sizes.tolist() == [8] * 4
    got = dst.load_state_dict(src.state_dict(), strict=False)
    assert sorted(got.unexpected_keys) == ["optim_state1", "optim_state2", "optim_step"]
    assert torch.equal(dst.weight, src.weight) and dst.sizes.tolist() == [2, 4, 8, 4]
    model = torch.nn.Sequential(pme.MultiSizeEmbeddingBag(4, 8, mode="sum"))  # nested: the same
    model.load_state_dict({f"0.{k}": v for k, v in src.state_dict().items()}, strict=False)
    assert torch.equal(model[0].weight, src.weight)


def test_grouped_projection_refuses_max_and_conversions_keep_freezing():
    """mode='max' with a projection would add the size slots' maxima (not the bag's max): refused.
    A frozen nn table converts to a frozen pme table."""
    with pytest.raises(ValueError, match="mode='max' cannot take project=True"):
        pme.MultiSizeEmbeddingBag(4, 8, sizes=[2, 4, 8, 4], mode="max", layout="grouped", project=True)
    grouped_max = pme.MultiSizeEmbeddingBag(4, 8, sizes=[2, 4, 8, 4], mode="max", layout="grouped")
    assert grouped_max(torch.tensor([0, 1]), torch.tensor([0])).shape == (1, 14)
    frozen = torch.nn.Sequential(torch.nn.Embedding.from_pretrained(torch.randn(5, 8)))
    pme.convert(frozen, {"0": 4})
    assert not frozen[0].weight.requires_grad
    trained = torch.nn.Sequential(torch.nn.EmbeddingBag(5, 8))
    pme.convert(trained, {"0": 4}, init="fresh")
    assert trained[0].weight.requires_grad


def test_sparse_adam_checks_every_gradient_before_a_step():
    """A grouped table with a projection and sparse=True: the projection's gradient is dense, so
    pme.optim.SparseAdam refuses, as torch's does, before it changes anything."""
    m = pme.MultiSizeEmbeddingBag(5, 8, sizes=[2, 4, 0, 8, 4], mode="sum", layout="grouped", project=True, sparse=True)
    w0 = m.weight.detach().clone()
    opt = pme.optim.SparseAdam(m.parameters())
    m(torch.tensor([0, 1]), torch.tensor([0])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support dense gradients.*not its projection"):
        opt.step()
    assert torch.equal(m.weight, w0) and not opt.state


@pytest.mark.parametrize("kind", ["bag", "embedding", "grouped", "fused", "collection"])
def test_built_under_a_meta_device_context(kind):
    """``with torch.device("meta"):`` (the meta-init idiom) builds every module on meta, sizes given
    or not, as nn.EmbeddingBag builds (its sizes, offsets and grouped columns used to be made on
    the context's device too, where their values cannot be read); meta input gives the real
    module's shapes."""
    from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

    sizes = [1, 2, 3, 4, 0, 4]

    def build():
        if kind == "collection":
            return MultiSizeEmbeddingBagCollection([EmbeddingBagConfig(6, 4, "t0", ["f0"])], {"t0": sizes})
        if kind == "embedding":
            return pme.MultiSizeEmbedding(6, 4, sizes=sizes)
        opts = {"grouped": dict(layout="grouped"), "fused": dict(optimizer=pme.optim.RowwiseAdagrad(lr=0.1))}
        return pme.MultiSizeEmbeddingBag(6, 4, mode="sum", sizes=sizes, **opts.get(kind, {}))

    real = build()
    with torch.device("meta"):
        meta = build()
    assert meta.weight.is_meta and meta.offsets.is_meta
    idx, off = torch.tensor([0, 3, 5, 1]), torch.tensor([0, 2, 4])

    def call(m, device):
        i, o = idx.to(device), off.to(device)
        if kind == "collection":
            return m({"f0": (i, o)}).values()
        return m(i) if kind == "embedding" else m(i, o[:-1])

    with torch.no_grad():
        assert call(meta, "meta").shape == call(real, "cpu").shape
    if kind != "collection":  # (a collection's per-table state_dict slices by offsets: values meta lacks)
        assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    # sizes made inside the block are meta too: no values to lay the table out by, said clearly
    with torch.device("meta"), pytest.raises(ValueError, match="sizes is a meta tensor"):
        sizes = torch.tensor([1, 2, 3, 4, 0, 4])
        build()


@pytest.mark.parametrize("assign", [False, True])
def test_meta_modules_refuse_a_checkpoint_clearly(assign):
    """A table or collection on the meta device has no offsets to check a checkpoint against or to
    copy into: loading one is a clear error (it used to crash for a table, and to report success
    while loading nothing for a collection), assign=True included."""
    from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

    cfgs = [EmbeddingBagConfig(6, 4, "t0", ["f0"])]
    for make in (
        lambda d: pme.MultiSizeEmbeddingBag(6, 4, sizes=[1, 2, 3, 4, 0, 4], device=d),
        lambda d: MultiSizeEmbeddingBagCollection(cfgs, {"t0": [1, 2, 3, 4, 0, 4]}, device=d),
    ):
        with pytest.raises(RuntimeError, match="on the meta device cannot take a checkpoint"):
            make("meta").load_state_dict(make("cpu").state_dict(), assign=assign)


@pytest.mark.parametrize("via", ["table", "parent"])
@pytest.mark.parametrize("kind", ["bag", "embedding", "fused"])
def test_to_empty_then_load_state_dict(kind, via):
    """The meta-init idiom: build on meta, ``to_empty(device="cpu")`` (the table's own, or a parent
    module's, which reaches the table only through ``_apply``), load the checkpoint. Before the load
    a lookup is a clear error (the offsets are uninitialised memory); after it the table equals the
    one the checkpoint came from (a fused optimizer's state included). A collection refuses
    ``to_empty`` clearly."""
    from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

    def build(device):
        if kind == "embedding":
            return pme.MultiSizeEmbedding(6, 4, sizes=[1, 2, 3, 4, 0, 4], device=device)
        opt = pme.optim.Adam(lr=0.1) if kind == "fused" else None
        return pme.MultiSizeEmbeddingBag(6, 4, mode="sum", sizes=[1, 2, 3, 4, 0, 4], device=device, optimizer=opt)

    real = build("cpu")
    idx, off = torch.tensor([0, 3, 5, 1]), torch.tensor([0, 2])

    def call(m):
        return m(idx) if kind == "embedding" else m(idx, off)

    if kind == "fused":
        call(real).sum().backward()  # some optimizer state to carry over
    m = (
        build("meta").to_empty(device="cpu")
        if via == "table"
        else torch.nn.Sequential(build("meta")).to_empty(device="cpu")[0]
    )
    with pytest.raises(RuntimeError, match=r"materialised with to_empty\(\).*load_state_dict"):
        call(m)
    m.load_state_dict(real.state_dict())
    with torch.no_grad():
        assert torch.equal(call(m), call(real))
    assert {k: v.tolist() for k, v in m.state_dict().items()} == {k: v.tolist() for k, v in real.state_dict().items()}
    c = MultiSizeEmbeddingBagCollection([EmbeddingBagConfig(6, 4, "t0", ["f0"])], None, device="meta")
    with pytest.raises(NotImplementedError, match="build it on its real device"):
        c.to_empty(device="cpu")
    parent = torch.nn.ModuleDict({"c": c})  # a parent's to_empty reaches the collection through _apply
    with pytest.raises(NotImplementedError, match="build it on its real device"):
        parent.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="moved off the meta device"):
        c({"f0": (torch.tensor([1]), torch.tensor([0, 1]))})
    with pytest.raises(RuntimeError, match="moved off the meta device"):
        c.state_dict()
    assert "sizes=? (to_empty)" in repr(c)
