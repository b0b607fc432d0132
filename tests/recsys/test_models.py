"""Tests for pme.recsys.models: metrics, FM / DeepFM forward, table swapping, training."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pme.recsys.data import CTRDataset, make_planted
from pme.recsys.models import FM, DeepFM, auc, evaluate, log_loss, predict, train_model


# --------------------------------------------------------------------------- metrics
def brute_force_auc(y, s):
    pos = [a for a, label in zip(s, y) if label > 0.5]
    neg = [a for a, label in zip(s, y) if label <= 0.5]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_pairwise_count(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 200, (1,), generator=g))
    y = (torch.rand(n, generator=g) < 0.4).float()
    y[0], y[1] = 0.0, 1.0  # both classes present
    s = torch.randn(n, generator=g)
    if seed % 2:
        s = (s * 2).round()  # many ties
    assert auc(y, s) == pytest.approx(brute_force_auc(y.tolist(), s.tolist()), abs=1e-12)


def test_auc_edge_cases():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(y, torch.tensor([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(y, torch.tensor([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auc(y, torch.zeros(4)) == 0.5
    assert math.isnan(auc(torch.ones(3), torch.randn(3)))
    with pytest.raises(ValueError):
        auc(y, torch.zeros(3))


def test_log_loss():
    y = torch.tensor([0.0, 1.0, 1.0])
    z = torch.tensor([-2.0, 0.5, 3.0])
    p = torch.sigmoid(z.double())
    ref = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert log_loss(y, z) == pytest.approx(float(ref), rel=1e-12)


# --------------------------------------------------------------------------- models
def small_data(n=64, dense=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (n,), generator=g)
    offs = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    ar = torch.arange(n + 1)
    return CTRDataset(
        field_names=["a", "b", "tags"],
        values={
            "a": torch.randint(0, 10, (n,), generator=g),
            "b": torch.randint(0, 7, (n,), generator=g),
            "tags": torch.randint(0, 5, (int(offs[-1]),), generator=g),
        },
        offsets={"a": ar, "b": ar, "tags": offs},
        cardinality={"a": 10, "b": 7, "tags": 5},
        labels=(torch.rand(n, generator=g) < 0.5).float(),
        dense=torch.randn(n, 4, generator=g) if dense else None,
    )


@pytest.mark.parametrize("cls", [FM, DeepFM])
@pytest.mark.parametrize("dense", [False, True])
def test_forward_shapes_and_structure(cls, dense):
    d = small_data(dense=dense)
    m = cls.from_dataset(d, embedding_dim=8)
    assert isinstance(m.embeddings, nn.ModuleDict) and list(m.embeddings) == ["a", "b", "tags"]
    for f, e in m.embeddings.items():
        assert type(e) is nn.EmbeddingBag
        assert e.weight.shape == (d.cardinality[f], 8)
        assert e.mode == ("mean" if f == "tags" else "sum")
        assert type(m.linear[f]) is nn.EmbeddingBag and m.linear[f].weight.shape == (d.cardinality[f], 1)
    # linear terms are not among the searchable tables
    emb_ids = {id(mod) for mod in m.embeddings.modules()}
    assert all(id(mod) not in emb_ids for mod in m.linear.modules())
    for batch in d.batches(16):
        out = m(batch)
        assert out.shape == (batch["labels"].numel(),) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_fm_matches_bruteforce():
    d = small_data(n=20, dense=True)
    m = FM.from_dataset(d, embedding_dim=5, init_std=0.5)
    with torch.no_grad():
        for lin in m.linear.values():
            lin.weight.normal_()
        m.bias.fill_(0.3)
    batch = d.as_batch()
    out = m(batch)
    ref = []
    for i in range(len(d)):
        vecs, first = [], 0.3
        for f in d.field_names:
            toks = d.values[f][d.offsets[f][i] : d.offsets[f][i + 1]]
            w, lw = m.embeddings[f].weight.detach(), m.linear[f].weight.detach()
            pool = (lambda t: t.mean(0)) if f == "tags" else (lambda t: t.sum(0))
            if len(toks):
                vecs.append(pool(w[toks]))
                first += float(pool(lw[toks]))
            else:
                vecs.append(torch.zeros(5))
        x = d.dense[i]
        first += float(m.dense_linear(x).detach())
        vecs.append(m.dense_embedding(x).detach())
        pair = sum(float(vecs[a] @ vecs[b]) for a in range(len(vecs)) for b in range(a + 1, len(vecs)))
        ref.append(first + pair)
    assert torch.allclose(out.detach(), torch.tensor(ref), atol=1e-5)


class FunctionalBag(nn.Module):
    """Another module with nn.EmbeddingBag's forward signature."""

    def __init__(self, weight, mode):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.mode = mode
        self.calls = 0

    def forward(self, input, offsets=None, per_sample_weights=None):
        self.calls += 1
        return F.embedding_bag(input, self.weight, offsets, mode=self.mode, per_sample_weights=per_sample_weights)


@pytest.mark.parametrize("cls", [FM, DeepFM])
def test_tables_can_be_swapped_in_place(cls):
    d = small_data(dense=True)
    torch.manual_seed(0)
    m = cls.from_dataset(d, embedding_dim=6)
    m.eval()
    batch = d.as_batch()
    before = m(batch)
    for name, e in list(m.embeddings.items()):
        m.embeddings[name] = FunctionalBag(e.weight, e.mode)
    after = m(batch)
    assert all(e.calls == 1 for e in m.embeddings.values())
    assert torch.allclose(before, after, atol=1e-6)
    after.sum().backward()
    assert all(e.weight.grad is not None for e in m.embeddings.values())


def test_bad_model_args():
    with pytest.raises(ValueError):
        FM({"a": 3}, 4, mode_by_field={"b": "sum"})
    with pytest.raises(ValueError):
        FM({"a": 3}, 4, mode_by_field={"a": "median"})
    with pytest.raises(ValueError):
        FM({"a": 3}, 0)
    with pytest.raises(ValueError):
        DeepFM({"a": 3}, 4, dropout=1.5)
    with pytest.raises(ValueError, match="optimizer"):
        train_model(FM({"a": 3}, 4), small_data(), optimizer="lbfgs-ish", progress=False)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("cls", [FM, DeepFM])
def test_training_reduces_loss_on_planted(cls):
    data, _ = make_planted(20_000, num_fields=4, vocab=100, dim=8, seed=0)
    train, val = data.split((0.8, 0.2), seed=0)
    torch.manual_seed(0)
    m = cls.from_dataset(train, embedding_dim=8)
    before = evaluate(m, val)
    hist = train_model(m, train, val, epochs=3, batch_size=512, lr=1e-2, progress=False, seed=0)
    after = evaluate(m, val)
    assert hist["epoch"] == [1, 2, 3] and hist["steps"][-1] == 3 * math.ceil(len(train) / 512)
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert after["logloss"] < before["logloss"] - 0.05
    assert after["auc"] > 0.7 and after["auc"] > before["auc"] + 0.1
    assert after["auc"] == pytest.approx(hist["val_auc"][-1])


def test_train_seed_reproducible_and_max_steps():
    data, _ = make_planted(3_000, num_fields=3, vocab=30, dim=4, seed=1)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = DeepFM.from_dataset(data, embedding_dim=4, hidden=(16,), dropout=0.1)
        h = train_model(m, data, epochs=5, batch_size=256, progress=False, seed=3, max_steps=7)
        outs.append(predict(m, data))
        assert h["steps"] == [7] and math.isnan(h["val_auc"][0])
    assert torch.equal(outs[0], outs[1])


def test_train_max_steps_zero_and_bad_batch_size():
    """max_steps=0 takes no step (it used to take one before checking); a batch size of 0 is named
    (it used to be a ZeroDivisionError), and so is a negative max_steps."""
    data, _ = make_planted(200, num_fields=2, vocab=10, dim=4, seed=1)
    m = FM.from_dataset(data, embedding_dim=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    h = train_model(m, data, epochs=2, batch_size=32, progress=False, max_steps=0)
    assert h["steps"] == [0] and math.isnan(h["train_loss"][0])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        train_model(m, data, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_steps must be >= 0, got -1"):
        train_model(m, data, batch_size=32, progress=False, max_steps=-1)


def test_evaluate_matches_metrics():
    data, _ = make_planted(2_000, num_fields=2, vocab=20, dim=4, seed=2)
    m = FM.from_dataset(data, embedding_dim=4, init_std=0.3)
    logits = predict(m, data, batch_size=300)
    assert logits.shape == (len(data),)
    full = m(data.as_batch()).detach()
    assert torch.allclose(logits, full, atol=1e-6)
    res = evaluate(m, data, batch_size=300)
    assert res["auc"] == pytest.approx(auc(data.labels, full))
    assert res["logloss"] == pytest.approx(log_loss(data.labels, full), rel=1e-6)


def test_progress_fallback_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    data, _ = make_planted(1_000, num_fields=2, vocab=10, dim=4, seed=0)
    train_model(FM.from_dataset(data, 4), data, data, epochs=1, batch_size=100, progress=True)
    err = capsys.readouterr().err
    assert "10/10" in err and "epoch 1/1" in err and "val auc" in err
