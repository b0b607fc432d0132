"""Pruning kernels and the search against torch.kthvalue and the reference (the search on the
toolkit's planted data and models: tests/recsys/test_search_on_recsys.py)."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pme import ops, reference
from pme.search import popularity_sizes, random_sizes, search, uniform_sizes

from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000), k_frac=st.floats(0, 1), ties=st.booleans(), neg=st.booleans(), seed=st.integers(0, 2**16)
)
def test_topk_threshold_is_kthvalue(device, n, k_frac, ties, neg, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    if ties:
        x = (x * 3).round()  # many ties, zeros and negative zeros
    if not neg:
        x = x.abs()
    k = max(1, min(n, int(k_frac * n) + 1))
    got = ops.topk_threshold(x.to(device), k)
    want = torch.kthvalue(x, n - k + 1).values
    assert got.shape == () and float(got) == float(want)


@pytest.mark.parametrize("device", DEVICES)
def test_prune_counts_and_pack_match_reference(device):
    gen = torch.Generator().manual_seed(0)
    V, D = 50, 16
    scores = (torch.rand(V, D, generator=gen) * 4).round().to(device)  # ties inside rows
    dense = torch.randn(V, D, generator=gen).to(device)
    t = ops.topk_threshold(scores, 300)
    counts = ops.prune_counts(scores, t)
    torch.testing.assert_close(counts, reference.prune_counts(scores, t))
    assert int(counts.sum()) >= 300
    for order in ("score", "position"):
        flat, off = ops.prune_pack(dense, scores, counts, order)
        want = reference.prune_pack(dense, scores, off, order == "score")
        assert torch.equal(flat, want)
        assert torch.equal(off[1:] - off[:-1], counts)


def test_prune_bad_input():
    with pytest.raises(ValueError, match="k must be in"):
        ops.topk_threshold(torch.rand(10), 11)
    s = torch.rand(10).double()  # other float dtypes are read as float32, as prune_pack reads them
    assert torch.equal(ops.topk_threshold(s, 3), ops.topk_threshold(s.float(), 3))
    assert torch.equal(
        ops.prune_counts(s.half().reshape(2, 5), 0.5), ops.prune_counts(s.half().float().reshape(2, 5), 0.5)
    )
    with pytest.raises(TypeError, match="floating-point"):
        ops.topk_threshold(torch.arange(10), 1)
    with pytest.raises(TypeError, match="k must be an integer, got 2.7"):
        ops.topk_threshold(torch.rand(10), 2.7)
    with pytest.raises(TypeError, match="k must be an integer, got True"):
        ops.topk_threshold(torch.rand(10), True)
    with pytest.raises(ValueError, match="threshold must be one number"):
        ops.prune_counts(torch.rand(3, 4), torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="sizes must be integers"):
        ops.prune_pack(torch.rand(3, 4), torch.rand(3, 4), torch.tensor([2.9, 1.0, 1.0]))
    with pytest.raises(ValueError, match="sizes must be in"):
        ops.prune_pack(torch.rand(3, 4), torch.rand(3, 4), torch.tensor([1, 5, 2]))
    with pytest.raises(ValueError, match="order"):
        ops.prune_pack(torch.rand(3, 4), torch.rand(3, 4), torch.tensor([1, 2, 2]), order="random")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["snip", "grad"])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_accumulate_scores_matches_reference(device, rule, mode):
    from conftest import make_table, random_bags

    V, D = 30, 8
    w, offsets, col, width, _ = make_table(V, D, torch.float32, device, seed=4)
    gen = torch.Generator().manual_seed(5)
    sc = torch.rand(w.numel()).to(device)
    sc_ref = sc.clone()
    for _ in range(3):
        idx, off = random_bags(V, 7, 5, gen, torch.int64, device, padding_idx=2)
        bo = torch.cat([off, off.new_tensor([idx.numel()])])
        out, argmax = torch.ops.pme.bag_forward(w, offsets, idx, bo, None, col, width, ops.MODES[mode], 2)
        go = torch.randn(out.shape, generator=gen).to(device)
        ops.accumulate_scores_(sc, go, w, offsets, idx, bo, argmax=argmax, mode=mode, padding_idx=2, rule=rule)
        reference.accumulate_scores_(
            sc_ref, go, w, reference.Lookup(offsets, idx, bo, width, None, mode, None, 2), rule
        )
    torch.testing.assert_close(sc, sc_ref, rtol=1e-5, atol=1e-6)


def test_baselines_meet_the_budget():
    shapes = {"a": (100, 16), "b": (37, 16)}
    dense = sum(v * d for v, d in shapes.values())
    for b in (0.05, 0.2, 0.5, 1.0):
        u = uniform_sizes(shapes, b)
        assert sum(int(s.sum()) for s in u.values()) <= b * dense
        rs = random_sizes(shapes, b, quantum=4, min_size=0)
        tot = sum(int(s.sum()) for s in rs.values())
        assert tot <= b * dense and tot >= 0.8 * b * dense
        counts = {"a": torch.randint(0, 1000, (100,)), "b": torch.randint(0, 10, (37,))}
        p = popularity_sizes(counts, {"a": 16, "b": 16}, b)
        assert sum(int(s.sum()) for s in p.values()) <= b * dense
    # popular tokens get larger sizes
    counts = {"a": torch.arange(100) ** 2}
    p = popularity_sizes(counts, {"a": 16}, 0.3)["a"]
    assert int(p[-1]) >= int(p[0]) and int(p[-1]) > int(p[0])


def test_batch_to_moves_every_tensor_of_a_nested_batch():
    from pme.search import batch_to

    v, o = torch.tensor([1, 2, 3]), torch.tensor([0, 1])
    batch = {"fields": {"user": (v, o)}, "dense": None, "labels": torch.rand(2), "extra": [v, "tag", 3]}
    moved = batch_to(batch, "meta")
    assert moved["fields"]["user"][0].is_meta and moved["fields"]["user"][1].is_meta
    assert isinstance(moved["fields"]["user"], tuple) and moved["dense"] is None and moved["labels"].is_meta
    assert moved["extra"][0].is_meta and moved["extra"][1:] == ["tag", 3]
    assert batch_to(batch, None) is batch
    assert not batch["labels"].is_meta  # the input is left as it was


def test_bench_cli_passes_options_through(tmp_path, capsys):
    """`pme bench` runs the packaged benchmark (no checkout needed) with its own options."""
    from pme.cli import main

    out = tmp_path / "b.json"
    assert (
        main(
            [
                "bench",
                "--quick",
                "--methods",
                "pme",
                "--rows",
                "1000",
                "--bags",
                "8",
                "--repeats",
                "3",
                "--copy-mb",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("pme bench --quick") and doc["complete"]
    (case,) = doc["configs"]
    assert case["config"]["rows"] == 1000 and {r["method"] for r in case["results"]} == {"pme"}
    assert all(len(r["times_ms"]) >= 3 for r in case["results"] if "times_ms" in r)
    with pytest.raises(SystemExit):
        main(["bench", "--no-such-option"])
    assert "--no-such-option" in capsys.readouterr().err


def test_search_float64_tables_and_custom_loss():
    """A generic model (not pme.recsys.models), a loss_fn, float64 tables: the same sizes as in float32."""
    torch.manual_seed(0)
    V, D = 40, 8
    x = torch.randint(0, V, (64, 3))
    y = torch.rand(64)

    class Net(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.table = torch.nn.EmbeddingBag(V, D, mode="sum", dtype=dtype)

        def forward(self, x):
            return self.table(x).sum(-1)

    def loss_fn(model, batch):
        xb, yb = batch
        return ((model(xb) - yb.to(model.table.weight.dtype)) ** 2).mean()

    n32 = Net(torch.float32)
    n64 = Net(torch.float64)
    with torch.no_grad():
        n64.table.weight.copy_(n32.table.weight.double())
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    r32 = search(
        n32, batches, budget=0.5, rule="taylor", num_batches=4, loss_fn=loss_fn, quantum=1, min_size=0, progress=False
    )
    r64 = search(
        n64, batches, budget=0.5, rule="taylor", num_batches=4, loss_fn=loss_fn, quantum=1, min_size=0, progress=False
    )
    assert r64.kept_entries <= r64.budget_entries
    assert torch.equal(r32.sizes["table"], r64.sizes["table"])
    with pytest.raises(TypeError, match="loss_fn"):
        search(n32, batches, budget=0.5, rule="taylor", progress=False)


def test_bench_takes_cuda_without_an_index(monkeypatch):
    """`pme bench --device cuda` (and the default on a GPU machine) names the current CUDA device:
    torch.cuda.set_device refuses torch.device("cuda"), which once stopped the GPU benchmark."""
    from torch.cuda._utils import _get_device_index

    import pme.bench

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    dev = pme.bench.pick_device("cuda")
    assert dev == torch.device("cuda", 3)
    assert _get_device_index(dev) == 3  # what set_device does with its argument
    assert pme.bench.pick_device("cuda:1") == torch.device("cuda", 1)
    assert pme.bench.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pme.bench.pick_device(None) == torch.device("cpu")
