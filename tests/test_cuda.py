"""CUDA-only behaviour: graph capture, streams, alignment, 64-bit addressing, validation modes, hot rows.

The shared suites (test_lookup, test_optim, test_prune) already run every operator on CUDA
against the dense oracle; this file checks what only a GPU run can: that the kernels never
synchronise (a CUDA graph captures and replays them), run on the current stream, take the
scalar path on unaligned buffers, address flat buffers beyond 2^31 elements, report bad input
without poisoning the process, and stay bitwise deterministic on rows hit by thousands of
lookups. Without a GPU every test here skips visibly (PME_REQUIRE_CUDA=1 turns that into a
failure); the alignment test also runs on CPU.
"""

import os

import pytest
import torch

import pme
from pme import ops, reference

from conftest import DEVICES, REQUIRE_CUDA, cuda_ready, make_table, random_bags

if cuda_ready() or REQUIRE_CUDA:
    needs_cuda = pytest.mark.cuda
else:
    why = "no GPU" if not torch.cuda.is_available() else "pme built without CUDA kernels"
    needs_cuda = pytest.mark.skip(reason=f"CUDA variant: {why}")

MODES = ["sum", "mean", "max"]
ERRORS = (ValueError, TypeError, IndexError, RuntimeError)


def _dense_oracle(w, offsets, idx, off, D, mode, psw=None):
    """F.embedding_bag on the float64 dense view (padded layout)."""
    bo = torch.cat([off, off.new_tensor([idx.numel()])])
    return reference.embedding_bag(
        w.double(), offsets, idx, bo, D, None, mode, None if psw is None else psw.double(), None
    )


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_replays_forward_and_backward(mode):
    V, D, B, L = 500, 32, 64, 8
    w, offsets, _, width, _ = make_table(V, D, torch.float32, "cuda", seed=1)
    wp = w.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, V, (B * L,), generator=gen).cuda()
    off = torch.arange(0, B * L, L).cuda()
    go = torch.randn(B, width, generator=gen).cuda()

    def step():
        out = ops.embedding_bag(wp, offsets, idx, off, width=width, mode=mode)
        (g,) = torch.autograd.grad(out, wp, go)
        return out, g

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's graph recipe asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # fails if any kernel or check synchronises with the host
        out_g, grad_g = step()
    for seed in range(3):  # new indices copied into the captured buffers, then replay
        idx.copy_(torch.randint(0, V, (B * L,), generator=torch.Generator().manual_seed(10 + seed)).cuda())
        graph.replay()
        out_e, grad_e = step()
        assert torch.equal(out_g, out_e)
        assert torch.equal(grad_g, grad_e)
        torch.testing.assert_close(out_e.double(), _dense_oracle(w, offsets, idx, off, D, mode), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("opt", ["sgd", "rowwise_adagrad"])
def test_cuda_graph_replays_fused_training_step(opt):
    V, D, B, L = 300, 16, 32, 6
    sizes = torch.randint(0, D + 1, (V,), generator=torch.Generator().manual_seed(0))
    make = {"sgd": lambda: pme.optim.SGD(lr=0.1), "rowwise_adagrad": lambda: pme.optim.RowwiseAdagrad(lr=0.1)}[opt]
    eager = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", device="cuda", optimizer=make())
    # built on the CPU and moved: .cuda() must leave the host-side step count on the host
    graphed = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", optimizer=make()).cuda()
    assert graphed.optim_step.device.type == "cpu" and graphed.optim_state1.is_cuda
    graphed.load_state_dict(eager.state_dict())
    idx = torch.zeros(B * L, dtype=torch.int64, device="cuda")
    off = torch.arange(0, B * L, L, device="cuda")
    go = torch.zeros(B, D, device="cuda")

    def train_step(m):
        m(idx, off).backward(go)

    batches = [
        (
            torch.randint(0, V, (B * L,), generator=torch.Generator().manual_seed(s)).cuda(),
            torch.randn(B, D, generator=torch.Generator().manual_seed(100 + s)).cuda(),
        )
        for s in range(6)
    ]
    # capture on a scratch copy so that warm-up steps do not move `graphed`
    scratch = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", device="cuda", optimizer=make())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        train_step(scratch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(graphed)
    # capture records the kernels without running them, but Python-side state (optim_step) moved
    graphed.load_state_dict(eager.state_dict())
    for bidx, bgo in batches:
        idx.copy_(bidx)
        go.copy_(bgo)
        graph.replay()
        eager(bidx, off).backward(bgo)
    assert torch.equal(graphed.weight, eager.weight)
    assert torch.equal(graphed.optim_state1, eager.optim_state1)


@needs_cuda
def test_kernels_run_on_the_current_stream(monkeypatch):
    # The lookup is queued on a side stream behind a ~30 ms sleep, then the default stream
    # overwrites the indices at once. Run on the side stream, the kernel reads the new indices;
    # run on any other stream, it would have read the old ones.
    monkeypatch.setenv("PME_CUDA_VALIDATE", "0")  # the check would wait for the sleep
    V, D = 2000, 64
    w, offsets, _, width, _ = make_table(V, D, torch.float32, "cuda", seed=3)
    gen = torch.Generator().manual_seed(4)
    idx_old, off = random_bags(V, 256, 20, gen, device="cuda")
    idx_new = torch.randint(0, V, idx_old.shape, generator=gen).cuda()
    expect = ops.embedding_bag(w, offsets, idx_new, off, width=width, mode="sum")
    idx = idx_old.clone()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        out = ops.embedding_bag(w, offsets, idx, off, width=width, mode="sum")
    idx.copy_(idx_new)  # default stream, not ordered after `side`
    torch.cuda.synchronize()
    assert torch.equal(out, expect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_unaligned_buffers_give_the_same_result(device, dtype, shift):
    # sizes that are multiples of 8 (the 16-byte vector path when the buffer is aligned) and odd ones
    V, D = 400, 64
    gen = torch.Generator().manual_seed(5)
    sizes = torch.tensor([8, 16, 24, 64, 7, 13, 1, 0])[torch.randint(0, 8, (V,), generator=gen)]
    w, offsets, _, width, _ = make_table(V, D, dtype, device, sizes=sizes, seed=6)
    store = torch.zeros(w.numel() + 8, dtype=dtype, device=device)
    shifted = store[shift : shift + w.numel()]
    shifted.copy_(w)
    assert (shifted.data_ptr() % 16 == 0) == (shift == 0) or dtype != torch.float32
    idx, off = random_bags(V, 64, 12, gen, device=device)
    for mode in MODES:
        a = ops.embedding_bag(w, offsets, idx, off, width=width, mode=mode)
        b = ops.embedding_bag(shifted, offsets, idx, off, width=width, mode=mode)
        # same accumulation order per column, whichever load path: equal up to rounding noise
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        torch.testing.assert_close(b.double(), _dense_oracle(w, offsets, idx, off, D, mode), rtol=tol, atol=tol)


def _free_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


LARGE_DEVICES = [
    pytest.param("cuda", marks=needs_cuda, id="cuda"),
    pytest.param(
        "cpu",
        id="cpu",
        marks=pytest.mark.skipif(os.environ.get("PME_LARGE_TESTS") != "1", reason="CPU variant: set PME_LARGE_TESTS=1"),
    ),
]


@pytest.mark.parametrize("device", LARGE_DEVICES)
def test_table_beyond_2_31_elements(device):
    # fp16 rows of 128 entries: total = 2^31 + 128 * 1000 entries (4 GiB), so the last rows start
    # past 2^31 and any 32-bit offset arithmetic reads the wrong entries
    D, extra = 128, 1000
    V = 2**31 // D + extra
    total = V * D
    need = total * 2 * 2 + V * 8 * 2  # table + flat gradient + offsets
    if _free_bytes(device) < need * 1.2:
        pytest.skip(f"needs about {need / 2**30:.1f} GiB free on {device}")
    dtype = torch.float16
    offsets = torch.arange(0, total + 1, D, dtype=torch.int64, device=device)
    w = torch.zeros(total, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(7)
    rows = torch.cat([torch.tensor([0, 1, V // 2, 2**31 // D - 1]), torch.arange(V - extra, V)])
    rows = rows[torch.randperm(rows.numel(), generator=gen)]
    vals = torch.randn(rows.numel(), D, generator=gen).to(dtype)
    for r, v in zip(rows.tolist(), vals):  # distinct values per row, set through plain torch slicing
        w[r * D : (r + 1) * D] = v.to(device)
    idx = rows.repeat(2).to(device)
    off = torch.arange(0, idx.numel(), 4, device=device)
    for mode in MODES:
        out = ops.embedding_bag(w, offsets, idx, off, width=D, mode=mode)
        dense = vals.float().repeat(2, 1).reshape(-1, 4, D)
        expect = {"sum": dense.sum(1), "mean": dense.mean(1), "max": dense.amax(1)}[mode]
        torch.testing.assert_close(out.float().cpu(), expect, rtol=1e-2, atol=1e-2)
    # backward into the flat buffer: each row's gradient lands in its own 128 entries
    wp = w.requires_grad_(True)
    out = ops.embedding_bag(wp, offsets, idx, off, width=D, mode="sum")
    go = torch.ones_like(out)
    (g,) = torch.autograd.grad(out, wp, go)
    for r in rows[:6].tolist() + [V - 1]:
        seg = g[r * D : (r + 1) * D].float()
        assert bool((seg == 2).all()), f"row {r}: gradient {seg[:4].tolist()}..."
    # nothing else written: the whole buffer sums to the lookups' gradient (chunks bound the memory)
    assert sum(float(c.sum(dtype=torch.float32)) for c in g.split(2**26)) == 2 * rows.numel() * D


@needs_cuda
def test_bad_input_raises_and_leaves_the_process_usable(monkeypatch):
    V, D = 100, 16
    w, offsets, _, width, _ = make_table(V, D, torch.float32, "cuda", seed=8)
    idx = torch.tensor([1, 2, V, 3], device="cuda")
    off = torch.tensor([0, 2], device="cuda")
    with pytest.raises(ERRORS, match=r"indices\[2\] = 100"):
        ops.embedding_bag(w, offsets, idx, off, width=width, mode="sum")
    with pytest.raises(ERRORS, match="non-decreasing"):
        ops.embedding_bag(w, offsets, idx[:2], torch.tensor([0, 2, 1], device="cuda"), width=width, mode="sum")
    torch.cuda.synchronize()  # no sticky device error
    # PME_CUDA_VALIDATE=0: no synchronising check; the bad lookup is skipped, never read
    monkeypatch.setenv("PME_CUDA_VALIDATE", "0")
    out = ops.embedding_bag(w, offsets, idx, off, width=width, mode="sum")
    keep = ops.embedding_bag(
        w, offsets, torch.tensor([1, 2, 3], device="cuda"), torch.tensor([0, 2], device="cuda"), width=width, mode="sum"
    )
    torch.cuda.synchronize()
    assert torch.equal(out, keep)
    monkeypatch.setenv("PME_CUDA_VALIDATE", "1")
    ok = ops.embedding_bag(w, offsets, idx[:2], off[:1], width=width, mode="sum")
    torch.testing.assert_close(ok.double(), _dense_oracle(w, offsets, idx[:2], off[:1], D, "sum"))


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_hot_rows_are_deterministic_and_exact(mode):
    # one row in most lookups (the backward splits such rows over several blocks), a few warm ones
    V, D, N = 1000, 64, 200_000
    w, offsets, _, width, _ = make_table(V, D, torch.float32, "cuda", seed=9)
    gen = torch.Generator().manual_seed(10)
    idx = torch.where(
        torch.rand(N, generator=gen) < 0.7, torch.tensor(5), torch.randint(0, 50, (N,), generator=gen)
    ).cuda()
    off = torch.arange(0, N, 16, device="cuda")
    go = torch.randn(off.numel(), width, generator=gen).cuda()
    grads = []
    for _ in range(3):
        wp = w.clone().requires_grad_(True)
        out = ops.embedding_bag(wp, offsets, idx, off, width=width, mode=mode)
        grads.append(torch.autograd.grad(out, wp, go)[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    w64 = w.double().cpu().requires_grad_(True)
    ref = ops.embedding_bag(w64, offsets.cpu(), idx.cpu(), off.cpu(), width=width, mode=mode)
    (g64,) = torch.autograd.grad(ref, w64, go.double().cpu())
    torch.testing.assert_close(grads[0].double().cpu(), g64, rtol=1e-4, atol=1e-2)
    # the fused step on the same batch: bitwise repeatable
    states = []
    for _ in range(2):
        m = pme.MultiSizeEmbeddingBag(
            V, D, sizes=offsets.diff().cpu(), mode=mode, device="cuda", optimizer=pme.optim.RowwiseAdagrad(lr=0.1)
        )
        m.weight.data.copy_(w)
        m(idx, off).backward(go)
        states.append((m.weight.clone(), m.optim_state1.clone()))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    V, D = 300, 32
    w, offsets, _, width, _ = make_table(V, D, torch.float32, "cuda:1", seed=11)
    gen = torch.Generator().manual_seed(12)
    idx, off = random_bags(V, 40, 10, gen, device="cuda:1")
    with torch.cuda.device(0):  # the current device is not the tensors' device
        out = ops.embedding_bag(w, offsets, idx, off, width=width, mode="sum")
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.double(), _dense_oracle(w, offsets, idx, off, D, "sum"))


@needs_cuda
def test_collection_backward_refuses_graph_capture_clearly():
    """A collection's backward reads sizes back to the host, which a CUDA graph cannot capture: the
    operator refuses with pme's message instead of failing inside the capture."""
    cfg = [pme.collection.EmbeddingBagConfig(20, 8, "a", ["f"])]
    m = pme.MultiSizeEmbeddingBagCollection(cfg, 4, device="cuda")
    feats, B = m._features(["f"]), 2
    idx, bo = torch.tensor([1, 2, 3], device="cuda"), torch.tensor([0, 1, 3], device="cuda")
    w, off, tr = m.weight.detach(), m.offsets, m.table_rows
    go = torch.zeros(B, m.out_width, device="cuda")
    torch.ops.pme.collection_backward(go, w, off, tr, feats, idx, bo, None, B, False)  # fine eagerly
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            torch.ops.pme.collection_backward(go, w, off, tr, feats, idx, bo, None, B, False)


@needs_cuda
def test_sparse_backward_and_prune_pack_refuse_graph_capture_clearly():
    """A sparse=True backward and prune_pack read a size back to the host: inside a CUDA graph
    capture each refuses with pme's message instead of failing inside the capture."""
    w, off, _, _, _ = make_table(20, 8, device="cuda", seed=1)
    idx, bo = torch.tensor([1, 2, 3], device="cuda"), torch.tensor([0, 1, 3], device="cuda")
    go = torch.ones(2, 8, device="cuda")
    argmax = torch.empty(0, dtype=torch.int64, device="cuda")
    args = (go, w, off, idx, bo, None, None, argmax, 0, -1, False)
    torch.ops.pme.bag_backward_sparse(*args)  # fine eagerly
    dense, scores = torch.randn(5, 8, device="cuda"), torch.rand(5, 8, device="cuda")
    offsets = torch.arange(0, 21, 4, device="cuda")
    torch.ops.pme.prune_pack(dense, scores, offsets, False)
    torch.cuda.synchronize()
    for call in (
        lambda: torch.ops.pme.bag_backward_sparse(*args),
        lambda: torch.ops.pme.prune_pack(dense, scores, offsets, False),
    ):
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                call()
