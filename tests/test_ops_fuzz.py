"""Differential fuzzing of the public functions of ``pme.ops`` (compiled CPU kernels) against torch on
the dense view (``reference.to_dense`` + ``F.embedding_bag`` / ``F.embedding``) and against
``pme.reference``, in float64 where the kernels allow it.

Each hypothesis test draws a whole call (table, layout, mode, bags, weights, padding, dtypes and
memory layouts of every tensor argument) and compares values and gradients; the plain tests below
pin the corner cases found while writing them (see the README, "Semantics in one paragraph" and
"Safety"). CPU only: the CUDA kernels have their own tests.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import pme
from pme import ops, reference

pytestmark = pytest.mark.skipif(ops.backend() != "compiled", reason="compares the compiled kernels")

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INF, NAN = float("inf"), float("nan")
BAD_INPUT = (ValueError, IndexError, RuntimeError, TypeError)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _table(sizes, D, dtype=torch.float64, grouped=False, seed=0):
    """(weight, offsets, width, col_of_size) of a table of the given row sizes; the grouped
    layout's column map is built here from the sizes (one slot per size present, sorted)."""
    sizes = torch.as_tensor(sizes, dtype=torch.int64)
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(int(offsets[-1]), generator=gen, dtype=torch.float64).to(dtype)
    if not grouped:
        return weight, offsets, D, None
    cos = torch.full((D + 1,), -1, dtype=torch.int64)
    col = 0
    for s in sorted(set(sizes.tolist())):
        cos[s] = col
        col += s
    return weight, offsets, col, cos


def _noncontig(t):
    """The same values in a non-contiguous tensor (every other element of a larger buffer)."""
    out = torch.stack([t, torch.zeros_like(t)], dim=-1).select(-1, 0)
    assert t.numel() <= 1 or not out.is_contiguous()
    return out


def _layout(t, how):
    """``t`` as drawn: contiguous, strided (non-contiguous) or, for a constant tensor, expanded."""
    if how == "strided":
        return _noncontig(t)
    if how == "expanded" and t.numel() and bool((t == t.reshape(-1)[0]).all()):
        return t.reshape(-1)[:1].expand(t.shape)
    return t


@st.composite
def tables(draw, dtype=torch.float64, max_rows=8, max_d=9):
    D = draw(st.integers(0, max_d))
    V = draw(st.integers(1, max_rows))
    sizes = draw(st.lists(st.integers(0, D), min_size=V, max_size=V))
    grouped = draw(st.booleans()) and D > 0
    extra = draw(st.sampled_from([0, 0, 3]))  # an output wider than every row
    w, off, W, cos = _table(sizes, D, dtype, grouped, seed=draw(st.integers(0, 2**16)))
    return w, off, W + (extra if cos is None else 0), cos


@st.composite
def bag_calls(draw, V):
    """nn.EmbeddingBag-style (input, offsets, include_last_offset, mode, psw values, padding_idx)."""
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    B = draw(st.integers(0, 5))
    counts = draw(st.lists(st.integers(0, 4), min_size=B, max_size=B))
    N = sum(counts)
    idx = draw(st.lists(st.integers(0, V - 1), min_size=N, max_size=N))
    two_d = B > 0 and len(set(counts)) == 1 and draw(st.booleans())
    ilo = not two_d and draw(st.booleans())
    starts = [sum(counts[:b]) for b in range(B)]
    idx_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    off_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    inp = torch.tensor(idx, dtype=idx_dtype)
    if two_d:
        inp, offsets = inp.reshape(B, counts[0]), None
    else:
        offsets = torch.tensor(starts + ([N] if ilo else []), dtype=off_dtype)
    psw = None
    if mode == "sum" and draw(st.booleans()):
        vals = st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from([0.0, -0.0, -1.0]))
        psw = torch.tensor(draw(st.lists(vals, min_size=N, max_size=N)), dtype=torch.float64).reshape(inp.shape)
    pad = draw(st.one_of(st.none(), st.integers(-V, V - 1)))
    return inp, offsets, ilo, mode, psw, pad


def _dense_bag(weight, offsets, W, cos, inp, bag_offsets, mode, psw, pad, ilo, psw_layout=lambda t: t):
    """torch's answer on the dense view and the leaves (weight, psw) to take gradients for;
    ``psw_layout`` (a strided or expanded view) is applied to the psw leaf as the call under test does."""
    w = weight.detach().clone().requires_grad_(True)
    p = None if psw is None else psw.detach().clone().requires_grad_(True)
    dense = reference.to_dense(w, offsets, W, cos)
    leaf, p = p, (None if p is None else psw_layout(p))
    n_bags = (bag_offsets.numel() - (1 if ilo else 0)) if bag_offsets is not None else inp.shape[0]
    if n_bags <= 0 or inp.numel() == 0 or W == 0:
        # (F.embedding_bag segfaults on zero bags with max and rejects some empty inputs: zeros)
        out = dense.new_zeros(max(n_bags, 0), W) + 0 * dense.sum() + (0 * p.sum() if p is not None else 0)
    else:
        out = F.embedding_bag(
            inp, dense, bag_offsets, mode=mode, per_sample_weights=p, padding_idx=pad, include_last_offset=ilo
        )
    return out, w, leaf


def _grads(out, w, p, g):
    ins = [w] + ([p] if p is not None else [])
    got = torch.autograd.grad(out, ins, g, allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for t, x in zip(ins, got)]


def _close(a, b, **kw):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    torch.testing.assert_close(a, b, equal_nan=True, **kw)


def _bag_offsets_closed(bags_in, n):
    """[B + 1] offsets (the last one closing the last bag) from nn-style offsets."""
    return torch.cat([bags_in.long(), torch.tensor([n])])


# --------------------------------------------------------------------------------------------
# embedding_bag: values and gradients against F.embedding_bag on the dense view
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_embedding_bag_matches_torch_on_dense_view(data):
    w, off, W, cos = data.draw(tables())
    V = off.numel() - 1
    inp, offsets, ilo, mode, psw, pad = data.draw(bag_calls(V))
    how = data.draw(st.sampled_from(["contiguous", "strided", "expanded"]))
    exp, we, pe = _dense_bag(w, off, W, cos, inp, offsets, mode, psw, pad, ilo, lambda t: _layout(t, how))
    wg = w.clone().requires_grad_(True)
    pg = None if psw is None else psw.clone().requires_grad_(True)
    got = ops.embedding_bag(
        wg,
        off,
        _layout(inp, how),
        None if offsets is None else _layout(offsets, how),
        width=W,
        col_of_size=cos,
        mode=mode,
        per_sample_weights=None if pg is None else _layout(pg, how),
        padding_idx=pad,
        include_last_offset=ilo,
    )
    _close(got.detach(), exp.detach())
    g = torch.randn_like(exp)
    for a, b in zip(_grads(got, wg, pg, g), _grads(exp, we, pe, g)):
        _close(a, b)


@SETTINGS
@given(data=st.data())
def test_embedding_bag_nonfinite_weights_match_reference(data):
    """README Semantics: an inf/NaN per-sample weight scales its row's stored entries only; every
    kernel and the reference agree (the one exception to the dense-view rule)."""
    w, off, W, cos = data.draw(tables())
    V = off.numel() - 1
    N = data.draw(st.integers(1, 6))
    idx = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=N, max_size=N)))
    vals = st.one_of(st.sampled_from([INF, -INF, NAN, 0.0, -2.0]), st.floats(-2, 2))
    psw = torch.tensor(data.draw(st.lists(vals, min_size=N, max_size=N)), dtype=torch.float64)
    starts = sorted(set([0] + data.draw(st.lists(st.integers(0, N), max_size=3))))
    pad = data.draw(st.one_of(st.none(), st.integers(-V, V - 1)))
    got = ops.embedding_bag(w, off, idx, torch.tensor(starts), width=W, col_of_size=cos, mode="sum",
                            per_sample_weights=psw, padding_idx=pad)  # fmt: skip
    bo = _bag_offsets_closed(torch.tensor(starts), N)
    exp = reference.embedding_bag(w, off, idx, bo, W, cos, "sum", psw, None if pad is None else pad % V)
    _close(got, exp)
    # columns no looked-up row stores stay exactly 0 (never NaN from 0 * inf)
    stored = reference.to_dense(torch.ones_like(w), off, W, cos) != 0
    keep = idx != (pad % V) if pad is not None else torch.ones_like(idx, dtype=torch.bool)
    for b in range(len(starts)):
        lo, hi = starts[b], (starts[b + 1] if b + 1 < len(starts) else N)
        sel = idx[lo:hi][keep[lo:hi]]
        cols = stored[sel].any(0) if sel.numel() else torch.zeros(W, dtype=torch.bool)
        assert bool((got[b][~cols] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("grouped", [False, True])
def test_16bit_tables_accumulate_in_float32(dtype, mode, grouped):
    w, off, W, cos = _table([8, 3, 0, 8, 5] * 20, 8, dtype, grouped, seed=3)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 100, (300,), generator=gen)
    bo = torch.tensor([0, 7, 7, 150])
    psw = torch.randn(300, generator=gen).to(dtype) if mode == "sum" else None
    got = ops.embedding_bag(w, off, idx, bo, width=W, col_of_size=cos, mode=mode, per_sample_weights=psw)
    exp = reference.embedding_bag(w, off, idx, _bag_offsets_closed(bo, 300), W, cos, mode, psw)
    _close(got, exp)  # (summation order differs: not bitwise)
    # a 16-bit accumulator would overflow (fp16) or lose the small term; the kernels' float32 one does not
    big = torch.tensor([60000.0, -60000.0, 1e-3, 0.0]).to(dtype)
    w2, off2 = big.repeat(2), torch.tensor([0, 4, 8])
    out = ops.embedding_bag(w2, off2, torch.tensor([0, 1, 0, 1]), torch.tensor([0]), width=4, mode="mean")
    _close(out, big.reshape(1, 4))


@SETTINGS
@given(data=st.data())
def test_embedding_matches_torch_on_dense_view(data):
    w, off, W, cos = data.draw(tables())
    V = off.numel() - 1
    shape = tuple(data.draw(st.lists(st.integers(0, 3), max_size=3)))
    n = math.prod(shape)
    idx = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)), dtype=torch.int64)
    idx = idx.reshape(shape).to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    if idx.dim() == 2:
        idx = idx.t().contiguous().t() if data.draw(st.booleans()) else idx  # transposed layout
    pad = data.draw(st.one_of(st.none(), st.integers(-V, V - 1)))
    wg, we = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = ops.embedding(wg, off, idx, width=W, col_of_size=cos, padding_idx=pad)
    exp = F.embedding(idx, reference.to_dense(we, off, W, cos), padding_idx=pad)
    _close(got.detach(), exp.detach())
    g = torch.randn_like(exp)
    _close(_grads(got, wg, None, g)[0], _grads(exp, we, None, g)[0])


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_stored_nan_and_infinities_pool_as_torch(mode):
    w, off, W, _ = _table([3, 0, 5, 2], 6)
    w[0], w[4], w[9] = NAN, -INF, INF
    dense = reference.to_dense(w, off, W)
    for idx in ([0, 2], [2, 0], [1, 0], [0, 1], [3, 3, 0], [2, 3, 1], [1]):
        idx = torch.tensor(idx)
        got = ops.embedding_bag(w, off, idx, torch.tensor([0]), width=W, mode=mode)
        _close(got, F.embedding_bag(idx, dense, torch.tensor([0]), mode=mode))


def test_zero_bags_empty_bags_and_zero_width():
    w, off, W, _ = _table([3, 0, 5], 6)
    idx = torch.tensor([0, 1, 2])
    for mode in ("sum", "mean", "max"):
        # (F.embedding_bag itself segfaults here with max: torch 2.13 CPU)
        out = ops.embedding_bag(w, off, idx, torch.tensor([], dtype=torch.long), width=W, mode=mode)
        assert out.shape == (0, W)
        out = ops.embedding_bag(w, off, torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]), width=W, mode=mode)
        _close(out, torch.zeros(2, W, dtype=w.dtype))
        out = ops.embedding_bag(w, off, torch.zeros(3, 0, dtype=torch.long), width=W, mode=mode)
        _close(out, torch.zeros(3, W, dtype=w.dtype))
    # every row of size 0, width 0
    out = ops.embedding_bag(w.new_zeros(0), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0]),
                            width=0, mode="max")  # fmt: skip
    assert out.shape == (1, 0)
    # indices past the last bag are still range-checked
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding_bag(w, off, torch.tensor([0, 7]), torch.tensor([], dtype=torch.long), width=W)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [3, -1, 2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1, -(2**63)])
def test_huge_and_negative_indices_raise(dtype, bad):
    info = torch.iinfo(dtype)
    if not info.min <= bad <= info.max:
        pytest.skip("not representable")
    w, off, W, _ = _table([3, 0, 5], 6)
    idx = torch.tensor([0, bad], dtype=dtype)
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding_bag(w, off, idx, torch.tensor([0], dtype=dtype), width=W)
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding(w, off, idx, width=W)
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding_bag(w, off, idx, torch.tensor([0], dtype=dtype), width=W, max_norm=1.0)
    g = torch.zeros(1, W, dtype=w.dtype)
    with pytest.raises(BAD_INPUT, match="out of range"):
        ops.sparse_update_(w.clone(), w.new_zeros(0), w.new_zeros(0), g, off, idx, torch.tensor([0, 2], dtype=dtype))
    with pytest.raises(BAD_INPUT, match="out of range"):
        ops.accumulate_scores_(torch.zeros_like(w), g, w, off, idx, torch.tensor([0, 2], dtype=dtype))


@pytest.mark.parametrize("ilo", [False, True])
@pytest.mark.parametrize("bad", [-1, 9, 2**31, 2**62, 2**63 - 1, -(2**63)])
def test_bag_offsets_out_of_range_or_decreasing_raise(ilo, bad):
    w, off, W, _ = _table([3, 0, 5], 6)
    idx = torch.tensor([0, 1, 2, 2])
    bo = torch.tensor([0, bad, 4] if ilo else [0, bad])
    with pytest.raises(BAD_INPUT, match="offsets"):
        ops.embedding_bag(w, off, idx, bo, width=W, include_last_offset=ilo)
    closed = torch.tensor([0, bad, 4])
    g = torch.zeros(2, W, dtype=w.dtype)
    with pytest.raises(BAD_INPUT, match="offsets"):
        ops.sparse_update_(w.clone(), w.new_zeros(0), w.new_zeros(0), g, off, idx, closed)


def test_include_last_offset_must_close_the_input():
    w, off, W, _ = _table([3, 0, 5], 6)
    with pytest.raises(ValueError, match="offsets\\[-1\\]"):
        ops.embedding_bag(w, off, torch.tensor([0, 1, 2]), torch.tensor([0, 2]), width=W, include_last_offset=True)


@pytest.mark.parametrize("which", ["weight", "offsets", "col_of_size"])
def test_noncontiguous_table_tensors_are_read_right_or_refused(which):
    """A strided flat buffer / offset table / column map: the right answer or a clear error."""
    w, off, W, cos = _table([3, 0, 5, 2], 6, grouped=True)
    idx, bo = torch.tensor([0, 2, 3, 2]), torch.tensor([0, 1])
    exp = F.embedding_bag(idx, reference.to_dense(w, off, W, cos), bo, mode="sum")
    args = {"weight": w, "offsets": off, "col_of_size": cos}
    args[which] = _noncontig(args[which])
    try:
        got = ops.embedding_bag(args["weight"], args["offsets"], idx, bo, width=W, col_of_size=args["col_of_size"],
                                mode="sum")  # fmt: skip
    except RuntimeError as e:
        assert "contiguous" in str(e) and which in str(e)
    else:
        _close(got, exp)
    _close(ops.to_dense(args["weight"], args["offsets"], W, args["col_of_size"]), reference.to_dense(w, off, W, cos))


# --------------------------------------------------------------------------------------------
# sparse_update_ / accumulate_scores_ against pme.reference
# --------------------------------------------------------------------------------------------
def _fused_case(data, dtype=torch.float64):
    w, off, W, cos = data.draw(tables(dtype=dtype))
    V = off.numel() - 1
    mode = data.draw(st.sampled_from(["sum", "mean", "max"]))
    N = data.draw(st.integers(0, 8))
    idx = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), min_size=N, max_size=N)), dtype=torch.int64)
    cuts = sorted(data.draw(st.lists(st.integers(0, N), max_size=4)))
    bo = torch.tensor([0, *cuts, N] if data.draw(st.booleans()) else [0, *cuts])  # may end before N
    idx = idx.to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    bo = bo.to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    psw = None
    if mode == "sum" and data.draw(st.booleans()):
        psw = torch.tensor(data.draw(st.lists(st.floats(-2, 2), min_size=N, max_size=N)), dtype=torch.float64)
        psw = psw.to(dtype)
    pad = data.draw(st.one_of(st.none(), st.integers(-V, V - 1)))
    B = bo.numel() - 1
    argmax = None
    if mode == "max":
        _, argmax = torch.ops.pme.bag_forward(w, off, idx.long(), bo.long(), None, cos, W, 2,
                                              -1 if pad is None else pad % V)  # fmt: skip
    g = torch.randn(B, W, dtype=torch.float64).to(dtype)
    if data.draw(st.booleans()):  # every argument of the batch in a non-contiguous layout
        idx, bo, g = _noncontig(idx), _noncontig(bo), g.t().contiguous().t()
        psw = None if psw is None else _noncontig(psw)
        argmax = None if argmax is None else argmax.t().contiguous().t()
    lookup = dict(col_of_size=cos, mode=mode, per_sample_weights=psw, padding_idx=pad, argmax=argmax)
    ref = reference.Lookup(off, idx, bo, W, cos, mode, psw, None if pad is None else pad % V)
    return w, off, idx, bo, g, lookup, ref


@SETTINGS
@given(data=st.data(), optimizer=st.sampled_from(["sgd", "rowwise_adagrad", "adam"]))
def test_sparse_update_matches_reference(data, optimizer):
    w, off, idx, bo, g, lookup, ref = _fused_case(data)
    V, T = off.numel() - 1, w.numel()
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    s1 = {"sgd": torch.zeros(0), "rowwise_adagrad": torch.rand(V, generator=gen), "adam": torch.randn(T, generator=gen)}
    s2 = torch.rand(T, generator=gen) if optimizer == "adam" else torch.zeros(0)
    s1 = s1[optimizer].double()
    s2 = s2.double()
    hyper = ops.Hyperparameters(optimizer, lr=0.3, weight_decay=0.05, grad_scale=2.0)
    step = data.draw(st.integers(1, 5))
    got = [w.clone(), s1.clone(), s2.clone()]
    ops.sparse_update_(*got, g, off, idx, bo, optimizer=hyper, step=step, **lookup)
    exp = [w.clone(), s1.clone(), s2.clone()]
    reference.sparse_update_(*exp, g, ref, hyper, step)
    for a, b in zip(got, exp):
        _close(a, b)


@SETTINGS
@given(data=st.data(), rule=st.sampled_from(["snip", "grad"]))
def test_accumulate_scores_matches_reference(data, rule):
    w, off, idx, bo, g, lookup, ref = _fused_case(data)
    s0 = torch.rand(w.numel(), dtype=torch.float64)
    got, exp = s0.clone(), s0.clone()
    ops.accumulate_scores_(got, g, w, off, idx, bo, rule=rule, **lookup)
    reference.accumulate_scores_(exp, g, w, ref, rule)
    _close(got, exp)


def _max_lookup():
    w, off, W, _ = _table([3, 0, 5, 2, 5, 1], 7)
    idx, bo = torch.tensor([0, 1, 2, 3, 4, 5, 2, 0]), torch.tensor([0, 3, 3, 7, 8])
    _, argmax = torch.ops.pme.bag_forward(w, off, idx, bo, None, None, W, 2, -1)
    g = torch.randn(4, W, dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    return w, off, idx, bo, argmax, g


def test_fused_ops_read_a_noncontiguous_argmax_right():
    """pme.ops.sparse_update_ / accumulate_scores_ with the forward's argmax in another memory
    layout (same values): the same step (fixed in pme.ops: it passes argmax.contiguous())."""
    w, off, idx, bo, argmax, g = _max_lookup()
    strided = argmax.t().contiguous().t()
    scores = [torch.zeros_like(w), torch.zeros_like(w)]
    for s, am in zip(scores, (argmax, strided)):
        ops.accumulate_scores_(s, g, w, off, idx, bo, mode="max", argmax=am)
    _close(scores[1], scores[0])
    weights = [w.clone(), w.clone()]
    for ww, am in zip(weights, (argmax, strided)):
        ops.sparse_update_(ww, w.new_zeros(0), w.new_zeros(0), g, off, idx, bo, mode="max", argmax=am, lr=1.0)
    _close(weights[1], weights[0])


@pytest.mark.parametrize("op", ["bag_backward", "bag_backward_sparse", "accumulate_scores_", "sparse_update_"])
def test_raw_operators_refuse_a_noncontiguous_argmax(op):
    """The operators read argmax [B, width] as contiguous rows: one in another layout (same values)
    is refused clearly (it gave wrong gradients silently); nothing is written."""
    w, off, idx, bo, argmax, g = _max_lookup()
    strided = argmax.t().contiguous().t()
    assert not strided.is_contiguous() and torch.equal(strided, argmax)

    def call(am, ww, s):
        lookup = (off, idx, bo, None, None, am, 2, -1)
        if op == "bag_backward":
            return torch.ops.pme.bag_backward(g, ww, *lookup, False)[0]
        if op == "bag_backward_sparse":
            return torch.ops.pme.bag_backward_sparse(g, ww, *lookup, False)[1]
        if op == "accumulate_scores_":
            return torch.ops.pme.accumulate_scores_(s, g, ww, *lookup, 0)
        e = w.new_zeros(0)
        return torch.ops.pme.sparse_update_(ww, e, e, g, *lookup, 0, 1.0, 0.0, 1e-8, 0.9, 0.999, 1.0, 1)

    ww, s = w.clone(), torch.zeros_like(w)
    with pytest.raises(RuntimeError, match="argmax must be the contiguous int64"):
        call(strided, ww, s)
    assert torch.equal(ww, w) and not s.any()
    call(argmax, ww, s)  # the forward's own argmax is taken


def test_fused_ops_promote_mixed_index_dtypes():
    """int32 indices with int64 bag offsets (or the reverse): promoted to int64 as embedding_bag and
    torch do (fixed in pme.ops: the operators require one dtype for both)."""
    w, off, W, _ = _table([3, 0, 5, 2], 6)
    idx, bo = torch.tensor([0, 2, 3, 2]), torch.tensor([0, 1, 4])
    g = torch.randn(2, W, dtype=w.dtype)
    ref = reference.Lookup(off, idx, bo, W, None, "mean")
    exp = torch.zeros_like(w)
    reference.accumulate_scores_(exp, g, w, ref)
    for i_dt, o_dt in ((torch.int32, torch.int64), (torch.int64, torch.int32)):
        got = torch.zeros_like(w)
        ops.accumulate_scores_(got, g, w, off, idx.to(i_dt), bo.to(o_dt))
        _close(got, exp)
        ww = w.clone()
        ops.sparse_update_(ww, w.new_zeros(0), w.new_zeros(0), g, off, idx.to(i_dt), bo.to(o_dt), lr=0.5)
        ew = w.clone()
        reference.sparse_update_(ew, w.new_zeros(0), w.new_zeros(0), g, ref, ops.Hyperparameters("sgd", lr=0.5))
        _close(ww, ew)


def _aliasing_cases():
    off, idx, bo = torch.tensor([0, 4, 8, 12, 16]), torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])
    buf = torch.randn(64)
    z = torch.zeros

    def adam(w, s1, s2, g):
        return lambda: ops.sparse_update_(w, s1, s2, g, off, idx, bo, optimizer="adam")

    shared = z(16)
    return {
        "state1 is weight": adam(buf[:16], buf[:16], z(16), torch.randn(2, 4)),
        "state1 overlaps weight": adam(buf[:16], buf[8:24], z(16), torch.randn(2, 4)),
        "state1 is state2": adam(torch.randn(16), shared, shared, torch.randn(2, 4)),
        "grad_out views weight": adam(buf[:16], z(16), z(16), buf[:8].view(2, 4)),
        "grad_out views state2": adam(torch.randn(16), z(16), buf[:16], buf[8:16].view(2, 4)),
        "psw views weight": lambda: ops.sparse_update_(
            buf[:16], z(0), z(0), torch.randn(2, 4), off, idx, bo, mode="sum", per_sample_weights=buf[:3]
        ),  # fmt: skip
        "adagrad state views grad_out": lambda: ops.sparse_update_(
            torch.randn(16), buf[:4], z(0), buf[:8].view(2, 4), off, idx, bo, optimizer="rowwise_adagrad"
        ),
        "scores view grad_out": lambda: ops.accumulate_scores_(
            buf[:16], buf[:8].view(2, 4), torch.randn(16), off, idx, bo
        ),  # fmt: skip
        "scores view weight": lambda: ops.accumulate_scores_(buf[:16], torch.randn(2, 4), buf[:16], off, idx, bo),
        "scores view psw": lambda: ops.accumulate_scores_(
            buf[:16], torch.randn(2, 4), torch.randn(16), off, idx, bo, mode="sum", per_sample_weights=buf[4:7]
        ),  # fmt: skip
    }


@pytest.mark.parametrize("case", sorted(_aliasing_cases()))
def test_in_place_tensors_that_alias_an_argument_are_refused(case):
    call = _aliasing_cases()[case]
    with pytest.raises(RuntimeError, match="share memory"):
        call()


def test_in_place_tensors_in_one_storage_but_disjoint_are_fine():
    off, idx, bo = torch.tensor([0, 4, 8, 12, 16]), torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])
    buf = torch.randn(48, dtype=torch.float64)
    g = torch.randn(2, 4, dtype=torch.float64)
    w, s1, s2 = buf[:16].clone(), buf[16:32].clone(), buf[32:48].clone()
    ops.sparse_update_(buf[:16], buf[16:32], buf[32:48], g, off, idx, bo, optimizer="adam", lr=0.1)
    hyper = ops.Hyperparameters("adam", lr=0.1)
    reference.sparse_update_(w, s1, s2, g, reference.Lookup(off, idx, bo, 4), hyper)
    _close(buf, torch.cat([w, s1, s2]))


@pytest.mark.parametrize("what", ["weight", "state1", "scores"])
def test_strided_or_expanded_in_place_tensors_are_refused(what):
    off, idx, bo = torch.tensor([0, 4, 8, 12, 16]), torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3])
    for bad in (torch.zeros(32)[::2], torch.zeros(1).expand(16)):
        with pytest.raises(RuntimeError, match="contiguous"):
            if what == "scores":
                ops.accumulate_scores_(bad, torch.randn(2, 4), torch.randn(16), off, idx, bo)
            else:
                w, s1 = (bad, torch.zeros(16)) if what == "weight" else (torch.randn(16), bad)
                ops.sparse_update_(w, s1, torch.zeros(16), torch.randn(2, 4), off, idx, bo, optimizer="adam")


# --------------------------------------------------------------------------------------------
# embedding_renorm_ (max_norm) against torch.embedding_renorm_ on the dense view
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(
    data=st.data(),
    norm_type=st.sampled_from([2.0, 1.0, 3.0, 0.5, INF, 0.0, -1.0]),
    max_norm=st.sampled_from([0.0, 0.3, 1.0, 10.0, -1.0]),
)
def test_embedding_renorm_matches_torch(data, norm_type, max_norm):
    w, off, W, cos = data.draw(tables())
    V = off.numel() - 1
    idx = torch.tensor(data.draw(st.lists(st.integers(0, V - 1), max_size=6)), dtype=torch.int64)
    dense = reference.to_dense(w, off, W, cos)
    try:
        torch.embedding_renorm_(dense, idx, max_norm, norm_type)
    except RuntimeError:  # (the inf-norm of a width-0 row has no value: both refuse)
        with pytest.raises(RuntimeError):
            ops.embedding_renorm_(w.clone(), off, idx, max_norm, norm_type, width=W, col_of_size=cos)
        return
    got = ops.embedding_renorm_(w.clone(), off, idx, max_norm, norm_type, width=W, col_of_size=cos)
    _close(reference.to_dense(got, off, W, cos), dense + 0.0)  # (+0.0: torch leaves -0.0 in the padding)


# --------------------------------------------------------------------------------------------
# Pruning: topk_threshold, prune_counts, prune_pack against pme.reference and torch
# --------------------------------------------------------------------------------------------
SCORE_VALUES = st.one_of(
    st.floats(-4, 4, width=32),
    st.sampled_from([NAN, -NAN, INF, -INF, 0.0, -0.0, 1e-45, -1e-45, 1.0, 1.0]),
)


@st.composite
def score_tables(draw, max_v=5, max_d=6):
    V, D = draw(st.integers(0, max_v)), draw(st.integers(0, max_d))
    vals = draw(st.lists(SCORE_VALUES, min_size=V * D, max_size=V * D))
    s = torch.tensor(vals, dtype=torch.float32).reshape(V, D)
    return s.to(draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])))


@SETTINGS
@given(scores=score_tables(), data=st.data())
def test_topk_threshold_matches_reference(scores, data):
    n = scores.numel()
    if n == 0:
        with pytest.raises(ValueError, match="k must be in"):
            ops.topk_threshold(scores, 1)
        return
    k = data.draw(st.sampled_from([1, n, max(1, n // 2), data.draw(st.integers(1, n))]))
    if data.draw(st.booleans()) and scores.dim() == 2:
        scores = scores.t().contiguous().t()
    got = ops.topk_threshold(scores, k)
    _close(got, reference.topk_threshold(scores, k))
    # the threshold keeps at least k entries (NaN: every one)
    assert int(ops.prune_counts(scores.reshape(1, -1), got).sum()) >= k
    for bad in (0, n + 1, -1, 2**63 - 1):
        with pytest.raises(ValueError, match="k must be in"):
            ops.topk_threshold(scores, bad)
    with pytest.raises(TypeError):
        ops.topk_threshold(scores, float(k))


@SETTINGS
@given(scores=score_tables(), data=st.data())
def test_prune_counts_matches_reference(scores, data):
    th = data.draw(SCORE_VALUES)
    kind = data.draw(st.sampled_from(["float", "f32", "f64", "f16", "1-elem", "int"]))
    if kind == "int":
        th = 0 if math.isnan(th) or math.isinf(th) else int(th)
    threshold = {
        "float": th,
        "int": th,
        "f32": torch.tensor(th, dtype=torch.float32),
        "f64": torch.tensor(th, dtype=torch.float64),
        "f16": torch.tensor(th, dtype=torch.float16),
        "1-elem": torch.tensor([th]),
    }[kind]
    got = ops.prune_counts(scores, threshold)
    t32 = torch.as_tensor(threshold).float().reshape(())
    _close(got, reference.prune_counts(scores.float(), t32))
    if not math.isnan(float(t32)):  # torch's own comparison, in float32
        _close(got, (scores.float() >= t32).sum(1))


def test_prune_counts_rejects_bad_thresholds_and_scores():
    s = torch.rand(3, 4)
    with pytest.raises(ValueError, match="one number"):
        ops.prune_counts(s, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="2-D"):
        ops.prune_counts(s[0], 0.1)
    with pytest.raises(TypeError):
        ops.prune_counts(s.long(), 0.1)
    with pytest.raises(TypeError):
        ops.prune_counts(s, 1j)


@SETTINGS
@given(scores=score_tables(), data=st.data(), order=st.sampled_from(["score", "position"]))
def test_prune_pack_matches_reference(scores, data, order):
    V, D = scores.shape
    dense = torch.randn(V, D, dtype=torch.float64)
    sizes = torch.tensor(data.draw(st.lists(st.integers(0, D), min_size=V, max_size=V)), dtype=torch.int64)
    if data.draw(st.booleans()) and V and D:
        dense, scores = dense.t().contiguous().t(), scores.t().contiguous().t()
    sizes_arg = data.draw(st.sampled_from(["tensor", "list", "int32"]))  # (an empty list: V = 0)
    arg = {"tensor": sizes, "list": sizes.tolist(), "int32": sizes.int()}[sizes_arg]
    w, off = ops.prune_pack(dense, scores, arg, order)
    exp_off = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    _close(off, exp_off)
    _close(w, reference.prune_pack(dense, scores.float(), exp_off, order == "score"))
    # every packed entry is one of its row's dense entries, each used once
    for r in range(V):
        row = w[int(off[r]) : int(off[r + 1])]
        assert bool(torch.isin(row, dense[r]).all())


@pytest.mark.parametrize("bad", [[5, 0, 0], [-1, 1, 0], [2**63 - 1, 0, 0], [-(2**63), 0, 0]])
def test_prune_pack_refuses_sizes_outside_0_to_D(bad):
    d, s = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="sizes must be in"):
        ops.prune_pack(d, s, torch.tensor(bad))


def test_prune_pack_refuses_bad_sizes_and_shapes():
    d, s = torch.randn(3, 4), torch.randn(3, 4)
    for bad, err in (([1.0, 1.0, 0.0], TypeError), ([True, False, True], TypeError), ([1, 2], ValueError),
                     ([[1, 2, 3]], ValueError)):  # fmt: skip
        with pytest.raises(err):
            ops.prune_pack(d, s, torch.tensor(bad))
    with pytest.raises(ValueError, match="same shape"):
        ops.prune_pack(d, s[:2], [1, 1, 1])
    with pytest.raises(BAD_INPUT, match="dense"):
        ops.prune_pack(d.long(), s, [1, 1, 1])


def test_prune_pack_of_no_rows_takes_an_empty_list_of_sizes():
    """``sizes=[]`` for a [0, D] table: torch.as_tensor([]) is float32, which was refused as
    "sizes must be integers" (fixed in pme.ops: an empty sequence is taken as int64)."""
    w, off = ops.prune_pack(torch.zeros(0, 4), torch.zeros(0, 4), [])
    assert w.shape == (0,) and off.tolist() == [0]


def test_prune_pack_of_a_dense_table_requiring_grad_is_not_silently_differentiable():
    """The packing operator has no autograd formula: its output used to carry a grad_fn whose
    backward gave ``dense`` no gradient, with only a deprecation warning (the reference path's
    indexing did give one). Fixed in pme.ops: ``dense`` is detached, the output plainly has no
    gradient."""
    d = torch.randn(3, 4, requires_grad=True)
    w, _ = ops.prune_pack(d, torch.randn(3, 4), [1, 2, 3])
    assert w.grad_fn is None and not w.requires_grad


# --------------------------------------------------------------------------------------------
# check_offsets
# --------------------------------------------------------------------------------------------
def test_check_offsets_catches_a_decrease_hidden_by_wraparound():
    """offsets [0, 2**63-1, -2, 5]: the differences wrap to 2**63-1, 2**63-1, 7 (all >= 0), so a
    sign test on them missed the decrease when no width was given (collection reference path).
    Fixed in pme.ops: the order is compared directly."""
    off = torch.tensor([0, 2**63 - 1, -2, 5])
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.check_offsets(off, 5)
    with pytest.raises(ValueError):
        ops.to_dense(torch.randn(5), off, 7)


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(0, dtype=torch.int64), torch.tensor([[0, 1]]), torch.tensor([0.0, 1.0]), torch.tensor([0, 1]).int()],
)
def test_check_offsets_refuses_malformed_offsets_clearly(bad):
    with pytest.raises(ValueError, match="1-D int64"):
        ops.check_offsets(bad, 1)


def test_public_functions_are_listed():
    for name in ("embedding_bag", "embedding", "sparse_update_", "accumulate_scores_", "topk_threshold",
                 "prune_counts", "prune_pack", "to_dense", "embedding_renorm_"):  # fmt: skip
        assert callable(getattr(pme.ops, name))
