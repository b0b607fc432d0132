"""pme.MultiSizeEmbeddingBagCollection against TorchRec and FBGEMM (run by scripts/test_torchrec.sh).

- full sizes: outputs (keys, lengths, values) and gradients equal torchrec.EmbeddingBagCollection's;
- random sizes: equal to an EmbeddingBagCollection holding the zero-padded dense views, gradients
  restricted to the stored entries;
- fused row-wise Adagrad: the trajectory of FBGEMM's TBE (EXACT_ROWWISE_ADAGRAD, CPU) on dense
  tables of the stored entries (every row of a table at the table's stored width);
- from_ebc, and pme.convert on a torchrec DLRM.
"""

import pytest
import torch

torchrec = pytest.importorskip("torchrec")
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType  # noqa: E402

import pme  # noqa: E402
from pme.collection import MultiSizeEmbeddingBagCollection  # noqa: E402

from conftest import random_jagged, random_sizes  # noqa: E402


def configs(pooling=PoolingType.SUM, dims=(8, 16, 4, 12)):
    """4 tables, feature f0 read by t0 and t2 (names f0@t0, f0@t2), a table without features."""
    feats = [["f0", "f1"], ["f2"], ["f0", "f3"], []]
    rows = [50, 17, 33, 9]
    return [
        EmbeddingBagConfig(
            num_embeddings=rows[t], embedding_dim=dims[t], name=f"t{t}", feature_names=feats[t], pooling=pooling
        )
        for t in range(4)
    ]


def feature_rows(ebc) -> dict:
    """{feature: rows of the smallest table that reads it} (its valid indices)."""
    rows = {}
    for c in ebc.embedding_bag_configs():
        for f in c.feature_names:
            rows[f] = min(rows.get(f, c.num_embeddings), c.num_embeddings)
    return rows


def make_kjt(ebc, B, seed, index_dtype=torch.int64, weighted=False, max_len=6):
    """KJT over every feature the collection reads (keys in reverse order), with empty bags,
    the largest index of each feature's smallest table, duplicates."""
    gen = torch.Generator().manual_seed(seed)
    rows = feature_rows(ebc)
    keys = sorted(rows, reverse=True)
    values, lengths = [], []
    for f in keys:
        v, ln = random_jagged(rows[f], B, max_len, gen)
        values.append(v)
        lengths.append(ln)
    values = torch.cat(values).to(index_dtype)
    lengths = torch.cat(lengths).to(torch.int32 if index_dtype == torch.int32 else torch.int64)
    w = torch.rand(values.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths, weights=w)


def table_grads(m):
    return {name: m.weight.grad[m._row_span(i)[2] : m._row_span(i)[3]] for i, name in enumerate(m.table_names)}


@pytest.mark.parametrize(
    "pooling,weighted,index_dtype",
    [
        (PoolingType.SUM, False, torch.int64),
        (PoolingType.MEAN, False, torch.int32),
        (PoolingType.SUM, True, torch.int64),
    ],
)
def test_full_sizes_equal_embedding_bag_collection(pooling, weighted, index_dtype):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(configs(pooling), is_weighted=weighted)
    m = MultiSizeEmbeddingBagCollection.from_ebc(ebc)
    assert m.is_weighted() is ebc.is_weighted() is weighted  # TorchRec's method
    assert bool(m.is_weighted) is weighted and m.is_weighted == weighted  # and pme's attribute
    kjt = make_kjt(ebc, 10, 1, index_dtype, weighted)
    want, got = ebc(kjt), m(kjt)
    assert type(got) is type(want)
    assert got.keys() == want.keys() == ["f0@t0", "f1", "f2", "f0@t2", "f3", "t3"]
    assert got.length_per_key() == want.length_per_key()
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)
    for k in want.keys():
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    go = torch.randn_like(want.values())
    want.values().backward(go)
    got.values().backward(go)
    for name, g in table_grads(m).items():
        torch.testing.assert_close(g, ebc.embedding_bags[name].weight.grad.reshape(-1), rtol=1e-5, atol=1e-6)


def random_sized_pair(pooling, weighted, seed):
    """A collection of random row sizes over configs(pooling), and an EmbeddingBagCollection
    holding its zero-padded dense views."""
    gen = torch.Generator().manual_seed(seed)
    cfgs = configs(pooling)
    sizes = {c.name: random_sizes(c.num_embeddings, c.embedding_dim, gen) for c in cfgs}
    m = MultiSizeEmbeddingBagCollection(cfgs, sizes, is_weighted=weighted)
    ebc = EmbeddingBagCollection(configs(pooling), is_weighted=weighted)
    with torch.no_grad():
        for name in m.table_names:
            ebc.embedding_bags[name].weight.copy_(m.to_dense(name))
    return m, ebc


def assert_grads_of_stored_entries(m, ebc, want, got):
    """Back-propagates one random output gradient through both outputs: pme's table gradients
    equal EBC's dense ones restricted to the stored entries."""
    go = torch.randn_like(want.values())
    want.values().backward(go)
    got.values().backward(go)
    for name, g in table_grads(m).items():
        dense_grad = ebc.embedding_bags[name].weight.grad
        mask = torch.arange(dense_grad.shape[1]) < m.sizes(name).unsqueeze(1)
        torch.testing.assert_close(g, dense_grad[mask], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "pooling,weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_sizes_equal_dense_view(pooling, weighted, seed):
    m, ebc = random_sized_pair(pooling, weighted, seed)
    kjt = make_kjt(ebc, 12, 10 + seed, torch.int64, weighted)
    want, got = ebc(kjt), m(kjt)
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)
    assert_grads_of_stored_entries(m, ebc, want, got)


def _tbe(specs, feature_table_map, pooling, lr, eps, weights):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(V, D, EmbeddingLocation.HOST, ComputeDevice.CPU) for V, D in specs],
        feature_table_map=feature_table_map,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=eps,
        pooling_mode=PoolingMode.MEAN if pooling == PoolingType.MEAN else PoolingMode.SUM,
        weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32,
    )
    with torch.no_grad():
        for dst, src in zip(tbe.split_embedding_weights(), weights):
            dst.copy_(src)
    return tbe


@pytest.mark.parametrize(
    "pooling,weighted,uniform",
    [
        (PoolingType.SUM, False, False),
        (PoolingType.SUM, False, True),
        (PoolingType.MEAN, False, True),
        (PoolingType.SUM, True, True),
    ],
)
def test_fused_rowwise_adagrad_trajectory_equals_fbgemm_tbe(pooling, weighted, uniform):
    """uniform=False: full sizes; uniform=True: every row of table t stores s_t < D_t entries, and
    TBE runs on [V_t, s_t] tables (the stored entries), its output padded to D_t."""
    cfgs = configs(pooling)
    stored = {c.name: (c.embedding_dim // 2 if uniform else c.embedding_dim) for c in cfgs}
    stored = {k: max(4, v - v % 4) for k, v in stored.items()}  # TBE on CPU: widths of 4
    torch.manual_seed(3)
    lr, eps = 0.05, 1e-4
    m = MultiSizeEmbeddingBagCollection(
        cfgs, stored, is_weighted=weighted, optimizer=pme.optim.RowwiseAdagrad(lr=lr, eps=eps)
    )
    blocks = [(ti, f) for ti, c in enumerate(cfgs) for f in (c.feature_names or [c.name])]
    tbe = _tbe(
        [(c.num_embeddings, stored[c.name]) for c in cfgs],
        [ti for ti, _ in blocks],
        pooling,
        lr,
        eps,
        [m.to_dense(c.name)[:, : stored[c.name]] for c in cfgs],
    )
    dims = [cfgs[ti].embedding_dim for ti, _ in blocks]
    for step in range(4):
        kjt = make_kjt(
            EmbeddingBagCollection(cfgs, is_weighted=weighted, device="meta"), 16, 50 + step, torch.int64, weighted
        )
        go = torch.randn(16, sum(dims), generator=torch.Generator().manual_seed(step))
        got = m(kjt)
        got.values().backward(go)
        # TBE reads the same bags, one feature per output block, in block order.
        d = kjt.to_dict()
        idx = torch.cat([d[f].values() for _, f in blocks]).long()
        lens = torch.cat([d[f].lengths() for _, f in blocks]).long()
        offs = torch.zeros(lens.numel() + 1, dtype=torch.int64)
        offs[1:] = lens.cumsum(0)
        psw = torch.cat([d[f].weights() for _, f in blocks]) if weighted else None
        out = tbe(idx, offs, psw)
        # Output blocks: TBE's [B, s_t] columns are the first s_t of pme's [B, D_t] block.
        col, tcol, go_t, parts = 0, 0, [], []
        for (ti, _), D in zip(blocks, dims):
            s = stored[cfgs[ti].name]
            parts.append((got.values()[:, col : col + s].detach(), out[:, tcol : tcol + s].detach()))
            go_t.append(go[:, col : col + s])
            col, tcol = col + D, tcol + s
        for a, b in parts:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        out.backward(torch.cat(go_t, 1))
        for c, w, st in zip(cfgs, tbe.split_embedding_weights(), tbe.split_optimizer_states()):
            torch.testing.assert_close(
                m.to_dense(c.name)[:, : stored[c.name]],
                w,
                rtol=1e-5,
                atol=1e-6,
                msg=lambda s, c=c: f"{c.name} step {step}: {s}",
            )
            r0, r1 = int(m.table_rows[m._table_index(c.name)]), int(m.table_rows[m._table_index(c.name) + 1])
            torch.testing.assert_close(m.optim_state1[r0:r1], st[0], rtol=1e-5, atol=1e-7)


def test_from_ebc_random_sizes_and_state_dict():
    torch.manual_seed(1)
    ebc = EmbeddingBagCollection(configs(), is_weighted=False)
    gen = torch.Generator().manual_seed(2)
    sizes = {c.name: random_sizes(c.num_embeddings, c.embedding_dim, gen) for c in configs()}
    m = MultiSizeEmbeddingBagCollection.from_ebc(ebc, sizes)
    for c in configs():
        w = ebc.embedding_bags[c.name].weight.detach()
        mask = torch.arange(c.embedding_dim) < sizes[c.name].unsqueeze(1)
        assert torch.equal(m.to_dense(c.name), w * mask)
    sd = m.state_dict()
    assert sorted(sd) == sorted(f"embedding_bags.{c.name}.{k}" for c in configs() for k in ("weight", "offsets"))
    assert sd["embedding_bags.t1.weight"].shape == (int(sizes["t1"].sum()),)
    # Into a model: DLRM with our collection in place of its EmbeddingBagCollection.
    from torchrec.models.dlrm import DLRM

    cfgs = [
        EmbeddingBagConfig(num_embeddings=20 + t, embedding_dim=8, name=f"t{t}", feature_names=[f"f{t}"])
        for t in range(3)
    ]
    model = DLRM(
        EmbeddingBagCollection(cfgs), dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1]
    )
    sizes = {"sparse_arch.embedding_bag_collection": {"t0": 4, "t1": 8, "t2": torch.randint(0, 9, (22,))}}
    ref = MultiSizeEmbeddingBagCollection.from_ebc(
        model.sparse_arch.embedding_bag_collection, sizes["sparse_arch.embedding_bag_collection"]
    )
    pme.collection.convert(model, sizes)
    assert isinstance(model.sparse_arch.embedding_bag_collection, MultiSizeEmbeddingBagCollection)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1", "f2"], values=torch.tensor([1, 2, 3, 4, 5, 6, 7]), lengths=torch.tensor([1, 2, 1, 0, 2, 1])
    )
    out = model(torch.randn(2, 4), kjt)
    assert out.shape == (2, 1)
    out.sum().backward()
    assert model.sparse_arch.embedding_bag_collection.weight.grad is not None
    torch.testing.assert_close(ref(kjt).values(), model.sparse_arch.embedding_bag_collection(kjt).values())


def test_load_an_embedding_bag_collection_checkpoint():
    """A torchrec EmbeddingBagCollection's state_dict (dense [V, D] weights, the same keys) loads into
    a pme collection of other sizes: each row keeps its first sizes[i] values, the sizes stay, and
    a fused optimizer's state starts fresh (the checkpoint has none)."""
    torch.manual_seed(3)
    ebc = EmbeddingBagCollection(configs(), is_weighted=False)
    gen = torch.Generator().manual_seed(4)
    sizes = {c.name: random_sizes(c.num_embeddings, c.embedding_dim, gen) for c in configs()}
    m = MultiSizeEmbeddingBagCollection(configs(), sizes, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    m.optim_state1.fill_(0.5)
    m.optim_step.fill_(3)
    assert not m.load_state_dict(ebc.state_dict()).missing_keys
    for c in configs():
        mask = torch.arange(c.embedding_dim) < sizes[c.name].unsqueeze(1)
        assert torch.equal(m.to_dense(c.name), ebc.embedding_bags[c.name].weight.detach() * mask)
        assert torch.equal(m.sizes(c.name), sizes[c.name])
    assert bool((m.optim_state1 == 0).all()) and int(m.optim_step) == 0
    # its configs are torchrec's (planners and sharders read pooling.value, data_type)
    back = m.embedding_bag_configs()
    assert all(isinstance(c, EmbeddingBagConfig) for c in back)
    assert [(c.name, c.pooling, c.data_type) for c in back] == [
        (c.name, c.pooling, torchrec.types.DataType.FP32) for c in configs()
    ]
    assert EmbeddingBagCollection(back).embedding_bag_configs()[0].num_embeddings == configs()[0].num_embeddings
    bad = {k: v[:, :2] for k, v in ebc.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"a dense table must be a float \[\d+, \d+\] tensor"):
        m.load_state_dict(bad)


def make_vbe_kjt(ebc, B, seed, index_dtype=torch.int64, weighted=False, max_len=6):
    """A KJT with a variable batch per feature (TorchRec's VBE): feature f has its own B_f in
    [1, B] bags (B for the second key, B // 2 for the last; empty bags, the largest index,
    duplicates) and inverse indices [F, B] that map each of the B samples to one of them (every
    bag used at least once)."""
    gen = torch.Generator().manual_seed(seed)
    rows = feature_rows(ebc)
    keys = sorted(rows, reverse=True)
    values, lengths, strides, inverse = [], [], [], []
    for i, f in enumerate(keys):
        # the second feature has the whole batch, the last half of it, the others any share
        bf = (
            B if i == 1 else max(1, B // 2) if i == len(keys) - 1 else int(torch.randint(1, B + 1, (1,), generator=gen))
        )
        v, ln = random_jagged(rows[f], bf, max_len, gen)
        values.append(v)
        lengths.append(ln)
        strides.append([bf])
        inverse.append(torch.cat([torch.randperm(bf, generator=gen), torch.randint(0, bf, (B,), generator=gen)])[:B])
    values = torch.cat(values).to(index_dtype)
    lengths = torch.cat(lengths).to(torch.int32 if index_dtype == torch.int32 else torch.int64)
    w = torch.rand(values.numel(), generator=gen) + 0.5 if weighted else None
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        weights=w,
        stride_per_key_per_rank=strides,
        inverse_indices=(keys, torch.stack(inverse)),
    )


def expanded(kjt):
    """The same batch as a KJT of one batch size: every sample's own copy of each feature's bag."""
    inv_keys, inv = kjt.inverse_indices()
    d = kjt.to_dict()
    values, lengths, weights = [], [], []
    for k in kjt.keys():
        jt, rows = d[k], inv[inv_keys.index(k)]
        o = jt.offsets()
        for b in rows.tolist():
            values.append(jt.values()[o[b] : o[b + 1]])
            if jt.weights_or_none() is not None:
                weights.append(jt.weights()[o[b] : o[b + 1]])
        lengths.append(jt.lengths()[rows])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(),
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weights else None,
    )


@pytest.mark.parametrize(
    "pooling,weighted,index_dtype",
    [
        (PoolingType.SUM, False, torch.int64),
        (PoolingType.MEAN, False, torch.int32),
        (PoolingType.SUM, True, torch.int64),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_variable_batch_per_feature_equals_embedding_bag_collection(pooling, weighted, index_dtype, seed):
    m, ebc = random_sized_pair(pooling, weighted, seed)
    kjt = make_vbe_kjt(ebc, 9, 20 + seed, index_dtype, weighted)
    assert kjt.variable_stride_per_key() and len(set(kjt.stride_per_key())) > 1
    want, got = ebc(kjt), m(kjt)
    assert got.keys() == want.keys() and got.values().shape == want.values().shape == (9, m.out_width)
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)
    # the same batch with every sample's bags spelled out gives the same output
    torch.testing.assert_close(m(expanded(kjt)).values(), got.values(), rtol=1e-6, atol=1e-6)
    assert_grads_of_stored_entries(m, ebc, want, got)


def test_variable_batch_per_feature_fused_step_equals_expanded_batch():
    """A fused row-wise Adagrad step on a VBE batch moves the tables as on the same batch spelled
    out sample by sample (each pooled bag's gradient is the sum over the samples that read it)."""
    gen = torch.Generator().manual_seed(3)
    cfgs = configs()
    sizes = {c.name: random_sizes(c.num_embeddings, c.embedding_dim, gen) for c in cfgs}
    a = MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    b = MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    with torch.no_grad():
        b.weight.copy_(a.weight)
    for step in range(3):
        kjt = make_vbe_kjt(EmbeddingBagCollection(cfgs, device="meta"), 7, 40 + step)
        go = torch.randn(7, a.out_width, generator=gen)
        a(kjt).values().backward(go)
        b(expanded(kjt)).values().backward(go)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.weight, MultiSizeEmbeddingBagCollection(cfgs, sizes).weight)


def test_inverse_indices_are_applied_as_embedding_bag_collection_applies_them():
    """EBC applies a KJT's inverse indices whenever they are there (also without a variable batch),
    takes an empty inverse tensor for none, and looks only at the batches of features it reads."""
    m, ebc = random_sized_pair(PoolingType.SUM, False, 4)
    plain = make_kjt(ebc, 5, 4)
    inv = torch.randint(0, 5, (len(plain.keys()), 7), generator=torch.Generator().manual_seed(1))
    cases = {
        "inverse, one batch": KeyedJaggedTensor(
            keys=plain.keys(), values=plain.values(), lengths=plain.lengths(), inverse_indices=(plain.keys(), inv)
        ),
        "empty inverse": KeyedJaggedTensor(
            keys=plain.keys(),
            values=plain.values(),
            lengths=plain.lengths(),
            stride_per_key_per_rank=[[5]] * len(plain.keys()),
            inverse_indices=(plain.keys(), inv[:, :0]),
        ),
        "an unread feature of another batch": KeyedJaggedTensor(
            keys=[*plain.keys(), "unread"],
            values=torch.cat([plain.values(), torch.tensor([1, 2, 3])]),
            lengths=torch.cat([plain.lengths(), torch.tensor([1, 1, 1])]),
            stride_per_key_per_rank=[[5]] * len(plain.keys()) + [[3]],
        ),
    }
    for name, kjt in cases.items():
        want, got = ebc(kjt), m(kjt)
        assert got.values().shape == want.values().shape, name
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6, msg=name)
    assert m(cases["inverse, one batch"]).values().shape[0] == 7


def with_unread_feature(kjt, at):
    """The VBE ``kjt`` with a feature no table reads inserted at key position ``at``, of more bags
    than any other feature (2 values each, in range of every table of configs())."""
    keys, strides, d = list(kjt.keys()), kjt.stride_per_key(), kjt.to_dict()
    B_x = max(strides) + 2
    order = [*keys[:at], "unread", *keys[at:]]
    values, lengths, spkpr = [], [], []
    for k in order:
        if k == "unread":
            values.append(torch.arange(2 * B_x) % 5)  # a shift reads them as wrong values, not as an error
            lengths.append(torch.full((B_x,), 2))
            spkpr.append([B_x])
        else:
            values.append(d[k].values())
            lengths.append(d[k].lengths())
            spkpr.append([strides[keys.index(k)]])
    inv_keys, inv = kjt.inverse_indices()
    return KeyedJaggedTensor(
        keys=order,
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        stride_per_key_per_rank=spkpr,
        inverse_indices=([*inv_keys, "unread"], torch.cat([inv, torch.zeros(1, inv.shape[1], dtype=inv.dtype)])),
    )


@pytest.mark.parametrize("at", [0, 2], ids=["first", "middle"])
def test_variable_batch_with_an_unread_feature_of_a_larger_batch(at):
    """A VBE KJT that also carries a feature no table reads, with more bags than any feature the
    collection reads (the batch pme pools at): its extra bags must not shift the features after it
    (which read the unread feature's last values as their first bag)."""
    m, ebc = random_sized_pair(PoolingType.SUM, False, 5)
    kjt = make_vbe_kjt(ebc, 6, 30)
    x = with_unread_feature(kjt, at)
    want, got = ebc(x), m(x)
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.values(), m(kjt).values(), rtol=0, atol=0)
    assert_grads_of_stored_entries(m, ebc, want, got)


def test_malformed_kjt_layouts_are_refused():
    m = MultiSizeEmbeddingBagCollection(configs())
    kjt = make_kjt(EmbeddingBagCollection(configs(), device="meta"), 3, 0)
    v, ln, keys = kjt.values(), kjt.lengths(), kjt.keys()
    with pytest.raises(ValueError, match="offsets but .* keys x batch 2 need"):
        m(KeyedJaggedTensor(keys=keys, values=v, lengths=ln, stride=2))
    with pytest.raises(ValueError, match="bags end at .* but it has"):
        m(KeyedJaggedTensor(keys=keys, values=torch.cat([v, v[:1]]), lengths=ln))


def test_variable_batch_per_feature_errors():
    m = MultiSizeEmbeddingBagCollection(configs())
    kjt = make_vbe_kjt(EmbeddingBagCollection(configs(), device="meta"), 5, 7)
    no_inverse = KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values(),
        lengths=kjt.lengths(),
        stride_per_key_per_rank=kjt.stride_per_key_per_rank(),
    )
    with pytest.raises(ValueError, match="needs inverse indices"):
        m(no_inverse)
    keys, inv = kjt.inverse_indices()
    bad = inv.clone()
    f = keys.index("f2")
    bad[f, 3] = kjt.stride_per_key()[kjt.keys().index("f2")]  # one past the feature's bags
    with pytest.raises(IndexError, match="feature 'f2': sample 3 reads bag"):
        m(
            KeyedJaggedTensor(
                keys=kjt.keys(),
                values=kjt.values(),
                lengths=kjt.lengths(),
                stride_per_key_per_rank=kjt.stride_per_key_per_rank(),
                inverse_indices=(keys, bad),
            )
        )
    assert m(kjt).values().shape == (5, m.out_width)  # still usable


def test_kjt_errors():
    m = MultiSizeEmbeddingBagCollection(configs())
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 0, 1, 0])
    )
    with pytest.raises(KeyError, match="no feature 'f2'"):
        m(kjt)
    wm = MultiSizeEmbeddingBagCollection(configs(), is_weighted=True)
    kjt = make_kjt(EmbeddingBagCollection(configs(), device="meta"), 3, 0)
    with pytest.raises(ValueError, match="carries no weights"):
        wm(kjt)
    # weights that cannot be the lookups' weights: said so, not cast or left to the kernel
    v, ln = kjt.values(), kjt.lengths()
    with pytest.raises(TypeError, match="weights must be floating point, got torch.int64"):
        wm(KeyedJaggedTensor(keys=kjt.keys(), values=v, lengths=ln, weights=torch.ones_like(v)))
    with pytest.raises(ValueError, match=rf"one entry per value \({v.numel()}\), got shape \({v.numel() - 1},\)"):
        wm(KeyedJaggedTensor(keys=kjt.keys(), values=v, lengths=ln, weights=torch.ones(v.numel() - 1)))
    with pytest.raises(ValueError, match="weights are on meta but the collection is on cpu"):
        wm(KeyedJaggedTensor(keys=kjt.keys(), values=v, lengths=ln, weights=torch.ones(v.numel(), device="meta")))


def test_non_pooled_collection_equals_embedding_collection():
    from torchrec import EmbeddingCollection, EmbeddingConfig

    from pme.collection import MultiSizeEmbeddingCollection

    cfgs = [
        EmbeddingConfig(num_embeddings=V, embedding_dim=8, name=f"t{i}", feature_names=f)
        for i, (V, f) in enumerate([(40, ["f0", "f1"]), (9, ["f2"]), (25, ["f0"])])
    ]
    gen = torch.Generator().manual_seed(5)
    sizes = {c.name: random_sizes(c.num_embeddings, 8, gen) for c in cfgs}
    m = MultiSizeEmbeddingCollection(cfgs, sizes)
    ec = EmbeddingCollection(cfgs)
    with torch.no_grad():
        for name in m.table_names:
            ec.embeddings[name].weight.copy_(m.to_dense(name))
    kjt = make_kjt(
        EmbeddingBagCollection(
            [
                EmbeddingBagConfig(
                    num_embeddings=c.num_embeddings, embedding_dim=8, name=c.name, feature_names=c.feature_names
                )
                for c in cfgs
            ],
            device="meta",
        ),
        7,
        3,
    )
    want, got = ec(kjt), m(kjt)
    assert list(got) == list(want) == ["f0@t0", "f1", "f2", "f0@t2"]
    # built on the meta device (as TorchRec builds models): the shapes of EmbeddingCollection's outputs
    on_meta = MultiSizeEmbeddingCollection(cfgs, device="meta")(kjt.to("meta"))
    assert list(on_meta) == list(want)
    assert all(on_meta[k].values().is_meta and on_meta[k].values().shape == want[k].values().shape for k in want)
    loss_w, loss_g = 0, 0
    for k in want:
        torch.testing.assert_close(got[k].values(), want[k].values(), rtol=1e-6, atol=1e-6)
        assert torch.equal(got[k].lengths().long(), want[k].lengths().long())
        g = torch.randn_like(want[k].values())
        loss_w = loss_w + (want[k].values() * g).sum()
        loss_g = loss_g + (got[k].values() * g).sum()
    loss_w.backward()
    loss_g.backward()
    for _i, name in enumerate(m.table_names):
        dg = ec.embeddings[name].weight.grad
        mask = torch.arange(8) < m.sizes(name).unsqueeze(1)
        torch.testing.assert_close(table_grads(m)[name], dg[mask], rtol=1e-5, atol=1e-6)


def test_non_pooled_collection_variable_batch_per_feature():
    """EmbeddingCollection on a VBE KJT: each feature's jagged output has its own bags."""
    from torchrec import EmbeddingCollection, EmbeddingConfig

    from pme.collection import MultiSizeEmbeddingCollection

    cfgs = [
        EmbeddingConfig(num_embeddings=V, embedding_dim=8, name=f"t{i}", feature_names=f)
        for i, (V, f) in enumerate([(40, ["f0", "f1"]), (9, ["f2"]), (25, ["f3"])])
    ]
    gen = torch.Generator().manual_seed(6)
    m = MultiSizeEmbeddingCollection(cfgs, {c.name: random_sizes(c.num_embeddings, 8, gen) for c in cfgs})
    ec = EmbeddingCollection(cfgs)
    with torch.no_grad():
        for name in m.table_names:
            ec.embeddings[name].weight.copy_(m.to_dense(name))
    bag_cfgs = [
        EmbeddingBagConfig(num_embeddings=c.num_embeddings, embedding_dim=8, name=c.name, feature_names=c.feature_names)
        for c in cfgs
    ]
    kjt = make_vbe_kjt(EmbeddingBagCollection(bag_cfgs, device="meta"), 6, 8)
    assert len(set(kjt.stride_per_key())) > 1
    # also with a feature no table reads, of a larger batch, before the others
    for x in (kjt, with_unread_feature(kjt, 0), with_unread_feature(kjt, 2)):
        want, got = ec(x), m(x)
        assert list(got) == list(want)
        for k in want:
            assert torch.equal(got[k].lengths().long(), want[k].lengths().long())
            torch.testing.assert_close(got[k].values(), want[k].values(), rtol=1e-6, atol=1e-6)


class _KJTRanker(torch.nn.Module):
    """A served model's shape: (values, lengths) in, a KeyedJaggedTensor built inside, the pooled
    KeyedTensor's values out."""

    def __init__(self, collection, keys):
        super().__init__()
        self.c, self.keys = collection, keys

    def forward(self, values, lengths):
        kjt = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths)
        return self.c(kjt).values()


def test_kjt_model_compiles_and_exports_with_a_dynamic_batch():
    """torch.compile(fullgraph=True) with Inductor and torch.export (non-strict, as TorchRec
    exports; dynamic batch, saved and loaded) of a model that builds its KJT: equal to the eager
    collection, which equals EmbeddingBagCollection on the dense views; a bad index still raises."""
    import io

    gen = torch.Generator().manual_seed(11)
    cfgs = configs(PoolingType.MEAN)
    sizes = {c.name: random_sizes(c.num_embeddings, c.embedding_dim, gen) for c in cfgs}
    m = MultiSizeEmbeddingBagCollection(cfgs, sizes)
    rows = feature_rows(m)
    keys = sorted(rows)
    model = _KJTRanker(m, keys).eval()
    ebc = EmbeddingBagCollection(cfgs)
    with torch.no_grad():
        for c in cfgs:
            ebc.embedding_bags[c.name].weight.copy_(m.to_dense(c.name))

    def batch(B, seed):
        g = torch.Generator().manual_seed(seed)
        parts = [random_jagged(rows[f], B, 5, g) for f in keys]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    n, samples = torch.export.Dim("n", max=1 << 30), torch.export.Dim("batch", min=2, max=1 << 20)
    args = batch(6, 0)
    buf = io.BytesIO()
    torch.export.save(
        torch.export.export(model, args, dynamic_shapes=({0: n}, {0: len(keys) * samples}), strict=False),
        buf,
    )
    buf.seek(0)
    exported = torch.export.load(buf).module()
    for B, seed in ((6, 0), (9, 1)):
        v, ln = batch(B, seed)
        want = ebc(KeyedJaggedTensor(keys=keys, values=v, lengths=ln)).values()
        eager = model(v, ln)
        torch.testing.assert_close(eager, want)
        torch.testing.assert_close(compiled(v, ln), eager)
        torch.testing.assert_close(exported(v, ln), eager)
    bad = v.clone()
    bad[0] = 10**6
    for fn in (compiled, exported):
        with pytest.raises(RuntimeError, match="index out of range"):
            fn(bad, ln)


def test_variable_batch_per_feature_under_torch_compile():
    """A VBE batch through a compiled model (graph breaks allowed: TorchRec's KJT can make the
    batch sizes data-dependent on a recompile): equal to the eager collection on two batches of
    different layouts; a bad inverse index still raises the eager call's IndexError."""
    torch.manual_seed(3)
    ebc = EmbeddingBagCollection(configs(PoolingType.SUM))
    m = MultiSizeEmbeddingBagCollection.from_ebc(ebc).eval()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, kjt):
            return self.m(kjt).values()

    model = Model()
    torch._dynamo.reset()
    compiled = torch.compile(model)
    for seed in (1, 2):
        kjt = make_vbe_kjt(ebc, 8, seed)
        torch.testing.assert_close(compiled(kjt), model(kjt))
    inv_keys, inv = kjt.inverse_indices()
    bad = inv.clone()
    bad[0, 3] = 99
    bad_kjt = KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values(),
        lengths=kjt.lengths(),
        stride_per_key_per_rank=kjt.stride_per_key_per_rank(),
        inverse_indices=(inv_keys, bad),
    )
    with pytest.raises(IndexError, match="sample 3 reads bag 99"):
        compiled(bad_kjt)
    torch.testing.assert_close(compiled(kjt), model(kjt))
