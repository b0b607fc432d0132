"""pme.sharding under TorchRec's DistributedModelParallel, 1, 2 and 4 CPU processes over gloo.

Each scenario trains a sharded collection for a few steps in spawned processes (every rank
feeds its slice of one global batch) next to an unsharded copy fed the whole batch, and checks:
outputs equal, gradients equal (no optimizer) or weights and optimizer state equal after the
steps (fused SGD / row-wise Adagrad / Adam). TorchRec divides the embedding gradient by the world
size in its backward all-to-all (the mean over ranks, as DDP does for dense parameters), so the
unsharded reference is driven by the output gradient / world size. Row-wise Adagrad on column
shards keeps one accumulator per row per shard (as FBGEMM under TorchRec): its reference is the
collection split into one table per column shard. Tables: random sizes (0..D per row), a feature
read by two tables, a table without features, empty bags, the largest index, duplicates; a
weighted variant (int32 indices) and a mean-pooled one. Also: checkpoints (sharded save, merge,
load into an unsharded collection, into another plan and into 4 ranks), refusals, the planner.

All scenarios of one world size run in one spawn (module-scoped fixtures) to keep the run short
on 2 cores; each scenario is its own test below.
"""

import json
import os
import traceback
from datetime import timedelta

import pytest
import torch

torchrec = pytest.importorskip("torchrec")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.elastic.utils.distributed import get_free_port  # noqa: E402
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: E402
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError  # noqa: E402
from torchrec.distributed.sharding_plan import (  # noqa: E402
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan  # noqa: E402

import pme.optim  # noqa: E402
from pme import sharding  # noqa: E402
from pme.collection import MultiSizeEmbeddingBagCollection  # noqa: E402

from conftest import random_jagged  # noqa: E402

STEPS = 3
B = 5  # samples per rank


# --------------------------------------------------------------------------------------------
# Models, inputs, plans
# --------------------------------------------------------------------------------------------
def configs(kind):
    """4 tables: f0 read by t0 and t2, t3 reads its own name; 'W' weighted, 'M' mean pooling."""
    pooling = PoolingType.MEAN if kind == "M" else PoolingType.SUM
    feats = [["f0", "f1"], ["f2"], ["f0", "f3"], []]
    rows, dims = [50, 17, 33, 9], [8, 16, 4, 12]
    return [
        EmbeddingBagConfig(
            num_embeddings=rows[t], embedding_dim=dims[t], name=f"t{t}", feature_names=feats[t], pooling=pooling
        )
        for t in range(4)
    ]


OPTIMIZERS = {
    None: None,
    "sgd": lambda: pme.optim.SGD(lr=0.3),
    "rowwise_adagrad": lambda: pme.optim.RowwiseAdagrad(lr=0.2),
    "adam": lambda: pme.optim.Adam(lr=0.05),
}


def make_collection(kind, opt, seed=0, tables=None):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(7)
    cfgs = tables or configs(kind)
    sizes = {c.name: torch.randint(0, c.embedding_dim + 1, (c.num_embeddings,), generator=g) for c in cfgs}
    o = OPTIMIZERS[opt]
    return MultiSizeEmbeddingBagCollection(cfgs, sizes, is_weighted=(kind == "W"), optimizer=o() if o else None)


def global_kjt(kind, n, seed):
    """n samples; keys in an order of their own; empty bags, the largest index, duplicates."""
    g = torch.Generator().manual_seed(seed)
    rows = {"f0": 33, "f1": 50, "f2": 17, "f3": 33, "t3": 9}
    keys = ["f3", "t3", "f1", "f0", "f2"]
    vals, lens = [], []
    for i, k in enumerate(keys):
        v, ln = random_jagged(rows[k], n, 3, g, empty=i % n)
        vals.append(v)
        lens.append(ln)
    idt = torch.int32 if kind == "W" else torch.int64
    v = torch.cat(vals).to(idt)
    w = torch.rand(v.numel(), generator=g) + 0.5 if kind == "W" else None
    return KeyedJaggedTensor.from_lengths_sync(keys, v, torch.cat(lens).to(idt), weights=w)


def rank_slice(kjt, rank, b):
    """Samples [rank * b, (rank + 1) * b) of every feature, as a KJT of the same keys."""
    d = kjt.to_dict()
    vals, lens, ws = [], [], []
    for k in kjt.keys():
        jt = d[k]
        o = jt.offsets()
        s, e = int(o[rank * b]), int(o[(rank + 1) * b])
        vals.append(jt.values()[s:e])
        lens.append(jt.lengths()[rank * b : (rank + 1) * b])
        if jt.weights_or_none() is not None:
            ws.append(jt.weights()[s:e])
    return KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), torch.cat(vals), torch.cat(lens), weights=torch.cat(ws) if ws else None
    )


def make_plan(m, how, world):
    sharder = sharding.MultiSizeEmbeddingBagCollectionSharder()
    names = m.table_names
    if how == "tw":
        per = {n: table_wise(rank=i % world) for i, n in enumerate(names)}
    elif how == "cw":  # every table over all ranks, reusing a rank when world < 3
        per = {
            n: column_wise(ranks=[(i + j) % world for j in range(max(2, world))][: max(2, min(world, 4))])
            for i, n in enumerate(names)
        }
    elif how == "mixed":
        per = {
            n: (table_wise(rank=(i + 1) % world) if i % 2 else column_wise(ranks=[(i + j) % world for j in range(2)]))
            for i, n in enumerate(names)
        }
    elif how == "rw":
        per = {n: row_wise() for n in names}
    elif how == "rwmix":  # row-wise next to the others (t3, 9 rows, row-wise only up to 3 ranks)
        per = {
            "t0": row_wise(),
            "t1": column_wise(ranks=[1, 0]),
            "t2": table_wise(rank=world - 1),
            "t3": row_wise() if world <= 3 else table_wise(rank=0),
        }
    elif how == "dp":
        per = {n: data_parallel() for n in names}
    elif how == "rw_small":
        per = {n: row_wise() for n in names}
    else:
        raise ValueError(how)
    mp_plan = construct_module_sharding_plan(
        m, per, sharder=sharder, local_size=world, world_size=world, device_type="cpu"
    )
    return ShardingPlan({"": mp_plan}), sharder


def shard_model(m, how, world):
    plan, sharder = make_plan(m, how, world)
    return DistributedModelParallel(
        m,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=[sharder],
        init_data_parallel=False,
    )


def pieces_of(dmp):
    """{table name: [(c0, c1), ...]} over all ranks, in column order."""
    sm = dmp.module
    out = {}
    for p in sm._pieces:
        for ti, c0, c1 in p:
            out.setdefault(sm._tables[ti].name, []).append((c0, c1))
    for ti in sm._rw:  # row shards hold whole rows: one column piece
        out[sm._tables[ti].name] = [(0, sm._tables[ti].embedding_dim)]
    return {k: sorted(v) for k, v in out.items()}


def row_slice(sd, table, key, r0, r1, V):
    """Field ``key`` of rows [r0, r1) of ``table`` in an unsharded state_dict."""
    o = sd[f"embedding_bags.{table}.offsets"]
    v = sd[f"embedding_bags.{table}.{key}"]
    if key == "offsets":
        return o[r0 : r1 + 1] - o[r0]
    if v.numel() == o[-1] and key != "optim_state1" or (key == "optim_state1" and v.numel() != V):
        return v[int(o[r0]) : int(o[r1])] if v.numel() else v
    return v[r0:r1]


def column_split(m, pieces):
    """The collection with each table cut into one table per column shard (same features,
    weights and sizes): the model that row-wise Adagrad on column shards trains."""
    cfgs, sd = [], {}
    src = m.state_dict()
    for c in m.embedding_bag_configs():
        for c0, c1 in pieces[c.name]:
            name = sharding._piece_name(c.name, c0, c1, c.embedding_dim)
            cfgs.append(
                EmbeddingBagConfig(
                    num_embeddings=c.num_embeddings,
                    embedding_dim=c1 - c0,
                    name=name,
                    feature_names=list(c.feature_names) or [c.name],
                    pooling=c.pooling,  # torchrec.PoolingType (embedding_bag_configs gives torchrec configs)
                )
            )
            o = m.table_offsets(c.name)
            w, s = sharding.column_piece(m.table_weight(c.name).detach(), o, c0, c1)
            po = torch.zeros(o.numel(), dtype=torch.int64)
            torch.cumsum(s, 0, out=po[1:])
            sd[f"embedding_bags.{name}.weight"] = w.clone()
            sd[f"embedding_bags.{name}.offsets"] = po
            for k in ("optim_state1", "optim_state2"):
                v = src[f"embedding_bags.{c.name}.{k}"]
                sd[f"embedding_bags.{name}.{k}"] = v.clone()
    sd["optim_step"] = src["optim_step"]
    split = MultiSizeEmbeddingBagCollection(
        cfgs, 0, is_weighted=m.is_weighted, optimizer=type(m.optimizer)(**_opt_args(m.optimizer))
    )
    split.load_state_dict(sd)
    return split


def _opt_args(o):
    return {"lr": o.lr}


def split_values(split, m, kt, pieces):
    """Output of the column-split model in the unsharded collection's column order."""
    names = split.embedding_names()
    d = kt.to_dict()
    cols = []
    for c in m.embedding_bag_configs():
        for f in list(c.feature_names) or [c.name]:
            for c0, c1 in pieces[c.name]:
                p = sharding._piece_name(c.name, c0, c1, c.embedding_dim)
                cols.append(d[f if f in names else f"{f}@{p}"])
    return torch.cat(cols, 1)


def all_gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def table_grads(m):
    return {n: m.weight.grad[m._row_span(i)[2] : m._row_span(i)[3]] for i, n in enumerate(m.table_names)}


# --------------------------------------------------------------------------------------------
# Scenarios (run on every rank)
# --------------------------------------------------------------------------------------------
def run_training(kind, opt, how, world, rank):
    m = make_collection(kind, opt)
    ref = make_collection(kind, opt)
    dmp = shard_model(m, how, world)
    sm = dmp.module
    pieces = pieces_of(dmp)
    split = opt == "rowwise_adagrad" and any(len(v) > 1 for v in pieces.values())
    if split:
        ref = column_split(ref, pieces)
    for step in range(STEPS):
        kjt = global_kjt(kind, B * world, 100 + step)
        out = dmp(rank_slice(kjt, rank, B)).wait()
        want = ref(kjt)
        wv = split_values(ref, m, want, pieces) if split else want.values()
        assert out.keys() == m.embedding_names()
        close(out.values(), wv[rank * B : (rank + 1) * B], f"step {step} output")
        gen = torch.Generator().manual_seed(500 + step)
        G = torch.randn(wv.shape, generator=gen)
        (out.values() * G[rank * B : (rank + 1) * B]).sum().backward()
        (wv * G / world).sum().backward()
        if opt is None:  # gradients of the local shards equal the unsharded gradient's pieces
            got = table_grads(sm.local) if sm.local is not None else {}
            if sm.local_rw is not None:
                got.update(table_grads(sm.local_rw))
            want_g = table_grads(ref)
            for name, ti, kind, a, b in sm._shards["local"] + sm._shards["local_rw"]:
                t = sm._tables[ti].name
                o = ref.table_offsets(t)
                if kind == "row":
                    exp = want_g[t][int(o[a]) : int(o[b])]
                else:
                    exp = sharding.column_piece(want_g[t], o, a, b)[0]
                close(got[name], exp, f"step {step} gradient of {name}")
            for _, mod in sm._locals():
                mod.weight.grad = None
            ref.weight.grad = None
    sd = dmp.state_dict()
    rsd = ref.state_dict()
    if split:  # every shard equals its table of the column-split model (row shards: its rows)
        for k, v in sd.items():
            r = sharding._ROWS.match(k.split(".")[1]) if k.startswith("embedding_bags.") else None
            if r is None:
                close(v, rsd[k], k)
            else:
                close(
                    v,
                    row_slice(
                        rsd, r.group("t"), k.split(".")[-1], int(r.group("r0")), int(r.group("r1")), int(r.group("v"))
                    ),
                    k,
                )
    else:
        merged = sharding.merge_state_dicts(all_gather(sd))
        assert sorted(merged) == sorted(rsd), (sorted(merged), sorted(rsd))
        for k, v in rsd.items():
            close(merged[k], v, k)
    return dmp, ref


def scenario_checkpoint(world, rank, outdir):
    kind, opt = "A", "adam"
    dmp, ref = run_training(kind, opt, "mixed", world, rank)
    parts = all_gather(dmp.state_dict())
    merged = sharding.merge_state_dicts(parts)
    ref_saved = {k: v.clone() for k, v in ref.state_dict().items()}
    # into an unsharded collection (other seed: every value must come from the checkpoint)
    fresh = make_collection(kind, opt, seed=3)
    fresh.load_state_dict(merged)
    for k, v in ref.state_dict().items():
        close(fresh.state_dict()[k], v, f"unsharded load {k}")
    # back into a sharded model with another plan, and with the same plan from the rank files
    other = shard_model(make_collection(kind, opt, seed=4), "rw", world)
    other.load_state_dict(merged)
    same = shard_model(make_collection(kind, opt, seed=5), "mixed", world)
    same.load_state_dict(parts[rank])
    for step in range(2):
        kjt = global_kjt(kind, B * world, 900 + step)
        want = ref(kjt).values()
        G = torch.randn(want.shape, generator=torch.Generator().manual_seed(step))
        (want * G / world).sum().backward()
        for name, mod in (("other plan", other), ("same plan", same)):
            got = mod(rank_slice(kjt, rank, B)).wait().values()
            close(got, want[rank * B : (rank + 1) * B], f"{name} after loading, step {step}")
            (got * G[rank * B : (rank + 1) * B]).sum().backward()
    for name, mod in (("other plan", other), ("same plan", same)):
        m2 = sharding.merge_state_dicts(all_gather(mod.state_dict()))
        for k, v in ref.state_dict().items():
            close(m2[k], v, f"{name}: {k} after training on")
    # all or nothing: one bad table, nothing replaced
    bad = dict(merged)
    bad["embedding_bags.t2.weight"] = bad["embedding_bags.t2.weight"][:-1]
    bad["embedding_bags.t0.weight"] = bad["embedding_bags.t0.weight"] + 1
    before = {k: v.clone() for k, v in same.state_dict().items()}
    try:
        same.load_state_dict(bad)
    except RuntimeError as e:
        holds_t2 = any(k.startswith("embedding_bags.t2") for k in before)
        assert (not holds_t2) or "t2" in str(e), str(e)
    else:
        assert not any(k.startswith("embedding_bags.t2") for k in before), "a truncated table loaded"
    if any(k.startswith("embedding_bags.t2") for k in before):
        for k, v in same.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a refused load"
    if rank == 0:
        torch.save({"merged": merged, "ref": ref_saved}, os.path.join(outdir, "ckpt.pt"))
    dist.barrier()


def scenario_reshard(world, rank, outdir):
    """A checkpoint merged from 2 ranks, loaded on 4 (another plan), trains on as the reference."""
    kind, opt = "A", "adam"
    ck = torch.load(os.path.join(outdir, "ckpt.pt"))
    ref = make_collection(kind, opt, seed=9)
    ref.load_state_dict(ck["ref"])
    dmp = shard_model(make_collection(kind, opt, seed=8), "rwmix", world)
    dmp.load_state_dict(ck["merged"])
    kjt = global_kjt(kind, B * world, 77)
    want = ref(kjt).values()
    got = dmp(rank_slice(kjt, rank, B)).wait().values()
    close(got, want[rank * B : (rank + 1) * B], "resharded output")
    G = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    (want * G / world).sum().backward()
    (got * G[rank * B : (rank + 1) * B]).sum().backward()
    merged = sharding.merge_state_dicts(all_gather(dmp.state_dict()))
    for k, v in ref.state_dict().items():
        close(merged[k], v, f"resharded {k}")


def expect(exc, words, fn):
    try:
        fn()
    except exc as e:
        assert all(w in str(e) for w in words), f"{type(e).__name__} without {words}: {e}"
        return
    raise AssertionError(f"no {exc.__name__} raised (expected one naming {words})")


def scenario_refusals(world, rank, outdir):
    m = make_collection("A", "sgd")
    expect(
        NotImplementedError,
        ["data_parallel", "table_wise, column_wise or row_wise"],
        lambda: shard_model(m, "dp", world),
    )
    plan, sharder = make_plan(m, "tw", world)
    del plan.plan[""]["t1"]
    expect(
        ValueError,
        ["t1"],
        lambda: DistributedModelParallel(
            m,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=torch.device("cpu"),
            plan=plan,
            sharders=[sharder],
            init_data_parallel=False,
        ),
    )
    dmp = shard_model(make_collection("A", "sgd"), "tw", world)
    kjt = global_kjt("A", B * world, 1)
    expect(TypeError, ["KeyedJaggedTensor"], lambda: dmp({"f0": (torch.zeros(1), torch.zeros(2))}))
    # inverse indices (VBE) are not sharded: refused, not ignored
    with_inverse = KeyedJaggedTensor(
        keys=kjt.keys(),
        values=kjt.values(),
        lengths=kjt.lengths(),
        inverse_indices=(kjt.keys(), torch.zeros(len(kjt.keys()), 3, dtype=torch.int64)),
    )
    expect(NotImplementedError, ["inverse indices"], lambda: dmp(with_inverse))
    # ranks feeding different batch sizes: refused on every rank (no hang)
    expect(ValueError, ["same batch size"], lambda: dmp(rank_slice(kjt, rank, B - rank % 2)).wait())
    if world >= 3:  # sizes whose total is B * world: ranks 2.. cannot tell from the total alone
        mine = ([B - 1, B + 1] + [B] * (world - 2))[rank]
        expect(
            ValueError,
            ["the ranks fed", str([B - 1, B + 1] + [B] * (world - 2))],
            lambda: dmp(rank_slice(kjt, rank, mine)).wait(),
        )
    # row-wise Adagrad state of column shards has no unsharded form
    dmp = shard_model(make_collection("A", "rowwise_adagrad"), "cw", world)
    expect(ValueError, ["row-wise Adagrad"], lambda: sharding.merge_state_dicts(all_gather(dmp.state_dict())))
    # a rank file missing: the column shards do not cover the table
    parts = all_gather(dmp.state_dict())
    expect(ValueError, ["cover"], lambda: sharding.merge_state_dicts(parts[:1]))
    # all or nothing across a rank's two local collections (row shards next to the others): a bad
    # Adam state in either leaves both untouched
    dmp = shard_model(make_collection("A", "adam"), "rwmix", world)
    own = dmp.state_dict()
    before = {k: v.clone() for k, v in own.items()}
    row_key = next(k for k in own if ":r" in k and k.endswith("optim_state2") and own[k].numel())
    other_key = next(k for k in own if ":r" not in k and k.endswith("optim_state2") and own[k].numel())
    for key in (row_key, other_key):
        bad = {k: (v + 1 if k.endswith(".weight") else v) for k, v in own.items()}
        bad[key] = torch.full_like(own[key], float("nan"))
        expect(RuntimeError, [key.split(".")[1]], lambda: dmp.load_state_dict(bad))
        for k, v in dmp.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a load refused for {key}"


def scenario_refusals_4(world, rank, outdir):
    # 9 rows over 4 ranks: TorchRec's blocks of 3 leave rank 3 none
    expect(ValueError, ["t3", "too few"], lambda: shard_model(make_collection("A", "sgd"), "rw_small", world))


def scenario_bad_index_named(world, rank, outdir):
    """One process owns every shard (so no other rank waits): a bad index is named by the user's
    feature, not the local collection's key number, for table-wise and row-wise shards."""
    for how in ("tw", "rw"):
        dmp = shard_model(make_collection("A", "sgd"), how, world)
        kjt = global_kjt("A", 4, 1)
        d = kjt.to_dict()
        bad = {k: (jt.values().clone(), jt.lengths()) for k, jt in d.items()}
        v, _ = bad["f1"]
        v[0] = 1000  # f1 reads a table of 50 rows
        keys = list(bad)
        broken = KeyedJaggedTensor.from_lengths_sync(
            keys, torch.cat([bad[k][0] for k in keys]), torch.cat([bad[k][1] for k in keys])
        )
        expect(RuntimeError, ["index out of range: feature 'f1'", "sharded"], lambda: dmp(broken).wait())


SCENARIOS = {
    1: {
        "tw_sgd": ("A", "sgd", "tw"),
        "cw_adam_weighted": ("W", "adam", "cw"),
        "rw_rowwise_adagrad_mean": ("M", "rowwise_adagrad", "rw"),
        "bad_index_named": scenario_bad_index_named,
    },
    2: {
        "tw_grad": ("A", None, "tw"),
        "tw_sgd": ("A", "sgd", "tw"),
        "tw_rowwise_adagrad": ("A", "rowwise_adagrad", "tw"),
        "tw_adam_weighted": ("W", "adam", "tw"),
        "cw_grad_mean": ("M", None, "cw"),
        "cw_sgd": ("A", "sgd", "cw"),
        "cw_adam_weighted": ("W", "adam", "cw"),
        "cw_rowwise_adagrad": ("A", "rowwise_adagrad", "cw"),
        "mixed_rowwise_adagrad_mean": ("M", "rowwise_adagrad", "mixed"),
        "rw_grad_mean": ("M", None, "rw"),
        "rw_rowwise_adagrad": ("A", "rowwise_adagrad", "rw"),
        "rw_adam_weighted": ("W", "adam", "rw"),
        "rwmix_rowwise_adagrad": ("A", "rowwise_adagrad", "rwmix"),
        "checkpoint": scenario_checkpoint,
        "refusals": scenario_refusals,
    },
    4: {
        "tw_rowwise_adagrad": ("A", "rowwise_adagrad", "tw"),
        "cw_adam": ("A", "adam", "cw"),
        "mixed_sgd_weighted": ("W", "sgd", "mixed"),
        "rwmix_adam_mean": ("M", "adam", "rwmix"),
        "reshard_from_2": scenario_reshard,
        "refusals_4": scenario_refusals_4,
    },
}


def _worker(rank, world, port, outdir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name, sc in SCENARIOS[world].items():
        try:
            if callable(sc):
                sc(world, rank, outdir)
            else:
                run_training(*sc, world, rank)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(outdir, f"world{world}_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def _run(world, outdir):
    mp.spawn(_worker, args=(world, get_free_port(), str(outdir)), nprocs=world, join=True)
    res = {}
    for r in range(world):
        with open(os.path.join(outdir, f"world{world}_rank{r}.json")) as f:
            res[r] = json.load(f)
    return res


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sharding")


@pytest.fixture(scope="module")
def world1(outdir):
    return _run(1, outdir)


@pytest.fixture(scope="module")
def world2(outdir):
    return _run(2, outdir)


@pytest.fixture(scope="module")
def world4(outdir, world2):  # loads the checkpoint world 2 wrote
    return _run(4, outdir)


def _check(res, name):
    bad = {r: v for r, v in res.items() if v.get(name) != "ok"}
    assert not bad, "\n".join(f"rank {r}:\n{v.get(name)}" for r, v in bad.items())


@pytest.mark.parametrize("name", list(SCENARIOS[1]))
def test_one_process(world1, name):
    _check(world1, name)


@pytest.mark.parametrize("name", list(SCENARIOS[2]))
def test_two_processes(world2, name):
    _check(world2, name)


@pytest.mark.parametrize("name", list(SCENARIOS[4]))
def test_four_processes(world4, name):
    _check(world4, name)


# --------------------------------------------------------------------------------------------
# Planner (one process)
# --------------------------------------------------------------------------------------------
def _criteo_like(rows=20000, D=64, n=4, frac_seed=0):
    cfgs = [
        EmbeddingBagConfig(num_embeddings=rows, embedding_dim=D, name=f"t{t}", feature_names=[f"f{t}"])
        for t in range(n)
    ]
    g = torch.Generator().manual_seed(frac_seed)
    mix = torch.tensor([D // 8, D // 4, D // 2, D])
    sizes = {
        c.name: mix[torch.multinomial(torch.tensor([0.55, 0.25, 0.15, 0.05]), rows, True, generator=g)] for c in cfgs
    }
    return cfgs, sizes


def test_planner_charges_true_multisize_bytes():
    cfgs, sizes = _criteo_like()
    m = MultiSizeEmbeddingBagCollection(cfgs, sizes)
    ebc = EmbeddingBagCollection(cfgs, device=torch.device("meta"))
    pl = sharding.planner(2, ddr_cap=10**9)
    pl.plan(m, [sharding.MultiSizeEmbeddingBagCollectionSharder()])
    got = {o.name: o.shards[0].storage.ddr for o in pl.get_selected_options()}
    pd = sharding.planner(2, ddr_cap=10**9)
    pd.plan(ebc, [EmbeddingBagCollectionSharder()])
    dense = {o.name: o.shards[0].storage.ddr for o in pd.get_selected_options()}
    for c in cfgs:
        stored = int(sizes[c.name].sum()) * 4 + (c.num_embeddings + 1) * 8
        assert dense[c.name] - got[c.name] == c.num_embeddings * c.embedding_dim * 4 - stored
        assert sharding.shard_bytes(m, c.name) == stored
    # with row-wise Adagrad, one fp32 accumulator per row more
    ma = MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    assert sharding.shard_bytes(ma, "t0") == sharding.shard_bytes(m, "t0") + cfgs[0].num_embeddings * 4
    # a column shard holds the entries of its columns only
    s = sizes["t0"]
    assert sharding.shard_bytes(m, "t0", 8, 32) == int((s - 8).clamp(0, 24).sum()) * 4 + (len(s) + 1) * 8


def test_planner_keeps_row_wise_off_tables_too_small_for_it():
    # 3 rows over 4 ranks: TorchRec's row blocks would leave a rank empty, which the sharder refuses
    cfgs = [
        EmbeddingBagConfig(num_embeddings=V, embedding_dim=8, name=f"t{i}", feature_names=[f"f{i}"])
        for i, V in enumerate([3, 5, 4000])
    ]
    m = MultiSizeEmbeddingBagCollection(cfgs, 4)
    sh = sharding.MultiSizeEmbeddingBagCollectionSharder()
    constraints = {c.name: ParameterConstraints(sharding_types=["row_wise"]) for c in cfgs}
    with pytest.raises(PlannerError):  # row-wise only: t0 and t1 cannot be placed
        sharding.planner(4, ddr_cap=10**9, constraints=constraints).plan(m, [sh])
    constraints = {"t2": ParameterConstraints(sharding_types=["row_wise"])}
    plan = sharding.planner(4, ddr_cap=10**9, constraints=constraints).plan(m, [sh]).plan[""]
    assert plan["t2"].sharding_type == "row_wise"
    assert plan["t0"].sharding_type != "row_wise" and plan["t1"].sharding_type != "row_wise"


def test_planner_fits_more_rows_per_rank_than_dense():
    cfgs, sizes = _criteo_like()
    m = MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    ebc = EmbeddingBagCollection(cfgs, device=torch.device("meta"))
    cap = 6 * 10**6  # bytes per rank: the 4 dense tables (5.1 MB each) need 20 MB
    plan = sharding.planner(2, ddr_cap=cap).plan(m, [sharding.MultiSizeEmbeddingBagCollectionSharder()])
    ranks = {n: p.ranks for n, p in plan.plan[""].items()}
    assert sorted(ranks) == [c.name for c in cfgs] and all(len(r) >= 1 for r in ranks.values())
    with pytest.raises(PlannerError):
        sharding.planner(2, ddr_cap=cap).plan(ebc, [EmbeddingBagCollectionSharder()])


def test_merge_finds_collections_nested_in_a_model():
    """Shard keys of a collection inside a model (``sparse.ebc.embedding_bags.<t>:<c0>-<c1>of<D>.*``)
    are joined without naming the prefix, and two collections of one model each under their own;
    the merged state equals the unsharded collection's under its prefix."""
    m = make_collection("A", "sgd")
    pieces = {c.name: [(0, 1), (1, c.embedding_dim)] for c in m.embedding_bag_configs()}
    split = column_split(m, pieces).state_dict()
    ranks = [{}, {}]
    for i, (k, v) in enumerate(sorted(split.items())):
        for pre in ("sparse.ebc.", "other."):
            ranks[i % 2][pre + k] = v
    merged = sharding.merge_state_dicts(ranks)
    want = m.state_dict()
    for pre in ("sparse.ebc.", "other."):
        for k, v in want.items():
            assert torch.equal(merged[pre + k], v), pre + k
    assert not any(":" in k for k in merged)
    only = sharding.merge_state_dicts(ranks, prefix="other.")  # a given prefix joins that one only
    assert any(":" in k and k.startswith("sparse.ebc.") for k in only)
    assert all(torch.equal(only["other." + k], v) for k, v in want.items())
