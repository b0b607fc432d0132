"""pme.MultiSizeEmbeddingBagCollection without TorchRec: plain per-feature input.

Oracles: torch's F.embedding_bag on each table's zero-padded dense view (float64), per-table
pme.MultiSizeEmbeddingBag modules, and a dense float64 optimizer step restricted to the stored
entries. Tables of random sizes (zero and full rows), a feature shared by two tables, sum and
mean pooling, weighted features, empty bags, the largest index, duplicates, int32 and int64.
"""

import pytest
import torch
import torch.nn.functional as F

import pme
from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection, embedding_names

from conftest import DEVICES, random_sizes


def make_collection(seed, pooling="sum", weighted=False, dtype=torch.float64, optimizer=None, shared=True):
    """4 tables (V, D random), random sizes; feature "f0" read by tables t0 and t2 when shared."""
    gen = torch.Generator().manual_seed(seed)
    tables, sizes = [], {}
    feats = [["f0", "f1"], ["f2"], ["f0" if shared else "f5", "f3"], ["f4"]]
    for t in range(4):
        V = int(torch.randint(3, 40, (1,), generator=gen))
        D = [4, 8, 16, 5][t]
        pool = pooling if pooling != "mixed" else ("mean" if t % 2 else "sum")
        tables.append(EmbeddingBagConfig(V, D, f"t{t}", feats[t], pool))
        sizes[f"t{t}"] = random_sizes(V, D, gen)
    m = MultiSizeEmbeddingBagCollection(tables, sizes, is_weighted=weighted, dtype=dtype, optimizer=optimizer)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.numel(), generator=gen, dtype=torch.float64).to(dtype))
    return m, tables, sizes


def make_input(m, B, seed, index_dtype=torch.int64, weighted=False, max_len=5, key_order=None):
    """{feature: (values, offsets [B + 1][, weights])}: empty bags, largest index, duplicates."""
    gen = torch.Generator().manual_seed(seed + 1000)
    rows = {}
    for t in m._tables:
        for f in t.feature_names:
            rows[f] = min(rows.get(f, t.num_embeddings), t.num_embeddings)
    keys = key_order or sorted(rows)
    out = {}
    for f in keys:
        lens = torch.randint(0, max_len + 1, (B,), generator=gen)
        if B >= 2:
            lens[0] = 0
        n = int(lens.sum())
        v = torch.randint(0, rows[f], (n,), generator=gen)
        if n >= 3:
            v[0] = rows[f] - 1
            v[1] = v[2]
        o = torch.zeros(B + 1, dtype=torch.int64)
        o[1:] = lens.cumsum(0)
        item = (v.to(index_dtype), o.to(index_dtype))
        if weighted:
            item = item + (torch.randn(n, generator=gen, dtype=torch.float64).to(m.weight.dtype),)
        out[f] = item
    return out


def dense_oracle(m, inp, dense=None):
    """{output key: F.embedding_bag on the dense view}, the dense views (float64, requiring grad)."""
    if dense is None:
        dense = {t.name: m.to_dense(t.name).detach().double().requires_grad_() for t in m._tables}
    res = {}
    names = iter(embedding_names(m._tables))
    for t in m._tables:
        for f in t.feature_names:
            item = inp[f]
            psw = item[2].double() if len(item) == 3 and m.is_weighted else None
            res[next(names)] = F.embedding_bag(
                item[0].long(),
                dense[t.name],
                item[1].long(),
                mode=t.pooling,
                per_sample_weights=psw,
                include_last_offset=True,
            )
    return res, dense


def stored_mask(m, name):
    s = m.sizes(name)
    t = m._tables[m._table_index(name)]
    return torch.arange(t.embedding_dim).unsqueeze(0) < s.unsqueeze(1)


@pytest.mark.parametrize(
    "pooling,weighted,index_dtype",
    [
        ("sum", False, torch.int64),
        ("mean", False, torch.int32),
        ("sum", True, torch.int32),
        ("mixed", False, torch.int64),
        ("sum", True, torch.int64),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_len", [5, 1], ids=["multi-hot", "one-hot"])  # one-hot: the kernel's copy path
def test_forward_and_gradients_equal_dense_view(pooling, weighted, index_dtype, seed, max_len):
    m, tables, sizes = make_collection(seed, pooling, weighted)
    B = 6 if max_len > 1 else 70  # one-hot: more than one 64-bag run per block
    inp = make_input(m, B, seed, index_dtype, weighted, max_len=max_len, key_order=["f4", "f3", "f2", "f1", "f0"])
    if weighted:
        inp = {k: (v, o, w.clone().requires_grad_()) for k, (v, o, w) in inp.items()}
    out = m(inp)
    assert isinstance(out, pme.collection.KeyedOutput)
    assert out.keys() == ["f0@t0", "f1", "f2", "f0@t2", "f3", "f4"]
    assert out.values().shape == (B, m.out_width) and out.values().dtype == torch.float64
    ref, dense = dense_oracle(m, {k: tuple(x.detach() for x in item) for k, item in inp.items()})
    for k, v in out.to_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-10, atol=1e-10, msg=k)
    # Gradients: the dense gradient restricted to the stored entries, table by table.
    go = torch.randn_like(out.values())
    out.values().backward(go)
    torch.autograd.backward(
        [ref[k] for k in out.keys()], [go[:, a:b] for a, b in zip(out.offset_per_key()[:-1], out.offset_per_key()[1:])]
    )
    for i, t in enumerate(m._tables):
        _, _, e0, e1 = m._row_span(i)
        got = m.weight.grad[e0:e1]
        want = dense[t.name].grad[stored_mask(m, t.name)]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=t.name)
    if weighted:
        # f0 feeds two tables: its weights' gradient is the sum of both blocks'.
        inp2 = {k: (v, o, w.detach().clone().requires_grad_()) for k, (v, o, w) in inp.items()}
        ref2, _ = dense_oracle(m, inp2)
        torch.autograd.backward(
            [ref2[k] for k in out.keys()],
            [go[:, a:b] for a, b in zip(out.offset_per_key()[:-1], out.offset_per_key()[1:])],
        )
        for k in inp:
            torch.testing.assert_close(inp[k][2].grad, inp2[k][2].grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_len", [5, 1], ids=["multi-hot", "one-hot"])
def test_forward_dtypes_match_per_table_modules(dtype, max_len):
    """Each output block equals a per-table pme.MultiSizeEmbeddingBag on the same rows, bitwise
    (the one-hot copy path rounds as the pooling kernels do)."""
    m, tables, sizes = make_collection(5, "mixed", dtype=dtype)
    # more than one 64-bag run per block: a run's bags are pooled straight into output rows 64 on
    inp = make_input(m, 70 if max_len > 1 else 130, 5, torch.int64, max_len=max_len)
    out = m(inp).to_dict()
    names = iter(m.embedding_names())
    for t in tables:
        single = pme.MultiSizeEmbeddingBag(
            t.num_embeddings,
            t.embedding_dim,
            sizes=sizes[t.name],
            mode=t.pooling,
            include_last_offset=True,
            dtype=dtype,
        )
        with torch.no_grad():
            single.weight.copy_(m.table_weight(t.name))
        for f in t.feature_names:
            v, o = inp[f]
            torch.testing.assert_close(out[next(names)], single(v, o), rtol=0, atol=0)


def test_full_sizes_equal_nn_embedding_bag_float32():
    m, tables, _ = make_collection(7, "mixed", dtype=torch.float32)
    full = MultiSizeEmbeddingBagCollection(tables, None, dtype=torch.float32)
    inp = make_input(full, 11, 7)
    out = full(inp).to_dict()
    names = iter(full.embedding_names())
    for t in tables:
        dense = full.to_dense(t.name)
        assert torch.equal(dense.reshape(-1), full.table_weight(t.name))  # full rows: the flat buffer is dense
        eb = torch.nn.EmbeddingBag.from_pretrained(dense, mode=t.pooling, include_last_offset=True)
        for f in t.feature_names:
            torch.testing.assert_close(out[next(names)], eb(*inp[f]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_no_grad_forward_equals_graded_forward(weighted):
    """Without a gradient wanted (no_grad, inference mode) the collection's forward dispatches past
    the autograd wrapper: the graded call's values, no grad_fn; a frozen collection with graded
    per-sample weights still gets their gradient."""
    m, _, _ = make_collection(3, "sum", weighted=weighted)
    inp = make_input(m, 9, 3, weighted=weighted)
    graded = m(inp).values()
    assert graded.grad_fn is not None
    with torch.no_grad():
        plain = m(inp).values()
    with torch.inference_mode():
        inference = m(inp).values()
    for out in (plain, inference):
        assert out.grad_fn is None and torch.equal(out, graded.detach())
    if weighted:
        for p in m.parameters():
            p.requires_grad_(False)
        weights = {f: (v, o, w.clone().requires_grad_(True)) for f, (v, o, w) in inp.items()}
        m(weights).values().sum().backward()
        assert all(w.grad is not None for _, _, w in weights.values())


def test_all_empty_and_zero_batch():
    m, _, _ = make_collection(3, "mean")
    inp = {
        f: (torch.zeros(0, dtype=torch.int64), torch.zeros(5, dtype=torch.int64))
        for f in ["f0", "f1", "f2", "f3", "f4"]
    }
    out = m(inp).values()
    assert out.shape == (4, m.out_width) and bool((out == 0).all())
    out.sum().backward()
    assert bool((m.weight.grad == 0).all())
    inp = {
        f: (torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        for f in ["f0", "f1", "f2", "f3", "f4"]
    }
    assert m(inp).values().shape == (0, m.out_width)


def _dense_step(m, inp, go, opt, state, step):
    """Reference fused step on the dense float64 views: summed gradient, rows the batch touches."""
    ref, dense = dense_oracle(m, inp)
    out_keys = m.embedding_names()
    offs = [0]
    for t in m._tables:
        for _ in t.feature_names:
            offs.append(offs[-1] + t.embedding_dim)
    torch.autograd.backward([ref[k] for k in out_keys], [go[:, a:b] for a, b in zip(offs[:-1], offs[1:])])
    new = {}
    for t in m._tables:
        w = dense[t.name].detach().clone()
        g = dense[t.name].grad
        mask = stored_mask(m, t.name)
        touched = torch.zeros(t.num_embeddings, dtype=torch.bool)
        for f in t.feature_names:
            v, o = inp[f][0], inp[f][1]
            touched[v[: int(o[-1])].long()] = True
        s1, s2, mm = state[t.name]
        for r in touched.nonzero().flatten().tolist():
            n = int(mask[r].sum())
            gr = g[r, :n] + opt.weight_decay * w[r, :n]
            if opt.name == "sgd":
                w[r, :n] -= opt.lr * gr
            elif opt.name == "rowwise_adagrad":
                if n:
                    s1[r] += (gr * gr).mean()
                    w[r, :n] -= opt.lr * gr / (s1[r].sqrt() + opt.eps)
            else:
                mm[r, :n] = opt.beta1 * mm[r, :n] + (1 - opt.beta1) * gr
                s2[r, :n] = opt.beta2 * s2[r, :n] + (1 - opt.beta2) * gr * gr
                bc1, bc2 = 1 - opt.beta1**step, 1 - opt.beta2**step
                w[r, :n] -= opt.lr * bc2**0.5 / bc1 * mm[r, :n] / (s2[r, :n].sqrt() + opt.eps)
        new[t.name] = w
    return new


@pytest.mark.parametrize("opt_name", ["rowwise_adagrad", "sgd", "adam"])
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mixed", False), ("sum", True)])
def test_fused_optimizer_trajectory_equals_dense_steps(opt_name, pooling, weighted):
    opt = {
        "rowwise_adagrad": pme.optim.RowwiseAdagrad(lr=0.3, eps=1e-6),
        "sgd": pme.optim.SGD(lr=0.2, weight_decay=0.01),
        "adam": pme.optim.Adam(lr=0.05, weight_decay=0.01),
    }[opt_name]
    m, tables, _ = make_collection(11, pooling, weighted, optimizer=opt)
    assert not m.weight.requires_grad
    state = {
        t.name: (
            torch.zeros(t.num_embeddings, dtype=torch.float64),
            torch.zeros(t.num_embeddings, t.embedding_dim, dtype=torch.float64),
            torch.zeros(t.num_embeddings, t.embedding_dim, dtype=torch.float64),
        )
        for t in m._tables
    }
    for step in range(1, 5):
        inp = make_input(m, 7, 100 + step, torch.int32 if step % 2 else torch.int64, weighted)
        go = torch.randn(7, m.out_width, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        if weighted:  # the weights' gradient, from the table before the step (a feature read by two tables: both)
            inp = {k: (v, o, w.clone().requires_grad_()) for k, (v, o, w) in inp.items()}
            ref_in = {k: (v, o, w.detach().clone().requires_grad_()) for k, (v, o, w) in inp.items()}
            ref, _ = dense_oracle(m, ref_in)
            keys = embedding_names(m._tables)
            cols = torch.tensor([0] + [ref[k].shape[1] for k in keys]).cumsum(0).tolist()
            torch.autograd.backward([ref[k] for k in keys], [go[:, a:b] for a, b in zip(cols[:-1], cols[1:])])
        want = _dense_step(m, {k: tuple(x.detach() for x in item) for k, item in inp.items()}, go, opt, state, step)
        out = m(inp).values()
        out.backward(go)
        assert m.weight.grad is None
        if weighted:
            for k in inp:
                torch.testing.assert_close(inp[k][2].grad, ref_in[k][2].grad, rtol=1e-10, atol=1e-12, msg=k)
        for t in m._tables:
            torch.testing.assert_close(
                m.to_dense(t.name), want[t.name], rtol=1e-10, atol=1e-12, msg=f"{t.name} step {step}"
            )
    assert int(m.optim_step) == 4


def test_state_dict_per_table_round_trip_and_other_sizes():
    m, tables, sizes = make_collection(4, "mixed", optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    m(make_input(m, 5, 4)).values().sum().backward()
    sd = m.state_dict()
    want = {
        f"embedding_bags.{t.name}.{k}" for t in tables for k in ("weight", "offsets", "optim_state1", "optim_state2")
    } | {"optim_step"}
    assert set(sd) == want
    assert m._state_per_row() == {"optim_state1": "rows", "optim_state2": "none"}
    t1 = m._tables[1]
    assert sd["embedding_bags.t1.offsets"][0] == 0 and sd["embedding_bags.t1.offsets"].shape == (t1.num_embeddings + 1,)
    assert sd["embedding_bags.t1.optim_state1"].shape == (t1.num_embeddings,)
    # Into a collection of other sizes: it takes the checkpoint's sizes and values.
    other = MultiSizeEmbeddingBagCollection(tables, 1, dtype=torch.float64, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    other.load_state_dict(sd)
    for t in tables:
        assert torch.equal(other.to_dense(t.name), m.to_dense(t.name))
        assert torch.equal(other.sizes(t.name), m.sizes(t.name))
    assert torch.equal(other.optim_state1, m.optim_state1) and int(other.optim_step) == 1
    inp = make_input(m, 5, 9)
    torch.testing.assert_close(other(inp).values(), m(inp).values(), rtol=0, atol=0)
    # A bad table leaves everything as it was (all or nothing).
    bad = dict(sd)
    off = bad["embedding_bags.t3.offsets"].clone()
    off[2] = off[1] - 1
    bad["embedding_bags.t3.offsets"] = off
    before = other.weight.detach().clone()
    with pytest.raises(RuntimeError, match="t3.*non-decreasing"):
        other.load_state_dict(bad)
    assert torch.equal(other.weight.detach(), before)
    bad = dict(sd)
    del bad["embedding_bags.t0.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(bad)


def _corrupt_state(sd, what):
    sd = dict(sd)
    if what == "step_negative":
        sd["optim_step"] = torch.tensor(-1)
    elif what == "step_float":
        sd["optim_step"] = torch.tensor(2.0)
    elif what == "step_cannot_increment":
        sd["optim_step"] = torch.tensor(2**63 - 1)
    elif what == "second_moment_negative":
        s = sd["embedding_bags.t2.optim_state2"].clone()
        s[-1] = -1.0
        sd["embedding_bags.t2.optim_state2"] = s
    elif what == "first_moment_nan":
        s = sd["embedding_bags.t1.optim_state1"].clone()
        s[0] = float("nan")
        sd["embedding_bags.t1.optim_state1"] = s
    elif what == "moment_short":
        sd["embedding_bags.t3.optim_state1"] = sd["embedding_bags.t3.optim_state1"][:-1].clone()
    return sd


@pytest.mark.parametrize(
    "what",
    [
        "step_negative",
        "step_float",
        "step_cannot_increment",
        "second_moment_negative",
        "first_moment_nan",
        "moment_short",
    ],
)
def test_adam_state_per_entry_round_trip_and_bad_state_changes_nothing(what):
    """Adam's state is per stored entry: each table saves its own slice, a checkpoint of other
    sizes brings its state, and a bad step count or moment leaves the collection as it was."""
    m, tables, _ = make_collection(6, "mixed", optimizer=pme.optim.Adam(lr=0.05))
    for step in range(2):
        m(make_input(m, 5, 30 + step)).values().sum().backward()
    sd = m.state_dict()
    assert m._state_per_row() == {"optim_state1": "entries", "optim_state2": "entries"}
    for i, t in enumerate(m._tables):
        _, _, e0, e1 = m._row_span(i)
        for k in ("optim_state1", "optim_state2"):
            assert torch.equal(sd[f"embedding_bags.{t.name}.{k}"], getattr(m, k)[e0:e1])
    other = MultiSizeEmbeddingBagCollection(tables, 2, dtype=torch.float64, optimizer=pme.optim.Adam(lr=0.05))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match="optim_s"):
        other.load_state_dict(_corrupt_state(sd, what))
    after = other.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    other.load_state_dict(sd)
    assert int(other.optim_step) == 2 and other.optim_state1.shape == (m.weight.numel(),)
    assert torch.equal(other.optim_state1, m.optim_state1) and torch.equal(other.optim_state2, m.optim_state2)
    inp = make_input(m, 5, 40)
    for mod in (m, other):  # the same next step from the same state
        mod(inp).values().sum().backward()
    assert torch.equal(other.weight, m.weight) and torch.equal(other.optim_state2, m.optim_state2)


def test_from_dense_keeps_first_entries_and_repr():
    tables = [EmbeddingBagConfig(10, 8, "a", ["x"]), EmbeddingBagConfig(6, 4, "b", ["y"], "mean")]
    dense = {"a": torch.randn(10, 8), "b": torch.randn(6, 4)}
    sizes = {"a": torch.randint(0, 9, (10,)), "b": 2}
    m = MultiSizeEmbeddingBagCollection.from_dense(tables, dense, sizes)
    assert torch.equal(m.to_dense("a"), dense["a"] * stored_mask(m, "a"))
    assert torch.equal(m.to_dense("b"), dense["b"] * stored_mask(m, "b"))
    assert m.memory_report()["stored_entries"] == int(sizes["a"].sum()) + 12
    r = repr(m)
    assert "(a): 10 x 8" in r and "pooling='mean'" in r


def test_dict_input_checks_each_feature_and_ignores_unread_ones():
    """Weights of the wrong length for one feature (the totals may still agree), float offsets or
    values are refused with the feature's name; a feature no table reads is ignored, as
    EmbeddingBagCollection does, even when its own offsets are bad."""
    tables = [EmbeddingBagConfig(10, 2, "a", ["f1"]), EmbeddingBagConfig(10, 2, "b", ["f2"])]
    m = MultiSizeEmbeddingBagCollection(tables, is_weighted=True)
    # is_weighted is TorchRec's method and pme's bool attribute at once
    assert m.is_weighted() is True and m.is_weighted and not MultiSizeEmbeddingBagCollection(tables).is_weighted
    t = torch.tensor
    ok = {"f1": (t([0, 1, 2]), t([0, 3]), torch.ones(3)), "f2": (t([5]), t([0, 1]), t([2.0]))}
    with pytest.raises(ValueError, match=r"feature 'f1': weights must be 1-D with one entry per value \(3\)"):
        m({"f1": (t([0, 1, 2]), t([0, 3]), torch.ones(2)), "f2": (t([5]), t([0, 1]), t([1.0, 100.0]))})
    with pytest.raises(TypeError, match="feature 'f2': offsets must be int32 or int64, got torch.float32"):
        m({**ok, "f2": (t([5]), t([0.0, 1.0]), t([2.0]))})
    with pytest.raises(TypeError, match="feature 'f1': values must be int32 or int64, got torch.bool"):
        m({**ok, "f1": (t([True, False, True]), t([0, 3]), torch.ones(3))})
    want = m(ok).values()
    got = m({**ok, "unread": (t([5, 6]), t([0, 3, 2]))}).values()
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="none of the features the collection reads"):
        m({"unread": (t([5]), t([0, 1]))})


def test_partial_checkpoint_loads_the_whole_tables_it_holds():
    """strict=False with some tables' keys: those tables are loaded, the others kept, the missing keys
    reported; strict=True changes nothing and raises for them."""
    cf = [EmbeddingBagConfig(6, 4, "a", ["f1"]), EmbeddingBagConfig(8, 2, "b", ["f2"])]
    src = MultiSizeEmbeddingBagCollection(cf, 2)
    dst = MultiSizeEmbeddingBagCollection(cf)
    b_before = dst.to_dense("b").detach().clone()
    got = dst.load_state_dict({k: v for k, v in src.state_dict().items() if ".a." in k}, strict=False)
    assert got.missing_keys == ["embedding_bags.b.weight", "embedding_bags.b.offsets"]
    assert torch.equal(dst.to_dense("a"), src.to_dense("a")) and torch.equal(dst.to_dense("b"), b_before)
    assert torch.equal(dst.sizes("a"), src.sizes("a"))
    fresh = MultiSizeEmbeddingBagCollection(cf)
    w0 = fresh.weight.detach().clone()
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: all or nothing
        fresh.load_state_dict({k: v for k, v in src.state_dict().items() if ".a." in k})
    assert torch.equal(fresh.weight, w0) and fresh.sizes("a").tolist() == [4] * 6
    # a dense [V, D] table (an EmbeddingBagCollection's checkpoint has these keys) keeps the sizes
    dense = {"embedding_bags.a.weight": torch.randn(6, 4), "embedding_bags.b.weight": torch.randn(8, 2)}
    assert not dst.load_state_dict(dense).missing_keys
    assert torch.equal(dst.to_dense("a"), dense["embedding_bags.a.weight"] * stored_mask(dst, "a"))
    assert torch.equal(dst.to_dense("b"), dense["embedding_bags.b.weight"])
    # weights without the fused optimizer's state: taken, with a fresh state
    fused = MultiSizeEmbeddingBagCollection(cf, optimizer=pme.optim.Adam(lr=0.1))
    fused(make_input(fused, 3, 0)).values().sum().backward()
    assert int(fused.optim_step) == 1
    assert not fused.load_state_dict(src.state_dict()).missing_keys
    assert torch.equal(fused.to_dense("a"), src.to_dense("a")) and int(fused.optim_step) == 0
    assert float(fused.optim_state1.abs().sum()) == 0 and fused.optim_state1.numel() == fused.weight.numel()


def test_from_dense_refuses_mixed_dtypes_unless_told():
    tables = [EmbeddingBagConfig(10, 4, "a", ["x"]), EmbeddingBagConfig(6, 4, "b", ["y"])]
    dense = {"a": torch.randn(10, 4).half(), "b": torch.randn(6, 4)}
    with pytest.raises(ValueError, match="different dtypes"):
        MultiSizeEmbeddingBagCollection.from_dense(tables, dense)
    m = MultiSizeEmbeddingBagCollection.from_dense(tables, dense, dtype=torch.float32)
    assert m.weight.dtype == torch.float32 and torch.equal(m.to_dense("b"), dense["b"])


def test_from_dense_checks_the_table_names_of_dense_and_scores():
    """scores (and dense) keyed by a name the collection does not have are refused, not ignored
    (a misspelt name would keep each row's first entries instead of its best); a missing dense
    table, a list of another length and scores of another shape say which."""
    tables = [EmbeddingBagConfig(10, 4, "a", ["x"]), EmbeddingBagConfig(6, 2, "b", ["y"])]
    gen = torch.Generator().manual_seed(0)
    dense = {"a": torch.randn(10, 4, generator=gen), "b": torch.randn(6, 2, generator=gen)}
    best = MultiSizeEmbeddingBagCollection.from_dense(tables, dense, {"a": 2}, scores={"a": dense["a"].abs()})
    kept = dense["a"].gather(1, dense["a"].abs().topk(2, 1).indices.sort(1).values)
    torch.testing.assert_close(best.to_dense("a")[:, :2], kept, rtol=0, atol=0)
    with pytest.raises(KeyError, match=r"scores names tables \['A'\] that the collection does not have"):
        MultiSizeEmbeddingBagCollection.from_dense(tables, dense, {"a": 2}, scores={"A": dense["a"].abs()})
    with pytest.raises(KeyError, match=r"dense names tables \['c'\]"):
        MultiSizeEmbeddingBagCollection.from_dense(tables, {**dense, "c": torch.zeros(3, 2)})
    with pytest.raises(KeyError, match=r"dense has no weight for tables \['b'\]"):
        MultiSizeEmbeddingBagCollection.from_dense(tables, {"a": dense["a"]})
    with pytest.raises(ValueError, match="dense has 1 entries but there are 2 tables"):
        MultiSizeEmbeddingBagCollection.from_dense(tables, [dense["a"]])
    with pytest.raises(ValueError, match=r"table 'a': scores have shape \(10, 3\), expected \(10, 4\)"):
        MultiSizeEmbeddingBagCollection.from_dense(tables, dense, 2, scores=[torch.rand(10, 3), None])


def test_bad_input_raises_clear_errors():
    m, _, _ = make_collection(2, "mixed")
    inp = make_input(m, 4, 2)
    t2 = m._tables[2]
    # An index valid for a larger table but not for the one that reads it.
    v, o = inp["f3"]
    v = v.clone()
    v[-1] = t2.num_embeddings
    # said with the feature's and the table's names and the position in the feature's own values
    at = v.numel() - 1
    with pytest.raises(
        RuntimeError,
        match=f"index out of range: feature 'f3' value {at} is {t2.num_embeddings}, but table 't2' has "
        f"{t2.num_embeddings} rows",
    ):
        m({**inp, "f3": (v, o)})
    v[-1] = -1
    with pytest.raises(RuntimeError, match=f"index out of range: feature 'f3' value {at} is -1, but table 't2'"):
        m({**inp, "f3": (v, o)})
    # the raw operator keeps its positions in the concatenated input and the tables' numbers
    keys, idx, bo, psw, B = m._normal_form({**inp, "f3": (v, o)})
    with pytest.raises(RuntimeError, match=r"index out of range: indices\[\d+\] = -1 \(key \d+, output block"):
        m._lookup(pme.collection.CollectionRows(None, idx, bo, m._features(keys), psw, B))
    with pytest.raises(KeyError, match="no feature 'f4'"):
        m({k: x for k, x in inp.items() if k != "f4"})
    with pytest.raises(ValueError, match="same batch size"):
        m({**inp, "f4": (torch.zeros(0, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))})
    with pytest.raises(ValueError, match="offsets must start at 0"):
        m({**inp, "f4": (inp["f4"][0], inp["f4"][1] + 1)})
    with pytest.raises(TypeError, match="int32 or int64"):
        m({k: (x[0].float(), x[1]) for k, x in inp.items()})
    wm, _, _ = make_collection(2, "sum", weighted=True)
    winp = make_input(wm, 4, 2, weighted=True)
    with pytest.raises(ValueError, match=r"every feature carries weights or none does: features \['f2'\] have none"):
        wm({**winp, "f2": winp["f2"][:2]})
    with pytest.raises(ValueError, match="is_weighted=True needs sum pooling"):
        MultiSizeEmbeddingBagCollection([EmbeddingBagConfig(4, 4, "a", ["x"], "mean")], is_weighted=True)
    with pytest.raises(ValueError, match="unique"):
        MultiSizeEmbeddingBagCollection([EmbeddingBagConfig(4, 4, "a", ["x"]), EmbeddingBagConfig(4, 4, "a", ["y"])])
    with pytest.raises(ValueError, match="outside"):
        MultiSizeEmbeddingBagCollection([EmbeddingBagConfig(4, 4, "a", ["x"])], {"a": 5})


def test_bad_sizes_and_misplaced_input_name_their_table_or_feature():
    """A bad sizes entry says which table it is for; a feature whose values, offsets or weights
    are on another device than the collection says which feature and which tensor (not torch's
    error from concatenating the features)."""
    cfgs = [EmbeddingBagConfig(4, 4, "a", ["x"]), EmbeddingBagConfig(6, 2, "b", ["y"])]
    with pytest.raises(ValueError, match=r"table 'b': sizes\[0\] = 3 is outside \[0, embedding_dim = 2\]"):
        MultiSizeEmbeddingBagCollection(cfgs, {"a": 4, "b": 3})
    with pytest.raises(ValueError, match="table 'b': sizes has 2 entries but the table has 6 rows"):
        MultiSizeEmbeddingBagCollection(cfgs, [None, [1, 2]])
    with pytest.raises(ValueError, match="table 'a': sizes"):
        MultiSizeEmbeddingBagCollection.from_dense(cfgs, [torch.zeros(4, 4), torch.zeros(6, 2)], {"a": 5})
    m = MultiSizeEmbeddingBagCollection(cfgs, is_weighted=True)
    t = torch.tensor
    ok = {"x": (t([1, 2]), t([0, 1, 2]), t([1.0, 2.0])), "y": (t([3]), t([0, 0, 1]), t([0.5]))}
    assert m(ok).values().shape == (2, 6)
    meta = torch.device("meta")  # another device than the collection's, on every machine
    for i, what in enumerate(("values", "offsets", "weights")):
        item = list(ok["y"])
        item[i] = item[i].to(meta)
        with pytest.raises(ValueError, match=f"feature 'y': its {what} are on meta but the collection is on cpu"):
            m({"x": ok["x"], "y": tuple(item)})


def _normal(m, inp):
    keys, idx, bo, psw, B = m._normal_form(inp)
    return m._features(keys), idx, bo, psw, B


def _adagrad_args(weight, state1, grad_out, table):
    """collection_update_'s arguments for one row-wise Adagrad step (optimizer 1: state1 [V], no
    state2) of ``weight`` by ``grad_out``; ``table`` = (offsets, table_rows, features, indices,
    bag_offsets, per_sample_weights, B)."""
    return (weight, state1, torch.zeros(0, dtype=weight.dtype), grad_out, *table, 1, 0.1, 0.0, 1e-8, 0.9, 0.999, 1.0, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_an_empty_batch_still_checks_its_features(device):
    """With no samples (B = 0) a feature's key cannot be checked (bag_offsets has one entry for any
    number of keys), but its table, columns and pooling can: every operator refuses a bad one, on
    every device (the CUDA kernels checked blocks only with bags)."""
    m, _, _ = make_collection(2, "sum")
    m = m.to(device)
    empty = {k: (v[:0].to(device), o[:1].to(device)) for k, (v, o) in make_input(m, 4, 2).items()}
    feats, idx, bo, psw, B = _normal(m, empty)
    assert B == 0
    w, off, tr = m.weight.detach(), m.offsets, m.table_rows
    go = torch.zeros(0, m.out_width, dtype=w.dtype, device=device)
    for col, value, says in ((4, 2, "pooling must be 0"), (0, 9, "table 9 is out of range")):
        f = feats.clone()
        f[1, col] = value
        with pytest.raises(RuntimeError, match=says):
            torch.ops.pme.collection_forward(w, off, tr, f, idx, bo, None, 0, m.out_width)
        with pytest.raises(RuntimeError, match=says):
            torch.ops.pme.collection_backward(go, w, off, tr, f, idx, bo, None, 0, False)


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_decreasing_bag_offsets_never_fault(device, monkeypatch):
    """Bag offsets that decrease inside a feature: the CPU refuses them always; CUDA with
    PME_CUDA_VALIDATE=0 skips the check and must still stay inside its buffers (the backward's
    virtual lookup sized each block from its first and last bags only)."""
    monkeypatch.setenv("PME_CUDA_VALIDATE", "0")
    m, _, _ = make_collection(3, "sum")
    m = m.to(device)
    feats, idx, bo, psw, B = _normal(m, {k: (v.to(device), o.to(device)) for k, (v, o) in make_input(m, 4, 3).items()})
    bad = bo.clone()
    bad[1] = bo[B]  # bag 0 of key 0 runs to the end of the key, bag 1 starts back at bo[1]'s old place
    w, off, tr = m.weight.detach(), m.offsets, m.table_rows
    go = torch.randn(B, m.out_width, dtype=w.dtype, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="bag offsets must be non-decreasing"):
            torch.ops.pme.collection_backward(go, w, off, tr, feats, idx, bad, None, B, False)
        return
    gw, _ = torch.ops.pme.collection_backward(go, w, off, tr, feats, idx, bad, None, B, False)
    torch.cuda.synchronize()
    assert gw.shape == w.shape and bool(torch.isfinite(gw).all())
    s1 = torch.zeros(off.numel() - 1, dtype=pme.ops.acc_dtype(w.dtype), device=device)
    torch.ops.pme.collection_update_(*_adagrad_args(w.clone(), s1, go, (off, tr, feats, idx, bad, None, B)))
    torch.cuda.synchronize()


def test_blocks_writing_the_same_columns_are_refused():
    """Two output blocks on one column would race for it and leave other columns unwritten
    (uninitialised output): forward, backward and the fused update refuse them; gaps are fine."""
    m, _, _ = make_collection(2, "sum")
    feats, idx, bo, psw, B = _normal(m, make_input(m, 4, 2))
    w, off, tr = m.weight.detach(), m.offsets, m.table_rows
    f = feats.clone()
    f[1, 2] = f[0, 2] + f[0, 3] - 1  # block 1 starts on block 0's last column
    go = torch.randn(B, m.out_width, dtype=w.dtype)
    msg = r"features\[0\] and features\[1\] write overlapping output columns"
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pme.collection_forward(w, off, tr, f, idx, bo, None, B, m.out_width)
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pme.collection_backward(go, w, off, tr, f, idx, bo, None, B, False)
    w2, s1 = w.clone(), torch.zeros(off.numel() - 1, dtype=pme.ops.acc_dtype(w.dtype))
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.pme.collection_update_(*_adagrad_args(w2, s1, go, (off, tr, f, idx, bo, None, B)))
    assert torch.equal(w2, w) and not s1.any()
    # a gap instead: every block moved one column right in a wider output, column 0 is zero
    g = feats.clone()
    g[:, 2] += 1
    out = torch.ops.pme.collection_forward(w, off, tr, g, idx, bo, None, B, m.out_width + 1)
    ref = torch.ops.pme.collection_forward(w, off, tr, feats, idx, bo, None, B, m.out_width)
    assert torch.equal(out[:, 1:], ref) and not out[:, 0].any()


def test_operator_validation_is_overflow_safe():
    m, _, _ = make_collection(2, "sum")
    feats, idx, bo, psw, B = _normal(m, make_input(m, 4, 2))
    w, off, tr = m.weight.detach(), m.offsets, m.table_rows
    op = torch.ops.pme.collection_forward
    op(w, off, tr, feats, idx, bo, None, B, m.out_width)  # fine as it is
    cases = [
        (lambda f: f.__setitem__((0, 0), 4), "table 4 is out of range"),
        (lambda f: f.__setitem__((0, 1), 9), "key 9 is out of range"),
        (lambda f: f.__setitem__((0, 2), 2**62), "do not fit in the output width"),
        (lambda f: (f.__setitem__((0, 2), 2**62), f.__setitem__((0, 3), 2**62)), "do not fit"),
        (lambda f: f.__setitem__((0, 3), -1), "do not fit"),
        (lambda f: f.__setitem__((0, 4), 2), "pooling must be 0"),
    ]
    for change, msg in cases:
        f = feats.clone()
        change(f)
        with pytest.raises(RuntimeError, match=msg):
            op(w, off, tr, f, idx, bo, None, B, m.out_width)
    with pytest.raises(RuntimeError, match="table_rows\\[-1\\]"):
        op(w, off, tr - torch.arange(tr.numel()), feats, idx, bo, None, B, m.out_width)
    with pytest.raises(RuntimeError, match="not G \\* B \\+ 1"):
        op(w, off, tr, feats, idx, bo, None, B - 1, m.out_width)
    bad = bo.clone()
    bad[3] = 10**6
    with pytest.raises(RuntimeError, match="past the input"):
        op(w, off, tr, feats, idx, bad, None, B, m.out_width)
    with pytest.raises(RuntimeError, match="features must be an int64"):
        op(w, off, tr, feats.int(), idx, bo, None, B, m.out_width)
    # A row wider than its table (offsets of another collection): caught before it is read.
    narrow = feats.clone()
    narrow[:, 3] = 1
    # (all tables narrowed: the whole-table check sees it first)
    with pytest.raises(RuntimeError, match="does not fit in (the table's|the output) width 1"):
        op(w, off, tr, narrow, idx, bo, None, B, m.out_width)
    narrow = feats.clone()
    narrow[0, 3] = 1  # one block narrowed, the others as they were: caught per lookup
    with pytest.raises(RuntimeError, match="does not fit in the table's width 1"):
        op(w, off, tr, narrow, idx, bo, None, B, m.out_width)
    go = torch.randn(B, m.out_width, dtype=w.dtype)
    table = (off, tr, feats, idx, bo, None, B)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.pme.collection_backward(go[:1], w, off, tr, feats, idx, bo, None, B, False)
    with pytest.raises(RuntimeError, match="state1"):
        torch.ops.pme.collection_update_(*_adagrad_args(w.clone(), torch.zeros(3, dtype=w.dtype), go, table))
    # in-place arguments must not alias each other or a read-only argument
    V = off.numel() - 1
    w2 = w.clone()
    buf = torch.zeros(w2.numel() + V, dtype=w.dtype)
    for s1, wt, name in (
        (w2[:V], w2, "weight is updated in place and must not share memory with state1"),
        (buf[:V], buf[V:], None),
    ):
        if name is not None:
            with pytest.raises(RuntimeError, match=name):
                torch.ops.pme.collection_update_(*_adagrad_args(wt, s1, go, table))
        else:  # neighbours in one buffer that do not overlap are fine
            wt.copy_(w)
            torch.ops.pme.collection_update_(*_adagrad_args(wt, s1, go, table))
    with pytest.raises(RuntimeError, match="must not share memory with grad_out"):
        g2 = torch.zeros(w.numel() + go.numel(), dtype=w.dtype)
        torch.ops.pme.collection_update_(
            *_adagrad_args(g2[: w.numel()], torch.zeros(V, dtype=w.dtype), g2[: go.numel()].view_as(go), table)
        )


def test_one_call_for_all_tables():
    """The forward is one operator call, whatever the number of tables."""
    m, _, _ = make_collection(6, "mixed")
    inp = make_input(m, 5, 6)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        m(inp)
    names = [e.key for e in prof.key_averages()]
    assert sum(1 for n in names if n == "pme::collection_forward") == 1
    assert not any(n == "pme::bag_forward" for n in names)


def test_opcheck_collection_operators():
    for pooling, weighted in [("sum", False), ("mixed", False), ("sum", True)]:
        m, _, _ = make_collection(8, pooling, weighted, dtype=torch.float32)
        feats, idx, bo, psw, B = _normal(m, make_input(m, 4, 8, weighted=weighted))
        w = m.weight.detach().clone().requires_grad_()
        p = psw.clone().requires_grad_() if psw is not None else None
        torch.library.opcheck(
            torch.ops.pme.collection_forward, (w, m.offsets, m.table_rows, feats, idx, bo, p, B, m.out_width)
        )
        go = torch.randn(B, m.out_width)
        table = (m.offsets, m.table_rows, feats, idx, bo, psw, B)
        torch.library.opcheck(torch.ops.pme.collection_backward, (go, w.detach(), *table, psw is not None))
        torch.library.opcheck(
            torch.ops.pme.collection_update_,
            _adagrad_args(w.detach().clone(), torch.zeros(m.offsets.numel() - 1), go, table),
        )


@pytest.mark.parametrize("weighted", [False, True])
def test_eager_graded_forward_takes_the_light_autograd_function(weighted):
    """An eager call that wants a gradient goes through _CollectionLookupEager, not torch.library's
    autograd wrapper (benchmarks/bench_overhead.py's reason), with gradients equal to those of the
    operator's registered formula, bit for bit."""
    m, _, _ = make_collection(8, "sum" if weighted else "mixed", weighted, dtype=torch.float64)
    inp = make_input(m, 6, 8, weighted=weighted)
    feats, idx, bo, psw, B = _normal(m, inp)
    w = m.weight.detach().clone().requires_grad_()
    p = psw.clone().requires_grad_() if psw is not None else None
    batch = pme.collection.Batch(m.table_rows, feats, idx, bo, p, B)
    out = pme.collection.collection_lookup(w, m.offsets, batch, out_width=m.out_width)
    assert type(out.grad_fn).__name__ == "_CollectionLookupEagerBackward"
    raw = torch.ops.pme.collection_forward(w, m.offsets, m.table_rows, feats, idx, bo, p, B, m.out_width)
    assert type(raw.grad_fn).__name__ != "_CollectionLookupEagerBackward"
    torch.testing.assert_close(out, raw, rtol=0, atol=0)
    go = torch.randn_like(out)
    wrt = (w, p) if p is not None else (w,)
    for a, b in zip(torch.autograd.grad(out, wrt, go), torch.autograd.grad(raw, wrt, go)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        assert pme.collection.collection_lookup(w, m.offsets, batch, out_width=m.out_width).grad_fn is None


def test_gradcheck_float64():
    m, _, _ = make_collection(9, "mixed", dtype=torch.float64)
    feats, idx, bo, _, B = _normal(m, make_input(m, 3, 9, max_len=3))
    w = m.weight.detach().clone().requires_grad_()
    torch.autograd.gradcheck(
        lambda w: torch.ops.pme.collection_forward(w, m.offsets, m.table_rows, feats, idx, bo, None, B, m.out_width),
        (w,),
    )


@pytest.mark.parametrize("weighted", [False, True])
def test_torch_func_transforms(weighted):
    """torch.func over a collection (functional_call): grad equals torch.autograd's, jacrev equals
    torch.autograd.functional.jacobian, jvp (in the table and in the per-sample weights) equals the
    Jacobian times the tangent, vmap equals a loop; no warning of torch's batching fallback."""
    import warnings

    from torch.func import functional_call, grad, jacrev, jvp, vmap

    m, _, _ = make_collection(4, "sum" if weighted else "mixed", weighted=weighted)
    inp = make_input(m, 3, 4, max_len=3, weighted=weighted)
    w0 = m.weight.detach().clone()

    def f(w, psw=None):
        x = inp if psw is None else {k: (v[0], v[1], p) for (k, v), p in zip(inp.items(), psw)}
        return functional_call(m, {"weight": w}, (x,)).values()

    def loss(w):
        return (f(w) ** 2).sum()

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule")  # torch's generic fallback
        wr = w0.clone().requires_grad_()
        torch.testing.assert_close(grad(loss)(w0), torch.autograd.grad(loss(wr), wr)[0])
        J = jacrev(f)(w0)
        torch.testing.assert_close(J, torch.autograd.functional.jacobian(f, w0))
        t = torch.randn_like(w0)
        out, out_t = jvp(f, (w0,), (t,))
        torch.testing.assert_close(out, f(w0))
        torch.testing.assert_close(out_t, (J.reshape(-1, w0.numel()) @ t).reshape(out.shape))
        ws = torch.stack([w0, 2 * w0, -w0])
        torch.testing.assert_close(vmap(f)(ws), torch.stack([f(w) for w in ws]))
        if weighted:  # linear in the per-sample weights too
            psw = [v[2] for v in inp.values()]
            tp = [torch.randn_like(p) for p in psw]
            _, pt = jvp(lambda *p: f(w0, p), tuple(psw), tuple(tp))
            torch.testing.assert_close(pt, f(w0, tp))


@pytest.mark.parametrize("threads", [1, 2])
def test_deterministic_across_threads(threads):
    m, _, _ = make_collection(10, "mixed", dtype=torch.float32)
    inp = make_input(m, 64, 10, max_len=20)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = m(inp).values()
        out.backward(torch.ones_like(out))
        g1 = m.weight.grad.clone()
        torch.set_num_threads(1)
        m.weight.grad = None
        out2 = m(inp).values()
        out2.backward(torch.ones_like(out2))
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(out, out2) and torch.equal(g1, m.weight.grad)


def test_reference_backend_agrees(monkeypatch):
    """The pure-PyTorch path (no compiled extension) gives the kernels' results."""
    m, _, _ = make_collection(12, "mixed", weighted=False, optimizer=pme.optim.RowwiseAdagrad(lr=0.2))
    m2, _, _ = make_collection(12, "mixed", weighted=False, optimizer=pme.optim.RowwiseAdagrad(lr=0.2))
    inp = make_input(m, 6, 12)
    go = torch.randn(6, m.out_width, dtype=torch.float64)
    m(inp).values().backward(go)
    monkeypatch.setattr(pme.ops, "_compiled", lambda t: False)
    out_ref = m2(inp).values()
    out_ref.backward(go)
    torch.testing.assert_close(m2.weight, m.weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m2.optim_state1, m.optim_state1, rtol=1e-10, atol=1e-10)
    m.eval(), m2.eval()
    torch.testing.assert_close(m2(inp).values(), m(inp).values(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_non_pooled_collection_equals_embedding_on_dense_views(index_dtype):
    from pme.collection import MultiSizeEmbeddingCollection

    gen = torch.Generator().manual_seed(21)
    D = 8
    tables = [
        EmbeddingBagConfig(int(V), D, f"t{i}", f)
        for i, (V, f) in enumerate([(30, ["a", "b"]), (7, ["c"]), (12, ["a"])])
    ]
    sizes = {t.name: random_sizes(t.num_embeddings, D, gen) for t in tables}
    m = MultiSizeEmbeddingCollection(tables, sizes, dtype=torch.float64)
    rows = {"a": 12, "b": 30, "c": 7}
    inp = {}
    for f, V in rows.items():
        lens = torch.randint(0, 4, (5,), generator=gen)
        lens[0] = 0
        v = torch.randint(0, V, (int(lens.sum()),), generator=gen)
        v[-1] = V - 1
        o = torch.zeros(6, dtype=torch.int64)
        o[1:] = lens.cumsum(0)
        inp[f] = (v.to(index_dtype), o.to(index_dtype))
    out = m(inp)
    assert list(out) == ["a@t0", "b", "c", "a@t2"]
    dense = {t.name: m.to_dense(t.name).detach().requires_grad_() for t in tables}
    go = {}
    for name, (t, f) in zip(out, [("t0", "a"), ("t0", "b"), ("t1", "c"), ("t2", "a")]):
        vals, offs = out[name]
        want = F.embedding(inp[f][0].long(), dense[t])
        torch.testing.assert_close(vals, want, rtol=0, atol=0)
        assert torch.equal(offs, inp[f][1].long())
        go[name] = torch.randn_like(vals)
        want.backward(go[name])
    torch.autograd.backward([out[k][0] for k in out], [go[k] for k in out])
    for i, t in enumerate(tables):
        _, _, e0, e1 = m._row_span(i)
        torch.testing.assert_close(
            m.weight.grad[e0:e1], dense[t.name].grad[stored_mask(m, t.name)], rtol=1e-12, atol=1e-12
        )
    bad = dict(inp)
    bad["c"] = (torch.tensor([7], dtype=index_dtype), torch.tensor([0, 1, 1, 1, 1, 1], dtype=index_dtype))
    with pytest.raises(IndexError, match=r"feature 'c' value 0 is 7, but table 't1' has 7 rows \(valid: 0 to 6\)"):
        m(bad)
    assert set(m.state_dict()) == {f"embeddings.{t.name}.{k}" for t in tables for k in ("weight", "offsets")}
    with pytest.raises(ValueError, match="same embedding_dim"):
        MultiSizeEmbeddingCollection([EmbeddingBagConfig(4, 4, "x", ["x"]), EmbeddingBagConfig(4, 8, "y", ["y"])])


def test_subset_copies_tables_and_optimizer_state():
    """The table-wise unit of a future sharder: a subset equals the whole on its tables."""
    m, tables, _ = make_collection(13, "mixed", optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    inp = make_input(m, 6, 13)
    m(inp).values().sum().backward()
    sub = m.subset(["t3", "t1"])
    assert sub.table_names == ["t3", "t1"] and int(sub.optim_step) == 1
    for n in ("t3", "t1"):
        assert torch.equal(sub.to_dense(n), m.to_dense(n))
        r0, r1 = (int(x) for x in m.table_rows[m._table_index(n) : m._table_index(n) + 2])
        s0, s1 = (int(x) for x in sub.table_rows[sub._table_index(n) : sub._table_index(n) + 2])
        assert torch.equal(sub.optim_state1[s0:s1], m.optim_state1[r0:r1])
    sub_in = {k: inp[k] for k in ("f4", "f2")}
    want = m(inp).to_dict()
    got = sub(sub_in).to_dict()
    for k in ("f4", "f2"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert sub.weight.data_ptr() != m.weight.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_device_forward_backward_and_fused_step_equal_cpu(device, index_dtype):
    """The same collection on ``device``: forward, weight gradient and a fused row-wise Adagrad
    step equal the CPU kernels' (the CUDA variant runs where a GPU is)."""
    m, _, _ = make_collection(21, "mixed", dtype=torch.float32)
    inp = make_input(m, 9, 21, index_dtype)
    m.to(device)
    cpu = make_collection(21, "mixed", dtype=torch.float32)[0]
    on_dev = {k: tuple(x.to(device) for x in item) for k, item in inp.items()}
    go = torch.randn(9, m.out_width, generator=torch.Generator().manual_seed(3))
    out_c, out_d = cpu(inp).values(), m(on_dev).values()
    torch.testing.assert_close(out_d.cpu(), out_c.detach(), rtol=1e-5, atol=1e-6)
    out_c.backward(go)
    out_d.backward(go.to(device))
    torch.testing.assert_close(m.weight.grad.cpu(), cpu.weight.grad, rtol=1e-5, atol=1e-6)
    fc = make_collection(21, "mixed", dtype=torch.float32, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))[0]
    fd = make_collection(21, "mixed", dtype=torch.float32, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))[0].to(device)
    for _ in range(2):
        fc(inp).values().backward(go)
        fd(on_dev).values().backward(go.to(device))
    torch.testing.assert_close(fd.weight.detach().cpu(), fc.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fd.optim_state1.cpu(), fc.optim_state1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_hot_bad_index_is_refused_with_its_position(weighted):
    """A one-hot batch takes the kernel's copy path: a bad index there is reported, never read."""
    m, _, _ = make_collection(8, "sum", weighted, dtype=torch.float32)
    inp = make_input(m, 80, 8, weighted=weighted, max_len=1)
    v, o = inp["f2"][0].clone(), inp["f2"][1]
    j = int((o[1:] > o[:-1]).nonzero()[-1])  # the last non-empty bag
    v[int(o[j])] = m._tables[1].num_embeddings  # one past table t1's rows
    inp["f2"] = (v, o) + tuple(inp["f2"][2:])
    with pytest.raises(RuntimeError, match=rf"index out of range: feature 'f2' value {int(o[j])} is "):
        m(inp)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_hot_output_larger_than_the_cache_equals_dense_view(weighted):
    """A one-hot float32 batch whose output passes 8 MiB: the copy path writes unweighted rows by
    streaming stores where a row's columns are 16-byte aligned and its width a multiple of 4 (t0-t2
    here), plain copies elsewhere (width 5, unaligned rows, weighted). Every entry must equal the
    dense view's, and the first bags the same call on a small batch gives."""
    m, tables, sizes = make_collection(3, "sum" if weighted else "mixed", weighted, dtype=torch.float32)
    B = 40_000  # out_width 53 floats: 8.1 MiB of output
    inp = make_input(m, B, 3, torch.int64, weighted, max_len=1)
    assert B * m.out_width * 4 >= 8 << 20
    with torch.no_grad():
        out = m(inp)
        small = m(
            {
                k: tuple(x[: int(item[1][64])] if i != 1 else x[:65] for i, x in enumerate(item))
                for k, item in inp.items()
            }
        )
    ref, _ = dense_oracle(m, inp)
    for k, v in out.to_dict().items():
        if weighted:
            torch.testing.assert_close(v.double(), ref[k].detach(), rtol=1e-6, atol=1e-6, msg=k)
        else:  # one row per bag: the stored float32 value itself
            assert torch.equal(v, ref[k].detach().float()), k
    assert torch.equal(out.values()[:64], small.values())


def test_table_names_and_init_bounds_as_torchrec():
    """A '.' in a table name (a state_dict key part) is refused; each init bound defaults on its own
    to TorchRec's -+sqrt(1 / V)."""
    with pytest.raises(ValueError, match="cannot contain '.'"):
        MultiSizeEmbeddingBagCollection([EmbeddingBagConfig(4, 2, "a.b", ["f"])])
    V = 400
    m = MultiSizeEmbeddingBagCollection([EmbeddingBagConfig(V, 8, "a", ["f"], weight_init_max=1.0)])
    w = m.weight.detach()
    assert float(w.max()) > 0.5 and float(w.min()) >= -((1.0 / V) ** 0.5)


def test_non_pooled_collection_refuses_decreasing_offsets():
    """The non-pooled collection cuts the rows by the offsets without a pooled operator to check them:
    offsets that decrease (a negative length) are refused with the feature and the bag."""
    m = pme.MultiSizeEmbeddingCollection([EmbeddingBagConfig(10, 2, "a", ["f1", "f0"])])
    t = torch.tensor
    with pytest.raises(ValueError, match=r"feature 'f1': its offsets decrease at bag 1 \(3 then 1\)"):
        m({"f0": (t([1]), t([0, 1, 1, 1])), "f1": (t([1, 2, 3, 4]), t([0, 3, 1, 4]))})


def test_meta_collection_gives_shapes_and_refuses_real_input():
    """Built on the meta device (as TorchRec builds models): meta input gives the output's shape;
    input with values is refused, as the tables refuse it, instead of returning a meta output."""
    cfgs = [EmbeddingBagConfig(10, 4, "t0", ["f0"]), EmbeddingBagConfig(7, 6, "t1", ["f1"])]
    m = MultiSizeEmbeddingBagCollection(cfgs, None, device="meta")
    meta = {f: (torch.tensor([1, 2, 3], device="meta"), torch.tensor([0, 2, 3], device="meta")) for f in ("f0", "f1")}
    out = m(meta)
    assert out.values().is_meta and out.values().shape == (2, 10)
    real = {f: (torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])) for f in ("f0", "f1")}
    with pytest.raises(ValueError, match="input is on cpu but the collection is on meta"):
        m(real)
    # print(model) of a model built on meta works; what needs the sizes says why it has none
    assert "sizes=? (meta device)" in repr(m)
    with pytest.raises(RuntimeError, match="on the meta device, where its tables' row sizes are not known"):
        m.sizes("t0")
    with pytest.raises(RuntimeError, match="on the meta device"):
        m.state_dict()


def test_meta_non_pooled_collection_gives_shapes_and_refuses_real_input():
    """The non-pooled collection on the meta device: one [n_f, D] meta output per embedding name,
    with the feature's offsets, as EmbeddingCollection gives; real input refused."""
    cfgs = [EmbeddingBagConfig(10, 4, "t0", ["f0", "f1"]), EmbeddingBagConfig(7, 4, "t1", ["f0"])]
    m = pme.MultiSizeEmbeddingCollection(cfgs, device="meta")
    assert "sizes=? (meta device)" in repr(m)
    off = torch.tensor([0, 2, 3], device="meta")
    out = m({"f0": (torch.tensor([1, 2, 3], device="meta"), off), "f1": (torch.tensor([4], device="meta"), off)})
    assert list(out) == ["f0@t0", "f1", "f0@t1"]
    assert [tuple(v.shape) for v, _ in out.values()] == [(3, 4), (1, 4), (3, 4)]
    assert all(v.is_meta and o is off for v, o in out.values())
    with pytest.raises(KeyError, match="no feature 'f1'"):
        m({"f0": (torch.tensor([1, 2, 3], device="meta"), off)})
    with pytest.raises(ValueError, match="input is on cpu but the collection is on meta"):
        m({f: (torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])) for f in ("f0", "f1")})


def test_non_finite_weights_give_one_answer_on_every_path_and_thread_count():
    """Weighted features with inf / NaN weights: a one-hot run (copied) and a pooled run (the
    kernels) scale the stored entries only, so the answer does not depend on how the runs fall,
    i.e. on the thread count; it equals the reference's."""
    from pme import reference

    gen = torch.Generator().manual_seed(3)
    cfgs = [EmbeddingBagConfig(30, 16, "t0", ["f0"])]
    m = MultiSizeEmbeddingBagCollection(cfgs, {"t0": random_sizes(30, 16, gen)}, is_weighted=True)
    B = 130
    lengths = torch.ones(B, dtype=torch.int64)
    lengths[0] = 2  # the first run of 64 bags is pooled, the others copied (one-hot)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    values = torch.randint(0, 30, (int(offsets[-1]),), generator=gen)
    weights = torch.randn(values.shape, generator=gen)
    weights[::3] = float("inf")
    weights[1::7] = float("nan")
    inp = {"f0": (values, offsets, weights)}
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(m(inp).values())
    finally:
        torch.set_num_threads(threads)
    ref = reference.embedding_bag(
        m.table_weight("t0"), m.table_offsets("t0"), values, offsets, 16, None, "sum", weights
    )
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, equal_nan=True)
        assert torch.equal(out.isnan(), outs[0].isnan())


def test_decreasing_offsets_inside_a_feature_name_the_feature():
    """Offsets that decrease inside one feature (its ends right) are reported with the feature's
    name and its own bag and offsets, not positions in the concatenated batch."""
    cfgs = [EmbeddingBagConfig(10, 4, "t0", ["f1"]), EmbeddingBagConfig(10, 4, "t1", ["f2"])]
    m = MultiSizeEmbeddingBagCollection(cfgs, None)
    v = torch.tensor([1, 2, 3, 4])
    with pytest.raises(RuntimeError, match=r"feature 'f2': its offsets decrease at bag 1 \(3 then 2\)"):
        m({"f1": (v, torch.tensor([0, 1, 2, 4])), "f2": (v, torch.tensor([0, 3, 2, 4]))})
