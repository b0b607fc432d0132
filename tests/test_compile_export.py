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
