"""First checks of the CUDA kernels on a GPU machine (written without a GPU; run this first).

    python scripts/selfcheck_cuda.py            # correctness against the CPU kernels + timings
    python scripts/selfcheck_cuda.py --quick    # correctness only

Compares every CUDA operator with the CPU operator of the same build (the CPU kernels define the
semantics), checks bitwise determinism of the backward-shaped operators (also on hot rows that
the backward splits into parts), edge shapes (no bags, no lookups, width 0, all-padding bags),
weights at an unaligned address, the validation errors (PME_CUDA_VALIDATE=1) and the no-sync
mode (=0), CUDA-graph capture of every capturable operator, a second GPU when there is one, and
times the headline configuration (10M x 128 table, sizes 16/32/64/128, 16384 bags x 32 Zipf
lookups). Each check prints one line; the first failing assertion names what differs.
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


def update_(t, go, off, idx, bo, am, mode, pad, opt=0, lr=0.1, weight_decay=0.0, step=1):
    """ops.sparse_update_ of t = [weight, state1, state2] in place (no per-sample weights, padded
    layout, eps 1e-8, betas 0.9 / 0.999); opt 0 SGD (states empty), 1 row-wise Adagrad, 2 Adam."""
    ops.sparse_update_(*t, go, off, idx, bo, None, None, am, mode, pad, opt, lr, weight_decay, 1e-8, 0.9, 0.999, step)


def sgd_state(w):
    """[w, state1, state2] of an SGD step: no optimizer state."""
    return [w, torch.empty(0, device=w.device), torch.empty(0, device=w.device)]


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
        sizes = sorted(
            {0, max(q, D // 4 // q * q), max(q, D // 2 // q * q), D // q * q} | (set() if aligned else {1, D - 1})
        )
        sizes = [s for s in sizes if 0 <= s <= D]
        V = rng.choice([7, 100, 5000])
        w, off, cos, W = make_table(V, D, sizes, dtype, DEV, trial, grouped)
        if rng.random() < 0.25:  # data pointer off the 16-byte grid: the scalar path for every row
            store = torch.zeros(w.numel() + 1, dtype=dtype, device=DEV)
            store[1:].copy_(w)
            w = store[1:]
        idx, bo = batch(
            V,
            rng.choice([1, 5, 300]),
            rng.choice([1, 8, 40]),
            itype,
            trial,
            zipf=rng.random() < 0.5,
            trailing=rng.choice([0, 3]),
        )
        idx, bo = idx.to(DEV), bo.to(DEV)
        mode = rng.choice([0, 1, 2])
        pad = rng.choice([-1, 0, V - 1])
        psw = (
            torch.randn(idx.numel(), dtype=torch.float64).to(dtype).to(DEV)
            if mode == 0 and rng.random() < 0.5
            else None
        )
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
        rgw, rgp = ops.bag_backward(
            cpu(go), cpu(w), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), cpu(am), mode, pad, psw is not None
        )
        close(gw, rgw, dtype, f"bag_backward trial {trial}")
        close(gp, rgp, dtype, f"grad_psw trial {trial}")
        # sparse gradient (sparse=True): the same entries as the CPU, values close, repeatable
        scale = mode != 2 and rng.random() < 0.5
        se, sv = ops.bag_backward_sparse(go, w, off, idx, bo, psw, cos, am, mode, pad, scale)
        se2, sv2 = ops.bag_backward_sparse(go, w, off, idx, bo, psw, cos, am, mode, pad, scale)
        assert torch.equal(se, se2) and torch.equal(sv, sv2), f"bag_backward_sparse not deterministic ({trial})"
        rse, rsv = ops.bag_backward_sparse(
            cpu(go), cpu(w), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), cpu(am), mode, pad, scale
        )
        assert torch.equal(se.cpu(), rse), f"bag_backward_sparse entries differ (trial {trial})"
        close(sv, rsv, dtype, f"bag_backward_sparse trial {trial}")
        # non-pooled
        e = ops.embedding_forward(w, off, idx, cos, W, pad)
        re = ops.embedding_forward(cpu(w), cpu(off), cpu(idx), cpu(cos), W, pad)
        close(e, re, dtype, f"embedding_forward trial {trial}")
        ge = torch.randn(e.shape, dtype=torch.float64).to(dtype).to(DEV)
        close(
            ops.embedding_backward(ge, w, off, idx, cos, pad),
            ops.embedding_backward(cpu(ge), cpu(w), cpu(off), cpu(idx), cpu(cos), pad),
            dtype,
            f"embedding_backward trial {trial}",
        )
        # fused updates and scores
        if True:  # every weight dtype; optimizer state and scores are float32 (float64 for float64)
            sd = torch.float64 if dtype == torch.float64 else torch.float32
            for opt in (0, 1, 2):
                s1 = torch.rand(V if opt == 1 else w.numel(), dtype=sd) if opt else torch.zeros(0, dtype=sd)
                s2 = torch.rand(w.numel(), dtype=sd) if opt == 2 else torch.zeros(0, dtype=sd)
                tensors = [w.clone(), s1.to(DEV), s2.to(DEV)]
                rtensors = [w.cpu().clone(), s1.clone(), s2.clone()]
                args = (mode, pad, opt, 0.05, 0.01, 1e-8, 0.9, 0.999, 3)
                ops.sparse_update_(*tensors, go, off, idx, bo, psw, cos, am, *args)
                ops.sparse_update_(*rtensors, cpu(go), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), cpu(am), *args)
                for a, b in zip(tensors, rtensors):
                    close(a, b, dtype, f"sparse_update_ opt {opt} trial {trial} {dtype}")
            for rule in (0, 1):
                sc = torch.rand(w.numel(), dtype=sd)
                a, b = sc.to(DEV), sc.clone()
                ops.accumulate_scores_(a, go, w, off, idx, bo, psw, cos, am, mode, pad, rule)
                ops.accumulate_scores_(
                    b, cpu(go), cpu(w), cpu(off), cpu(idx), cpu(bo), cpu(psw), cpu(cos), cpu(am), mode, pad, rule
                )
                close(a, b, dtype, f"accumulate_scores_ rule {rule} trial {trial} {dtype}")
        n += 1
    print(f"lookups, backward, updates, scores: {n} random configurations match the CPU kernels")


def check_collection(quick):
    """The collection operators (one call for all tables) against their CPU kernels: forward,
    weight and per_sample_weights gradients, fused SGD / row-wise Adagrad / Adam steps; the
    backward and the steps repeatable bitwise; the whole-table check with and without the memo."""
    from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

    rng = random.Random(1)
    n = 0
    for trial in range(4 if quick else 12):
        dtype = rng.choice([torch.float32, torch.float64, torch.float16, torch.bfloat16])
        weighted = rng.random() < 0.4
        T = rng.choice([1, 3, 6])
        tables, sizes = [], {}
        for t in range(T):
            V, D = rng.choice([1, 9, 300, 4000]), rng.choice([4, 16, 64, 130])
            pool = "sum" if weighted else rng.choice(["sum", "mean"])
            feats = [f"f{t}"] + ([f"g{t}"] if rng.random() < 0.3 else [])
            tables.append(EmbeddingBagConfig(V, D, f"t{t}", feats, pool))
            sizes[f"t{t}"] = torch.randint(0, D + 1, (V,))
        m = MultiSizeEmbeddingBagCollection(tables, sizes, is_weighted=weighted, dtype=dtype)
        B, hot = rng.choice([1, 7, 513]), rng.choice([1, 1, 4, 30])
        itype = rng.choice([torch.int32, torch.int64])
        inp = {}
        for t in tables:
            for f in t.feature_names:
                lens = torch.randint(0, hot + 1, (B,))
                o = torch.zeros(B + 1, dtype=itype)
                o[1:] = lens.cumsum(0)
                v = torch.randint(0, t.num_embeddings, (int(lens.sum()),), dtype=itype)
                inp[f] = (v, o) + ((torch.randn(v.numel(), dtype=torch.float64).to(dtype),) if weighted else ())
        on = lambda d: {k: tuple(x.to(d) for x in item) for k, item in inp.items()}  # noqa: E731
        g = m.to(DEV)
        keys, idx, bo, psw, Bn = g._normal_form(on(DEV))
        fe = g._features(keys)
        args = (g.offsets, g.table_rows, fe, idx, bo, psw, Bn)
        cargs = tuple(x.cpu() if torch.is_tensor(x) else x for x in args)
        out = ops.collection_forward(g.weight, *args, g.out_width)
        ref = ops.collection_forward(g.weight.cpu(), *cargs, g.out_width)
        close(out, ref, dtype, f"collection_forward trial {trial} {dtype}")
        out2 = ops.collection_forward(g.weight, *args, g.out_width, table_checked=True)
        assert torch.equal(out, out2), f"collection_forward with table_checked differs (trial {trial})"
        go = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(DEV)
        gw, gp = ops.collection_backward(go, g.weight, *args, weighted)
        gw2, gp2 = ops.collection_backward(go, g.weight, *args, weighted)
        assert torch.equal(gw, gw2) and torch.equal(gp, gp2), f"collection_backward not deterministic ({trial})"
        rgw, rgp = ops.collection_backward(go.cpu(), g.weight.cpu(), *cargs, weighted)
        close(gw, rgw, dtype, f"collection_backward trial {trial}")
        close(gp, rgp, dtype, f"collection grad_psw trial {trial}")
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        V, total = g.offsets.numel() - 1, g.weight.numel()
        for opt in (0, 1, 2):
            s1 = torch.rand(V if opt == 1 else total, dtype=sd) if opt else torch.zeros(0, dtype=sd)
            s2 = torch.rand(total, dtype=sd) if opt == 2 else torch.zeros(0, dtype=sd)
            hyper = (opt, 0.05, 0.01, 1e-8, 0.9, 0.999, 1.0, 3)  # ..., beta2, grad_scale, step
            runs = []
            for _ in range(2):
                t_ = [g.weight.detach().clone(), s1.clone().to(DEV), s2.clone().to(DEV)]
                ops.collection_update_(*t_, go, *args, *hyper)
                runs.append(t_)
            for a, b in zip(*runs):
                assert torch.equal(a, b), f"collection_update_ opt {opt} not deterministic (trial {trial})"
            r_ = [g.weight.detach().cpu().clone(), s1.clone(), s2.clone()]
            ops.collection_update_(*r_, go.cpu(), *cargs, *hyper)
            for a, b in zip(runs[0], r_):
                close(a, b, dtype, f"collection_update_ opt {opt} trial {trial} {dtype}")
        n += 1
    # The whole table is scanned (rows no lookup touches included) unless table_checked.
    tables = [EmbeddingBagConfig(6, 8, "a", ["fa"])]
    m = MultiSizeEmbeddingBagCollection(tables, {"a": torch.tensor([8, 2, 4, 0, 8, 1])}).to(DEV)
    off = m.offsets.clone()
    off[4] = off[3] - 1
    fe = m._features(["fa"])
    idx, bo = torch.tensor([0, 1], device=DEV), torch.tensor([0, 1, 2], device=DEV)
    try:
        ops.collection_forward(m.weight, off, m.table_rows, fe, idx, bo, None, 2, m.out_width)
        raise AssertionError("a decreasing offset table was not refused by the CUDA collection")
    except RuntimeError as e:
        assert "non-decreasing" in str(e), str(e)
    ops.collection_forward(m.weight, off, m.table_rows, fe, idx, bo, None, 2, m.out_width, table_checked=True)
    torch.cuda.synchronize()
    print(f"collection: {n} random collections match the CPU kernels (forward, gradients, 3 fused steps)")


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
            for by_score, dd in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
                a = ops.prune_pack(dense.to(dd).to(DEV), sc.to(DEV), off.to(DEV), by_score)
                b = ops.prune_pack(dense.to(dd), sc, off, by_score)
                assert torch.equal(a.cpu(), b), f"prune_pack {V}x{D} {kind} by_score={by_score} {dd}"
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
    none = torch.empty(0, 0, dtype=torch.int64, device=DEV)
    go = torch.ones(1, W, device=DEV)
    bad = [  # (call, message fragment), each must raise with PME_CUDA_VALIDATE=1
        (lambda: ops.bag_backward(go, w, off, idx, bo, None, None, none, 0, -1, False), "indices[2] = 10"),
        (
            lambda: update_(sgd_state(w.clone()), go, off, idx, bo, none, 0, -1),
            "indices[2] = 10",
        ),
        (
            lambda: ops.bag_forward(w, off, idx[:2], torch.tensor([0, 2, 1], device=DEV), None, None, W, 0, -1),
            "non-decreasing",
        ),
        (
            lambda: ops.bag_forward(w, off, idx[:2], torch.tensor([0, 3], device=DEV), None, None, W, 0, -1),
            "past the input",
        ),
        (
            lambda: ops.bag_forward(w, off, idx[:2], torch.tensor([1, 2], device=DEV), None, None, W, 0, -1),
            "start at 0",
        ),
        (
            lambda: ops.bag_forward(w, off, idx[:2], torch.tensor([0, 2], device=DEV), None, None, 3, 0, -1),
            "output width 3",
        ),
        (lambda: ops.embedding_forward(w, off, idx, None, W, -1), "indices[2] = 10"),
        (
            lambda: ops.prune_pack(
                torch.zeros(2, 4, device=DEV), torch.zeros(2, 4, device=DEV), torch.tensor([0, 5, 6], device=DEV), False
            ),
            "outside [0, D = 4]",
        ),
    ]
    for call, frag in bad:
        try:
            call()
            raise AssertionError(f"no error (expected one mentioning {frag!r})")
        except RuntimeError as e:
            assert frag in str(e), f"expected {frag!r} in: {e}"
    torch.cuda.synchronize()  # no sticky device error
    os.environ["PME_CUDA_VALIDATE"] = "0"
    out, _ = ops.bag_forward(w, off, idx, bo, None, None, W, 0, -1)  # skipped, no fault
    ops.bag_backward(torch.ones_like(out), w, off, idx, bo, None, None, none, 0, -1, False)
    # mean without validation: the bad lookup is skipped by the forward and by the backward's count
    good = idx[:2]
    for mode in (0, 1, 2):
        out, am = ops.bag_forward(w, off, idx, bo, None, None, W, mode, -1)
        ref, ram = ops.bag_forward(w, off, good, torch.tensor([0, 2], device=DEV), None, None, W, mode, -1)
        assert torch.equal(out, ref), f"PME_CUDA_VALIDATE=0 forward mode {mode}"
        g1, _ = ops.bag_backward(go, w, off, idx, bo, None, None, am, mode, -1, False)
        g2, _ = ops.bag_backward(go, w, off, good, torch.tensor([0, 2], device=DEV), None, None, ram, mode, -1, False)
        assert torch.equal(g1, g2), f"PME_CUDA_VALIDATE=0 backward mode {mode}: skipped lookup changed the gradient"
    torch.cuda.synchronize()
    os.environ["PME_CUDA_VALIDATE"] = "1"
    print("validation: clear errors with PME_CUDA_VALIDATE=1; with 0 no fault, bad lookups skipped consistently")


def check_edges():
    """Shapes at the edges, each against the CPU kernels: no bags, no lookups, width 0, all-empty and
    all-padding bags, a table of empty rows, int32 everything."""
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    w, off, cos, W = make_table(50, 16, [0, 4, 16], torch.float32, DEV, 3)
    z, _, _, _ = make_table(50, 16, [0], torch.float32, DEV, 3)  # every row empty, total 0
    zoff = torch.zeros(51, dtype=torch.int64, device=DEV)
    cases = [  # (weight, offsets, idx, bag_offsets, width, pad)
        (w, off, [], [0], W, -1),  # no bags
        (w, off, [], [0, 0, 0, 0], W, -1),  # bags, no lookups
        (w, off, [1, 2, 3], [0, 0, 3, 3], W, -1),  # empty bags around a full one
        (w, off, [5, 5, 5, 1], [0, 3, 4], W, 5),  # a bag of padding only
        (z, zoff, [1, 2, 3], [0, 2, 3], 16, -1),  # empty rows, empty buffer
        (w, torch.zeros_like(off), [], [0, 0], 0, -1),  # width 0
    ]
    for itype in (torch.int64, torch.int32):
        for k, (wt, o, i, b, width, pad) in enumerate(cases):
            if width == 0:
                wt = torch.zeros(0, device=DEV)
            idx = torch.tensor(i, dtype=itype, device=DEV)
            bo = torch.tensor(b, dtype=itype, device=DEV)
            for mode in (0, 1, 2):
                out, am = ops.bag_forward(wt, o, idx, bo, None, None, width, mode, pad)
                rout, ram = ops.bag_forward(cpu(wt), cpu(o), cpu(idx), cpu(bo), None, None, width, mode, pad)
                assert torch.equal(out.cpu(), rout) and torch.equal(am.cpu(), ram), f"edge case {k} mode {mode}"
                go = torch.randn(out.shape).to(DEV)
                gw, _ = ops.bag_backward(go, wt, o, idx, bo, None, None, am, mode, pad, False)
                rgw, _ = ops.bag_backward(
                    go.cpu(), cpu(wt), cpu(o), cpu(idx), cpu(bo), None, None, ram, mode, pad, False
                )
                assert torch.equal(gw.cpu(), rgw), f"edge case {k} mode {mode}: backward"
                t = [wt.clone(), torch.zeros(50, device=DEV), torch.empty(0, device=DEV)]
                update_(t, go, o, idx, bo, am, mode, pad, opt=1)
            e = ops.embedding_forward(wt, o, idx, None, width, pad)
            assert torch.equal(e.cpu(), ops.embedding_forward(cpu(wt), cpu(o), cpu(idx), None, width, pad))
    torch.cuda.synchronize()
    print("edge shapes (no bags, no lookups, width 0, empty and padding-only bags, empty rows): equal to the CPU")


def check_hot_rows(quick):
    """Rows hit by thousands of lookups (split into parts by the backward): bitwise repeatable, close to
    the CPU (a different but fixed summation order), for the gradient, the fused steps and the scores.
    --quick (also what gpu_session.sh runs under compute-sanitizer) uses 20k lookups and D = 200 only."""
    N = 20_000 if quick else 200_000
    for D in (200,) if quick else (64, 200):  # 200: rows wider than one 128-column chunk (two-pass Adagrad)
        V = 1000
        w, off, cos, W = make_table(V, D, [D // 2, D], torch.float32, DEV, 9)
        g = torch.Generator().manual_seed(10)
        idx = torch.where(torch.rand(N, generator=g) < 0.7, torch.tensor(5), torch.randint(0, 50, (N,), generator=g))
        bo = torch.arange(0, N + 1, 16)
        idx, bo = idx.to(DEV), bo.to(DEV)
        for mode in (0, 1, 2):
            out, am = ops.bag_forward(w, off, idx, bo, None, None, W, mode, 7)
            go = torch.randn(out.shape, generator=g).to(DEV)
            gws = [ops.bag_backward(go, w, off, idx, bo, None, None, am, mode, 7, False)[0] for _ in range(2)]
            assert torch.equal(gws[0], gws[1]), f"hot rows D={D} mode {mode}: backward not deterministic"
            rgw = ops.bag_backward(
                go.cpu(), w.cpu(), off.cpu(), idx.cpu(), bo.cpu(), None, None, am.cpu(), mode, 7, False
            )[0]
            close(gws[0], rgw, torch.float32, f"hot rows D={D} mode {mode}: backward")
            sp = [ops.bag_backward_sparse(go, w, off, idx, bo, None, None, am, mode, 7, mode != 2) for _ in range(2)]
            assert torch.equal(sp[0][0], sp[1][0]) and torch.equal(sp[0][1], sp[1][1]), "hot rows: sparse bwd"
            rsp = ops.bag_backward_sparse(
                go.cpu(), w.cpu(), off.cpu(), idx.cpu(), bo.cpu(), None, None, am.cpu(), mode, 7, mode != 2
            )
            assert torch.equal(sp[0][0].cpu(), rsp[0]), f"hot rows D={D} mode {mode}: sparse entries"
            close(sp[0][1], rsp[1], torch.float32, f"hot rows D={D} mode {mode}: sparse backward")
            for opt in (1, 2):
                res = []
                for dev in (DEV, DEV, "cpu"):
                    t = [
                        w.clone().to(dev),
                        torch.ones(V if opt == 1 else w.numel(), device=dev),
                        torch.ones(w.numel() if opt == 2 else 0, device=dev),
                    ]
                    update_(
                        t, go.to(dev), off.to(dev), idx.to(dev), bo.to(dev), am.to(dev), mode, 7, opt, 0.05, 0.01, 2
                    )
                    res.append(t)
                assert all(torch.equal(a, b) for a, b in zip(res[0], res[1])), f"hot rows: opt {opt} not repeatable"
                for a, b in zip(res[0], res[2]):
                    close(a, b, torch.float32, f"hot rows D={D} mode {mode} opt {opt}")
            sc = [torch.zeros(w.numel(), device=DEV) for _ in range(2)]
            for t in sc:
                ops.accumulate_scores_(t, go, w, off, idx, bo, None, None, am, mode, 7, 0)
            assert torch.equal(sc[0], sc[1]), "hot rows: accumulate_scores_ not repeatable"
    print(f"hot rows (70% of {N} lookups on one row): deterministic, and close to the CPU kernels")


def check_second_device():
    if torch.cuda.device_count() < 2:
        print("second GPU: skipped (one GPU)")
        return
    dev = "cuda:1"
    w, off, cos, W = make_table(300, 32, [8, 32], torch.float32, dev, 11)
    idx, bo = batch(300, 40, 10, torch.int64, 12)
    idx, bo = idx.to(dev), bo.to(dev)
    with torch.cuda.device(0):  # the current device is not the tensors' device
        out, am = ops.bag_forward(w, off, idx, bo, None, None, W, 2, -1)
        gw, _ = ops.bag_backward(torch.ones_like(out), w, off, idx, bo, None, None, am, 2, -1, False)
        t = ops.topk_threshold(w.abs(), 10)
    torch.cuda.synchronize(1)
    rout, _ = ops.bag_forward(w.cpu(), off.cpu(), idx.cpu(), bo.cpu(), None, None, W, 2, -1)
    assert out.device == torch.device(dev) and torch.equal(out.cpu(), rout)
    assert gw.device == torch.device(dev) and t.device == torch.device(dev)
    print("second GPU: kernels run on the tensors' device")


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

    # A training step (max lookup, fused Adam, scores) and the pruning scalars, captured once and
    # replayed on new indices: equal to the same calls run eagerly.
    V = 1000
    go = torch.randn(bo.numel() - 1, W, device=DEV)
    cap = [
        w.clone(),
        torch.zeros(w.numel(), device=DEV),
        torch.zeros(w.numel(), device=DEV),
        torch.zeros(w.numel(), device=DEV),
    ]  # weight, m, v, scores
    eager = [t.clone() for t in cap]
    idx_c = idx.clone()

    def step(t, ix):
        o, a = ops.bag_forward(t[0], off, ix, bo, None, None, W, 2, -1)
        ops.accumulate_scores_(t[3], go, t[0], off, ix, bo, None, None, a, 2, -1, 0)
        update_(t[:3], go, off, ix, bo, a, 2, -1, opt=2, lr=0.01)
        thr = ops.topk_threshold(t[3], 100)
        return o, thr, ops.prune_counts(t[3].reshape(-1, 1), thr)

    warm = [t.clone() for t in cap]
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(warm, idx_c)  # warm-up off the capture, on scratch copies
    torch.cuda.current_stream().wait_stream(s)
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        res_g = step(cap, idx_c)
    for seed in range(3):
        new_idx = torch.randint(0, V, idx.shape, generator=torch.Generator().manual_seed(100 + seed)).to(DEV)
        idx_c.copy_(new_idx)
        graph2.replay()
        res_e = step(eager, new_idx)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(cap, eager)), f"graph replay {seed}: state differs"
        assert all(torch.equal(a, b) for a, b in zip(res_g, res_e)), f"graph replay {seed}: outputs differ"
    print("CUDA graph capture and replay (lookup, backward, fused Adam, scores, topk, counts): same results")


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
        bytes_moved = sz.to(DEV)[idx].sum().item() * 4 + B * D * 4 + idx.numel() * 8 * 2
        out, am = ops.bag_forward(w, off, idx, bo, None, None, D, 0, -1)
        bwd = t(lambda: ops.bag_backward(go, w, off, idx, bo, None, None, am, 0, -1, False), 10)
        upd = t(lambda: update_(sgd_state(w), go, off, idx, bo, am, 0, -1, lr=1e-6), 10)
        print(
            f"{dist:8s} forward {fwd * 1e3:8.1f} us ({bytes_moved / fwd / 1e9:6.0f} GB/s of the lookup's bytes; "
            f"H100 copy: 2950 GB/s) | backward {bwd:.3f} ms | fused SGD {upd:.3f} ms"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(pme.info() if hasattr(pme, "info") else "")
    check_errors()
    check_edges()
    check_lookups(a.quick)
    check_collection(a.quick)
    check_hot_rows(a.quick)
    check_prune()
    check_graph()
    check_second_device()
    if not a.quick:
        bench()
