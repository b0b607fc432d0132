"""PyTorch's own nn.Embedding / nn.EmbeddingBag test cases, ported to pme (our port, not a copy).

Sources (PyTorch main, read 2026-11-27; each case names its own):
  - test/nn/test_embedding.py (TestEmbeddingNN, TestEmbeddingNNDeviceType)
  - torch/testing/_internal/common_methods_invocations.py: sample_inputs_embedding_bag,
    sample_inputs_embedding, error_inputs_embedding
  - torch/testing/_internal/common_nn.py: the Embedding / EmbeddingBag entries of module_tests
  - torch/testing/_internal/common_modules.py: module_inputs_torch_nn_Embedding,
    module_error_inputs_torch_nn_Embedding

Every case runs twice: ``full`` (all sizes D: pme must equal torch on the same table) and
``random`` (random sizes in [0, D]: pme must equal torch on the zero-padded dense view, outputs,
the in-place max_norm renormalisation, and gradients on the stored entries). What pme refuses
on purpose: integer weight dtypes in from_pretrained (tables are floating point). Where torch is
wrong (EmbeddingBag's scale_grad_by_freq count on CPU, see test_dropin.py), the gradient oracle is
torch's unscaled gradient divided by the per-row count, which is the documented rule.
"""

import itertools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pme
from pme import ops

warnings.filterwarnings("ignore", message="Sparse invariant checks")
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")

S, M = 5, 10  # the sizes common_methods_invocations.py uses
KINDS = ["full", "random"]
BAG_MODULE_ARGS = (
    "mode",
    "padding_idx",
    "include_last_offset",
    "max_norm",
    "norm_type",
    "scale_grad_by_freq",
    "sparse",
)


# --------------------------------------------------------------------------------------------
# The harness: one pme table and one torch table on its dense view, run side by side
# --------------------------------------------------------------------------------------------
def _sizes(V, D, kind, seed=0):
    if kind == "full" or D == 0:
        return None, torch.ones(V, D, dtype=torch.bool)
    s = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(seed))
    return s, torch.arange(D) < s[:, None]


def _tol(dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return dict(atol=2e-2, rtol=2e-2)
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1.3e-6)
    return dict(atol=1e-12, rtol=1e-10)


def make_pair(cls, weight, kind, seed=0, **kw):
    """(pme module, torch module on the dense view, mask of stored entries)."""
    V, D = weight.shape
    sizes, mask = _sizes(V, D, kind, seed)
    dense = (weight.detach() * mask.to(weight.dtype)).contiguous()
    nn_cls = nn.EmbeddingBag if cls is pme.MultiSizeEmbeddingBag else nn.Embedding
    ref_kw = dict(kw, scale_grad_by_freq=False)  # scaled by the count below (torch miscounts bags)
    ref = nn_cls.from_pretrained(dense.clone(), freeze=False, **ref_kw)
    m = cls.from_pretrained(dense, freeze=False, sizes=sizes, **kw)
    return m, ref, mask


def _counts(idx, V, offsets=None, include_last_offset=False):
    """Lookups of every row inside the bags (what scale_grad_by_freq divides by)."""
    flat = idx.reshape(-1).long()
    if offsets is not None:
        end = int(offsets[-1]) if include_last_offset else flat.numel()
        flat = flat[:end]
    return torch.bincount(flat, minlength=V)


def compare(m, ref, mask, idx, offsets=None, psw=None, psw_grad=False, dtype=torch.float64):
    """Forward, in-place renormalisation, backward (weight and per-sample-weight gradients)."""
    bag = isinstance(m, pme.MultiSizeEmbeddingBag)
    tol = _tol(dtype)
    p_ref = p_m = None
    if psw is not None:
        p_ref = psw.detach().clone().requires_grad_(psw_grad)
        p_m = psw.detach().clone().requires_grad_(psw_grad)
    out_ref = ref(idx, offsets, p_ref) if bag else ref(idx)
    out = m(idx, offsets, p_m) if bag else m(idx)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(m.to_dense(), ref.weight.detach(), **tol)  # max_norm: same rows rescaled
    go = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1)).to(out_ref.dtype)
    out_ref.backward(go)
    out.backward(go)
    V, D = ref.weight.shape
    g_ref = ref.weight.grad
    g_ref = torch.zeros_like(ref.weight) if g_ref is None else (g_ref.to_dense() if g_ref.is_sparse else g_ref)
    if m.scale_grad_by_freq:
        inc = getattr(m, "include_last_offset", False)
        g_ref = g_ref / _counts(idx, V, offsets, inc).clamp(min=1)[:, None].to(g_ref.dtype)
    g = m.weight.grad
    if m.sparse:
        assert g.is_sparse and g.shape == m.weight.shape
        g = g.to_dense()
    g = torch.zeros_like(m.weight) if g is None else g
    torch.testing.assert_close(ops.to_dense(g, m.offsets, D), g_ref * mask.to(g_ref.dtype), **tol)
    if psw_grad:
        torch.testing.assert_close(p_m.grad, p_ref.grad, **tol)
    return out


def _split_bag_kwargs(kw):
    module = {k: v for k, v in kw.items() if k in BAG_MODULE_ARGS}
    call = {k: v for k, v in kw.items() if k not in BAG_MODULE_ARGS}
    return module, call


# --------------------------------------------------------------------------------------------
# common_methods_invocations.py: sample_inputs_embedding_bag (the OpInfo samples, requires_grad=False
# so every sample is included, and every one is also run backward here)
# --------------------------------------------------------------------------------------------
def _opinfo_bag_samples():
    g = torch.Generator().manual_seed(0)

    def long(shape, low, high, noncontiguous=False):
        if noncontiguous:  # a strided view, as make_tensor(noncontiguous=True) gives
            t = torch.randint(low, high, (*shape[:-1], 2 * shape[-1]) if shape else (2,), generator=g)
            return t[..., ::2]
        return torch.randint(low, high, shape, generator=g)

    offsets = torch.tensor([0, 3])
    out = []
    for with_psw in (True, False):
        for mode in ("sum", "mean", "max"):
            if with_psw and mode != "sum":
                continue
            tag = f"{mode}-{'psw' if with_psw else 'nopsw'}"

            def add(name, shape, idx, scale=1.0, **kw):
                psw = torch.randn(idx.shape, generator=g, dtype=torch.float64) if with_psw else None
                if psw is not None and not kw.pop("no_psw", False):
                    kw["per_sample_weights"] = psw
                kw.pop("no_psw", None)
                out.append(pytest.param(shape, scale, idx, kw, id=f"{name}-{tag}"))

            add("1d", (M, S), long((S,), 0, M), offsets=offsets, mode=mode)
            add("1d_noncontiguous", (M, S), long((S,), 0, M, True), offsets=offsets, mode=mode)
            add("zero_length_bag", (M, S), long((S,), 0, M, True), offsets=torch.tensor([0, 0, 3]), mode=mode)
            add("2d", (M, S), long((S, S), 0, M), mode=mode)
            add("2d_noncontiguous", (M, S), long((S, S), 0, M, True), mode=mode)
            idx = long((6,), 0, S)
            idx[0] = idx[4] = 4
            add("negative_padding_idx", (S, S), idx, padding_idx=-1, offsets=offsets, mode=mode)
            idx = long((3, 3), 0, S)
            idx[0, 0] = idx[1, 1] = 2
            add("positive_padding_idx", (S, S), idx, padding_idx=2, mode=mode)
            add(
                "include_last_offset",
                (S, S),
                long((6,), 0, S),
                mode=mode,
                offsets=torch.tensor([0, 3, 6]),
                include_last_offset=True,
                no_psw=True,
            )
            add("max_norm", (S, S), long((2, 2), 0, S), scale=2.0, max_norm=1.0, mode=mode)
            add(
                "max_norm_norm_type_1",
                (S, S),
                long((6,), 0, S),
                scale=2.0,
                max_norm=1.0,
                norm_type=1.0,
                mode=mode,
                offsets=offsets,
            )
            if mode != "max":
                idx = long((2, 2), 0, S)
                idx[0, 0] = idx[0, 1] = 1
                add("scale_grad_by_freq", (S, S), idx, scale_grad_by_freq=True, mode=mode)
                add("sparse", (S, S), long((6,), 0, S), sparse=True, offsets=offsets, mode=mode)
                idx = long((6,), 0, S)
                idx[0] = idx[1] = 1
                idx[3] = 0
                add(
                    "sparse_scale_padding_max_norm",
                    (S, S),
                    idx,
                    scale=2.0,
                    sparse=True,
                    scale_grad_by_freq=True,
                    padding_idx=0,
                    max_norm=1.0,
                    offsets=offsets,
                    mode=mode,
                )
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,scale,idx,kw", _opinfo_bag_samples())
def test_opinfo_sample_inputs_embedding_bag(shape, scale, idx, kw, kind):
    """common_methods_invocations.py::sample_inputs_embedding_bag"""
    weight = scale * torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    module_kw, call = _split_bag_kwargs(kw)
    m, ref, mask = make_pair(pme.MultiSizeEmbeddingBag, weight, kind, **module_kw)
    compare(
        m,
        ref,
        mask,
        idx,
        call.get("offsets"),
        call.get("per_sample_weights"),
        psw_grad=call.get("per_sample_weights") is not None,
    )


def _opinfo_embedding_samples():
    g = torch.Generator().manual_seed(3)
    out = [
        pytest.param((M, S), 1.0, torch.randint(0, M, (), generator=g), {}, id="0d"),
        pytest.param((M, S), 1.0, torch.randint(0, M, (S,), generator=g), {}, id="1d"),
        pytest.param((M, S), 1.0, torch.randint(0, M, (S, S), generator=g), {}, id="2d"),
    ]
    idx = torch.randint(0, S, (2, 2), generator=g)
    idx[0, 0] = idx[1, 1] = 2
    out.append(pytest.param((S, S), 1.0, idx, {"padding_idx": 2}, id="padding_idx"))
    idx = torch.randint(0, S, (2, 2), generator=g)
    idx[0, 0] = idx[1, 1] = 4
    out.append(pytest.param((S, S), 1.0, idx, {"padding_idx": -1}, id="negative_padding_idx"))
    out.append(pytest.param((S, S), 2.0, torch.randint(0, S, (2, 2), generator=g), {"max_norm": 1.0}, id="max_norm"))
    out.append(
        pytest.param(
            (S, S),
            2.0,
            torch.randint(0, S, (2, 2), generator=g),
            {"max_norm": 1.0, "norm_type": 1.0},
            id="max_norm_norm_type_1",
        )
    )
    idx = torch.randint(0, S, (2, 2), generator=g)
    idx[0, 0] = idx[0, 1] = 1
    out.append(pytest.param((S, S), 1.0, idx, {"scale_grad_by_freq": True}, id="scale_grad_by_freq"))
    out.append(pytest.param((S, S), 1.0, torch.randint(0, S, (2, 2), generator=g), {"sparse": True}, id="sparse"))
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,scale,idx,kw", _opinfo_embedding_samples())
def test_opinfo_sample_inputs_embedding(shape, scale, idx, kw, kind):
    """common_methods_invocations.py::sample_inputs_embedding"""
    weight = scale * torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    m, ref, mask = make_pair(pme.MultiSizeEmbedding, weight, kind, **kw)
    compare(m, ref, mask, idx)


@pytest.mark.parametrize("weight", [torch.tensor(1.0), torch.tensor(1.0).reshape(1, 1, 1)], ids=["0d", "3d"])
def test_opinfo_error_inputs_embedding(weight):
    """common_methods_invocations.py::error_inputs_embedding and test_embedding.py::
    test_embedding_scalar_weight_error: a weight that is not 2-D. torch's F.embedding raises
    RuntimeError "'weight' must be 2-D"; pme's tables are built from the 2-D weight."""
    for cls in (pme.MultiSizeEmbedding, pme.MultiSizeEmbeddingBag):
        with pytest.raises(RuntimeError, match="2-dimensional"):
            cls.from_pretrained(weight)


# --------------------------------------------------------------------------------------------
# common_nn.py module_tests and common_modules.py module inputs
# --------------------------------------------------------------------------------------------
def _rand_long(shape, high, seed):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


COMMON_NN = [
    pytest.param(pme.MultiSizeEmbedding, {}, lambda: _rand_long((2, 3), 4, 0), id="Embedding"),
    pytest.param(
        pme.MultiSizeEmbedding, {}, lambda: _rand_long((1, 512), 4, 1).expand(7, 512), id="Embedding_discontiguous"
    ),
    pytest.param(pme.MultiSizeEmbeddingBag, {}, lambda: _rand_long((2, 3), 4, 2), id="EmbeddingBag_mean"),
    pytest.param(
        pme.MultiSizeEmbeddingBag,
        {},
        lambda: _rand_long((1, 512), 4, 3).expand(7, 512),
        id="EmbeddingBag_discontiguous",
    ),
    pytest.param(
        pme.MultiSizeEmbeddingBag,
        {"args": (None, 2.0, False, "sum")},
        lambda: _rand_long((2, 3), 4, 4),
        id="EmbeddingBag_sum",
    ),
    pytest.param(
        pme.MultiSizeEmbeddingBag,
        {"args": (None, 2.0, False, "max")},
        lambda: _rand_long((2, 3), 4, 5),
        id="EmbeddingBag_max",
    ),
    pytest.param(
        pme.MultiSizeEmbeddingBag,
        {"padding_idx": 1},
        lambda: torch.stack([torch.randperm(3), torch.randperm(3)]),
        id="EmbeddingBag_mean_padding_idx",
    ),
    pytest.param(
        pme.MultiSizeEmbeddingBag,
        {"args": (None, 2.0, False, "sum"), "padding_idx": 1},
        lambda: torch.stack([torch.randperm(3), torch.randperm(3)]),
        id="EmbeddingBag_sum_padding_idx",
    ),
    pytest.param(
        pme.MultiSizeEmbeddingBag,
        {"args": (None, 2.0, False, "max"), "padding_idx": 1},
        lambda: torch.stack([torch.randperm(3), torch.randperm(3)]),
        id="EmbeddingBag_max_padding_idx",
    ),
    pytest.param(
        pme.MultiSizeEmbeddingBag, {"sparse": True}, lambda: torch.randperm(2).repeat(1, 2), id="EmbeddingBag_sparse"
    ),
    pytest.param(
        pme.MultiSizeEmbedding, {"sparse": True}, lambda: torch.randperm(2).repeat(1, 2), id="Embedding_sparse"
    ),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls,ctor,make_input", COMMON_NN)
def test_common_nn_module_tests(cls, ctor, make_input, kind):
    """common_nn.py::module_tests (Embedding / EmbeddingBag entries): constructed with torch's
    positional arguments, float64, compared with torch and checked by gradcheck (dense ones)."""
    ctor = dict(ctor)
    args = ctor.pop("args", ())
    torch.manual_seed(0)
    m = cls(4, 3, *args, dtype=torch.float64, sizes=_sizes(4, 3, kind)[0], **ctor)
    nn_cls = nn.EmbeddingBag if cls is pme.MultiSizeEmbeddingBag else nn.Embedding
    ref = nn_cls(4, 3, *args, dtype=torch.float64, **ctor)
    with torch.no_grad():
        ref.weight.copy_(m.to_dense())
    mask = _sizes(4, 3, kind)[1]
    x = make_input()
    compare(m, ref, mask, x)
    if not m.sparse:
        w = m.weight.detach().clone().requires_grad_(True)
        if cls is pme.MultiSizeEmbeddingBag:

            def f(w):
                return ops.embedding_bag(w, m.offsets, x, width=3, mode=m.mode, padding_idx=m.padding_idx)
        else:

            def f(w):
                return ops.embedding(w, m.offsets, x, width=3)

        assert torch.autograd.gradcheck(f, (w,), fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("discontiguous", [False, True])
def test_common_modules_module_inputs_embedding(kind, discontiguous):
    """common_modules.py::module_inputs_torch_nn_Embedding"""
    x = _rand_long((1, 512), 4, 6).expand(7, 512) if discontiguous else _rand_long((2, 3), 4, 6)
    m, ref, mask = make_pair(pme.MultiSizeEmbedding, torch.randn(4, 3, dtype=torch.float64), kind)
    compare(m, ref, mask, x)


def test_common_modules_module_error_inputs_embedding():
    """common_modules.py::module_error_inputs_torch_nn_Embedding: out of range -> IndexError,
    float indices -> RuntimeError, negative num_embeddings -> RuntimeError (construction)."""
    m = pme.MultiSizeEmbedding(num_embeddings=10, embedding_dim=3)
    with pytest.raises(IndexError, match="index out of range"):
        m(torch.tensor([0, 5, 15]))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        m(torch.tensor([1.5, 2.5]))
    with pytest.raises(RuntimeError, match="non-negative"):
        pme.MultiSizeEmbedding(num_embeddings=-1, embedding_dim=3)


# --------------------------------------------------------------------------------------------
# test/nn/test_embedding.py, TestEmbeddingNN
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_embedding_sparse_basic(kind):
    """test_embedding.py::TestEmbeddingNN::test_embedding_sparse_basic"""
    m, ref, mask = make_pair(pme.MultiSizeEmbedding, torch.randn(10, 20), kind, sparse=True)
    x = torch.tensor([[0, 2, 4, 5], [4, 3, 0, 9]])
    m(x).sum().backward()
    assert m.weight.grad.is_sparse and m.weight.grad.shape == m.weight.shape
    m.zero_grad()
    compare(m, ref, mask, x, dtype=torch.float32)


def test_embedding_sparse_empty_tensor():
    """test_embedding.py::TestEmbeddingNN::test_embedding_sparse_empty_tensor"""
    m = pme.MultiSizeEmbedding(0, 0, sparse=True)
    m(torch.tensor([], dtype=torch.int64)).sum().backward()
    assert m.weight.grad.is_sparse and m.weight.grad.shape == m.weight.shape
    m = pme.MultiSizeEmbedding(10, 0, sparse=True)
    m(torch.tensor([[0, 2, 4, 5], [4, 3, 0, 9]])).sum().backward()
    assert m.weight.grad.is_sparse and m.weight.grad.shape == m.weight.shape


def test_move_sparse_half_embedding():
    """test_embedding.py::TestEmbeddingNN::test_move_sparse_half_embedding"""
    m = pme.MultiSizeEmbedding(10, 3, sparse=True)
    assert m.weight.device.type == "cpu" and m.weight.dtype == torch.get_default_dtype()
    m.to(torch.float16)
    assert m.weight.dtype == torch.float16 and m.embedding_dim == 3 and m.num_embeddings == 10


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_max_norm(kind):
    """test_embedding.py::TestEmbeddingNN::test_embedding_max_norm"""
    m = pme.MultiSizeEmbedding(22, 5, max_norm=1.0, sizes=_sizes(22, 5, kind)[0])
    out = m(torch.tensor([2, 8, 8, 6]))
    assert torch.equal(out[1], out[2])
    assert bool(out.detach().norm(p=2, dim=1).le(1).all())


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        pytest.param(torch.uint8, id="refused-uint8"),
        pytest.param(torch.int8, id="refused-int8"),
        pytest.param(torch.int16, id="refused-int16"),
        pytest.param(torch.int32, id="refused-int32"),
        pytest.param(torch.int64, id="refused-int64"),
    ],
)
def test_embedding_from_pretrained(dtype):
    """test_embedding.py::TestEmbeddingNN::test_embedding_from_pretrained. Integer tables are
    refused on purpose (pme tables are floating point): TypeError naming the fix."""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype)
    if not a.is_floating_point():
        with pytest.raises(TypeError, match="integer tables are not supported"):
            pme.MultiSizeEmbedding.from_pretrained(a)
        return
    m = pme.MultiSizeEmbedding.from_pretrained(a)
    assert torch.equal(m.to_dense(), a)
    assert torch.equal(m(torch.tensor([0, 1])), a)


def test_embedding_bag_from_pretrained():
    """test_embedding.py::TestEmbeddingNN::test_embedding_bag_from_pretrained"""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = pme.MultiSizeEmbeddingBag.from_pretrained(a)
    assert torch.equal(m.to_dense(), a)
    x = torch.tensor([0, 1])
    assert torch.equal(m(x, torch.arange(x.size(0))), a)


def test_embedding_from_pretrained_padding_idx():
    """test_embedding.py::TestEmbeddingNN::test_embedding_from_pretrained_padding_idx (the row
    is read with row(), pme's accessor for nn's weight[i])"""
    emb = torch.rand(4, 3)
    emb[2] = 7
    m = pme.MultiSizeEmbedding.from_pretrained(emb, padding_idx=2)
    assert torch.equal(m.row(2), torch.full((3,), 7.0))


def test_embedding_bag_from_pretrained_padding_idx():
    """test_embedding.py::TestEmbeddingNN::test_embedding_bag_from_pretrained_padding_idx"""
    emb = torch.rand(4, 3, requires_grad=True)
    m = pme.MultiSizeEmbeddingBag.from_pretrained(emb, padding_idx=2)
    assert torch.equal(m.to_dense(), emb.detach())


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_from_pretrained_options(kind):
    """test_embedding.py::TestEmbeddingNN::test_embedding_from_pretrained_options. torch's
    from_pretrained shares the tensor, so torch checks that `a` itself was renormalised; pme's
    flat buffer is a copy, so the renormalised table is read back with to_dense()."""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    sizes, mask = _sizes(2, 3, kind, seed=2)
    opts = {"max_norm": 2.0, "norm_type": 0.5, "scale_grad_by_freq": False, "sparse": True}
    m = pme.MultiSizeEmbedding.from_pretrained(a, sizes=sizes, **opts)
    out = m(torch.tensor([0, 1]))
    table = m.to_dense()
    assert torch.equal(out, table)
    assert bool(table[mask].ne((torch.arange(1, 7, dtype=a.dtype).view(2, 3) * mask)[mask]).all())
    assert bool(out.detach().norm(p=opts["norm_type"], dim=1).le(opts["max_norm"]).all())


@pytest.mark.parametrize(
    "cls, pme_fn, torch_fn",
    [
        pytest.param(pme.MultiSizeEmbedding, ops.embedding, F.embedding, id="embedding"),
        pytest.param(pme.MultiSizeEmbeddingBag, ops.embedding_bag, F.embedding_bag, id="embedding_bag"),
    ],
)
def test_functional(cls, pme_fn, torch_fn):
    """test_embedding.py::TestEmbeddingNN::test_embedding_functional and
    test_embedding_bag_functional (pme.ops.embedding / embedding_bag are the functional forms)"""
    a = torch.tensor([[1, 3, 2], [0, 2, 1]])
    emb = torch.rand(4, 3)
    m = cls(4, 3, _weight=emb)
    torch.testing.assert_close(m(a), torch_fn(a, emb))
    torch.testing.assert_close(pme_fn(m.weight, m.offsets, a, width=3), torch_fn(a, emb))
    m = cls.from_pretrained(emb, padding_idx=2)
    torch.testing.assert_close(m(a), torch_fn(a, emb, padding_idx=2))


def test_embedding_bag_padding_idx_error():
    """test_embedding.py::TestEmbeddingNN::test_embedding_bag_padding_idx_error: functional ->
    RuntimeError, module -> AssertionError, in range -> fine."""
    a = torch.tensor([[1, 3, 2], [0, 2, 1]])
    m = pme.MultiSizeEmbeddingBag(4, 3)
    for padding_idx in range(-6, 6):
        if padding_idx < -4 or padding_idx >= 4:
            with pytest.raises(RuntimeError, match="padding_idx"):
                ops.embedding_bag(m.weight, m.offsets, a, width=3, padding_idx=padding_idx)
            with pytest.raises(AssertionError, match="padding_idx"):
                pme.MultiSizeEmbeddingBag(4, 3, padding_idx=padding_idx)
        else:
            ops.embedding_bag(m.weight, m.offsets, a, width=3, padding_idx=padding_idx)
            pme.MultiSizeEmbeddingBag(4, 3, padding_idx=padding_idx)


def test_embeddingbag_from_pretrained():
    """test_embedding.py::TestEmbeddingNN::test_embeddingbag_from_pretrained"""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = pme.MultiSizeEmbeddingBag.from_pretrained(a)
    assert torch.equal(m.to_dense(), a)
    torch.testing.assert_close(m(torch.tensor([[0, 1]])), a.mean(0, keepdim=True))


def test_embeddingbag_from_pretrained_options():
    """test_embedding.py::TestEmbeddingNN::test_embeddingbag_from_pretrained_options (the
    renormalised table read back with to_dense(), see test_embedding_from_pretrained_options)"""
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    opts = {"max_norm": 2.0, "norm_type": 0.5, "scale_grad_by_freq": False, "mode": "max", "sparse": False}
    m = pme.MultiSizeEmbeddingBag.from_pretrained(a, **opts)
    out = m(torch.tensor([[0, 1]]))
    table = m.to_dense()
    torch.testing.assert_close(out, table.max(0, keepdim=True)[0])
    assert bool(table.ne(torch.arange(1, 7, dtype=a.dtype).view(2, 3)).all())
    assert bool(table.norm(p=opts["norm_type"], dim=1).le(opts["max_norm"]).all())


def test_embeddingbag_include_last_offset():
    """test_embedding.py::TestEmbeddingNN::test_embeddingbag_include_last_offset (torch issue 89677).

    torch runs the last bag to the end of the input when offsets[-1] < len(input) in some modes
    and not in others; pme refuses that input (README, Safety) and matches torch on the CSR form."""
    m = pme.MultiSizeEmbeddingBag(100, 3, include_last_offset=True, padding_idx=61)
    x = torch.tensor([0, 1, 2, 3])
    out2 = m(x, torch.tensor([0, 3, 4]))
    w = m.to_dense()
    ref = torch.stack([w[0:3].mean(0), w[3]])
    torch.testing.assert_close(out2, ref)
    with pytest.raises(ValueError, match="offsets\\[-1\\] = 3 must equal the number of indices 4"):
        m(x, torch.tensor([0, 3, 3]))


# --------------------------------------------------------------------------------------------
# test/nn/test_embedding.py, TestEmbeddingNNDeviceType (CPU)
# --------------------------------------------------------------------------------------------
def test_embedding_dense_grad():
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_dense_grad (gradcheck; the
    gradgradcheck half is test_embedding_dense_gradgrad)"""
    m = pme.MultiSizeEmbedding(20, 20, dtype=torch.float64)
    x = torch.tensor([[0, 1, 1, 2], [3, 5, 7, 11]])
    w = m.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: ops.embedding(w, m.offsets, x, width=20), (w,))


def test_embedding_dense_gradgrad():
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_dense_grad (gradgradcheck)"""
    m = pme.MultiSizeEmbedding(20, 20, dtype=torch.float64)
    x = torch.tensor([[0, 1, 1, 2], [3, 5, 7, 11]])
    w = m.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda w: ops.embedding(w, m.offsets, x, width=20) ** 2, (w,))


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_backward(kind):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_backward: sparse gradients
    of one and of two backward passes (accumulated). pme's gradient is of the flat buffer, so the
    indices/values are compared through the dense view."""
    sizes, mask = _sizes(10, 3, kind, seed=5)
    m = pme.MultiSizeEmbedding(10, 3, sparse=True, dtype=torch.float64, sizes=sizes)
    t = torch.tensor([[7, 1, 3]])

    def dense_grad():
        g = m.weight.grad
        assert g.is_sparse
        return ops.to_dense(g.to_dense(), m.offsets, 3)

    def expected(rows):
        e = torch.zeros(10, 3, dtype=torch.float64)
        for r in rows:
            e[r] += 1
        return e * mask

    m.zero_grad()
    m(t[0]).sum().backward()
    torch.testing.assert_close(dense_grad(), expected([7, 1, 3]))
    m.zero_grad()
    m(t[0]).sum().backward()
    m(t[0]).sum().backward()
    torch.testing.assert_close(dense_grad(), expected([7, 1, 3, 7, 1, 3]))
    m.zero_grad()
    m(t[0]).sum().backward()
    t[0, 0] = 8
    m(t[0]).sum().backward()
    torch.testing.assert_close(dense_grad(), expected([7, 1, 3, 8, 1, 3]))


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_max_norm_backward(kind):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_max_norm_backward"""
    sizes, mask = _sizes(4, 4, kind, seed=6)
    w = torch.randn(4, 4) * 2
    m = pme.MultiSizeEmbedding.from_pretrained(w, freeze=False, max_norm=1.0, sizes=sizes)
    m(torch.tensor([0, 1, 2, 2])).sum().backward()
    expected = torch.tensor([[1.0, 1.0, 2.0, 0.0]]).transpose(0, 1).expand(4, 4)
    torch.testing.assert_close(ops.to_dense(m.weight.grad, m.offsets, 4), expected * mask)


def test_embedding_max_norm_fwd_AD():
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_max_norm_fwd_AD"""
    import torch.autograd.forward_ad as fwAD

    m = pme.MultiSizeEmbedding.from_pretrained(torch.randn(4, 4) * 2, max_norm=1.0)
    x = torch.tensor([[0, 1], [2, 2]])
    with fwAD.dual_level():
        dual = fwAD.make_dual(m.weight.detach(), torch.ones_like(m.weight))
        out = ops.embedding(dual, m.offsets, x, width=4, max_norm=1.0)
        jvp = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(jvp, torch.ones(2, 2, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_embedding_padding_idx(kind):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_padding_idx"""
    sizes = _sizes(10, 20, kind, seed=7)[0]
    for sparse in (False, True):
        m = pme.MultiSizeEmbedding(10, 20, padding_idx=0, sparse=sparse, sizes=sizes)
        out = m(torch.tensor([[0, 2, 4, 5], [4, 3, 0, 9]]))
        assert out[0][0].sum() == 0 and out[1][2].sum() == 0
        m = pme.MultiSizeEmbedding(10, 20, padding_idx=-2, sparse=sparse, sizes=sizes)
        out = m(torch.tensor([[0, 2, 8, 5], [4, 8, 0, 9]]))
        assert out[0][2].sum() == 0 and out[1][1].sum() == 0
    # change the padding vector
    m = pme.MultiSizeEmbedding(10, 20, padding_idx=2, sparse=True, sizes=sizes)
    lo, hi = int(m.offsets[2]), int(m.offsets[3])
    with torch.no_grad():
        m.weight[lo:hi] = 1.0
    out = m(torch.tensor([0, 2]))
    torch.testing.assert_close(out[1], m.row(2))
    with pytest.raises(AssertionError):
        pme.MultiSizeEmbedding(num_embeddings=10, embedding_dim=20, padding_idx=25)
    with pytest.raises(AssertionError):
        pme.MultiSizeEmbedding(num_embeddings=10, embedding_dim=20, padding_idx=-25)
    m = pme.MultiSizeEmbedding(5, 2, padding_idx=0, sizes=_sizes(5, 2, kind, seed=8)[0])
    for n in (1, 2, 1000):
        for other in ([], [1, 3], [2]):
            x = torch.tensor(other + [0] * n)
            pre = m.row(0).detach().clone()
            m(x).sum().backward()
            after = (m.weight + m.weight.grad).detach()
            torch.testing.assert_close(ops.to_dense(after, m.offsets, 2)[0], pre)
            m.zero_grad()
            emb_sum = m(x).sum()
            (g,) = torch.autograd.grad(emb_sum, [m.weight], retain_graph=True)
            (g.sum() + emb_sum).backward()
            after = (m.weight + m.weight.grad).detach()
            torch.testing.assert_close(ops.to_dense(after, m.offsets, 2)[0], pre)
            m.zero_grad()


def _gen_1d(num_bags, max_per_bag, num_words, include_last_offset, allpad, rng):
    empty_bag = rng.randint(0, num_bags - 1)
    full_bag = empty_bag
    while full_bag == empty_bag:
        full_bag = rng.randint(0, num_bags - 1)
    idx, offsets, cur = [], [], 0
    for bag in range(num_bags):
        offsets.append(cur)
        n = max_per_bag if bag == full_bag else 0 if bag == empty_bag else rng.randint(1, max_per_bag - 1)
        idx += [1 if allpad else rng.randint(0, num_words - 1) for _ in range(n)]
        cur += n
    if include_last_offset:
        offsets.append(len(idx))
    return torch.tensor(idx, dtype=torch.int64), torch.tensor(offsets)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "mode,sparse", [("max", False), ("mean", False), ("mean", True), ("sum", False), ("sum", True)]
)
def test_embedding_bag_1D_padding_idx(kind, dtype, mode, sparse):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_1D_padding_idx: 1-D
    input + offsets against the same bags as 2-D input filled with padding, for every index
    used as padding_idx and none; here each side is also compared with torch."""
    rng = random.Random(0)
    num_words, num_bags, max_per_bag = 100, 10, 10
    for include_last_offset, allpad in itertools.product([False, True], [False, True]):
        idx1, offsets = _gen_1d(num_bags, max_per_bag, num_words, include_last_offset, allpad, rng)
        for pad1 in sorted(set(idx1.tolist()))[:6] + [None]:
            pad2 = pad1 if pad1 is not None else num_words
            words = num_words if pad1 is not None else num_words + 1
            starts = offsets[:-1] if include_last_offset else offsets
            idx2 = torch.full((num_bags, max_per_bag), pad2, dtype=torch.int64)
            for b in range(num_bags):
                s = int(starts[b])
                e = len(idx1) if b + 1 == num_bags else int(starts[b + 1])
                idx2[b, : e - s] = idx1[s:e]
            weight = torch.randn(words, 3, dtype=dtype, generator=torch.Generator().manual_seed(pad2))
            kw = dict(mode=mode, sparse=sparse)
            m1, ref1, mask = make_pair(
                pme.MultiSizeEmbeddingBag, weight, kind, padding_idx=pad1, include_last_offset=include_last_offset, **kw
            )
            m2, ref2, _ = make_pair(pme.MultiSizeEmbeddingBag, weight, kind, padding_idx=pad2, **kw)
            out1 = compare(m1, ref1, mask, idx1, offsets, dtype=dtype)
            out2 = compare(m2, ref2, mask, idx2, dtype=dtype)
            torch.testing.assert_close(out1, out2, **_tol(dtype))
            g1, g2 = m1.weight.grad, m2.weight.grad
            torch.testing.assert_close(g1.to_dense() if sparse else g1, g2.to_dense() if sparse else g2, **_tol(dtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "mode,sparse", [("max", False), ("mean", False), ("mean", True), ("sum", False), ("sum", True)]
)
def test_embedding_bag_2D_padding_idx(kind, dtype, mode, sparse):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_2D_padding_idx:
    against F.embedding + a masked reduction (torch's own check), and against torch."""
    gen = torch.Generator().manual_seed(1)
    num_words, dim1 = 10, 10
    for allpad, dim0 in itertools.product([False, True], [1, 10]):
        if allpad:
            idx = torch.ones(dim0, dim1, dtype=torch.int64)
        else:
            idx = torch.randint(0, num_words, (dim0, dim1), generator=gen)
            if dim0 > 1:
                idx[3] = idx[3][0]
        for pad in sorted(set(idx.flatten().tolist())):
            weight = torch.randn(num_words, 3, dtype=dtype, generator=gen)
            m, ref, mask = make_pair(pme.MultiSizeEmbeddingBag, weight, kind, padding_idx=pad, mode=mode, sparse=sparse)
            out = compare(m, ref, mask, idx, dtype=dtype)
            emb = F.embedding(idx, m.to_dense().detach(), padding_idx=pad)
            keep = idx.ne(pad).to(dtype).unsqueeze(-1)
            if mode == "max":
                check = emb.masked_fill(idx.unsqueeze(-1) == pad, -float("inf")).amax(dim=1)
            else:
                check = (emb * keep).sum(dim=1)
                if mode == "mean":
                    check = check / keep.sum(dim=1)
            if mode != "sum":
                check = check.masked_fill(idx.eq(pad).all(dim=-1).unsqueeze(-1), 0)
            torch.testing.assert_close(out, check, **_tol(dtype))


@pytest.mark.parametrize("idx_dtype,off_dtype", list(itertools.product([torch.int32, torch.int64], repeat=2)))
@pytest.mark.parametrize("sparse", [True, False])
def test_embedding_bag_empty_input(idx_dtype, off_dtype, sparse):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_empty_input"""
    m = pme.MultiSizeEmbeddingBag(4, 3, sparse=sparse, sizes=torch.tensor([3, 1, 0, 2]))
    x = torch.tensor([], dtype=idx_dtype)
    for offsets in ([0], [0, 0]):
        out = m(input=x, offsets=torch.tensor(offsets, dtype=off_dtype))
        assert torch.equal(out, torch.zeros_like(out)) and out.shape == (len(offsets), 3)


@pytest.mark.parametrize(
    "w_dtype,idx_dtype", list(itertools.product([torch.float32, torch.float64], [torch.int32, torch.int64]))
)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_out_of_bounds_idx(w_dtype, idx_dtype, mode):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_out_of_bounds_idx:
    RuntimeError for negative and too large indices (padding_idx 0), with and without
    per_sample_weights."""
    m = pme.MultiSizeEmbeddingBag(10, 2, mode=mode, padding_idx=0, dtype=w_dtype)
    for idx in (torch.tensor([[-1, 1]], dtype=idx_dtype), torch.tensor([[11, 8]], dtype=idx_dtype)):
        for psw in (None, torch.randn(1, 2, dtype=w_dtype)) if mode == "sum" else (None,):
            with pytest.raises(RuntimeError, match="index out of range"):
                m(idx, per_sample_weights=psw)


def test_embedding_bag_dimension_errors():
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_dimension_errors: 5-D
    input, 5-D offsets (ValueError, as F.embedding_bag); a 3-D weight is refused when the table
    is built (pme's weight is the flat buffer)."""
    m = pme.MultiSizeEmbeddingBag(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="input must be 1-D"):
        m(torch.full((2, 0, 0, 6, 6), 2), torch.full((2, 0, 0, 6, 6), 0))
    with pytest.raises(ValueError, match="offsets must be a 1-D"):
        pme.MultiSizeEmbeddingBag(2, 2)(torch.full((2,), 1), torch.full((2, 0, 0, 6, 6), 0))
    with pytest.raises(RuntimeError, match="2-dimensional"):
        pme.MultiSizeEmbeddingBag.from_pretrained(torch.zeros(2, 2, 2))


@pytest.mark.parametrize("idx_dtype,off_dtype", list(itertools.product([torch.int32, torch.int64], repeat=2)))
def test_EmbeddingBag_per_sample_weights_failures(idx_dtype, off_dtype):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_EmbeddingBag_per_sample_weights_failures"""
    es = pme.MultiSizeEmbeddingBag(5, 2, mode="sum")
    x = torch.tensor([3, 1, 1, 1, 4, 0], dtype=idx_dtype)
    offsets = torch.tensor([0, 0, 3, 3, 6], dtype=off_dtype)
    with pytest.raises(RuntimeError, match="dtype of the table"):
        es(x, offsets, torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="must match"):
        es(x, offsets, torch.randn(5))
    with pytest.raises(ValueError, match="must match"):
        es(torch.randint(5, (7, 3), dtype=idx_dtype), None, torch.randn(7 * 3))
    for mode in ("max", "mean"):
        es = pme.MultiSizeEmbeddingBag(5, 2, mode=mode)
        with pytest.raises(NotImplementedError, match="only supported with mode='sum'"):
            es(torch.randint(5, (7, 3), dtype=idx_dtype), None, torch.randn(7, 3))


def _known_example_module(mode, wdtype, kind, sparse=False, include_last_offset=False):
    sizes, mask = _sizes(5, 2, kind, seed=9)
    w = torch.arange(1, 11).view(5, 2).to(wdtype)
    m, ref, _ = make_pair(
        pme.MultiSizeEmbeddingBag, w, kind, seed=9, mode=mode, sparse=sparse, include_last_offset=include_last_offset
    )
    return m, ref, mask


WDTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _psw_cases(test):
    """The cases of the two per_sample_weights-and-offsets tests: table kind x weight dtype x index
    and offset dtypes x trainable per-sample weights."""
    for mark in (
        pytest.mark.parametrize("trainable", [True, False]),
        pytest.mark.parametrize("idx_dtype,off_dtype", list(itertools.product([torch.int32, torch.int64], repeat=2))),
        pytest.mark.parametrize("wdtype", WDTYPES),
        pytest.mark.parametrize("kind", KINDS),
    ):
        test = mark(test)
    return test


@_psw_cases
def test_EmbeddingBag_empty_per_sample_weights_and_offsets(kind, wdtype, idx_dtype, off_dtype, trainable):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_EmbeddingBag_empty_per_sample_weights_and_offsets"""
    m, ref, mask = _known_example_module("sum", wdtype, kind)
    x = torch.tensor([], dtype=idx_dtype)
    offsets = torch.tensor([0, 0, 0, 0, 0], dtype=off_dtype)
    psw = torch.randn(0, dtype=wdtype).requires_grad_(trainable)
    out = m(x, offsets, psw)
    assert torch.equal(out, torch.zeros(5, 2, dtype=wdtype))
    out.backward(torch.randn(5, 2).to(wdtype))
    assert not bool(m.weight.grad.ne(0).any())
    if trainable:
        assert psw.grad is None or psw.grad.numel() == 0


@_psw_cases
def test_EmbeddingBag_per_sample_weights_and_offsets(kind, wdtype, idx_dtype, off_dtype, trainable):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_EmbeddingBag_per_sample_weights_and_offsets"""
    m, ref, mask = _known_example_module("sum", wdtype, kind)
    x = torch.tensor([3, 1, 1, 1, 4, 0], dtype=idx_dtype)
    offsets = torch.tensor([0, 0, 3, 3, 6], dtype=off_dtype)
    psw = torch.randn(6, generator=torch.Generator().manual_seed(0)).to(wdtype)
    compare(m, ref, mask, x, offsets, psw, psw_grad=trainable, dtype=wdtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("idx_dtype,off_dtype", list(itertools.product([torch.int32, torch.int64], repeat=2)))
@pytest.mark.parametrize("mode,has_weight", [("sum", False), ("sum", True), ("max", False), ("mean", False)])
@pytest.mark.parametrize("trainable,include_last_offset", list(itertools.product([True, False], repeat=2)))
def test_EmbeddingBag_per_sample_weights_and_new_offsets(
    kind, wdtype, idx_dtype, off_dtype, mode, has_weight, trainable, include_last_offset
):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_EmbeddingBag_per_sample_weights_and_new_offsets"""
    m, ref, mask = _known_example_module(mode, wdtype, kind, include_last_offset=include_last_offset)
    x = torch.tensor([3, 1, 1, 1, 4, 0], dtype=idx_dtype)
    offsets = torch.tensor([0, 0, 3, 3, 6] + ([6] if include_last_offset else []), dtype=off_dtype)
    psw = torch.randn(6, generator=torch.Generator().manual_seed(0)).to(wdtype) if has_weight else None
    compare(m, ref, mask, x, offsets, psw, psw_grad=has_weight and trainable, dtype=wdtype)


def _vs_embedding(
    N,
    D,
    B,
    L,
    kind,
    max_norm=None,
    mode="mean",
    wdtype=torch.float64,
    dtype=torch.int64,
    test_psw=False,
    trainable_psw=False,
    sparse=False,
    test_backward=True,
):
    """test_embedding.py::_test_EmbeddingBag_vs_Embedding, against pme's own MultiSizeEmbedding
    with the same sizes (and against torch through compare())."""
    gen = torch.Generator().manual_seed(N * 1000 + D * 100 + B * 10 + L)
    sizes = _sizes(N, D, kind, seed=N + D)[0]
    w = torch.randn(N, D, generator=gen).to(wdtype)
    es = pme.MultiSizeEmbeddingBag.from_pretrained(w, False, max_norm, mode=mode, sparse=sparse, sizes=sizes)
    e = pme.MultiSizeEmbedding.from_pretrained(w, False, None, max_norm, sizes=sizes)
    x = torch.randint(N, (B, L), generator=gen, dtype=dtype)
    offsets = torch.arange(0, B, dtype=dtype).mul_(L)
    go = torch.rand(B, D, generator=gen).to(wdtype)
    if test_psw:
        psw = torch.randn(B, L, generator=gen).to(wdtype).softmax(dim=-1)
        p_ref = psw.clone().requires_grad_(trainable_psw)
        psw.requires_grad_(trainable_psw)
        out = es(x.view(-1), offsets, psw.view(-1))
    else:
        out = es(x.view(-1), offsets)
    if mode == "sum":
        ref = (e(x) * p_ref.unsqueeze(-1)).sum(1) if test_psw else e(x).sum(1)
    elif mode == "mean":
        ref = e(x).mean(1)
    else:
        ref = e(x).max(1)[0]
    tol = _tol(wdtype)
    torch.testing.assert_close(out, ref, **tol)
    if not test_backward:
        return
    out.backward(go)
    ref.backward(go)
    g = es.weight.grad.to_dense() if sparse else es.weight.grad
    torch.testing.assert_close(
        g,
        e.weight.grad,
        atol=5 * tol["atol"],
        rtol=max(tol["rtol"], 0.02 if wdtype in (torch.float16, torch.bfloat16) else 0),
    )
    if test_psw and trainable_psw:
        torch.testing.assert_close(psw.grad, p_ref.grad, **tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "idx_dtype,wdtype", list(itertools.product([torch.int32, torch.int64], [torch.float32, torch.float64]))
)
@pytest.mark.parametrize("sparse,trainable", list(itertools.product([True, False], repeat=2)))
def test_EmbeddingBag_per_sample_weights_and_no_offsets(kind, idx_dtype, wdtype, sparse, trainable):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_EmbeddingBag_per_sample_weights_and_no_offsets"""
    kw = dict(test_psw=True, mode="sum", wdtype=wdtype, dtype=idx_dtype, sparse=sparse, trainable_psw=trainable)
    for N, D, B, L in ((2, 3, 5, 7), (2, 5, 53, 23), (101, 5, 3, 7), (2, 101, 3, 7)):
        _vs_embedding(N, D, B, L, kind, **kw)


def _test_embedding_bag(
    kind, mode, sparse, wdtype=torch.float64, dtype=torch.int64, odtype=torch.int64, test_backward=True
):
    """test_embedding.py::_test_EmbeddingBag: the known example, its 2-D form, all-empty bags,
    EmbeddingBag vs Embedding (with max_norm), and illegal input combinations."""
    m, ref, mask = _known_example_module(mode, wdtype, kind, sparse=sparse)
    x = torch.tensor([3, 1, 1, 1, 4, 0], dtype=dtype)
    offsets = torch.tensor([0, 0, 3, 3, 6], dtype=odtype)
    compare(m, ref, mask, x, offsets, dtype=wdtype)
    if kind == "full":  # torch's hard-coded expectations
        den = 1 if mode == "sum" else 3
        if mode == "max":
            want = torch.tensor([[0, 0], [7, 8], [0, 0], [9, 10], [0, 0]], dtype=wdtype)
            want_g = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 2], [3, 4]], dtype=wdtype)
        else:
            want = torch.tensor([[0, 0], [13, 16], [0, 0], [13, 16], [0, 0]], dtype=wdtype) / den
            want_g = torch.tensor([[3, 4], [5, 8], [0, 0], [1, 2], [3, 4]], dtype=wdtype) / den
        m.zero_grad()
        out = m(x, offsets)
        out.backward(torch.tensor([99, 99, 1, 2, 99, 99, 3, 4, 99, 99], dtype=wdtype).view(5, 2))
        g = m.weight.grad.to_dense() if sparse else m.weight.grad
        torch.testing.assert_close(out, want, **_tol(wdtype))
        torch.testing.assert_close(g.view(5, 2), want_g, **_tol(wdtype))
    m2, ref2, _ = _known_example_module(mode, wdtype, kind, sparse=sparse)
    compare(m2, ref2, mask, x.view(2, -1), dtype=wdtype)
    m.zero_grad()
    m(torch.tensor([], dtype=dtype), torch.tensor([0, 0, 0, 0], dtype=odtype)).sum().backward()
    g = m.weight.grad.to_dense() if sparse else m.weight.grad
    assert not bool(g.ne(0).any())
    rng = random.Random(0)
    N, D, B, L = rng.randint(1, 100), rng.randint(1, 100), rng.randint(1, 50), rng.randint(1, 50)
    kw = dict(mode=mode, sparse=sparse, wdtype=wdtype, dtype=dtype, test_backward=test_backward)
    _vs_embedding(N, D, B, L, kind, **kw)
    for max_norm in (None, 3):
        for p in itertools.product([1, 2], repeat=4):
            _vs_embedding(*p, kind, max_norm=max_norm, **kw)
    es = pme.MultiSizeEmbeddingBag(10, 20, mode=mode, sparse=sparse)
    x = torch.ones(3, 4, dtype=dtype)
    off = torch.arange(0, 3, dtype=odtype)
    with pytest.raises(ValueError):
        es(x, off)
    with pytest.raises(ValueError):
        es(x.view(-1))
    off[0] = 1
    with pytest.raises(RuntimeError):
        es(x.view(-1), off)
    off[0] = 0
    off[-1] = 100
    with pytest.raises(RuntimeError):
        es(x.view(-1), off)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("idx_dtype,off_dtype", list(itertools.product([torch.int32, torch.int64], repeat=2)))
def test_embedding_bag_device(kind, wdtype, idx_dtype, off_dtype):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_device (CPU), dense
    sum/mean/max and sparse sum/mean; torch skips the sparse backward check for float32 and
    float16 on CPU ("precision on sparse embeddings"), so do we."""
    kw = dict(wdtype=wdtype, dtype=idx_dtype, odtype=off_dtype)
    for mode in ("sum", "mean", "max"):
        _test_embedding_bag(kind, mode, False, **kw)
    sparse_backward = wdtype not in (torch.float32, torch.float16)
    for mode in ("sum", "mean"):
        _test_embedding_bag(kind, mode, True, test_backward=sparse_backward, **kw)


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("idx_dtype,off_dtype", list(itertools.product([torch.int32, torch.int64], repeat=2)))
def test_embedding_bag_non_contiguous_weight(wdtype, idx_dtype, off_dtype):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_non_contiguous_weight:
    a table built from a non-contiguous [V, D] view equals one built from its contiguous copy."""
    w = torch.randn(3, 4).to(wdtype)
    nc, c = w[:, :3], w[:, :3].clone().contiguous()
    x = torch.tensor([0, 1, 2], dtype=idx_dtype)
    offsets = torch.tensor([0, 2], dtype=off_dtype)
    for mode in ("sum", "mean", "max"):
        a = pme.MultiSizeEmbeddingBag.from_pretrained(nc, mode=mode)(x, offsets)
        b = pme.MultiSizeEmbeddingBag.from_pretrained(c, mode=mode)(x, offsets)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, F.embedding_bag(x, nc, offsets, mode=mode), **_tol(wdtype))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx_dtype,off_dtype", list(itertools.product([torch.int32, torch.int64], repeat=2)))
def test_embedding_bag_bfloat16_half(kind, wdtype, idx_dtype, off_dtype):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_bfloat16 and
    test_embedding_bag_half: sparse sum (and mean for bfloat16) with the backward checked"""
    kw = dict(wdtype=wdtype, dtype=idx_dtype, odtype=off_dtype, test_backward=True)
    _test_embedding_bag(kind, "sum", True, **kw)
    if wdtype == torch.bfloat16:
        _test_embedding_bag(kind, "mean", True, **kw)


@pytest.mark.parametrize("bag_grad,psw_grad", [(True, True), (True, False), (False, True), (False, False)])
def test_embedding_bag_per_sample_weights_grad(bag_grad, psw_grad):
    """test_embedding.py::TestEmbeddingNNDeviceType::test_embedding_bag_per_sample_weights_grad"""
    bag = pme.MultiSizeEmbeddingBag(256, 256, mode="sum")
    bag.requires_grad_(bag_grad)
    x = torch.arange(1, 5).expand(3, -1)
    w = torch.rand(3, 4, requires_grad=psw_grad)
    out = bag(x, per_sample_weights=F.softmax(w, dim=-1))
    if bag_grad or psw_grad:
        out.sum().backward()
        assert (w.grad is not None) == psw_grad
