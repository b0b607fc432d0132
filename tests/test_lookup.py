"""Lookups against the oracle: F.embedding_bag / F.embedding on the dense view, in float64."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import pme
from pme import ops, reference

from conftest import DEVICES, make_table, random_bags

MODES = ["sum", "mean", "max"]
LAYOUTS = ["padded", "grouped"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def oracle(w, offsets, col, width, idx, bag_offsets, mode, psw, pad, grad_out):
    """Output and gradients (weight, psw) of F.embedding_bag on the float64 dense view."""
    w64 = w.detach().double().requires_grad_(True)
    p64 = psw.detach().double().requires_grad_(True) if psw is not None else None
    dense = reference.to_dense(w64, offsets, width, col)
    out = (
        F.embedding_bag(idx.long(), dense, bag_offsets.long(), mode=mode, per_sample_weights=p64, padding_idx=pad)
        if idx.numel() and bag_offsets.numel()
        else (dense.new_zeros(bag_offsets.numel(), width) + 0 * dense.sum())
    )
    grads = torch.autograd.grad(out, [w64] + ([p64] if p64 is not None else []), grad_out.double(), allow_unused=True)
    gw = grads[0] if grads[0] is not None else torch.zeros_like(w64)
    gp = None
    if p64 is not None:
        gp = grads[1] if grads[1] is not None else torch.zeros_like(p64)
    return out, gw, gp


def run_case(device, dtype, mode, layout, index_dtype, use_psw, pad_choice, seed, V=50, D=16, B=24, L=7):
    w, offsets, col, width, _ = make_table(V, D, dtype, device, layout, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pad = {"none": None, "first": 0, "negative": -2}[pad_choice]
    pad_row = None if pad is None else pad % V
    idx, bags = random_bags(V, B, L, gen, index_dtype, device, padding_idx=pad_row)
    psw = torch.randn(idx.shape, generator=gen).to(dtype).to(device) if use_psw else None
    w = w.requires_grad_(True)
    if psw is not None:
        psw.requires_grad_(True)
    out = ops.embedding_bag(
        w, offsets, idx, bags, width=width, col_of_size=col, mode=mode, per_sample_weights=psw, padding_idx=pad
    )
    grad_out = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    gw, *rest = torch.autograd.grad(out, [w] + ([psw] if psw is not None else []), grad_out)
    ref_out, ref_gw, ref_gp = oracle(w, offsets, col, width, idx, bags, mode, psw, pad_row, grad_out)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out.to(device), rtol=rtol, atol=atol)
    scale = 4 if dtype in (torch.float16, torch.bfloat16) else 1  # sums of up to L rounded terms
    torch.testing.assert_close(gw.double(), ref_gw.to(device), rtol=rtol * scale, atol=atol * scale)
    if use_psw:
        torch.testing.assert_close(rest[0].double(), ref_gp.to(device), rtol=rtol * scale * 4, atol=atol * scale * 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_bag_matches_dense_oracle(device, dtype, mode, layout, index_dtype):
    run_case(device, dtype, mode, layout, index_dtype, use_psw=False, pad_choice="none", seed=3)
    run_case(device, dtype, mode, layout, index_dtype, use_psw=False, pad_choice="negative", seed=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_sample_weights(device, dtype, layout):
    run_case(device, dtype, "sum", layout, torch.int64, use_psw=True, pad_choice="first", seed=5)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    V=st.integers(1, 40),
    D=st.integers(1, 24),
    B=st.integers(0, 12),
    L=st.integers(0, 9),
    mode=st.sampled_from(MODES),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
    pad=st.sampled_from(["none", "first", "negative"]),
    psw=st.booleans(),
    index_dtype=st.sampled_from([torch.int32, torch.int64]),
)
def test_bag_random_tables(device, V, D, B, L, mode, layout, seed, pad, psw, index_dtype):
    if pad == "negative" and V < 2:
        pad = "first"
    run_case(
        device,
        torch.float64,
        mode,
        layout,
        index_dtype,
        use_psw=psw and mode == "sum",
        pad_choice=pad,
        seed=seed,
        V=V,
        D=D,
        B=B,
        L=L,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [3, 8, 300])  # 300: past the width of one CUDA lane group
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_max_ties_nan_and_inf_follow_the_dense_view(device, D, seed):
    """mode="max" on tables whose values tie (0 against the implicit zeros of short rows, equal
    stored values), and hold NaN or infinities: output and gradient equal nn.EmbeddingBag's CPU
    rule on the dense view (float64): the bag's first lookup sets every column, a later one replaces
    a column only when strictly greater, an implicit zero that wins passes gradient to no entry."""
    g = torch.Generator().manual_seed(seed)
    V = 6
    sizes = torch.randint(0, D + 1, (V,), generator=g)
    sizes[int(torch.randint(0, V, (1,), generator=g))] = 0
    levels = torch.tensor([-1.0, 0.0, -0.0, 1.0, float("nan"), float("-inf"), float("inf")], dtype=torch.float64)
    weight = levels[torch.randint(0, len(levels), (int(sizes.sum()),), generator=g)]
    offsets = torch.zeros(V + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    lens = torch.randint(0, 5, (7,), generator=g)
    idx = torch.randint(0, V, (int(lens.sum()),), generator=g)
    bo = torch.zeros(8, dtype=torch.int64)
    bo[1:] = lens.cumsum(0)
    pad = int(torch.randint(-1, V, (1,), generator=g))
    pad = None if pad < 0 else pad
    w = weight.clone().to(device).requires_grad_()
    out = ops.embedding_bag(
        w,
        offsets.to(device),
        idx.to(device),
        bo.to(device),
        width=D,
        mode="max",
        include_last_offset=True,
        padding_idx=pad,
    )
    go = torch.randn(7, D, generator=g, dtype=torch.float64)
    out.backward(go.to(device))
    dense = reference.to_dense(weight, offsets, D).requires_grad_()
    ref = F.embedding_bag(idx, dense, bo, mode="max", include_last_offset=True, padding_idx=pad)
    ref.backward(go)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0, equal_nan=True)
    mask = torch.arange(D) < sizes.unsqueeze(1)
    torch.testing.assert_close(w.grad.cpu(), dense.grad[mask], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_against_nn_embedding_bag(device, mode):
    """Module vs nn.EmbeddingBag holding the dense view: 2-D input, include_last_offset, padding."""
    V, D = 64, 32
    sizes = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(0))
    m = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode=mode, padding_idx=5, device=device)
    ref = torch.nn.EmbeddingBag(V, D, mode=mode, padding_idx=5, device=device)
    with torch.no_grad():
        ref.weight.copy_(m.to_dense())
    x = torch.randint(0, V, (10, 6), device=device)
    x[0, :3] = 5
    x[1, :] = 5  # a bag of padding only
    go = torch.randn(10, D, device=device)
    (m(x) * go).sum().backward()
    (ref(x) * go).sum().backward()
    torch.testing.assert_close(m(x), ref(x))
    dense_grad = reference.to_dense(m.weight.grad, m.offsets, D)
    mask = reference.to_dense(torch.ones_like(m.weight), m.offsets, D) > 0
    torch.testing.assert_close(dense_grad, ref.weight.grad * mask)
    # include_last_offset with 1-D input
    m2 = pme.MultiSizeEmbeddingBag(
        V, D, sizes=sizes, mode=mode, include_last_offset=True, _weight=m.weight.detach(), device=device
    )
    ref2 = torch.nn.EmbeddingBag(
        V, D, mode=mode, include_last_offset=True, device=device, _weight=ref.weight.detach().clone()
    )
    idx = torch.randint(0, V, (20,), device=device)
    off = torch.tensor([0, 4, 4, 11, 20], device=device)
    torch.testing.assert_close(m2(idx, off), ref2(idx, off))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pad", [None, 3])
def test_embedding_matches_f_embedding(device, dtype, layout, pad):
    V, D = 30, 12
    w, offsets, col, width, _ = make_table(V, D, dtype, device, layout, seed=7)
    x = torch.randint(0, V, (4, 5, 3), device=device)
    x[0, 0, 0] = V - 1
    x[1, 1] = 3
    w.requires_grad_(True)
    out = ops.embedding(w, offsets, x, width=width, col_of_size=col, padding_idx=pad)
    assert out.shape == (4, 5, 3, width)
    go = torch.randn(out.shape, device=device).to(dtype)
    (gw,) = torch.autograd.grad(out, w, go)
    w64 = w.detach().double().requires_grad_(True)
    ref = F.embedding(x, reference.to_dense(w64, offsets, width, col), padding_idx=pad)
    (rgw,) = torch.autograd.grad(ref, w64, go.double())
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(gw.double(), rgw, rtol=4 * rtol, atol=4 * atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(device, mode, layout):
    V, D = 12, 6
    w, offsets, col, width, _ = make_table(V, D, torch.float64, device, layout, seed=11)
    gen = torch.Generator().manual_seed(12)
    idx, bags = random_bags(V, 6, 5, gen, torch.int64, device)
    w.requires_grad_(True)
    psw = torch.randn(idx.shape, dtype=torch.float64, device=device, requires_grad=True) if mode == "sum" else None

    def f(w, psw):
        return ops.embedding_bag(
            w, offsets, idx, bags, width=width, col_of_size=col, mode=mode, per_sample_weights=psw, padding_idx=2
        )

    assert torch.autograd.gradcheck(f, (w, psw), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_large_index_and_empty_inputs(device):
    V, D = 1000, 8
    w, offsets, col, width, _ = make_table(V, D, torch.float32, device, seed=1)
    # all bags empty
    out = ops.embedding_bag(
        w,
        offsets,
        torch.empty(0, dtype=torch.long, device=device),
        torch.zeros(3, dtype=torch.long, device=device),
        width=width,
        mode="max",
    )
    assert out.shape == (3, D) and bool((out == 0).all())
    # zero bags
    out = ops.embedding_bag(w, offsets, torch.empty(0, 4, dtype=torch.long, device=device), width=width)
    assert out.shape == (0, D)
    # a 2-D input of width 0
    out = ops.embedding_bag(w, offsets, torch.empty(3, 0, dtype=torch.long, device=device), width=width, mode="sum")
    assert out.shape == (3, D) and bool((out == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_backward_is_deterministic(device, mode):
    V, D = 200, 32
    w, offsets, col, width, _ = make_table(V, D, torch.float32, device, seed=2)
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 20, (4000,), generator=gen).to(device)  # many duplicates
    bags = torch.arange(0, 4000, 8, device=device)
    go = torch.randn(bags.numel(), D, generator=gen).to(device)
    grads = []
    for _ in range(3):
        wi = w.clone().requires_grad_(True)
        out = ops.embedding_bag(wi, offsets, idx, bags, width=width, mode=mode)
        (g,) = torch.autograd.grad(out, wi, go)
        grads.append(g)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("V", [3000, 300_000])
def test_backward_of_a_large_batch_equals_the_oracle(mode, V):
    """Batches of 4096+ lookups group their rows with a radix sort (csrc/cpu/row_groups.h; small
    batches use std::sort): with rows spanning 12 and 19 bits (two passes), duplicates, the
    largest index and padding, the dense and the sparse gradient equal the float64 oracle's, and
    the sums are in lookup order (the same bits on 1 and 2 threads)."""
    D = 16
    w, offsets, col, width, _ = make_table(V, D, torch.float64, "cpu", seed=V)
    gen = torch.Generator().manual_seed(V + 1)
    N = 9000
    idx = torch.cat([torch.randint(0, V, (N // 2,), generator=gen), torch.randint(0, 50, (N // 2,), generator=gen)])
    idx = idx[torch.randperm(N, generator=gen)]
    idx[0] = V - 1
    bags = torch.sort(torch.randint(0, N, (600,), generator=gen)).values
    bags[0] = 0
    go = torch.randn(bags.numel(), width, generator=gen, dtype=torch.float64)
    ends = torch.cat([bags, bags.new_tensor([N])])
    dense = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        ref_out = reference.embedding_bag(dense, offsets, idx, ends, width, col, mode, None, 7)
        (expect,) = torch.autograd.grad(ref_out, dense, go)
    grads, before = [], torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            wi = w.clone().requires_grad_(True)
            out = ops.embedding_bag(wi, offsets, idx, bags, width=width, mode=mode, padding_idx=7)
            (g,) = torch.autograd.grad(out, wi, go)
            grads.append(g)
        finally:
            torch.set_num_threads(before)
    torch.testing.assert_close(grads[0], expect, rtol=1e-12, atol=1e-12)
    assert torch.equal(grads[0], grads[1])
    if mode != "max":
        ws = w.clone().requires_grad_(True)
        out = ops.embedding_bag(ws, offsets, idx, bags, width=width, mode=mode, padding_idx=7, sparse=True)
        (gs,) = torch.autograd.grad(out, ws, go)
        assert gs.is_sparse and gs.is_coalesced()
        torch.testing.assert_close(gs.to_dense(), expect, rtol=1e-12, atol=1e-12)


def test_opcheck_every_operator():
    V, D = 20, 8
    for layout, mode in itertools.product(LAYOUTS, range(3)):
        w, offsets, col, width, _ = make_table(V, D, torch.float32, "cpu", layout, seed=mode)
        gen = torch.Generator().manual_seed(1)
        idx, bags = random_bags(V, 5, 4, gen)
        bo = torch.cat([bags, bags.new_tensor([idx.numel()])])
        psw = torch.randn(idx.shape) if mode == 0 else None
        wg = w.clone().requires_grad_(True)
        torch.library.opcheck(torch.ops.pme.bag_forward, (wg, offsets, idx, bo, psw, col, width, mode, 1))
        out, argmax = torch.ops.pme.bag_forward(w, offsets, idx, bo, psw, col, width, mode, 1)
        go = torch.randn_like(out)
        torch.library.opcheck(
            torch.ops.pme.bag_backward, (go, w, offsets, idx, bo, psw, col, argmax, mode, 1, psw is not None)
        )
        torch.library.opcheck(torch.ops.pme.embedding_forward, (wg, offsets, idx, col, width, 1))
        gx = torch.randn(idx.numel(), width)
        torch.library.opcheck(torch.ops.pme.embedding_backward, (gx, w, offsets, idx, col, 1))
        state = torch.zeros(V), torch.empty(0)
        torch.library.opcheck(
            torch.ops.pme.sparse_update_,
            (
                w.clone(),
                state[0].clone(),
                state[1],
                go,
                offsets,
                idx,
                bo,
                psw,
                col,
                argmax,
                mode,
                1,
                *ops.Hyperparameters("rowwise_adagrad", lr=0.1).operator_args(1),
            ),
        )
        torch.library.opcheck(
            torch.ops.pme.accumulate_scores_,
            (torch.zeros_like(w), go, w, offsets, idx, bo, psw, col, argmax, mode, 1, 0),
        )
    scores = torch.rand(V, D)
    torch.library.opcheck(torch.ops.pme.topk_threshold, (scores, 17))
    t = torch.ops.pme.topk_threshold(scores, 17)
    torch.library.opcheck(torch.ops.pme.prune_counts, (scores, t))
    sizes = torch.randint(0, D + 1, (V,))
    off = torch.zeros(V + 1, dtype=torch.long)
    off[1:] = sizes.cumsum(0)
    torch.library.opcheck(
        torch.ops.pme.prune_pack,
        (torch.randn(V, D), scores, off, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    V, D = 40, 16
    sizes = torch.randint(1, D + 1, (V,), generator=torch.Generator().manual_seed(0))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode=mode)
            self.lin = torch.nn.Linear(D, 1)

        def forward(self, x, off):
            return self.lin(self.emb(x, off)).squeeze(-1)

    model = Model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randint(0, V, (30,))
    off = torch.tensor([0, 5, 5, 17])
    eager = model(x, off)
    out = compiled(x, off)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    g_compiled = model.emb.weight.grad.clone()
    model.zero_grad()
    eager.sum().backward()
    torch.testing.assert_close(g_compiled, model.emb.weight.grad)


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_lookup_skips_autograd_and_gives_the_same_output(mode):
    """A lookup that wants no gradient (no_grad, a frozen table, inference mode) is dispatched
    past the autograd wrapper (torch.compile(fullgraph=True) traces the plain call): each gives
    the graded call's output with no grad_fn; a frozen table with graded per-sample weights takes
    the autograd path and their gradient flows."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    V, D = 30, 8
    m = pme.MultiSizeEmbeddingBag(V, D, sizes=torch.randint(0, D + 1, (V,), generator=gen), mode=mode)
    idx, off = random_bags(V, 10, 6, gen)
    graded = m(idx, off)
    assert graded.grad_fn is not None
    with torch.no_grad():
        plain = m(idx, off)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(idx, off)
    with torch.inference_mode():
        inference = m(idx, off)
    for out in (plain, compiled, inference):
        assert out.grad_fn is None and torch.equal(out, graded.detach())
    m.weight.requires_grad_(False)
    assert m(idx, off).grad_fn is None
    emb = pme.MultiSizeEmbedding(V, D, sizes=torch.randint(0, D + 1, (V,), generator=gen))
    graded_rows = emb(idx)
    with torch.no_grad():
        rows = emb(idx)
    assert graded_rows.grad_fn is not None and rows.grad_fn is None and torch.equal(rows, graded_rows.detach())
    if mode == "sum":
        psw = torch.rand(idx.shape, generator=gen, requires_grad=True)
        out = m(idx, off, per_sample_weights=psw)
        out.sum().backward()
        assert psw.grad is not None and psw.grad.abs().sum() > 0


def test_embedding_padding_idx_is_an_operator_argument():
    # nn.Embedding semantics through the schema (no side channel): the forward returns the padding
    # row as stored, the backward skips it, also under torch.compile(fullgraph=True).
    torch._dynamo.reset()
    V, D, pad = 12, 8, 3
    sizes = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(2))
    sizes[pad] = D
    m = pme.MultiSizeEmbedding(V, D, sizes=sizes, padding_idx=pad)
    with torch.no_grad():
        m.weight.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.tensor([[pad, 1, V - 1], [pad, pad, 0]])
    dense = m.to_dense().detach().requires_grad_(True)
    ref = F.embedding(x, dense, padding_idx=pad)
    for fn in (m, torch.compile(m, fullgraph=True, backend="aot_eager")):
        m.weight.grad = None
        out = fn(x)
        torch.testing.assert_close(out, ref)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        out.backward(go)
        (rg,) = torch.autograd.grad(ref, dense, go, retain_graph=True)
        torch.testing.assert_close(pme.MultiSizeEmbedding.from_dense(rg, sizes).weight, m.weight.grad)
        assert bool((m.weight.grad[int(m.offsets[pad]) : int(m.offsets[pad + 1])] == 0).all())
    w, offsets = m.weight.detach(), m.offsets
    with pytest.raises(RuntimeError, match="padding_idx 12 is out of range"):
        torch.ops.pme.embedding_forward(w, offsets, x.reshape(-1), None, D, V)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs_are_accepted(device):
    V, D = 30, 8
    w, offsets, col, width, _ = make_table(V, D, torch.float32, device, seed=0)
    x = torch.randint(0, V, (6, 8), device=device)
    out_t = ops.embedding_bag(w, offsets, x.t(), width=width, mode="sum")
    out_c = ops.embedding_bag(w, offsets, x.t().contiguous(), width=width, mode="sum")
    torch.testing.assert_close(out_t, out_c)
    idx = torch.randint(0, V, (40,), device=device)[::2]
    off = torch.tensor([0, 3, 9], device=device)
    torch.testing.assert_close(
        ops.embedding_bag(w, offsets, idx, off, width=width),
        ops.embedding_bag(w, offsets, idx.contiguous(), off, width=width),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("full_share", [1.0, 0.5])
def test_cpu_forward_full_width_rows(monkeypatch, dtype, D, full_share):
    """Rows as wide as the table take the register kernels' whole-step path (plain loads, one
    branch per row): all rows full (a table at full size), or half of them mixed with shorter
    rows; the last row is full, so the whole loads read up to the buffer's last entry. Every
    kernel equals the portable one and the float64 oracle (within the dtype's rounding)."""
    gen = torch.Generator().manual_seed(D)
    V = 50
    sizes = torch.where(torch.rand(V, generator=gen) < full_share, D, torch.randint(0, D, (V,), generator=gen))
    sizes[-1] = D
    w, offsets, col, width, _ = make_table(V, D, dtype, "cpu", seed=D, sizes=sizes)
    idx, bags = random_bags(V, 30, 12, gen, torch.int64)
    idx[0] = V - 1
    psw = torch.randn(idx.shape, generator=gen).to(dtype)
    ends = torch.cat([bags, torch.tensor([idx.numel()])])  # the oracle takes [B + 1] bag offsets
    expect = reference.embedding_bag(w.double(), offsets, idx, ends, width, col, "sum", psw.double())
    mean_expect = reference.embedding_bag(w.double(), offsets, idx, ends, width, col, "mean")
    outs, means = {}, {}
    for kernel in ["avx512", "avx2", "generic"]:
        monkeypatch.setenv("PME_CPU_KERNEL", kernel)
        outs[kernel] = ops.embedding_bag(w, offsets, idx, bags, width=width, mode="sum", per_sample_weights=psw)
        means[kernel] = ops.embedding_bag(w, offsets, idx, bags, width=width, mode="mean")
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    for kernel in outs:
        torch.testing.assert_close(outs[kernel].double(), expect, rtol=tol, atol=tol, msg=kernel)
        torch.testing.assert_close(means[kernel].double(), mean_expect, rtol=tol, atol=tol, msg=kernel)
        assert torch.equal(means[kernel], means["generic"]), kernel  # the same fp32 sums in the same order
    assert torch.equal(outs["avx2"], outs["avx512"])  # both one FMA per weighted entry


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [5, 13, 40, 64, 100, 128, 200, 255, 256, 257, 300])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_cpu_forward_kernels_on_wide_tables(monkeypatch, dtype, D, mode):
    """The CPU forward has register kernels (sum/mean, padded, widths up to 256) for AVX-512 and
    for AVX2, each run where the CPU has it, and a portable one; PME_CPU_KERNEL=avx512 / avx2 /
    generic forces one (a kernel the CPU lacks falls back to the best it has). All match the
    oracle on tables of odd widths and row sizes (row tails of every length), with padding and
    per-sample weights, and agree with each other."""
    kernels = ["auto", "avx512", "avx2", "generic"]
    outs, weighted = {}, {}
    w, offsets, col, width, _ = make_table(60, D, dtype, "cpu", seed=D)
    idx, bags = random_bags(60, 20, 9, torch.Generator().manual_seed(D), torch.int32)
    psw = torch.randn(idx.shape, generator=torch.Generator().manual_seed(D + 1)).to(dtype)
    for kernel in kernels:
        monkeypatch.setenv("PME_CPU_KERNEL", kernel)
        run_case(
            "cpu",
            dtype,
            mode,
            "padded",
            torch.int64,
            use_psw=mode == "sum",
            pad_choice="negative",
            seed=D,
            V=60,
            D=D,
            B=20,
            L=9,
        )
        outs[kernel] = ops.embedding_bag(w, offsets, idx, bags, width=width, mode=mode)
        weighted[kernel] = ops.embedding_bag(w, offsets, idx, bags, width=width, mode="sum", per_sample_weights=psw)
    # the same fp32 sums in the same order: identical outputs
    for kernel in kernels[:-1]:
        assert torch.equal(outs[kernel], outs["generic"]), kernel
    # weighted: both register kernels use one FMA per entry (the portable one may round twice)
    assert torch.equal(weighted["avx2"], weighted["avx512"])
    assert torch.equal(weighted["auto"], weighted["avx512"])
    # a bad lookup is reported the same way by every kernel
    for kernel in kernels:
        monkeypatch.setenv("PME_CPU_KERNEL", kernel)
        with pytest.raises(RuntimeError, match=r"indices\[3\] = 60"):
            ops.embedding_bag(w, offsets, torch.tensor([1, 2, 3, 60, 61]), torch.tensor([0, 2]), width=width)
        with pytest.raises(RuntimeError, match="does not fit in the output width"):
            ops.embedding_bag(w, offsets, torch.tensor([1, 0, 3]), torch.tensor([0, 2]), width=D - 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [8, 16, 40, 64, 300])
def test_non_finite_weights_scale_stored_entries_only_on_every_kernel(monkeypatch, dtype, D):
    """A per-sample weight of inf, -inf or NaN scales its row's stored entries only: the columns a
    row does not store stay 0 (the dense view's 0 * inf = NaN is not an entry of the table), with
    every kernel (the register kernels multiply whole 64-byte steps: a run holding such a weight
    goes to the portable kernel), the reference and across runs of 4096 lookups."""
    gen = torch.Generator().manual_seed(D)
    V = 40
    w, offsets, col, width, sizes = make_table(V, D, dtype, "cpu", seed=D)
    idx, bags = random_bags(V, 700, 9, gen, torch.int64)  # > 4096 lookups: several check runs
    psw = torch.randn(idx.shape, generator=gen).to(dtype)
    special = torch.randperm(idx.numel(), generator=gen)[:12]
    psw[special] = torch.tensor([float("inf"), float("-inf"), float("nan")] * 4, dtype=dtype)
    ends = torch.cat([bags, torch.tensor([idx.numel()])])
    ref = reference.embedding_bag(w.double(), offsets, idx, ends, width, col, "sum", psw.double())
    stored = (torch.arange(width) < sizes.unsqueeze(1))[idx]  # [N, W] which columns each lookup stores
    bag_of = torch.repeat_interleave(torch.arange(bags.numel()), ends.diff())
    touched = torch.zeros(bags.numel(), width, dtype=torch.bool).index_put_((bag_of,), stored, accumulate=True)
    assert bool(torch.isnan(ref).any()) and bool((~touched).any())
    assert not bool(torch.isnan(ref[~touched]).any())  # unstored columns of every bag stay finite
    outs = {}
    for kernel in ["avx512", "avx2", "generic"]:
        monkeypatch.setenv("PME_CPU_KERNEL", kernel)
        outs[kernel] = ops.embedding_bag(w, offsets, idx, bags, width=width, mode="sum", per_sample_weights=psw)
        tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        torch.testing.assert_close(outs[kernel].double(), ref, rtol=tol, atol=tol, equal_nan=True, msg=kernel)
        assert torch.equal(torch.isnan(outs[kernel]), torch.isnan(ref)), kernel
    for kernel in outs:  # the run with a non-finite weight is the portable kernel's on every path
        assert torch.equal(outs[kernel].isnan(), outs["generic"].isnan())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_cpu_forward_across_index_check_runs(monkeypatch, dtype, index_dtype):
    """The register kernels take a batch in runs of whole bags of at least 4096 lookups, each run's
    indices checked in one pass first. A batch of about 15,000 lookups in bags of 0 to 60 (so runs
    end at uneven places, some bags empty, duplicates, the largest index, a padding row) must
    match the float64 oracle with every kernel, sum and mean, rows of every size up to the width."""
    V, D, B = 300, 64, 500
    w, offsets, _, width, _ = make_table(V, D, dtype, seed=7)
    idx, bags = random_bags(V, B, 60, torch.Generator().manual_seed(7), index_dtype, padding_idx=5)
    assert idx.numel() > 3 * 4096
    ends = torch.cat([bags, bags.new_full((1,), idx.numel())])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for mode in ("sum", "mean"):
        want = reference.embedding_bag(w.double(), offsets, idx, ends, width, None, mode, None, 5)
        for kernel in ("avx512", "avx2", "generic"):
            monkeypatch.setenv("PME_CPU_KERNEL", kernel)
            got = ops.embedding_bag(w, offsets, idx, bags, width=width, mode=mode, padding_idx=5)
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=f"{kernel} {mode}")


_GUARD_PAGE_HELPER = r"""
import ctypes, mmap, os, sys
import torch
from pme import ops, reference

def before_a_guard_page(n, dtype, keep):
    # A [n] tensor whose last byte is the last one before a page that cannot be read.
    size = torch.empty((), dtype=dtype).element_size()
    page = mmap.PAGESIZE
    pages = (n * size + page - 1) // page + 1
    mm = mmap.mmap(-1, pages * page)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr + (pages - 1) * page, page, 0) == 0, ctypes.get_errno()  # PROT_NONE
    keep.append(mm)
    return torch.frombuffer(mm, dtype=dtype, count=n, offset=(pages - 1) * page - n * size)
"""

_GUARD_PAGE_SCRIPT = (
    _GUARD_PAGE_HELPER
    + r"""
keep = []
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for D in (16, 40, 64, 256):
        V = 30
        sizes = torch.randint(0, D + 1, (V,), generator=gen)
        sizes[-4:] = torch.tensor([D, 3, 1, 2]).clamp(max=D)  # short rows end the buffer
        offsets = torch.zeros(V + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(sizes, 0)
        w = before_a_guard_page(int(offsets[-1]), dtype, keep)
        w.copy_(torch.randn(w.numel(), generator=gen).to(dtype))
        idx = torch.cat([torch.arange(V), torch.arange(V - 4, V).repeat(3), torch.randint(0, V, (40,), generator=gen)])
        bags = torch.arange(0, idx.numel(), 5)
        ends = torch.cat([bags, torch.tensor([idx.numel()])])
        psw = torch.randn(idx.shape, generator=gen).to(dtype)
        expect = reference.embedding_bag(w.double(), offsets, idx, ends, D, None, "sum", psw.double())
        for kernel in sys.argv[1:]:
            os.environ["PME_CPU_KERNEL"] = kernel
            for mode in ("sum", "mean"):
                ops.embedding_bag(w, offsets, idx, bags, width=D, mode=mode)
            out = ops.embedding_bag(w, offsets, idx, bags, width=D, mode="sum", per_sample_weights=psw)
            tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
            torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol, msg=f"{kernel} {dtype} D={D}")
print("OK")
"""
)


# Bad indices against an offset table that ends before an unreadable page, through the raw
# operator (no Python check first): every kernel must refuse them before reading the table.
_GUARD_INDEX_SCRIPT = (
    _GUARD_PAGE_HELPER
    + r"""
keep = []
V, D = 50, 64
sizes = torch.tensor([8, 16, 32, 64, 0] * 10)
offsets = before_a_guard_page(V + 1, torch.int64, keep)
offsets.zero_()
offsets[1:] = torch.cumsum(sizes, 0)
w = torch.randn(int(offsets[-1]))
for kernel in sys.argv[1:]:
    os.environ["PME_CPU_KERNEL"] = kernel
    for dtype in (torch.int32, torch.int64):
        big = 2**31 - 1 if dtype == torch.int32 else 2**40
        for bad in (V, V + 1, big, -1, -big):
            for n, at in ((40, 17), (9000, 8191)):  # a short batch, and one past a check run
                idx = torch.randint(0, V, (n,), dtype=dtype)
                idx[at] = bad
                bags = torch.arange(0, n + 1, 8, dtype=dtype)
                bags[-1] = n
                try:
                    torch.ops.pme.bag_forward(w, offsets, idx, bags, None, None, D, 0, -1, True)
                except (RuntimeError, IndexError) as e:  # the raw operator raises RuntimeError
                    assert f"indices[{at}] = {bad}" in str(e), (kernel, dtype, bad, str(e))
                else:
                    raise AssertionError(f"{kernel} {dtype}: index {bad} at {at} was not refused")
    idx = torch.randint(0, V, (40,))
    out = torch.ops.pme.bag_forward(w, offsets, idx, torch.arange(0, 41, 8), None, None, D, 0, -1, True)[0]
    dense = reference.to_dense(w, offsets, D)
    torch.testing.assert_close(out, dense[idx].view(5, 8, D).sum(1), msg=kernel)  # still usable
print("OK")
"""
)


def _run_guarded(script, what, where):
    """Runs one of the guard-page scripts for every CPU kernel in a subprocess (a read into the
    unreadable page kills it, not pytest); fails unless it printed OK."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", script, "avx2", "avx512", "generic"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (
        f"{what} next to an unreadable page ended with return code {r.returncode} "
        f"(-11: a read past {where}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    )


def test_cpu_forward_refuses_bad_indices_before_reading_the_offsets():
    """Indices one and two past the table, the largest int32 / a far int64, -1 and a far negative
    one, in batches of 40 and of 9000 lookups (past one run of the register kernels' vectorised
    index check), int32 and int64, through the raw operator (table_checked=True: no Python check
    and no whole-table scan first), with the offset table ending right before a page that cannot
    be read. Every kernel must raise an error naming the position and value, without reading
    offsets[V + 1] or anything further (a read there kills the subprocess), and work after."""
    _run_guarded(_GUARD_INDEX_SCRIPT, "bad indices", "the offsets")


def test_cpu_forward_reads_nothing_past_the_buffer():
    """The register kernels read a row with plain loads where its entries fill them and with masked
    loads where it ends inside one (AVX2 fp32: per 8 entries). Here each table's buffer ends right
    before a page that cannot be read, and its last rows are short (1, 2, 3 entries): a load that
    reaches past the row's end would kill the subprocess (SIGSEGV). Every kernel also matches the
    float64 oracle there, weighted, and runs sum and mean."""
    _run_guarded(_GUARD_PAGE_SCRIPT, "the lookups", "the buffer")
