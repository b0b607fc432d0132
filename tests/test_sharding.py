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
    # one rank's input refused (a feature missing, no weights for a weighted collection): every rank
    # raises, naming that rank and why (the others used to wait in the all-to-all until the timeout)
    mine = rank_slice(kjt, rank, B)
    if rank == world - 1:
        d = mine.to_dict()
        mine = KeyedJaggedTensor.from_jt_dict({k: v for k, v in d.items() if k != "f2"})
    expect(
        KeyError if rank == world - 1 else ValueError,
        ["'f2'", "every rank refuses"] + ([] if rank == world - 1 else [f"rank {world - 1}"]),
        lambda: dmp(mine).wait(),
    )
    weighted = shard_model(make_collection("W", "sgd"), "rw", world)
    wkjt = rank_slice(global_kjt("W", B * world, 2), rank, B)
    if rank == 0:
        wkjt = KeyedJaggedTensor.from_lengths_sync(wkjt.keys(), wkjt.values(), wkjt.lengths())
    expect(ValueError, ["carries no weights", "every rank refuses"], lambda: weighted(wkjt).wait())
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


def scenario_partial_load(world, rank, outdir):
    """A checkpoint without one of the rank's shards: strict=True replaces nothing (in either local
    collection: row shards next to others) and names the shard; strict=False loads the shards it
    holds whole and reports the missing one's keys."""
    dmp = shard_model(make_collection("A", "adam"), "rwmix", world)
    own = dmp.state_dict()
    shards = sorted({k.split(".")[1] for k in own if k.startswith("embedding_bags.")})
    for drop in (next(n for n in shards if ":r" in n), next(n for n in shards if ":r" not in n)):
        before = {k: v.clone() for k, v in dmp.state_dict().items()}
        part = {
            k: (v + 1 if k.endswith(".weight") else v)
            for k, v in own.items()
            if not k.startswith(f"embedding_bags.{drop}.")
        }
        expect(RuntimeError, [drop, "lacks"], lambda: dmp.load_state_dict(part))
        for k, v in dmp.state_dict().items():
            assert torch.equal(v, before[k]), f"{k} changed by a strict load refused for missing {drop}"
        res = dmp.load_state_dict(part, strict=False)
        assert sorted(res.missing_keys) == sorted(k for k in own if k.startswith(f"embedding_bags.{drop}.")), res
        for k, v in dmp.state_dict().items():
            want = before[k] + 1 if k.endswith(".weight") and not k.startswith(f"embedding_bags.{drop}.") else before[k]
            assert torch.equal(v, want), f"{k} after a strict=False load without {drop}"
        dmp.load_state_dict(own)


def scenario_other_plan_rank_file(world, rank, outdir):
    """A rank's own state_dict loaded into another plan: refused, saying to merge the rank files."""
    src = shard_model(make_collection("A", "sgd"), "mixed", world)
    dst = shard_model(make_collection("A", "sgd", seed=2), "rw", world)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    expect(RuntimeError, ["lacks", "merge_state_dicts"], lambda: dst.load_state_dict(src.state_dict()))
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    dst.load_state_dict(sharding.merge_state_dicts(all_gather(src.state_dict())))
    kjt = global_kjt("A", B * world, 3)
    close(
        dst(rank_slice(kjt, rank, B)).wait().values(),
        src(rank_slice(kjt, rank, B)).wait().values(),
        "merged rank files loaded into another plan",
    )


def scenario_ebc_checkpoint(world, rank, outdir):
    """A torchrec EmbeddingBagCollection's checkpoint (dense [V, D] weights) loads into every plan as
    into the unsharded collection: each row keeps its first sizes[i] values."""
    ebc = EmbeddingBagCollection(configs("A"))
    dense = ebc.state_dict()
    ref = make_collection("A", "adam")
    ref.load_state_dict(dense)
    kjt = global_kjt("A", B * world, 4)
    want = ref(kjt).values()[rank * B : (rank + 1) * B]
    for how in ("tw", "cw", "rw", "rwmix"):
        dmp = shard_model(make_collection("A", "adam", seed=6), how, world)
        dmp.load_state_dict(dense)
        close(dmp(rank_slice(kjt, rank, B)).wait().values(), want, f"{how} after loading an EBC checkpoint")
    bad = dict(dense)
    bad["embedding_bags.t2.weight"] = bad["embedding_bags.t2.weight"][:, :2]
    dmp = shard_model(make_collection("A", "adam"), "rw", world)
    expect(RuntimeError, ["embedding_bags.t2.weight", "[33, 4]"], lambda: dmp.load_state_dict(bad))


def scenario_lr_schedule(world, rank, outdir):
    """The fused optimizer object given to the collection is the one every shard steps with: a
    learning-rate change on it reaches the sharded module (row shards and the others), as unsharded."""
    opt = pme.optim.SGD(lr=0.3)
    m = make_collection("A", None)
    m = MultiSizeEmbeddingBagCollection(configs("A"), {n: m.sizes(n) for n in m.table_names}, optimizer=opt)
    dmp = shard_model(m, "rwmix", world)
    assert dmp.module.optimizer is opt
    before = {k: v.clone() for k, v in dmp.state_dict().items()}
    opt.lr = 0.0
    out = dmp(rank_slice(global_kjt("A", B * world, 5), rank, B)).wait()
    out.values().pow(2).sum().backward()
    for k, v in dmp.state_dict().items():
        if k.endswith(".weight"):
            assert torch.equal(v, before[k]), f"{k} moved with lr set to 0"


def scenario_meta_refused(world, rank, outdir):
    m = MultiSizeEmbeddingBagCollection(configs("A"), 3, device="meta")
    expect(ValueError, ["meta device", "CPU"], lambda: shard_model(m, "tw", world))


def scenario_plain_parent_load(world, rank, outdir):
    """A model holding the sharded collection, loaded by torch's load_state_dict (not
    DistributedModelParallel's): TorchRec's all-to-all buffers are not reported missing, and a
    checkpoint without a table changes nothing under strict=True."""

    class Model(torch.nn.Module):
        def __init__(self, ebc):
            super().__init__()
            self.sparse = ebc

    plan, sharder = make_plan(make_collection("A", "adam"), "mixed", world)
    dmp = DistributedModelParallel(
        Model(make_collection("A", "adam")),
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"sparse": plan.plan[""]}),
        sharders=[sharder],
        init_data_parallel=False,
    )
    sd = dmp.state_dict()
    res = dmp.module.load_state_dict(sd)
    assert not res.missing_keys and not res.unexpected_keys, res
    before = {k: v.clone() for k, v in sd.items()}
    part = {k: v + 1 for k, v in sd.items() if k.endswith(".weight") and ".t1." not in k}
    part.update({k: v for k, v in sd.items() if not k.endswith(".weight") and ".t1." not in k})
    expect(RuntimeError, ["t1"], lambda: dmp.module.load_state_dict(part))
    assert all(torch.equal(v, before[k]) for k, v in dmp.state_dict().items()), "a refused load changed values"
    res = dmp.module.load_state_dict(part, strict=False)
    assert res.missing_keys and all(".t1." in k for k in res.missing_keys), res


def scenario_train_pipeline(world, rank, outdir):
    """TorchRec's TrainPipelineSparseDist (its input dist one batch ahead, the model's dense part under
    DDP) trains a model holding the sharded collection (row-wise mean-pooled shards next to the
    others, fused Adam) as the unsharded model trained on the whole batch; it used to fail in the
    pipeline's input-dist stage ('_Both' object has no attribute 'awaitables')."""
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    class Model(torch.nn.Module):
        def __init__(self, ebc):
            super().__init__()
            self.sparse = ebc
            torch.manual_seed(1)
            self.dense = torch.nn.Linear(ebc.out_width, 1)

        def forward(self, batch):
            pred = self.dense(self.sparse(batch.sparse_features).values()).squeeze(1)
            return torch.nn.functional.mse_loss(pred, batch.labels), pred

    ref = Model(make_collection("M", "adam"))
    model = Model(make_collection("M", "adam"))
    plan, sharder = make_plan(model.sparse, "rwmix", world)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"sparse": plan.plan[""]}),
        sharders=[sharder],
    )
    dense = [p for n, p in dmp.named_parameters() if "dense" in n]
    pipe = TrainPipelineSparseDist(dmp, torch.optim.SGD(dense, lr=0.1), device=torch.device("cpu"))
    ref_opt = torch.optim.SGD(ref.dense.parameters(), lr=0.1)
    batches = []
    for i in range(4):
        kjt = global_kjt("M", B * world, 300 + i)
        labels = torch.randn(B * world, generator=torch.Generator().manual_seed(i))
        batches.append((kjt, labels))
    it = iter(
        [
            Batch(
                dense_features=torch.zeros(B, 1),
                sparse_features=rank_slice(k, rank, B),
                labels=y[rank * B : (rank + 1) * B],
            )
            for k, y in batches
        ]
    )
    for step, (kjt, labels) in enumerate(batches):
        got = pipe.progress(it)
        ref_opt.zero_grad()
        loss, want = ref(Batch(dense_features=torch.zeros(1), sparse_features=kjt, labels=labels))
        loss.backward()
        ref_opt.step()
        close(got.detach(), want.detach()[rank * B : (rank + 1) * B], f"pipelined step {step}")
    merged = sharding.merge_state_dicts(all_gather(dmp.module.sparse.state_dict()))
    for k, v in ref.sparse.state_dict().items():
        close(merged[k], v, f"after the pipeline: {k}")


def scenario_random(world, rank, outdir):
    """Random collections (1 to 4 tables of 1 to 40 rows and width 1 to 12, sum or mean pooling or
    weighted, random sizes) under random plans (column shards of random widths on any ranks, a rank
    may hold nothing), int32 or int64 values and lengths, batch 0 to 3 per rank: 2 steps against
    the unsharded collection (itself checked against torchrec's EmbeddingBagCollection on the dense
    views), the merged state, and the checkpoint loaded into a second random plan."""
    for seed in range(8):
        cfgs, weighted, plans, opt, idt, ldt, b = _draw(seed, world)
        desc = f"draw {seed}: {[(c.num_embeddings, c.embedding_dim, c.feature_names) for c in cfgs]} {plans} {opt}"
        try:
            _random_case(cfgs, weighted, plans, opt, idt, ldt, b, world, rank)
        except Exception as e:
            raise AssertionError(f"{desc}: {e}") from e


def _draw(seed, world):
    import random

    r = random.Random(seed)
    weighted = r.random() < 0.3
    cfgs = [
        EmbeddingBagConfig(
            num_embeddings=r.choice([1, 2, 3, 5, 17, 40]),
            embedding_dim=r.choice([1, 2, 3, 4, 6, 8, 12]),
            name=f"t{t}",
            feature_names=r.sample(["f0", "f1", "f2", "f3"], r.randint(0, 2)),
            pooling=PoolingType.SUM if weighted or r.random() < 0.5 else PoolingType.MEAN,
        )
        for t in range(r.randint(1, 4))
    ]
    plans = []
    for _ in range(2):
        per = {}
        for c in cfgs:
            kinds = ["tw"] + (["cw"] if c.embedding_dim >= 2 else [])
            if (world - 1) * -(-c.num_embeddings // world) < c.num_embeddings:
                kinds.append("rw")
            k = r.choice(kinds)
            if k == "cw":
                cuts = sorted(r.sample(range(1, c.embedding_dim), r.randint(2, min(c.embedding_dim, 4)) - 1))
                widths = [b - a for a, b in zip([0, *cuts], [*cuts, c.embedding_dim])]
                per[c.name] = ("cw", [r.randrange(world) for _ in widths], widths)
            else:
                per[c.name] = (k, r.randrange(world))
        plans.append(per)
    opt = r.choice([None, "sgd", "adam", "rowwise_adagrad"])
    if opt == "rowwise_adagrad" and any(p[0] == "cw" for p in plans[0].values()):
        opt = "adam"  # (row-wise Adagrad on column shards has its own reference: run_training's)
    return (
        cfgs,
        weighted,
        plans,
        opt,
        r.choice([torch.int32, torch.int64]),
        r.choice([torch.int32, torch.int64]),
        r.choice([0, 1, 3]),
    )


def _column_shards(ranks, widths):
    """column_wise with shards of the given widths on the given ranks (any order, ranks may repeat)."""
    from torchrec.distributed.sharding_plan import _get_parameter_sharding

    def gen(param, local_size, world_size, device_type, sharder):
        sor, c = [], 0
        for rk, w in zip(ranks, widths):
            sor.append(([param.shape[0], w], [0, c], rk))
            c += w
        return _get_parameter_sharding(param, "column_wise", sor, local_size, device_type, sharder)

    return gen


def _shard_random(m, per, world):
    sharder = sharding.MultiSizeEmbeddingBagCollectionSharder()
    gens = {
        n: table_wise(rank=p[1]) if p[0] == "tw" else row_wise() if p[0] == "rw" else _column_shards(p[1], p[2])
        for n, p in per.items()
    }
    plan = construct_module_sharding_plan(
        m, gens, sharder=sharder, local_size=world, world_size=world, device_type="cpu"
    )
    return DistributedModelParallel(
        m,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"": plan}),
        sharders=[sharder],
        init_data_parallel=False,
    )


def _random_case(cfgs, weighted, plans, opt, idt, ldt, b, world, rank):
    def collection(seed):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(7)
        sizes = {c.name: torch.randint(0, c.embedding_dim + 1, (c.num_embeddings,), generator=g) for c in cfgs}
        o = OPTIMIZERS[opt]
        return MultiSizeEmbeddingBagCollection(cfgs, sizes, is_weighted=weighted, optimizer=o() if o else None)

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        rows = {}
        for c in cfgs:
            for f in c.feature_names or [c.name]:
                rows[f] = min(rows.get(f, c.num_embeddings), c.num_embeddings)
        keys = sorted(rows)
        lens = [torch.randint(0, 4, (b * world,), generator=g) for _ in keys]
        vals = torch.cat([torch.randint(0, rows[k], (int(ln.sum()),), generator=g) for k, ln in zip(keys, lens)])
        w = torch.rand(vals.numel(), generator=g) + 0.5 if weighted else None
        full = KeyedJaggedTensor.from_lengths_sync(keys, vals.to(idt), torch.cat(lens).to(ldt), weights=w)
        mine = (
            rank_slice(full, rank, b)
            if b
            else KeyedJaggedTensor.from_lengths_sync(
                keys, vals[:0].to(idt), torch.zeros(0, dtype=ldt), weights=w[:0] if weighted else None
            )
        )
        return full, mine

    ref = collection(0)
    dmp = _shard_random(collection(0), plans[0], world)
    ebc = EmbeddingBagCollection(cfgs, is_weighted=weighted)
    for step in range(2):
        full, mine = batch(100 + step)
        want = ref(full)
        with torch.no_grad():
            for c in cfgs:
                ebc.embedding_bags[c.name].weight.copy_(ref.to_dense(c.name))
        close(want.values(), ebc(full).values(), f"step {step}: unsharded vs EmbeddingBagCollection")
        out = dmp(mine).wait()
        assert out.keys() == want.keys()
        close(out.values(), want.values()[rank * b : (rank + 1) * b], f"step {step} output")
        G = torch.randn(want.values().shape, generator=torch.Generator().manual_seed(step))
        (out.values() * G[rank * b : (rank + 1) * b]).sum().backward()
        (want.values() * G / world).sum().backward()
        if opt is None:
            for _, mod in dmp.module._locals():
                mod.weight.grad = None
            ref.weight.grad = None
    parts = all_gather(dmp.state_dict())
    merged = sharding.merge_state_dicts(parts)
    assert sorted(merged) == sorted(ref.state_dict())
    for k, v in ref.state_dict().items():
        close(merged[k], v, k)
    full, mine = batch(99)
    want = ref(full).values()[rank * b : (rank + 1) * b]
    other = _shard_random(collection(5), plans[1], world)
    other.load_state_dict(merged)
    close(other(mine).wait().values(), want, "merged checkpoint in another plan")
    same = _shard_random(collection(6), plans[0], world)
    same.load_state_dict(parts[rank])
    close(same(mine).wait().values(), want, "rank file in the same plan")


SCENARIOS = {
    1: {
        "tw_sgd": ("A", "sgd", "tw"),
        "cw_adam_weighted": ("W", "adam", "cw"),
        "rw_rowwise_adagrad_mean": ("M", "rowwise_adagrad", "rw"),
        "bad_index_named": scenario_bad_index_named,
        "meta_refused": scenario_meta_refused,
        "plain_parent_load": scenario_plain_parent_load,
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
        "partial_load": scenario_partial_load,
        "other_plan_rank_file": scenario_other_plan_rank_file,
        "ebc_checkpoint": scenario_ebc_checkpoint,
        "lr_schedule": scenario_lr_schedule,
        "random": scenario_random,
        "train_pipeline": scenario_train_pipeline,
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
    # a shard the table does not have: refused (it was a count of bytes, even a negative one)
    for bad in ({"c0": 8, "c1": 4}, {"c1": 65}, {"r0": 10, "r1": 2}, {"r1": 20001}):
        with pytest.raises(ValueError, match="has no shard"):
            sharding.shard_bytes(m, "t0", **bad)


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


def test_merge_refuses_rowwise_adagrad_column_state_whatever_the_sizes():
    """Row-wise Adagrad's per-row state of column shards is refused even when every shard stores as
    many entries as the table has rows (it was joined as if per entry, into a state of the wrong
    length); Adam's per-entry state of the same shards is joined."""
    cfgs = [EmbeddingBagConfig(num_embeddings=6, embedding_dim=4, name="a", feature_names=["x"])]
    sizes = {"a": torch.tensor([4, 4, 4, 0, 0, 0])}  # columns [0, 2) and [2, 4): 6 entries each
    pieces = {"a": [(0, 2), (2, 4)]}
    m = MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    with pytest.raises(ValueError, match="row-wise Adagrad"):
        sharding.merge_state_dicts([column_split(m, pieces).state_dict()])
    m = MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.Adam(lr=0.1))
    with torch.no_grad():
        m.optim_state1.uniform_()
        m.optim_state2.uniform_()
    o, split = m.table_offsets("a"), {"optim_step": m.state_dict()["optim_step"]}
    for c0, c1 in pieces["a"]:
        p = f"embedding_bags.a:{c0}-{c1}of4."
        split[p + "weight"], ps = sharding.column_piece(m.weight.detach(), o, c0, c1)
        split[p + "offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), ps.cumsum(0)])
        for k in ("optim_state1", "optim_state2"):
            split[p + k] = sharding.column_piece(getattr(m, k), o, c0, c1)[0]
    merged = sharding.merge_state_dicts([split])
    for k, v in m.state_dict().items():
        assert torch.equal(merged[k], v), k
    del split["embedding_bags.a:2-4of4.optim_state2"]
    with pytest.raises(ValueError, match="optim_state2"):
        sharding.merge_state_dicts([split])
