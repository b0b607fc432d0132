"""First checks of the CUDA kernels on a GPU machine (written without a GPU; run this first).

    python scripts/selfcheck_cuda.py            # correctness against the CPU kernels + timings
    python scripts/selfcheck_cuda.py --quick    # correctness only

Compares every CUDA operator with the CPU operator of the same build (the CPU kernels define the
semantics), checks bitwise determinism of the backward-shaped operators, the validation errors
(PME_CUDA_VALIDATE=1) and the no-sync mode (=0), CUDA-graph capture, and times the headline
configuration (10M x 128 table, sizes 16/32/64/128, 16384 bags x 32 Zipf lookups).
Not a pytest file: a standalone script for the session that first gets a GPU; move what is
useful into tests/ and benchmarks/.
"""

import argparse
import os
import random

import torch

import pme  # noqa: F401  (loads pme._C)

ops = torch.ops.pme
DEV = "cuda"
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def make_table(V, D, sizes, dtype, device, seed, grouped=False):
    g = torch.Generator().manual_seed(seed)
    sz = torch.tensor(sizes)[torch.randint(len(sizes), (V,), generator=g)]
    off = torch.zeros(V + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(sz, 0)
    w = torch.randn(int(off[-1]), generator=g, dtype=torch.float64).to(dtype)
    cos = None
    W = D
    if grouped:
        S = sorted(set(sizes) - {0})
        cos = torch.full((D + 1,), -1, dtype=torch.int64)
        c = 0
        for s in S:
            cos[s] = c
            c += s
        if 0 in sizes:
            cos[0] = 0
        W = c
    return w.to(device), off.to(device), (cos.to(device) if cos is not None else None), W


def batch(V, B, L, itype, seed, zipf=False, trailing=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 2 * L + 1, (B,), generator=g)
    N = int(lens.sum()) + trailing
    if zipf:
        p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.05
        idx = torch.multinomial(p / p.sum(), N, replacement=True, generator=g)
    else:
        idx = torch.randint(0, V, (N,), generator=g)
    bo = torch.zeros(B + 1, dtype=torch.int64)
    bo[1:] = torch.cumsum(lens, 0)
    return idx.to(itype), bo.to(itype)


def close(a, b, dtype, what):
    a, b = a.cpu().double(), b.cpu().double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 1.0)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:g} (tolerance {TOL[dtype] * scale:g})"


def check_lookups(quick):
    n = 0
    rng = random.Random(0)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for trial in range(12 if quick else 40):
        dtype = rng.choice(dtypes)
        itype = rng.choice([torch.int32, torch.int64])
        grouped = rng.random() < 0.3
        aligned = rng.random() < 0.6
        D = rng.choice([4, 16, 64, 128, 200, 700]) if not grouped else 64
        q = 16 // torch.tensor([], dtype=dtype).element_size() if aligned else 1
        sizes = sorted({0, max(q, D // 4 // q * q), max(q, D // 2 // q * q), D // q * q} | (set() if aligned else {1, D - 1}))
        sizes = [s for s in sizes if 0 <= s <= D]
        V = rng.choice([7, 100, 5000])
        w, off, cos, W = make_table(V, D, sizes, dtype, DEV, trial, grouped)
        idx, bo = batch(V, rng.choice([1, 5, 300]), rng.choice([1, 8, 40]), itype, trial, zipf=rng.random() < 0.5,
                        trailing=rng.choice([0, 3]))
        idx, bo = idx.to(DEV), bo.to(DEV)
        mode = rng.choice([0, 1, 2])
        pad = rng.choice([-1, 0, V - 1])
        psw = torch.randn(idx.numel(), dtype=torch.float64).to(dtype).to(DEV) if mode == 0 and rng.random() < 0.5 else None
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        out, am = ops.bag_forward(w, off, idx, bo, psw, cos, W, mode, pad)
        rout, ram = ops.bag_forward(cpu(w), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), W, mode, pad)
        close(out, rout, dtype, f"bag_forward trial {trial} mode {mode} {dtype}")
        if mode == 2:
            assert torch.equal(am.cpu(), ram), f"argmax differs (trial {trial})"
        go = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(DEV)
        gw, gp = ops.bag_backward(go, w, off, idx, bo, psw, cos, am, mode, pad, psw is not None)
        gw2, gp2 = ops.bag_backward(go, w, off, idx, bo, psw, cos, am, mode, pad, psw is not None)
        assert torch.equal(gw, gw2) and torch.equal(gp, gp2), f"bag_backward not deterministic (trial {trial})"
        rgw, rgp = ops.bag_backward(cpu(go), cpu(w), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), cpu(am), mode,
                                    pad, psw is not None)
        close(gw, rgw, dtype, f"bag_backward trial {trial}")
        close(gp, rgp, dtype, f"grad_psw trial {trial}")
        # non-pooled
        e = ops.embedding_forward(w, off, idx, cos, W)
        re = ops.embedding_forward(cpu(w), cpu(off), cpu(idx), cpu(cos), W)
        close(e, re, dtype, f"embedding_forward trial {trial}")
        ge = torch.randn(e.shape, dtype=torch.float64).to(dtype).to(DEV)
        close(ops.embedding_backward(ge, w, off, idx, cos, pad), ops.embedding_backward(cpu(ge), cpu(w), cpu(off),
              cpu(idx), cpu(cos), pad), dtype, f"embedding_backward trial {trial}")
        # fused updates and scores
        if dtype in (torch.float32, torch.float64):
            sd = dtype
            for opt in (0, 1, 2):
                s1 = torch.rand(V if opt == 1 else w.numel(), dtype=sd) if opt else torch.zeros(0, dtype=sd)
                s2 = torch.rand(w.numel(), dtype=sd) if opt == 2 else torch.zeros(0, dtype=sd)
                tensors = [w.clone(), s1.to(DEV), s2.to(DEV)]
                rtensors = [w.cpu().clone(), s1.clone(), s2.clone()]
                args = (mode, pad, opt, 0.05, 0.01, 1e-8, 0.9, 0.999, 3)
                ops.sparse_update_(*tensors, go, off, idx, bo, psw, cos, am, *args)
                ops.sparse_update_(*rtensors, cpu(go), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), cpu(am), *args)
                for a, b in zip(tensors, rtensors):
                    close(a, b, dtype, f"sparse_update_ opt {opt} trial {trial}")
            for rule in (0, 1):
                sc = torch.rand(w.numel(), dtype=sd)
                a, b = sc.to(DEV), sc.clone()
                ops.accumulate_scores_(a, go, w, off, idx, bo, psw, cos, am, mode, pad, rule)
                ops.accumulate_scores_(b, cpu(go), cpu(w), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), cpu(am),
                                       mode, pad, rule)
                close(a, b, dtype, f"accumulate_scores_ rule {rule} trial {trial}")
        n += 1
    print(f"lookups, backward, updates, scores: {n} random configurations match the CPU kernels")


def check_prune():
    g = torch.Generator().manual_seed(1)
    for V, D in [(1, 1), (7, 33), (1000, 128), (300, 1024), (20000, 16)]:
        for kind in ("rand", "ties"):
            sc = torch.rand(V, D, generator=g) if kind == "rand" else torch.randint(0, 3, (V, D), generator=g).float()
            if kind == "ties":
                sc[sc == 0] = -0.0
            for k in {1, V * D // 3 + 1, V * D}:
                t = ops.topk_threshold(sc.to(DEV), k)
                rt = ops.topk_threshold(sc, k)
                assert torch.equal(t.cpu(), rt), f"topk_threshold {V}x{D} k={k}: {t.item()} vs {rt.item()}"
                assert torch.equal(ops.prune_counts(sc.to(DEV), t).cpu(), ops.prune_counts(sc, rt))
            dense = torch.randn(V, D, generator=g)
            sizes = torch.randint(0, D + 1, (V,), generator=g)
            off = torch.zeros(V + 1, dtype=torch.int64)
            off[1:] = torch.cumsum(sizes, 0)
            for by_score in (False, True):
                a = ops.prune_pack(dense.to(DEV), sc.to(DEV), off.to(DEV), by_score)
                b = ops.prune_pack(dense, sc, off, by_score)
                assert torch.equal(a.cpu(), b), f"prune_pack {V}x{D} {kind} by_score={by_score}"
    print("topk_threshold, prune_counts, prune_pack: equal to the CPU kernels")


def check_errors():
    w, off, cos, W = make_table(10, 16, [4, 8, 16], torch.float32, DEV, 0)
    idx = torch.tensor([1, 2, 10], device=DEV)
    bo = torch.tensor([0, 3], device=DEV)
    os.environ["PME_CUDA_VALIDATE"] = "1"
    try:
        ops.bag_forward(w, off, idx, bo, None, None, W, 0, -1)
        raise AssertionError("no error for an out-of-range index")
    except RuntimeError as e:
        assert "index out of range: indices[2] = 10" in str(e), str(e)
    os.environ["PME_CUDA_VALIDATE"] = "0"
    out, _ = ops.bag_forward(w, off, idx, bo, None, None, W, 0, -1)  # skipped, no fault
    ops.bag_backward(torch.ones_like(out), w, off, idx, bo, None, None, torch.empty(0, 0, dtype=torch.int64,
                     device=DEV), 0, -1, False)
    torch.cuda.synchronize()
    os.environ["PME_CUDA_VALIDATE"] = "1"
    print("validation: clear error with PME_CUDA_VALIDATE=1, no fault with 0")


def check_graph():
    w, off, cos, W = make_table(1000, 64, [16, 32, 64], torch.float32, DEV, 0)
    idx, bo = batch(1000, 64, 8, torch.int64, 0)
    idx, bo = idx.to(DEV), bo.to(DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, am = ops.bag_forward(w, off, idx, bo, None, None, W, 1, -1)
        gw, _ = ops.bag_backward(torch.ones_like(out), w, off, idx, bo, None, None, am, 1, -1, False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, am_g = ops.bag_forward(w, off, idx, bo, None, None, W, 1, -1)
        gw_g, _ = ops.bag_backward(torch.ones_like(out_g), w, off, idx, bo, None, None, am_g, 1, -1, False)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_g, out) and torch.equal(gw_g, gw)
    print("CUDA graph capture and replay: same results")


def bench():
    os.environ["PME_CUDA_VALIDATE"] = "0"
    V, D, B, L = 10_000_000, 128, 16384, 32
    g = torch.Generator(device=DEV).manual_seed(0)
    # sizes 16/32/64/128, about 26% of the full table's parameters
    probs = torch.tensor([0.45, 0.3, 0.15, 0.1])
    sz = torch.tensor([16, 32, 64, 128])[torch.multinomial(probs, V, replacement=True)]
    off = torch.zeros(V + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(sz, 0)
    off = off.to(DEV)
    w = torch.randn(int(off[-1]), device=DEV, generator=g)
    print(f"table: {V} rows, {w.numel() / (V * D):.1%} of the full parameters")
    for dist in ("zipf", "uniform"):
        if dist == "zipf":
            p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64, device=DEV) ** 1.05
            idx = torch.multinomial((p / p.sum()).float(), B * L, replacement=True, generator=g)
        else:
            idx = torch.randint(0, V, (B * L,), device=DEV, generator=g)
        bo = torch.arange(0, B * L + 1, L, device=DEV)
        go = torch.randn(B, D, device=DEV)

        def t(fn, reps=20):
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(reps):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return sorted(times)[len(times) // 2]

        fwd = t(lambda: ops.bag_forward(w, off, idx, bo, None, None, D, 0, -1))
        bytes_moved = (sz.to(DEV)[idx].sum().item() * 4 + B * D * 4 + idx.numel() * 8 * 2)
        out, am = ops.bag_forward(w, off, idx, bo, None, None, D, 0, -1)
        bwd = t(lambda: ops.bag_backward(go, w, off, idx, bo, None, None, am, 0, -1, False), 10)
        upd = t(lambda: ops.sparse_update_(w, torch.empty(0, device=DEV), torch.empty(0, device=DEV), go, off, idx, bo,
                                           None, None, am, 0, -1, 0, 1e-6, 0.0, 1e-8, 0.9, 0.999, 1), 10)
        print(f"{dist:8s} forward {fwd * 1e3:8.1f} us ({bytes_moved / fwd / 1e9:6.0f} GB/s of the lookup's bytes; "
              f"H100 copy: 2950 GB/s) | backward {bwd:.3f} ms | fused SGD {upd:.3f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(pme.info() if hasattr(pme, "info") else "")
    check_errors()
    check_lookups(a.quick)
    check_prune()
    check_graph()
    if not a.quick:
        bench()
