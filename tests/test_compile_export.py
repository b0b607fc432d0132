"""pme under torch.compile (fullgraph, Inductor), torch.export (dynamic batch, save / load) and
AOTInductor: single tables and collections.

Oracles: the same module called eagerly, and F.embedding_bag / F.embedding on the float64 dense
view. Also: what a traced graph checks. A module's own table skips the O(V) whole-table scan in
a graph (it is checked when built, loaded and on eager calls), a table handed to pme.ops keeps
the scan, and every lookup, bag and feature is still checked when the graph runs.
"""

import io
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_collection import make_collection, make_input

import pme
from pme import ops

from conftest import DEVICES, random_sizes

MODULE_CASES = [("bag", "sum"), ("bag", "mean"), ("bag", "max"), ("embedding", None)]


def _cxx_found() -> bool:
    """Whether Inductor finds a C++ compiler: its CPU code and AOTInductor need one (pme itself,
    installed from a wheel, does not)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    try:
        get_cpp_compiler()
        return True
    except Exception:
        return False


NO_CXX = not _cxx_found()
needs_cxx = pytest.mark.skipif(NO_CXX, reason="Inductor's CPU code and AOTInductor need a C++ compiler; none found")


def skip_without_cxx(device):
    """Inductor on the CPU needs a C++ compiler (on CUDA it generates Triton)."""
    if device == "cpu" and NO_CXX:
        pytest.skip("Inductor's CPU code needs a C++ compiler; none found")


def make_module(kind, mode, seed, V=60, D=16):
    gen = torch.Generator().manual_seed(seed)
    sizes = random_sizes(V, D, gen)
    if kind == "bag":
        m = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode=mode, dtype=torch.float64)
    else:
        m = pme.MultiSizeEmbedding(V, D, sizes=sizes, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.numel(), generator=gen, dtype=torch.float64))
    return m


def bags(V, B, seed, dtype=torch.int64, max_len=6):
    """``(indices [N], offsets [B])``: an empty first bag, the largest index, a duplicate."""
    gen = torch.Generator().manual_seed(seed + 500)
    lens = torch.randint(0, max_len + 1, (B,), generator=gen)
    lens[0] = 0
    lens[1] = max(int(lens[1]), 3)
    idx = torch.randint(0, V, (int(lens.sum()),), generator=gen)
    idx[0], idx[1] = V - 1, idx[2]
    off = torch.zeros(B, dtype=torch.int64)
    off[1:] = lens.cumsum(0)[:-1]
    return idx.to(dtype), off.to(dtype)


def dense_oracle(m, kind, mode, idx, off):
    if kind == "bag":
        return F.embedding_bag(idx.long(), m.to_dense().detach(), off.long(), mode=mode)
    return F.embedding(idx.long(), m.to_dense().detach())


def call(m, kind, idx, off):
    return m(idx, off) if kind == "bag" else m(idx)


def captured_table_checked(fn, *args):
    """The ``table_checked`` argument of every pme operator in the graph dynamo builds for ``fn``."""
    seen = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            target = getattr(node.target, "_schema", None)
            if target is not None and target.name.startswith("pme::") and target.name != "pme::check_bag_ends":
                seen.append((target.name, node.args[-1] if len(node.args) == len(target.arguments) else False))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return seen


def test_a_traced_module_skips_the_table_scan_and_a_traced_table_keeps_it():
    m = make_module("bag", "sum", 0)
    idx, off = bags(60, 8, 0)
    assert captured_table_checked(m, idx, off) == [("pme::bag_forward", True)]
    e = make_module("embedding", None, 1)
    assert captured_table_checked(e, idx) == [("pme::embedding_forward", True)]
    w, o = m.weight.detach(), m.offsets

    def functional(i, b):
        return ops.embedding_bag(w, o, i, b, width=16, mode="sum")

    assert captured_table_checked(functional, idx, off) == [("pme::bag_forward", False)]
    c, _, _ = make_collection(0)
    feats = make_input(c, 5, 0)
    assert captured_table_checked(c, feats) == [("pme::collection_forward", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,mode", MODULE_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_compiled_modules_equal_eager_and_the_dense_view(kind, mode, index_dtype, device):
    skip_without_cxx(device)
    torch._dynamo.reset()
    m = make_module(kind, mode, 2).to(device)
    compiled = torch.compile(m, fullgraph=True)  # Inductor
    for B, seed in ((9, 0), (5, 1)):  # a second batch shape: recompiled or dynamic, still right
        idx, off = (t.to(device) for t in bags(60, B, seed, index_dtype))
        out = call(compiled, kind, idx, off)
        torch.testing.assert_close(out, dense_oracle(m, kind, mode, idx, off))
        go = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed)).to(device)
        (g_compiled,) = torch.autograd.grad(out, m.weight, go)
        (g_eager,) = torch.autograd.grad(call(m, kind, idx, off), m.weight, go)
        torch.testing.assert_close(g_compiled, g_eager)


@needs_cxx
def test_compiled_weighted_bags_with_a_padding_row():
    """per_sample_weights and padding_idx under torch.compile: forward against F.embedding_bag on
    the dense view, both gradients against the eager call."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(13)
    m = pme.MultiSizeEmbeddingBag(60, 16, sizes=random_sizes(60, 16, gen), mode="sum", padding_idx=5)
    m = m.to(torch.float64)
    compiled = torch.compile(m, fullgraph=True)
    idx, off = bags(60, 6, 13)
    idx[3] = 5
    psw = torch.rand(idx.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    out = compiled(idx, off, per_sample_weights=psw)
    dense = m.to_dense().detach()
    torch.testing.assert_close(out, F.embedding_bag(idx, dense, off, mode="sum", per_sample_weights=psw, padding_idx=5))
    go = torch.randn(out.shape, dtype=out.dtype, generator=gen)
    got = torch.autograd.grad(out, [m.weight, psw], go)
    want = torch.autograd.grad(m(idx, off, per_sample_weights=psw), [m.weight, psw], go)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@needs_cxx
def test_compiled_module_rejects_bad_input_and_stays_usable():
    torch._dynamo.reset()
    m = make_module("bag", "sum", 3)
    compiled = torch.compile(m, fullgraph=True)
    idx, off = bags(60, 6, 3)
    good = compiled(idx, off)
    for bad_idx, bad_off, msg in (
        (torch.tensor([0, 60]), torch.tensor([0]), "index out of range: indices\\[1\\] = 60"),
        (torch.tensor([-1, 2]), torch.tensor([0]), "index out of range: indices\\[0\\] = -1"),
        (torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]), "non-decreasing"),
        (torch.tensor([1, 2, 3]), torch.tensor([0, 4]), "past the input"),
    ):
        with pytest.raises(RuntimeError, match=msg):
            compiled(bad_idx, bad_off)
    torch.testing.assert_close(compiled(idx, off), good)
    # A table broken behind the module's back: the graph skipped the whole-table scan, and the
    # per-lookup span check still refuses the row (an eager call names it too).
    with torch.no_grad():
        m.offsets[5] = m.offsets[-1] + 7
    row5 = torch.tensor([4, 5]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="spans offsets"):
        compiled(*row5)
    with pytest.raises(RuntimeError, match="row 4 has size"):
        m(*row5)


@needs_cxx
def test_compiled_include_last_offset_is_checked_when_the_graph_runs():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    m = pme.MultiSizeEmbeddingBag(40, 8, sizes=random_sizes(40, 8, gen), mode="mean", include_last_offset=True)
    compiled = torch.compile(m, fullgraph=True)
    idx, off = bags(40, 7, 9)
    last = torch.cat([off, off.new_full((1,), idx.numel())])
    torch.testing.assert_close(compiled(idx, last), m(idx, last))
    short = last.clone()
    short[-1] -= 1
    for fn in (m, compiled):
        with pytest.raises(ValueError, match="include_last_offset=True: offsets\\[-1\\] = .* must equal"):
            fn(idx, short)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_collection_equals_eager_forward_and_backward(weighted, device):
    skip_without_cxx(device)
    torch._dynamo.reset()
    c, _, _ = make_collection(4, pooling="mixed" if not weighted else "sum", weighted=weighted)
    c = c.to(device)
    compiled = torch.compile(c, fullgraph=True)
    for B, seed in ((6, 0), (3, 1)):
        feats = {k: tuple(t.to(device) for t in item) for k, item in make_input(c, B, seed, weighted=weighted).items()}
        if weighted:
            feats = {k: (v, o, w.clone().requires_grad_(True)) for k, (v, o, w) in feats.items()}
        out = compiled(feats).values()
        ref = c(feats).values()
        torch.testing.assert_close(out, ref)
        go = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed)).to(device)
        wanted = [c.weight] + ([t[2] for t in feats.values()] if weighted else [])
        for g, r in zip(torch.autograd.grad(out, wanted, go), torch.autograd.grad(ref, wanted, go)):
            torch.testing.assert_close(g, r)


@needs_cxx
def test_compiled_collection_checks_each_features_bags():
    torch._dynamo.reset()
    c, _, _ = make_collection(5)
    compiled = torch.compile(c, fullgraph=True)
    feats = make_input(c, 4, 0)
    good = compiled(feats).values()
    key = sorted(feats)[1]
    v, o = feats[key]
    assert v.numel() >= 1
    short = dict(feats)
    short[key] = (v, torch.cat([o[:-1], o[-1:] - 1]).clamp(min=0))  # ends before its last value
    with pytest.raises(ValueError, match=f"feature '{key}': offsets must start at 0 and end at len"):
        compiled(short)
    bad_row = dict(feats)
    bad_row[key] = (v.clone().fill_(10**6), o)
    with pytest.raises(RuntimeError, match="index out of range"):
        compiled(bad_row)
    torch.testing.assert_close(compiled(feats).values(), good)


class _Ranker(torch.nn.Module):
    """A small model: one multi-size bag table and a linear layer."""

    def __init__(self, seed):
        super().__init__()
        self.emb = make_module("bag", "mean", seed)
        self.head = torch.nn.Linear(16, 1, dtype=torch.float64)

    def forward(self, idx, off):
        return self.head(self.emb(idx, off))


class _CollectionRanker(torch.nn.Module):
    """A collection read by three features, then a linear layer over its pooled output."""

    def __init__(self, seed):
        super().__init__()
        self.c, _, _ = make_collection(seed, pooling="mixed")
        self.keys = sorted({f for t in self.c._tables for f in t.feature_names})
        self.head = torch.nn.Linear(self.c.out_width, 1, dtype=torch.float64)

    def forward(self, *flat):
        feats = {k: (flat[2 * i], flat[2 * i + 1]) for i, k in enumerate(self.keys)}
        return self.head(self.c(feats).values())

    def flat_input(self, B, seed):
        feats = make_input(self.c, B, seed, key_order=self.keys)
        return tuple(t for k in self.keys for t in feats[k][:2])

    def dynamic_shapes(self):
        batch = torch.export.Dim("batch_plus_1", min=3, max=1 << 20)
        out = []
        for k in self.keys:
            out += [{0: torch.export.Dim(f"n_{k}", max=1 << 30)}, {0: batch}]
        return (tuple(out),)  # forward's *flat is one argument


def _round_trip(ep):
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    return torch.export.load(buf)


def test_exported_module_with_a_dynamic_batch_round_trips_and_checks_its_input():
    model = _Ranker(6).eval()
    idx, off = bags(60, 7, 6)
    batch = torch.export.Dim("batch", min=2, max=1 << 20)
    n = torch.export.Dim("n", max=1 << 30)
    ep = _round_trip(torch.export.export(model, (idx, off), dynamic_shapes=({0: n}, {0: batch})))
    for B, seed in ((7, 6), (13, 7), (2, 8)):
        i, o = bags(60, B, seed)
        torch.testing.assert_close(ep.module()(i, o), model(i, o))
    with pytest.raises(RuntimeError, match="index out of range"):
        ep.module()(torch.tensor([3, 60, 1]), torch.tensor([0, 1]))
    torch.testing.assert_close(ep.module()(idx, off), model(idx, off))


def test_exported_grouped_and_non_pooled_tables():
    """The grouped layout (a slot of columns per size class) and nn.Embedding's 2-D input, with a
    padding row: exported with dynamic shapes, equal to the eager module at other shapes."""
    gen = torch.Generator().manual_seed(12)
    sizes = torch.tensor([4, 8, 16])[torch.randint(0, 3, (60,), generator=gen)]
    grouped = pme.MultiSizeEmbeddingBag(60, 16, sizes=sizes, mode="mean", layout="grouped").eval()
    emb = pme.MultiSizeEmbedding(60, 16, sizes=sizes, padding_idx=3).eval()
    dim = torch.export.Dim
    ep = _round_trip(torch.export.export(grouped, bags(60, 5, 0), dynamic_shapes=({0: dim("n")}, {0: dim("b", min=2)})))
    for B, seed in ((5, 0), (9, 1)):
        i, o = bags(60, B, seed)
        torch.testing.assert_close(ep.module()(i, o), grouped(i, o))
    x = torch.randint(0, 60, (4, 5), generator=gen)
    ep = _round_trip(torch.export.export(emb, (x,), dynamic_shapes=({0: dim("rows", min=2), 1: dim("cols", min=2)},)))
    for shape in ((4, 5), (7, 3)):
        y = torch.randint(0, 60, shape, generator=gen)
        y[0, 0] = 3
        torch.testing.assert_close(ep.module()(y), F.embedding(y, emb.to_dense().detach()))


def test_exported_collection_with_a_dynamic_batch_round_trips_and_checks_its_input():
    model = _CollectionRanker(7).eval()
    args = model.flat_input(5, 0)
    ep = _round_trip(torch.export.export(model, args, dynamic_shapes=model.dynamic_shapes()))
    for B, seed in ((5, 0), (11, 1), (2, 2)):
        a = model.flat_input(B, seed)
        torch.testing.assert_close(ep.module()(*a), model(*a))
    bad = list(args)
    bad[1] = torch.cat([bad[1][:-1], bad[1][-1:] + 1])  # the first feature's bags overrun its values
    with pytest.raises(ValueError, match=f"feature '{model.keys[0]}'"):
        ep.module()(*bad)


# A serving process: it imports pme (which registers the operators), loads what was saved, runs it.
_SERVE = """
import sys, torch, pme
kind, path, inputs, out = sys.argv[1:]
args = torch.load(inputs)
if kind == "export":
    fn = torch.export.load(path).module()
else:
    fn = torch._inductor.aoti_load_package(path)
torch.save(fn(*args), out)
"""


def _serve_in_a_fresh_process(kind, path, args, tmp_path):
    import subprocess
    import sys

    torch.save(args, tmp_path / "inputs.pt")
    subprocess.run(
        [sys.executable, "-c", _SERVE, kind, str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True,
        timeout=600,
    )
    return torch.load(tmp_path / "out.pt")


@needs_cxx
def test_aoti_package_of_a_collection_model(tmp_path):
    """AOTInductor: the exported collection model compiled to a shared library and loaded back,
    here and in a fresh process that imports pme (pme's operators run through the package's
    proxy executor); the exported program itself is also loaded there."""
    model = _CollectionRanker(8).eval()
    args = model.flat_input(5, 0)
    ep = torch.export.export(model, args, dynamic_shapes=model.dynamic_shapes())
    torch.export.save(ep, tmp_path / "ranker.pt2")
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "ranker_aoti.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    a = model.flat_input(9, 3)
    with torch.no_grad():
        want = model(*a)
    for kind, saved in (("export", tmp_path / "ranker.pt2"), ("aoti", path)):
        torch.testing.assert_close(_serve_in_a_fresh_process(kind, saved, a, tmp_path), want)
    torch.testing.assert_close(runner(*a), model(*a))
    bad = list(a)
    bad[0] = bad[0].clone()
    bad[0][0] = 10**6
    if _torch_at_least(2, 13):
        with pytest.raises(RuntimeError, match="index out of range"):
            runner(*bad)
    else:  # torch 2.11's runtime prints the operator's error and fails the call with a generic one
        with pytest.raises((RuntimeError, AttributeError)):
            runner(*bad)
    torch.testing.assert_close(runner(*a), model(*a))


def _torch_at_least(major, minor) -> bool:
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (major, minor)


def _random_lookup_case(seed):
    """A random table (kind, layout, mode, padding row, include_last_offset, dtype, index dtype) and
    three random batches for it (2-D or 1-D + offsets, per-sample weights where the mode takes them)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(n):
        return int(torch.randint(0, n, (), generator=gen))

    V, D = 3 + draw(30), (1, 3, 8, 16)[draw(4)]
    kind = ("bag", "bag", "embedding")[draw(3)]
    dtype = (torch.float32, torch.float64)[draw(2)]
    kw = {"dtype": dtype}
    sizes = torch.randint(0, D + 1, (V,), generator=gen)
    if kind == "bag":
        kw["mode"] = ("sum", "mean", "max")[draw(3)]
        kw["include_last_offset"] = draw(3) == 0
        if draw(3) == 0:
            classes = torch.tensor(sorted({min(D, 1 << draw(5)) for _ in range(3)}))
            sizes = classes[torch.randint(0, len(classes), (V,), generator=gen)]
            kw.update(layout="grouped", project=kw["mode"] != "max" and draw(2) == 0)
    if draw(3) == 0:
        kw["padding_idx"] = draw(2 * V) - V
    cls = pme.MultiSizeEmbeddingBag if kind == "bag" else pme.MultiSizeEmbedding
    m = cls(V, D, sizes=sizes, **kw)
    weighted = kind == "bag" and kw["mode"] == "sum" and draw(2) == 0
    two_d = kind == "embedding" or (draw(3) == 0 and not kw.get("include_last_offset"))
    index_dtype = (torch.int32, torch.int64)[draw(2)]
    batches = []
    for _ in range(3):
        B = 1 + draw(7)
        if two_d:
            idx = torch.randint(0, V, (B, draw(4) + (kind == "embedding")), generator=gen)
            args = (idx.to(index_dtype),)
        else:
            lens = torch.randint(0, 4, (B,), generator=gen)
            idx = torch.randint(0, V, (int(lens.sum()),), generator=gen)
            off = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
            off = off if kw.get("include_last_offset") else off[:-1]
            args = (idx.to(index_dtype), off.to(index_dtype))
        psw = torch.rand(idx.shape, generator=gen, dtype=dtype).requires_grad_(True) if weighted else None
        batches.append((args, {"per_sample_weights": psw} if weighted else {}))
    return m, batches, dict(V=V, D=D, kind=kind, two_d=two_d, index_dtype=index_dtype, **kw)


@pytest.mark.parametrize("dynamic", [True, None])
def test_compiled_lookups_follow_eager_on_random_draws(dynamic):
    """Random tables and batches (the corner cases of _random_lookup_case, batch sizes 1 to 7 that
    change between calls) through torch.compile(fullgraph=True) with AOTAutograd (the operators'
    fake kernels and registered autograd, no C++ compiler needed): outputs and the gradients of
    the weight, the projection and the per-sample weights equal the eager call's."""
    for seed in range(12):
        m, batches, case = _random_lookup_case(seed + (0 if dynamic else 100))
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a, **k: m(*a, **k), backend="aot_eager", fullgraph=True, dynamic=dynamic)
        for args, kw in batches:
            out, ref = compiled(*args, **kw), m(*args, **kw)
            torch.testing.assert_close(out, ref, msg=lambda s: f"{case}: {s}")
            wanted = [m.weight] + [t for t in (m.projection, kw.get("per_sample_weights")) if t is not None]
            go = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(seed))
            got = torch.autograd.grad(out, wanted, go)
            for g, w in zip(got, torch.autograd.grad(ref, wanted, go)):
                torch.testing.assert_close(g, w, msg=lambda s: f"{case}: {s}")


def test_compiled_training_with_sparse_gradients_and_frequency_scaling():
    """scale_grad_by_freq traces with fullgraph=True (its gradient as eager's, divided by each
    row's count in the batch); sparse=True breaks the graph and keeps its coalesced COO gradient;
    a compiled model trained with pme.optim.SparseAdam follows the eager model under torch's."""
    V, D = 20, 8
    gen = torch.Generator().manual_seed(21)
    sizes = random_sizes(V, D, gen)
    idx, off = torch.tensor([1, 1, 1, 2, 3, 3, 5, 1, 19]), torch.tensor([0, 2, 2, 6])
    for kw, fullgraph in ((dict(scale_grad_by_freq=True), True), (dict(sparse=True, scale_grad_by_freq=True), False)):
        torch._dynamo.reset()
        m = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="mean", dtype=torch.float64, **kw)
        compiled = torch.compile(m, backend="aot_eager", fullgraph=fullgraph)
        go = torch.randn(4, D, dtype=torch.float64, generator=gen)
        (g_c,) = torch.autograd.grad(compiled(idx, off), m.weight, go)
        (g_e,) = torch.autograd.grad(m(idx, off), m.weight, go)
        assert g_c.is_sparse == g_e.is_sparse == bool(kw.get("sparse"))
        torch.testing.assert_close(g_c.to_dense(), g_e.to_dense())
    torch._dynamo.reset()
    ours = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", sparse=True, dtype=torch.float64)
    ref = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", sparse=True, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, backend="aot_eager")
    o_ours, o_ref = pme.optim.SparseAdam(ours.parameters(), lr=0.05), torch.optim.SparseAdam(ref.parameters(), lr=0.05)
    for _ in range(3):
        i = torch.randint(0, V, (12,), generator=gen)
        o = torch.tensor([0, 3, 3, 8])
        for fn, opt in ((compiled, o_ours), (ref, o_ref)):
            opt.zero_grad()
            fn(i, o).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-12, atol=1e-12)


def test_exported_bags_with_a_last_offset_and_weights_check_their_input():
    """include_last_offset (offsets [B + 1]: its Dim starts at 3, as torch specialises a batch of 1)
    with per-sample weights that share the indices' Dim: equal to eager at other shapes; a last
    offset short of the input and weights of another length are refused when the program runs."""
    gen = torch.Generator().manual_seed(31)
    m = pme.MultiSizeEmbeddingBag(40, 8, sizes=random_sizes(40, 8, gen), mode="sum", include_last_offset=True)
    m = m.double().eval()

    class Weighted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, i, o, w):
            return self.m(i, o, per_sample_weights=w)

    def batch(B, seed):
        i, o = bags(40, B, seed)
        return i, torch.cat([o, o.new_full((1,), i.numel())]), torch.rand(i.shape, dtype=torch.float64)

    n = torch.export.Dim("n", max=1 << 30)
    ep = _round_trip(
        torch.export.export(
            Weighted(), batch(6, 0), dynamic_shapes=({0: n}, {0: torch.export.Dim("b1", min=3)}, {0: n})
        )
    )
    for B, seed in ((6, 0), (11, 1), (2, 2)):
        a = batch(B, seed)
        torch.testing.assert_close(ep.module()(*a), m(a[0], a[1], per_sample_weights=a[2]))
    i, o, w = batch(5, 3)
    short = o.clone()
    short[-1] -= 1
    with pytest.raises((ValueError, RuntimeError), match="include_last_offset=True: offsets\\[-1\\]"):
        ep.module()(i, short, w)
    with pytest.raises((AssertionError, RuntimeError, ValueError)):
        ep.module()(i, o, w[:-1])
    torch.testing.assert_close(ep.module()(i, o, w), m(i, o, per_sample_weights=w))


@pytest.mark.parametrize("kind", ["bag", "embedding"])
def test_exported_program_with_a_corrupted_table_raises(kind):
    """A program's table is data in the saved file and the graph skips the whole-table scan: a
    corrupted offset table (a row past the buffer, a negative size) must raise when a lookup
    reaches it, never read out of bounds, and the program serves again once the table is right."""
    m = make_module(kind, "sum", 41)
    m.eval()
    idx, off = bags(60, 6, 41)
    args = (torch.arange(60), torch.tensor([0, 30])) if kind == "bag" else (torch.arange(60),)
    ep = _round_trip(torch.export.export(m, args))
    table = ep.state_dict["offsets"]
    good = table.clone()
    for value, msg in ((1 << 40, "overruns the"), (-(1 << 40), "is negative")):
        table[7] = value
        with pytest.raises(RuntimeError, match=f"spans offsets.*{msg}"):
            ep.module()(*args)
        table.copy_(good)
    torch.testing.assert_close(ep.module()(*args), m(*args))


def test_exported_sparse_and_frequency_scaled_tables_serve_their_lookup():
    """sparse=True and scale_grad_by_freq change only the gradient: exported for serving (eval,
    dynamic batch), the program's output equals the eager lookup's."""
    gen = torch.Generator().manual_seed(51)
    for kw in (dict(sparse=True), dict(scale_grad_by_freq=True)):
        m = pme.MultiSizeEmbeddingBag(60, 16, sizes=random_sizes(60, 16, gen), mode="mean", **kw).eval()
        dims = ({0: torch.export.Dim("n")}, {0: torch.export.Dim("b", min=2)})
        ep = _round_trip(torch.export.export(m, bags(60, 5, 0), dynamic_shapes=dims))
        with torch.no_grad():
            for B, seed in ((5, 0), (9, 1)):
                i, o = bags(60, B, seed)
                torch.testing.assert_close(ep.module()(i, o), m(i, o))


def test_compiled_modules_do_not_recompile_per_batch_size():
    """Eight batch sizes through torch.compile (default dynamic=None): one static graph, then one
    dynamic one; no pme path specialises on a batch size (past torch's recompile limit a model
    would fall back to eager)."""
    gen = torch.Generator().manual_seed(61)
    V, D = 30, 8
    sizes = random_sizes(V, D, gen)
    batches = (4, 5, 6, 7, 9, 12, 17, 33)

    def graphs(fn, inputs):
        torch._dynamo.reset()
        count = [0]

        def backend(gm, example_inputs):
            count[0] += 1
            return gm.forward

        compiled = torch.compile(fn, backend=backend)
        for a in inputs:
            compiled(*a)
        return count[0]

    def flat(B, last=False):
        idx = torch.randint(0, V, (3 * B + 1,), generator=gen)
        off = torch.arange(0, 3 * B, 3)
        return idx, torch.cat([off, off.new_full((1,), 3 * B + 1)]) if last else off

    bag = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="mean")
    last = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum", include_last_offset=True)
    emb = pme.MultiSizeEmbedding(V, D, sizes=sizes, padding_idx=0)
    c, _, _ = make_collection(0)
    cases = {
        "bag": (bag, [flat(B) for B in batches]),
        "bag 2-D": (bag, [(torch.randint(0, V, (B, 3), generator=gen),) for B in batches]),
        "include_last_offset": (last, [flat(B, last=True) for B in batches]),
        "weighted": (
            lambda i, o: last(i, o, per_sample_weights=torch.ones(i.shape)),
            [flat(B, last=True) for B in batches],
        ),
        "embedding": (emb, [(torch.randint(0, V, (B, 2), generator=gen),) for B in batches]),
        "collection": (c, [(make_input(c, B, B),) for B in batches]),
    }
    for name, (fn, inputs) in cases.items():
        assert graphs(fn, inputs) <= 2, name


@needs_cxx
def test_aoti_package_of_single_tables(tmp_path):
    """AOTInductor with single tables: a bag table with include_last_offset, an nn.Embedding-style
    table with a padding row and a grouped table with a projection and per-sample weights, one
    dynamic batch; equal to eager, and every kind of bad input refused with pme's message while
    the runner stays usable."""
    gen = torch.Generator().manual_seed(71)
    V, D = 50, 8

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = pme.MultiSizeEmbeddingBag(
                V, D, sizes=random_sizes(V, D, gen), mode="mean", include_last_offset=True
            )
            self.b = pme.MultiSizeEmbedding(V, D, sizes=random_sizes(V, D, gen), padding_idx=1)
            classes = torch.tensor([2, 4, 8])[torch.randint(0, 3, (V,), generator=gen)]
            self.c = pme.MultiSizeEmbeddingBag(V, D, sizes=classes, mode="sum", layout="grouped", project=True)

        def forward(self, i, o, x, w):
            return self.a(i, o) + self.b(x).sum(1) + self.c(i, o[:-1], per_sample_weights=w)

    model = Model().eval()

    def batch(B, seed):
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, V, (3 * B,), generator=g)
        return (
            i,
            torch.arange(0, 3 * B + 1, 3),
            torch.randint(0, V, (B, 4), generator=g),
            torch.rand(3 * B, generator=g),
        )

    n, b = torch.export.Dim("n", max=1 << 30), torch.export.Dim("b", min=2, max=1 << 20)
    dims = ({0: n}, {0: b + 1}, {0: b, 1: torch.export.Dim("k", min=2, max=64)}, {0: n})
    ep = torch.export.export(model, batch(4, 0), dynamic_shapes=dims)
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "tables.pt2"))
    )
    with torch.no_grad():
        for B, seed in ((4, 0), (9, 1), (2, 2)):
            a = batch(B, seed)
            torch.testing.assert_close(runner(*a), model(*a))
        i, o, x, w = batch(5, 3)
        bad_inputs = (
            (i.clone().fill_(V), o, x, w, "index out of range: indices\\[0\\] = 50"),
            (i, o, x.clone().fill_(-1), w, "index out of range: indices\\[0\\] = -1"),
            (i, o.clone().sub_(1).clamp_(min=0), x, w, "include_last_offset=True: offsets\\[-1\\]"),
        )
        for *bad, msg in bad_inputs:
            if _torch_at_least(2, 13):
                with pytest.raises(RuntimeError, match=msg):
                    runner(*bad)
            else:  # torch 2.11's runtime prints the operator's error and fails the call with a generic one
                with pytest.raises((RuntimeError, AttributeError)):
                    runner(*bad)
        torch.testing.assert_close(runner(i, o, x, w), model(i, o, x, w))
