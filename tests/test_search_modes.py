"""The search's modes against float64 autograd and its sizes at equal budget (the grouped layout's
shared projections and ``pme.search`` staying callable whatever was imported, on the toolkit's
models: tests/recsys/test_search_on_recsys.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import pme
from pme.search import normalize_scores, search, sizes_at_budget, table_shapes


class _Net(torch.nn.Module):
    """Two bag tables (sum and mean) and a linear head: a tiny CTR-like model in any dtype."""

    def __init__(self, dtype=torch.float32, V=(30, 11), D=8):
        super().__init__()
        torch.manual_seed(3)
        self.embeddings = torch.nn.ModuleDict(
            {
                "a": torch.nn.EmbeddingBag(V[0], D, mode="sum", dtype=dtype),
                "b": torch.nn.EmbeddingBag(V[1], D, mode="mean", dtype=dtype),
            }
        )
        self.head = torch.nn.Linear(2 * D, 1, dtype=dtype)

    def forward(self, batch):
        f = batch["fields"]
        e = torch.cat([self.embeddings[k](*f[k]) for k in ("a", "b")], 1)
        return self.head(e).squeeze(1)


def _batches(n_batches, B=16, V=(30, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        la = torch.randint(0, 4, (B,), generator=g)  # bags of 0-3 ids: empty bags and duplicates
        lb = torch.randint(1, 3, (B,), generator=g)
        va = torch.randint(0, V[0], (int(la.sum()),), generator=g)
        va[: min(3, va.numel())] = V[0] - 1  # the largest index, repeated
        vb = torch.randint(0, V[1], (int(lb.sum()),), generator=g)
        oa = torch.cat([torch.zeros(1, dtype=torch.int64), la.cumsum(0)[:-1]])
        ob = torch.cat([torch.zeros(1, dtype=torch.int64), lb.cumsum(0)[:-1]])
        out.append({"fields": {"a": (va, oa), "b": (vb, ob)}, "labels": torch.randint(0, 2, (B,), generator=g).float()})
    return out


def _dense_grads64(model, batch):
    m = copy.deepcopy(model).double()
    b = {"fields": batch["fields"], "labels": batch["labels"].double()}
    loss = F.binary_cross_entropy_with_logits(m(b), b["labels"])
    loss.backward()
    return {
        f"embeddings.{k}": (m.embeddings[k].weight.detach(), m.embeddings[k].weight.grad.detach()) for k in ("a", "b")
    }


@pytest.mark.parametrize("rule", ["taylor", "snip", "grad", "saliency"])
def test_batch_scores_match_float64_autograd(rule):
    model = _Net()
    train, held = _batches(3, seed=1), _batches(2, seed=2)
    r = search(
        model,
        train,
        budget=0.5,
        rule=rule,
        num_batches=3,
        normalize="none",
        held_out=held if rule == "saliency" else None,
        quantum=1,
        min_size=0,
        progress=False,
    )
    expect = {n: torch.zeros(30 if n.endswith("a") else 11, 8, dtype=torch.float64) for n in r.scores}
    for b in held if rule == "saliency" else train:
        for n, (w, g) in _dense_grads64(model, b).items():
            expect[n] += (g * g) if rule == "grad" else (w * g).abs()
    for n in r.scores:
        torch.testing.assert_close(r.scores[n].double(), expect[n], rtol=1e-4, atol=1e-7)


def test_magnitude_movement_and_field_normalisation():
    model = _Net()
    train = _batches(4, seed=1)
    r = search(model, train, budget=0.5, rule="magnitude", normalize="none", progress=False)
    for k in ("a", "b"):
        torch.testing.assert_close(r.scores[f"embeddings.{k}"], model.embeddings[k].weight.detach().abs())
    # movement: |w after 4 Adam steps - w before|, the warm-up replayed here
    r = search(
        model, train, budget=0.5, rule="movement", warmup_steps=4, warmup_lr=1e-2, normalize="none", progress=False
    )
    m = copy.deepcopy(model)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for b in train:
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(m(b), b["labels"]).backward()
        opt.step()
    for k in ("a", "b"):
        torch.testing.assert_close(
            r.scores[f"embeddings.{k}"], (m.embeddings[k].weight - model.embeddings[k].weight).detach().abs()
        )
    # per-field normalisation: divided by the mean over the rows the batches touched
    rf = search(
        model, train, budget=0.5, rule="movement", warmup_steps=4, warmup_lr=1e-2, normalize="field", progress=False
    )
    for k in ("a", "b"):
        n = f"embeddings.{k}"
        seen = torch.zeros(r.scores[n].shape[0], dtype=torch.bool)
        for b in train:
            seen[b["fields"][k][0]] = True
        torch.testing.assert_close(rf.scores[n], r.scores[n] / r.scores[n][seen].double().mean().float())
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_scores(r.scores, "max")


def test_trained_mode_sizes_meet_budget_and_follow_the_scores():
    """Scoring a trained model (no warm-up): sizes meet the budget to within one quantum and a
    row whose entries all outscore another's is at least as large."""
    model = _Net(D=16)
    r = search(model, _batches(2), budget=0.6, progress=False)  # 0.6 * 16 >= two quanta: steps of 4
    target = int(0.6 * r.dense_entries)
    assert target - 4 < r.kept_entries <= target
    for n, s in r.sizes.items():
        assert bool((s % 4 == 0).all()) and int(s.min()) >= 4 and int(s.max()) <= 16
        sc = r.scores[n]
        lo, hi = sc.max(1).values, sc.min(1).values
        i, j = int(torch.argmin(lo)), int(torch.argmax(hi))
        if float(hi[j]) > float(lo[i]):
            assert int(s[j]) >= int(s[i])


def test_search_mode_errors():
    model = _Net()
    with pytest.raises(ValueError, match="needs held_out"):
        search(model, _batches(1), rule="saliency", progress=False)
    with pytest.raises(ValueError, match="movement"):
        search(model, _batches(1), rule="movement", progress=False)
    with pytest.raises(ValueError, match="rule must be one of"):
        search(model, _batches(1), rule="nope", progress=False)
    with pytest.raises(ValueError, match="normalize must be one of"):
        search(model, _batches(1), normalize="nope", progress=False)
    with pytest.raises(ValueError, match="warmup_steps"):
        search(model, _batches(1), warmup_steps=-1, progress=False)
    with pytest.raises(ValueError, match="needs result"):
        sizes_at_budget("pme", 0.2)
    with pytest.raises(ValueError, match="needs model"):
        sizes_at_budget("uniform", 0.2)
    with pytest.raises(ValueError, match="needs data"):
        sizes_at_budget("popularity", 0.2, model=model)
    with pytest.raises(ValueError, match="method must be one of"):
        sizes_at_budget("best", 0.2, model=model)


@settings(max_examples=40, deadline=None)
@given(
    vs=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    D=st.sampled_from([8, 16, 64]),
    budget=st.floats(0.02, 1.0),
    seed=st.integers(0, 1000),
)
def test_sizes_at_budget_exact_for_every_method(vs, D, budget, seed):
    """Every method's total is floor(budget * V * D) or less than one quantum below it (when the
    rows have room), keyed by the model's table names."""
    names = [f"embeddings.f{i}" for i in range(len(vs))]
    model = torch.nn.Module()
    model.embeddings = torch.nn.ModuleDict({n.split(".")[1]: torch.nn.EmbeddingBag(v, D) for n, v in zip(names, vs)})
    shapes = table_shapes(model)
    assert shapes == {n: (v, D) for n, v in zip(names, vs)}
    dense = sum(vs) * D
    target = int(budget * dense)
    g = torch.Generator().manual_seed(seed)
    counts = {n: torch.randint(0, 1000, (v,), generator=g) for n, v in zip(names, vs)}
    scores = {n: torch.rand(v, D, generator=g) for n, v in zip(names, vs)}
    r = pme.search.SearchResult({}, scores, target, 0, dense, None, 0.0, "magnitude")
    for method in ("uniform", "popularity", "random", "pme"):
        try:
            s = sizes_at_budget(method, budget, model=model, counts=counts, result=r, seed=seed)
        except ValueError as e:  # a floor of one quantum a row can exceed a tiny budget
            assert "below what min_size" in str(e)
            continue
        assert set(s) == set(names)
        q = 1 if method == "uniform" or budget * D < 8 else 4
        total = sum(int(x.sum()) for x in s.values())
        assert total <= target, method
        if all(int(x.min()) < D for x in s.values()):
            assert total > target - q, (method, total, target)
        for x in s.values():
            assert int(x.min()) >= 0 and int(x.max()) <= D and bool((x % q == 0).all())


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 200), st.sampled_from([2, 3, 5, 8, 16, 64, 65])), min_size=1, max_size=5),
    budget=st.floats(0.02, 1.0),
    ties=st.sampled_from(["none", "few levels", "zeros"]),
    seed=st.integers(0, 1000),
)
def test_budget_met_with_mixed_widths_and_tied_scores(shapes, budget, ties, seed):
    """Tables of different widths (uniform's one size clamps to the narrow ones) and scores that tie
    across the threshold (rows no batch touched all score 0) still meet the budget: the total is at
    most floor(budget * entries) and within one quantum of it unless no row has room left."""
    names = [f"t{i}" for i in range(len(shapes))]
    model = torch.nn.ModuleDict({n: torch.nn.EmbeddingBag(V, D) for n, (V, D) in zip(names, shapes)})
    g = torch.Generator().manual_seed(seed)
    scores = {}
    for n, (V, D) in zip(names, shapes):
        sc = torch.rand(V, D, generator=g)
        if ties == "few levels":
            sc = (sc * 3).floor() / 3
        elif ties == "zeros":
            sc[torch.rand(V, generator=g) < 0.5] = 0.0
        scores[n] = sc
    counts = {n: torch.randint(0, 50, (V,), generator=g) for n, (V, _) in zip(names, shapes)}
    dense = sum(V * D for V, D in shapes)
    target = int(budget * dense)
    for method in ("uniform", "popularity", "random", "pme"):
        try:
            found = pme.search.from_scores(scores, budget) if method == "pme" else None
            s = sizes_at_budget(method, budget, model=model, counts=counts, result=found, seed=seed)
        except ValueError as e:  # a floor of one quantum a row can exceed a tiny budget
            assert "below what" in str(e) and "min_size" in str(e), (method, str(e))
            continue
        q = (
            1
            if method == "uniform"
            else pme.search._grid(budget, min(D for _, D in shapes), torch.float32, None, None)[0]
        )
        total = sum(int(x.sum()) for x in s.values())
        assert total <= target, (method, total, target)
        room = any(bool((s[n] + q <= D).any()) for n, (_, D) in zip(names, shapes))
        if room:
            assert total > target - q, (method, total, target, q)
        for n, (_, D) in zip(names, shapes):
            assert int(s[n].min()) >= 0 and int(s[n].max()) <= D


def test_equal_scores_and_a_floor_that_fits_exactly():
    """All-equal scores (every threshold keeps whole rows) and a budget that only the floor meets
    give sizes, not an error."""
    r = pme.search.from_scores({"a": torch.ones(200, 16)}, 0.2)
    assert r.kept_entries == r.budget_entries == 640
    sc = torch.rand(10, 5)
    sc[0] += 10
    r = pme.search.from_scores({"a": sc}, 0.2)  # 10 entries: every row at the floor of 1
    assert r.sizes["a"].tolist() == [1] * 10
    with pytest.raises(ValueError, match="below what min_size=1 allows"):
        pme.search.from_scores({"a": sc}, 0.1)


def test_for_budget_defaults_to_the_search_grid():
    """``result.for_budget(b)`` cuts on the grid ``pme.search`` and ``sizes_at_budget('pme')`` use."""
    g = torch.Generator().manual_seed(0)
    found = pme.search.from_scores({"a": torch.rand(300, 16, generator=g), "b": torch.rand(50, 16, generator=g)}, 0.5)
    for b in (0.5, 0.1):
        cut = found.for_budget(b).sizes
        same = sizes_at_budget("pme", b, result=found)
        assert all(torch.equal(cut[n], same[n]) for n in cut)
        assert min(int(x.min()) for x in cut.values()) >= 1
    assert all(bool((x % 4 == 0).all()) for x in found.for_budget(0.5).sizes.values())
    half = pme.search.from_scores({"a": torch.rand(300, 64, generator=g)}, 0.5, dtype=torch.float16)
    assert bool((half.for_budget(0.5).sizes["a"] % 8 == 0).all())  # 16 bytes of fp16


def test_grouped_falls_back_to_finer_classes():
    """A budget too small for the quantum's smallest projection still gets classes from 1."""
    m = torch.nn.ModuleDict({"a": torch.nn.EmbeddingBag(13, 64)})
    found = pme.search.from_scores({"a": torch.rand(13, 64)}, 1.0)
    for b in (0.1, 0.3, 0.7):
        s = sizes_at_budget("grouped", b, result=found)
        assert s is not None, b
        used = pme.search.projection_entries(s, {"a": 64}) + int(s["a"].sum())
        assert used <= int(b * 13 * 64)
    assert m is not None


def test_tied_tables_are_converted_everywhere():
    """A table shared by two attributes (tied) is swapped under both names; naming both, or the
    model itself, is refused."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Embedding(100, 16)
            self.dec = self.enc
            self.more = torch.nn.ModuleDict({"alias": self.enc})

    t = Tied()
    found = pme.search(t, [], 0.3, progress=False)
    assert list(found.sizes) == ["enc"]
    found.convert(t)
    assert isinstance(t.enc, pme.MultiSizeEmbedding) and t.dec is t.enc and t.more["alias"] is t.enc
    t2 = Tied()
    with pytest.raises(ValueError, match="same \\(tied\\) table"):
        pme.convert(t2, {"enc": 16, "dec": 16})
    bare = torch.nn.EmbeddingBag(10, 8)
    with pytest.raises(ValueError, match="the model itself"):
        pme.convert(bare, {"": 8})
    with pytest.raises(ValueError, match="itself an embedding table"):
        pme.search(bare, [], 0.5, progress=False)


def test_search_argument_errors():
    """Arguments of the wrong kind say so: a table name as a string, width-1 tables only, a string
    budget, a bad grid, counts of the wrong length or not finite."""
    model = torch.nn.ModuleDict({"emb": torch.nn.EmbeddingBag(10, 8), "bias": torch.nn.Embedding(10, 1)})
    assert list(pme.search(model, [], 0.5, tables="emb", progress=False).sizes) == ["emb"]
    with pytest.raises(ValueError, match="all of width 1"):
        pme.search(torch.nn.ModuleDict({"bias": torch.nn.Embedding(10, 1)}), [], 0.5, progress=False)
    with pytest.raises(ValueError, match="names no table"):
        pme.search(model, [], 0.5, tables=[], progress=False)
    with pytest.raises(TypeError, match="budget must be a number"):
        pme.search(model, [], [0.5], progress=False)
    with pytest.raises(ValueError, match="budget must be in"):
        pme.search(model, [], "0.5", progress=False)
    with pytest.raises(ValueError, match="quantum must be >= 1"):
        pme.search.from_scores({"a": torch.rand(4, 8)}, 0.5, quantum=0)
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        pme.search.sizes_for_budget({"a": torch.rand(4, 8)}, 0.5, min_size=-1)
    with pytest.raises(ValueError, match="has 7 entries but the table has 10 rows"):
        sizes_at_budget("popularity", 0.3, model=model, counts={"emb": torch.ones(7)})
    with pytest.raises(ValueError, match="finite and >= 0; row 2"):
        bad = torch.ones(10)
        bad[2] = float("nan")
        sizes_at_budget("popularity", 0.3, model=model, counts={"emb": bad})
    one = pme.search.from_scores({"empty": torch.rand(0, 8), "a": torch.rand(5, 8)}, 0.5)
    assert one.sizes["empty"].numel() == 0 and one.kept_entries <= one.budget_entries


def test_rewound_conversion_keeps_initial_values():
    """``result.convert(initial_model, init="kept")`` restarts the surviving entries from their
    initial values (the best-scored ones of each row, in column order)."""
    init = _Net(D=8)
    trained = copy.deepcopy(init)
    with torch.no_grad():
        for t in trained.embeddings.values():
            t.weight.mul_(torch.rand_like(t.weight) * 10)
    r = search(trained, _batches(1), budget=0.5, quantum=1, min_size=1, normalize="none", progress=False)
    before = {k: t.weight.detach().clone() for k, t in init.embeddings.items()}
    m = r.convert(copy.deepcopy(init), init="kept")
    for k, t in m.embeddings.items():
        dense = t.to_dense()
        sc = r.scores[f"embeddings.{k}"]
        for row in range(dense.shape[0]):
            s = int(r.sizes[f"embeddings.{k}"][row])
            cols = torch.sort(torch.sort(-sc[row].double(), stable=True).indices[:s]).values
            torch.testing.assert_close(dense[row, :s], before[k][row, cols])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_grouped_top_up_promotes_the_best_next_entries_into_used_classes(seed, k):
    """The budget left after snapping to classes goes to the rows whose promotion adds the
    best-scored entries (mean score of the added entries, float64 oracle), only into classes the
    width already uses, and never past the room."""
    from pme.search import _grouped_top_up

    g = torch.Generator().manual_seed(seed)
    D = 16
    scores = {"a": torch.rand(6, D, generator=g), "b": torch.rand(5, D, generator=g)}
    sizes = {"a": torch.tensor([4, 4, 4, 4, 4, 8]), "b": torch.full((5,), 4)}  # classes used: 4 and 8
    before = {n: s.clone() for n, s in sizes.items()}
    room = sum(int(s.sum()) for s in sizes.values()) + 4 * k + 3  # k promotions of 4 entries fit, not k + 1
    out = _grouped_top_up(sizes, scores, {"a": D, "b": D}, room)
    # oracle: each size-4 row's gain is the mean of its 5th-8th best scores; the k best rise to 8
    gain = []
    for n in ("a", "b"):
        srt = torch.sort(scores[n].double(), dim=1, descending=True).values
        gain += [(n, i, float(srt[i, 4:8].mean())) for i in range(len(sizes[n])) if sizes[n][i] == 4]
    best = sorted(gain, key=lambda t: -t[2])[:k]
    want = {n: sizes[n].clone() for n in sizes}
    for n, i, _ in best:
        want[n][i] = 8
    for n in sizes:
        assert torch.equal(out[n], want[n]), (n, out[n], want[n])
        assert set(out[n].tolist()) <= {4, 8}  # 16 is no class of this width yet: its projection is not counted
    assert sum(int(s.sum()) for s in out.values()) <= room
    assert all(torch.equal(sizes[n], before[n]) for n in sizes)  # the input is left as it was


def _shrink64(scores, counts, k):
    """shrink_scores written out row by row in float64: the reference."""
    out = {}
    for name, sc in scores.items():
        sc = sc.double()
        V, D = sc.shape
        n = counts[name].double()
        rows = [r for r in range(V) if n[r] > 0] or list(range(V))
        profile = torch.zeros(D, dtype=torch.float64)
        for r in rows:
            profile += torch.sort(sc[r], descending=True, stable=True).values
        profile /= len(rows)
        o = torch.empty_like(sc)
        for r in range(V):
            lam = n[r] / (n[r] + k * D)
            order = torch.sort(sc[r], descending=True, stable=True).indices
            for rank, j in enumerate(order.tolist()):
                o[r, j] = lam * sc[r, j] + (1 - lam) * profile[rank]
        out[name] = o
    return out


@settings(max_examples=25, deadline=None)
@given(
    V=st.integers(1, 12),
    D=st.sampled_from([1, 4, 8]),
    k=st.sampled_from([0.25, 1.0, 4.0]),
    seed=st.integers(0, 1000),
    ties=st.booleans(),
)
def test_shrink_scores_match_a_float64_reference(V, D, k, seed, ties):
    """Against the row-by-row float64 formula: unseen rows (count 0), rare and frequent ones,
    tied scores; the order of the entries inside every row is kept."""
    from pme.search import shrink_scores

    g = torch.Generator().manual_seed(seed)
    sc = torch.rand(V, D, generator=g)
    if ties:
        sc = (sc * 3).floor()
    counts = torch.randint(0, 3, (V,), generator=g) * torch.randint(0, 200, (V,), generator=g)
    got = shrink_scores({"t": sc}, {"t": counts}, k)["t"]
    want = _shrink64({"t": sc}, {"t": counts}, k)["t"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    if not ties:
        assert torch.equal(torch.argsort(got, 1, descending=True), torch.argsort(sc, 1, descending=True))


def test_shrink_limits_and_search_with_counts():
    """Strength 0 and very frequent tokens leave the scores as they are; tokens never seen all
    get the table's profile (so the same size); search(counts=...) cuts the shrunk scores."""
    from pme.search import default_granularity, shrink_scores, sizes_for_budget

    sc = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shrink_scores({"t": sc}, {"t": torch.zeros(6)}, 0.0)["t"], sc)
    torch.testing.assert_close(shrink_scores({"t": sc}, {"t": torch.full((6,), 10**9)})["t"], sc)
    counts = torch.tensor([0, 0, 0, 50, 50, 50])
    out = shrink_scores({"t": sc}, {"t": counts})["t"]
    unseen = torch.sort(out[:3], 1, descending=True).values
    assert torch.equal(unseen[0], unseen[1]) and torch.equal(unseen[0], unseen[2])
    # the profile is the mean of the seen rows' sorted scores
    torch.testing.assert_close(unseen[0], torch.sort(sc[3:], 1, descending=True).values.mean(0))

    model = _Net(D=16)
    data = _batches(2)
    counts = {"embeddings.a": torch.arange(30) % 4, "embeddings.b": torch.arange(11) * 7}
    plain = search(model, data, budget=0.4, progress=False)
    r = search(model, data, budget=0.4, counts=counts, shrink=2.0, progress=False)
    assert r.shrink == 2.0 and plain.shrink is None
    want = shrink_scores(plain.scores, counts, 2.0)
    for n in want:
        torch.testing.assert_close(r.scores[n], want[n])
    q, floor = default_granularity(0.4, 16, 4)
    sizes, _ = sizes_for_budget(want, 0.4, quantum=q, min_size=floor)
    assert all(torch.equal(r.sizes[n], sizes[n]) for n in sizes)
    assert "shrink=2.0" in repr(r) and "shrink=None" in repr(plain)


def test_shrink_errors():
    from pme.search import shrink_scores

    sc = {"t": torch.rand(3, 4)}
    with pytest.raises(KeyError, match=r"counts lack tables \['t'\]"):
        shrink_scores(sc, {})
    with pytest.raises(ValueError, match=r"counts\['t'\] has 2 entries but the table has 3 rows"):
        shrink_scores(sc, {"t": torch.ones(2)})
    with pytest.raises(ValueError, match=r"counts\['t'\] must be finite and >= 0; row 1 holds -1"):
        shrink_scores(sc, {"t": torch.tensor([1, -1, 0])})
    with pytest.raises(ValueError, match="strength must be >= 0"):
        shrink_scores(sc, {"t": torch.ones(3)}, -1.0)
    with pytest.raises(ValueError, match="shrink must be >= 0"):
        search(_Net(), _batches(1), counts={}, shrink=-0.5, progress=False)


def _reference_training_scores(model, batches, make_opt, rule, start_step):
    """Trains a copy of ``model`` in float64 with ``make_opt``; before each step after the first
    ``start_step``, adds ``|w * g|`` (``taylor``) or ``g^2`` (``grad``) of the step's gradient."""
    m = copy.deepcopy(model).double()
    opt = make_opt(m.parameters())
    ref = {f"embeddings.{k}": torch.zeros_like(m.embeddings[k].weight) for k in ("a", "b")}
    for step, b in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(m(b), b["labels"].double()).backward()
        if step >= start_step:
            for k in ("a", "b"):
                w, g = m.embeddings[k].weight.detach(), m.embeddings[k].weight.grad
                g = g.to_dense() if g.is_sparse else g
                ref[f"embeddings.{k}"] += (w * g).abs() if rule == "taylor" else g * g
        opt.step()
    return ref


@pytest.mark.parametrize("rule", ["taylor", "grad"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("start_step", [0, 3])
def test_training_scores_follow_a_float64_training_run(rule, sparse, start_step):
    """TrainingScores on plain nn.EmbeddingBag tables (dense and sparse gradients, duplicates, empty
    bags, the largest index) equals the float64 sum of each step's |w * g| / g^2 along the
    same training trajectory, from ``start_step`` on; training itself is unchanged."""
    model = _Net()
    for k in ("a", "b"):
        model.embeddings[k].sparse = sparse
    batches = _batches(7)
    make_opt = (lambda p: torch.optim.SGD(p, lr=0.5)) if sparse else (lambda p: torch.optim.Adam(p, lr=0.05))
    ref = _reference_training_scores(model, batches, make_opt, rule, start_step)
    plain = copy.deepcopy(model)
    acc = pme.search.TrainingScores(model, rule=rule, start_step=start_step)
    for m_ in (plain, model):
        opt = make_opt(m_.parameters())
        for b in batches:
            opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(m_(b), b["labels"]).backward()
            opt.step()
    got = acc.scores()
    assert acc.steps == {n: len(batches) - start_step for n in ref}
    for n, r in ref.items():
        assert got[n].dtype == torch.float32 and got[n].shape == r.shape
        torch.testing.assert_close(got[n].double(), r, rtol=1e-4, atol=1e-6)
        assert bool((r > 0).any())
    for k in ("a", "b"):  # the hooks only read: the same weights as without them, bit for bit
        assert torch.equal(plain.embeddings[k].weight, model.embeddings[k].weight)
    acc.remove()
    model(batches[0]).sum().backward()
    assert all(torch.equal(got[n], acc.scores()[n]) for n in got)  # removed: nothing more added


@pytest.mark.parametrize("rule", ["taylor", "grad"])
@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_training_scores_on_pme_tables(rule, path):
    """A full-width pme table, with a fused SGD (the scores come from the fused kernel before the
    update) or through autograd and torch SGD on its flat weight (the hook): equal to the float64
    SGD run on the same table; remove() gives the fused table its optimizer back."""
    V, D, lr = 23, 8, 0.3
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(V * D, generator=gen)
    fused = pme.MultiSizeEmbeddingBag(V, D, mode="sum", optimizer=pme.optim.SGD(lr=lr) if path == "fused" else None)
    fused.weight.data.copy_(w0)
    inner = fused.optimizer
    opt = torch.optim.SGD(fused.parameters(), lr=lr) if path == "autograd" else None
    ref_w = w0.double().reshape(V, D).clone()
    ref = torch.zeros(V, D, dtype=torch.float64)
    acc = pme.search.TrainingScores(torch.nn.ModuleDict({"t": fused}), rule=rule, start_step=1)
    assert ("TrainingScores" in repr(fused.optimizer)) == (path == "fused")
    for step in range(5):
        lens = torch.randint(0, 5, (9,), generator=gen)
        idx = torch.randint(0, V, (int(lens.sum()),), generator=gen)
        idx[:2] = V - 1  # the largest index, twice in one bag
        off = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)[:-1]])
        go = torch.randn(9, D, generator=gen)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        fused(idx, off).backward(go)
        if opt is not None:
            opt.step()
        g = torch.zeros(V, D, dtype=torch.float64)  # the table's gradient: sum of its bags' output gradients
        g.index_add_(0, idx, go.double().repeat_interleave(lens, 0))
        if step >= 1:
            ref += (ref_w * g).abs() if rule == "taylor" else g * g
        ref_w -= lr * g
    torch.testing.assert_close(fused.weight.detach().double().reshape(V, D), ref_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.scores()["t"].double(), ref, rtol=1e-4, atol=1e-5)
    assert acc.steps == {"t": 4}
    acc.remove()
    assert fused.optimizer is inner


def test_from_scores_equals_search_on_the_same_scores():
    """from_scores cuts given scores exactly as search does (magnitude of a model, with counts):
    the same sizes, meeting the budget; a second budget through for_budget."""
    model = _Net()
    counts = {"embeddings.a": torch.arange(30), "embeddings.b": torch.arange(11) * 3}
    found = search(model, _batches(2), budget=0.3, rule="magnitude", counts=counts, progress=False)
    mine = pme.search.from_scores(
        {n: model.embeddings[n.rpartition(".")[2]].weight.detach().abs() for n in found.sizes},
        0.3,
        counts=counts,
        rule="magnitude",
    )
    for n in found.sizes:
        assert torch.equal(found.sizes[n], mine.sizes[n])
    assert mine.kept_entries <= mine.budget_entries == int(0.3 * (30 + 11) * 8)
    assert mine.shrink == 1.0 and mine.rule == "magnitude"
    other = mine.for_budget(0.25, quantum=1, min_size=1)
    assert sum(int(s.sum()) for s in other.sizes.values()) == int(0.25 * (30 + 11) * 8)


def test_per_table_result_stays_per_table_at_other_budgets():
    """A search cut per table cuts every later budget per table too (for_budget and sizes_at_budget
    used to fall back to the global cut): each table then holds its own share, and its sizes are
    those of cutting its scores alone; per_table=False still asks for the global cut."""
    model = _Net()
    with torch.no_grad():  # table b's entries score far above a's: the global cut would starve a
        model.embeddings["b"].weight.mul_(100)
    found = search(model, _batches(2), budget=0.5, rule="magnitude", per_table=True, progress=False)
    assert found.per_table
    shapes = {"embeddings.a": (30, 8), "embeddings.b": (11, 8)}
    for b in (0.5, 0.25, 0.15):
        cut = found.for_budget(b, quantum=1, min_size=1)
        assert cut.per_table
        assert torch.equal(cut.sizes["embeddings.a"], sizes_at_budget("pme", b, result=found)["embeddings.a"])
        for n, (V, D) in shapes.items():
            alone, _ = pme.search.sizes_for_budget({n: found.scores[n]}, b, quantum=1, min_size=1)
            assert torch.equal(cut.sizes[n], alone[n])
            assert int(b * V * D) - 1 <= int(cut.sizes[n].sum()) <= int(b * V * D)
    glob = found.for_budget(0.25, per_table=False, quantum=1, min_size=1)
    assert not glob.per_table
    assert int(glob.sizes["embeddings.b"].sum()) > int(0.25 * 11 * 8)  # the global cut favours b


def test_training_scores_and_from_scores_errors():
    model = _Net()
    with pytest.raises(ValueError, match="rule must be one of"):
        pme.search.TrainingScores(model, rule="magnitude")
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        pme.search.TrainingScores(model, start_step=-1)
    with pytest.raises(KeyError, match="not embedding tables"):
        pme.search.TrainingScores(model, tables=["embeddings.zz"])
    frozen = _Net()
    frozen.embeddings["a"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="'embeddings.a' does not require gradients"):
        pme.search.TrainingScores(frozen)
    sized = torch.nn.ModuleDict({"t": pme.MultiSizeEmbeddingBag(5, 8, sizes=torch.tensor([8, 4, 8, 8, 8]))})
    with pytest.raises(ValueError, match="already multi-size"):
        pme.search.TrainingScores(sized)
    good = {"t": torch.rand(5, 8)}
    with pytest.raises(ValueError, match="budget must be in"):
        pme.search.from_scores(good, 0.0)
    with pytest.raises(ValueError, match=r"scores\['t'\] must be a \[V, D\] tensor"):
        pme.search.from_scores({"t": torch.rand(40)}, 0.5)
    with pytest.raises(TypeError, match="floating point"):
        pme.search.from_scores({"t": torch.ones(5, 8, dtype=torch.int64)}, 0.5)
    with pytest.raises(ValueError, match="no tables"):
        pme.search.from_scores({}, 0.5)
    with pytest.raises(KeyError, match="counts lack tables"):
        pme.search.from_scores(good, 0.5, counts={})


def test_shared_projection_survives_a_load_of_other_sizes():
    """convert_grouped(share=True): one projection per width; a checkpoint of other sizes and classes
    gives each table a projection of its own shape, and the model's load hook ties them again."""

    def make():
        return torch.nn.ModuleDict({n: torch.nn.EmbeddingBag(4, 8, mode="sum") for n in ("a", "b")})

    src = pme.search.convert_grouped(make(), {"a": torch.tensor([2, 4, 4, 2]), "b": torch.tensor([4, 4, 2, 2])})
    dst = pme.search.convert_grouped(make(), {"a": torch.tensor([4] * 4), "b": torch.tensor([4] * 4)})
    assert dst["a"].projection is dst["b"].projection
    dst.load_state_dict(src.state_dict())
    assert dst["a"].projection is dst["b"].projection
    assert torch.equal(dst["a"].projection, src["a"].projection)
    x, o = torch.tensor([0, 1, 3]), torch.tensor([0, 2])
    torch.testing.assert_close(dst["b"](x, o), src["b"](x, o))


def test_convert_arguments_are_checked():
    """convert_grouped takes sizes as convert does (a list, an int) and shares one projection per
    width and dtype; a wrong name is named. convert refuses scores for tables it does not convert,
    and scores with init='fresh' (which keeps no entry). from_pretrained(freeze=True) freezes the
    projection too."""
    m = torch.nn.ModuleDict({"a": torch.nn.EmbeddingBag(4, 8), "b": torch.nn.EmbeddingBag(4, 8, dtype=torch.float64)})
    pme.search.convert_grouped(m, {"a": [2, 4, 4, 2], "b": 4})
    assert m["a"].sizes.tolist() == [2, 4, 4, 2] and m["a"].projection is not m["b"].projection
    with pytest.raises(KeyError, match="'zz'"):
        pme.search.convert_grouped(torch.nn.ModuleDict({"a": torch.nn.EmbeddingBag(4, 8)}), {"zz": 4})
    one = torch.nn.ModuleDict({"a": torch.nn.EmbeddingBag(4, 8)})
    with pytest.raises(KeyError, match=r"scores name \['b'\]"):
        pme.convert(one, {"a": 4}, scores={"b": torch.rand(4, 8)})
    with pytest.raises(ValueError, match="init='fresh' draws new values"):
        pme.convert(one, {"a": 4}, init="fresh", scores={"a": torch.rand(4, 8)})
    f = pme.MultiSizeEmbeddingBag.from_pretrained(
        torch.randn(4, 8), sizes=[2, 4, 4, 2], layout="grouped", project=True, mode="sum"
    )
    assert not f.weight.requires_grad and not f.projection.requires_grad


def test_non_finite_or_negative_scores_and_counts_are_refused():
    """Scores from a diverged run (NaN, inf) and NaN or negative token counts are refused with the
    table and position named, instead of silently deciding sizes."""
    good = torch.rand(6, 4)
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        sc = good.clone()
        sc[2, 1] = bad_value
        with pytest.raises(ValueError, match=r"scores\['a'\] must be finite; row 2, column 1"):
            pme.search.from_scores({"a": sc}, 0.5)
    counts = torch.ones(6)
    counts[3] = float("nan")
    with pytest.raises(ValueError, match=r"counts\['a'\] must be finite and >= 0; row 3 holds nan"):
        pme.search.from_scores({"a": good}, 0.5, counts={"a": counts})
    counts[3] = -2.0
    with pytest.raises(ValueError, match=r"counts\['a'\] must be finite and >= 0; row 3 holds -2"):
        pme.search.from_scores({"a": good}, 0.5, counts={"a": counts})
    assert int(pme.search.from_scores({"a": good}, 0.5).sizes["a"].sum()) > 0


def test_baseline_size_rules_check_budget_and_quantum():
    """uniform / random / popularity sizes and grouped_sizes refuse a budget outside (0, 1] and a
    quantum below 1, as pme.search does (random used to give all-zero or all-full sizes, grouped a
    None that reads as 'no classes fit', uniform a ZeroDivisionError)."""
    shapes = {"a": (20, 8)}
    counts = {"a": torch.arange(20.0)}
    for call in (
        lambda b, q: pme.search.uniform_sizes(shapes, b, quantum=q),
        lambda b, q: pme.search.random_sizes(shapes, b, quantum=q),
        lambda b, q: pme.search.popularity_sizes(counts, {"a": 8}, b, quantum=q),
    ):
        for b in (0, -0.5, 2):
            with pytest.raises(ValueError, match="budget must be in"):
                call(b, 1)
        with pytest.raises(ValueError, match="quantum must be >= 1"):
            call(0.5, 0)
        assert int(call(0.5, 2)["a"].sum()) == 80
    result = pme.search.from_scores({"a": torch.rand(20, 8)}, 0.5)
    with pytest.raises(ValueError, match="budget must be in"):
        pme.search.grouped_sizes(result, 2)


@pytest.mark.parametrize("rule", ["taylor", "magnitude"])
def test_search_on_full_width_fused_tables_equals_the_plain_twin(rule):
    """A full-width pme table with a fused optimizer is searchable with every rule (its copy scores
    by plain gradients; it used to be refused as 'frozen?' for gradient rules): the sizes equal those
    of the same table without the optimizer, and the model itself is not stepped."""
    V, D = 30, 8

    def model(fused):
        opt = pme.optim.RowwiseAdagrad(lr=0.1) if fused else None
        return torch.nn.ModuleDict({"t": pme.MultiSizeEmbeddingBag(V, D, mode="sum", optimizer=opt)})

    a, b = model(True), model(False)
    with torch.no_grad():
        b["t"].weight.copy_(a["t"].weight)
    w0 = a["t"].weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, V, (16,), generator=g), torch.randn(4, generator=g)) for _ in range(4)]

    def loss_fn(m, batch):
        idx, y = batch
        return torch.nn.functional.mse_loss(m["t"](idx, torch.arange(0, 16, 4)).sum(1), y)

    kw = dict(rule=rule, loss_fn=loss_fn, num_batches=4, progress=False)
    ra, rb = pme.search(a, batches, 0.5, **kw), pme.search(b, batches, 0.5, **kw)
    assert torch.equal(ra.sizes["t"], rb.sizes["t"])
    assert int(a["t"].optim_step) == 0 and torch.equal(a["t"].weight, w0) and a["t"].optimizer is not None


@pytest.mark.parametrize("rule", ["magnitude", "taylor"])
def test_non_finite_weights_are_refused_by_the_search(rule):
    """A table with a NaN (a diverged run) used to be cut as if nothing were wrong: NaN scores
    decided the sizes silently. The search names the table, the row and the column."""
    model = _Net()
    with torch.no_grad():
        model.embeddings["a"].weight[3, 2] = float("nan")
    where = "row 3, column 2" if rule == "magnitude" else "row 3, column"  # taylor: NaN * gradient
    with pytest.raises(ValueError, match=f"{rule} scores of table 'embeddings.a' must be finite; {where}"):
        pme.search(model, _batches(2), 0.5, rule=rule, num_batches=2, progress=False)
    with torch.no_grad():
        model.embeddings["a"].weight[3, 2] = float("inf")
    with pytest.raises(ValueError, match="diverged"):
        pme.search(model, _batches(2), 0.5, progress=False)


def test_meta_tables_search_says_so_and_baselines_need_only_shapes():
    """A model built on the meta device has shapes but no values: the search says that (it used to
    fail inside torch with 'Tensor.item() cannot be called on meta tensors'); the baselines, which
    need only the shapes, meet the budget."""
    with torch.device("meta"):
        model = _Net()
    with pytest.raises(ValueError, match="meta device and hold no values"):
        pme.search(model, None, 0.5, progress=False)
    dense = 30 * 8 + 11 * 8
    for method in ("uniform", "random"):
        sizes = sizes_at_budget(method, 0.5, model=model)
        assert sum(int(s.sum()) for s in sizes.values()) == dense // 2


def test_a_tied_table_is_searched_under_the_name_given():
    """``tables=`` may name any alias of a shared table (``pme.convert`` accepts every alias); it
    used to be refused as 'not an embedding table of the model'. Two aliases of one table are
    refused as such, by the search and by the baselines."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.enc = torch.nn.EmbeddingBag(40, 16)
            self.dec = self.enc
            self.other = torch.nn.EmbeddingBag(10, 16)

    t = Tied()
    found = pme.search(t, None, 0.25, tables=["dec", "other"], progress=False)
    assert list(found.sizes) == ["dec", "other"]
    assert torch.equal(found.sizes["dec"], pme.search(t, None, 0.25, progress=False).for_budget(0.25).sizes["enc"])
    assert table_shapes(t, ["dec"]) == {"dec": (40, 16)}
    for method in ("uniform", "random"):
        assert list(sizes_at_budget(method, 0.25, model=t, tables=["dec"])) == ["dec"]
    found.convert(t)
    assert isinstance(t.enc, pme.MultiSizeEmbeddingBag) and t.dec is t.enc
    assert torch.equal(t.enc.sizes, found.sizes["dec"])
    t2 = Tied()
    grouped = sizes_at_budget("grouped", 0.25, result=found)
    pme.search.convert_grouped(t2, grouped)
    assert t2.dec is t2.enc and torch.equal(t2.dec.sizes.cpu(), grouped["dec"])
    with pytest.raises(ValueError, match="'enc' and 'dec', which are the same \\(tied\\) table"):
        pme.search(Tied(), None, 0.25, tables=["enc", "dec"], progress=False)
    with pytest.raises(ValueError, match="same \\(tied\\) table"):
        sizes_at_budget("uniform", 0.25, model=Tied(), tables=["enc", "dec"])
    with pytest.raises(KeyError, match="not embedding tables"):
        pme.search(Tied(), None, 0.25, tables=["nope"], progress=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_baselines_round_to_the_quantum_of_the_tables_dtype(dtype):
    """PME rounds half-precision tables to 8 entries (16 bytes); the popularity and random
    baselines and the grouped classes used float32's 4 whatever the tables were, so their rows
    were not 16-byte aligned and the methods were compared on different grids."""
    model = _Net(dtype, V=(300, 50), D=32)
    counts = {n: torch.arange(V) for n, (V, _) in table_shapes(model).items()}
    result = pme.search(model, None, 0.5, progress=False)
    assert result.dtype == dtype
    for method in ("pme", "popularity", "random", "grouped"):
        sizes = sizes_at_budget(method, 0.5, model=model, result=result, counts=counts)
        for n, s in sizes.items():
            assert bool((s % 8 == 0).all()), (method, n, torch.unique(s).tolist())


def test_popularity_with_an_empty_table():
    """A table of 0 rows next to others: popularity used to crash in torch's max() of nothing."""
    model = torch.nn.ModuleDict({"none": torch.nn.EmbeddingBag(0, 8), "a": torch.nn.EmbeddingBag(20, 8)})
    sizes = sizes_at_budget("popularity", 0.5, model=model, counts={"none": torch.zeros(0), "a": torch.arange(20)})
    assert sizes["none"].numel() == 0 and int(sizes["a"].sum()) == 80


def test_convert_grouped_names_an_infeasible_budget():
    """sizes_at_budget('grouped', ...) returns None when no set of classes fits; passing that on
    (as the README's example does) used to fail with "'NoneType' object is not iterable"."""
    model = torch.nn.ModuleDict({"t": torch.nn.EmbeddingBag(2, 64)})
    result = pme.search(model, None, 0.05, progress=False)
    sizes = sizes_at_budget("grouped", 0.05, result=result)
    assert sizes is None
    with pytest.raises(ValueError, match="found no set of size classes.*padded layout"):
        pme.search.convert_grouped(model, sizes)
    with pytest.raises(TypeError, match="sizes must be a dict"):
        pme.search.convert_grouped(model, [4, 4])


def test_tables_given_as_a_generator():
    """tables= read once as a list: a generator used to be spent by the check for unknown names,
    leaving 'tables=[] names no table'."""
    model = _Net()
    assert list(pme.search(model, None, 0.5, tables=(n for n in ["embeddings.b"]), progress=False).sizes) == [
        "embeddings.b"
    ]
    assert list(table_shapes(model, iter(["embeddings.a"]))) == ["embeddings.a"]
