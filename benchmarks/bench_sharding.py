#!/usr/bin/env python
"""Benchmark of pme's sharding under TorchRec's DistributedModelParallel (CPU processes, gloo).

What it measures
----------------
A DLRM-shaped model (``torchrec.models.dlrm.DLRM``: 13 dense features through a bottom MLP
128-D, the 26 Criteo-Kaggle-shaped tables of ``bench_collection.py`` capped at ``--cap`` rows,
width ``--dim``, the dot interaction, an over arch 256-1, BCE loss) trained for ``--steps``
steps on ``--world`` spawned CPU processes (gloo, 1 thread each), twice:

``pme``      the sparse arch is ``pme.MultiSizeEmbeddingBagCollection`` (row sizes D/8..D in the
             55/25/15/5% mix: 25.6% of the dense entries) with its fused row-wise Adagrad, sharded
             by ``pme.sharding.MultiSizeEmbeddingBagCollectionSharder``;
``torchrec`` the sparse arch is ``torchrec.EmbeddingBagCollection`` (dense tables), sharded by
             TorchRec's ``EmbeddingBagCollectionSharder`` with the fused kernel (FBGEMM's CPU TBE)
             and ``EXACT_ROWWISE_ADAGRAD``.

Both get the same plan (``--sharding tw``: table-wise, tables placed greedily by rows; ``cw``:
each table in two column halves on neighbouring ranks; ``rw``: every table row-wise), the same batches (each
rank ``--batch`` samples, ``--hots`` Zipf(``--alpha``) lookups per feature) and the same dense
arch (DDP via DMP, torch SGD). Per rank: the median wall time of a step (forward, backward with the
fused embedding update, dense SGD step), and the bytes this rank sends per step through
``torch.distributed.all_to_all_single`` (TorchRec's KJT and pooled-embedding all-to-alls, both
directions) and, for row-wise, ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` (the pooled
outputs and their gradients); DDP's all-reduce of the dense gradients is not counted (the same for
both).
FBGEMM's CPU TBE backward ran its scalar reference kernels here (see /work/shared/MACHINES.md).

Planner: with ``--plan-mb`` MB of memory per rank (TorchRec ``Topology`` ddr cap), the largest row
cap of the Criteo-shaped tables for which ``EmbeddingShardingPlanner`` finds a plan, for the pme
collection (with ``pme.sharding.MultiSizeStorageEstimator``: stored entries + offsets + row-wise
Adagrad state) and for the dense EmbeddingBagCollection (TorchRec's own estimate, which counts no
optimizer state for a fused-params EBC), and the rows per rank that gives.

Output: a table on stdout and ``benchmarks/results/sharding[_cw|_rw]_cpu_<date>.json``. The build machine
has 2 cores shared with other work: 4 processes oversubscribe it (said in the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_collection import CRITEO_KAGGLE, SIZE_MIX, draw_sizes, zipf_rows  # noqa: E402  (one table list)

from _common import at_least, non_negative, positive, save_json, seed_arg  # noqa: E402


def cards_for(cap, scale=1.0):
    return [max(3, min(cap, int(c * scale))) for c in CRITEO_KAGGLE]


def tables(cards, D):
    from torchrec import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(num_embeddings=V, embedding_dim=D, name=f"t{i}", feature_names=[f"f{i}"])
        for i, V in enumerate(cards)
    ]


def pme_collection(cards, D, seed, lr):
    import pme.optim
    from pme.collection import MultiSizeEmbeddingBagCollection

    gen = torch.Generator().manual_seed(seed)
    cfgs = tables(cards, D)
    sizes = {c.name: draw_sizes(c.num_embeddings, D, gen) for c in cfgs}
    return MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.RowwiseAdagrad(lr=lr, eps=1e-8))


def greedy_ranks(cards, world):
    """Table-wise placement: largest first onto the least loaded rank."""
    load = [0] * world
    out = {}
    for i in sorted(range(len(cards)), key=lambda i: -cards[i]):
        r = min(range(world), key=lambda r: load[r])
        out[f"t{i}"] = r
        load[r] += cards[i]
    return out


# --------------------------------------------------------------------------------------------
# Planner: largest row cap that plans at a given memory per rank
# --------------------------------------------------------------------------------------------
def plans(kind, cap, D, world, ddr_bytes, seed):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.types import PlannerError

    from pme import sharding

    cards = cards_for(cap)
    if kind == "pme":
        mod = pme_collection(cards, D, seed, 0.01)
        sharder = sharding.MultiSizeEmbeddingBagCollectionSharder()
    else:
        mod = EmbeddingBagCollection(tables(cards, D), device=torch.device("meta"))
        sharder = EmbeddingBagCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.01}
        )
    try:
        sharding.planner(world, ddr_cap=ddr_bytes).plan(mod, [sharder])
        return True, sum(cards)
    except PlannerError:
        return False, sum(cards)


def max_cap(kind, D, world, ddr_bytes, seed):
    lo, hi = 0, 1000
    while plans(kind, hi, D, world, ddr_bytes, seed)[0]:
        lo, hi = hi, hi * 2
        if hi > 20_000_000:
            break
    while hi - lo > max(100, lo // 50):
        mid = (lo + hi) // 2
        if plans(kind, mid, D, world, ddr_bytes, seed)[0]:
            lo = mid
        else:
            hi = mid
    return lo, sum(cards_for(lo))


# --------------------------------------------------------------------------------------------
# Training on spawned processes
# --------------------------------------------------------------------------------------------
class _Counter:
    def __init__(self):
        self.bytes = 0
        self.on = False


def _count_all_to_all(counter, rank, world):
    import torch.distributed as dist

    orig = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if counter.on and input.numel():
            row = input[0].numel() * input.element_size() if input.dim() else input.element_size()
            if input_split_sizes:
                counter.bytes += (sum(input_split_sizes) - input_split_sizes[rank]) * row
            else:
                counter.bytes += input.numel() * input.element_size() * (world - 1) // world
        return orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted
    # row-wise: the pooled outputs go by reduce-scatter, their gradients by all-gather (a rank
    # sends (W - 1) / W of the reduce-scatter input and its all-gather input to W - 1 ranks)
    rs, ag = dist.reduce_scatter_tensor, dist.all_gather_into_tensor

    def counted_rs(output, input, *a, **k):
        if counter.on:
            counter.bytes += input.numel() * input.element_size() * (world - 1) // world
        return rs(output, input, *a, **k)

    def counted_ag(output, input, *a, **k):
        if counter.on:
            counter.bytes += input.numel() * input.element_size() * (world - 1)
        return ag(output, input, *a, **k)

    dist.reduce_scatter_tensor, dist.all_gather_into_tensor = counted_rs, counted_ag


def _worker(rank, world, port, args, out_path):
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.models.dlrm import DLRM

    from pme import sharding

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = _Counter()
    _count_all_to_all(counter, rank, world)
    D = args.dim
    cards = cards_for(args.cap)
    place = greedy_ranks(cards, world)
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    # Batches: the same on every rank count (rank r takes its own slice of the seed stream).
    gen = torch.Generator().manual_seed(args.seed + 1000 * rank)
    batches = []
    for _ in range(args.warmup + args.steps):
        vals = [zipf_rows(V, args.batch * args.hots, args.alpha, gen) for V in cards]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f"f{i}" for i in range(len(cards))],
            values=torch.cat(vals),
            lengths=torch.full((len(cards) * args.batch,), args.hots),
        )
        batches.append(
            (torch.randn(args.batch, 13, generator=gen), kjt, torch.randint(0, 2, (args.batch,), generator=gen).float())
        )
    result = {}
    for kind in args.methods:
        torch.manual_seed(args.seed)
        if kind == "pme":
            sparse = pme_collection(cards, D, args.seed, args.lr)
            sharder = sharding.MultiSizeEmbeddingBagCollectionSharder()
        else:
            sparse = EmbeddingBagCollection(tables(cards, D), device=torch.device("meta"))
            sharder = EmbeddingBagCollectionSharder(
                fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": args.lr, "eps": 1e-8}
            )
        model = DLRM(
            embedding_bag_collection=sparse,
            dense_in_features=13,
            dense_arch_layer_sizes=[128, D],
            over_arch_layer_sizes=[256, 1],
        )
        # the fused kernel for both (construct_module_sharding_plan's default would be TorchRec's
        # dense kernel: dense gradients and no fused update)
        fused = EmbeddingComputeKernel.FUSED.value
        if args.sharding == "tw":
            per = {n: table_wise(rank=r, compute_kernel=fused) for n, r in place.items()}
        elif args.sharding == "cw":  # two column halves on neighbouring ranks
            per = {n: column_wise(ranks=[r, (r + 1) % world], compute_kernel=fused) for n, r in place.items()}
        else:  # TorchRec's even row blocks over all ranks
            per = {n: row_wise(compute_kernel=fused) for n in place}
        mplan = construct_module_sharding_plan(
            sparse, per, sharder=sharder, local_size=world, world_size=world, device_type="cpu"
        )
        plan = ShardingPlan({"sparse_arch.embedding_bag_collection": mplan})
        t0 = time.perf_counter()
        dmp = DistributedModelParallel(model, env=env, device=torch.device("cpu"), plan=plan, sharders=[sharder])
        shard_s = time.perf_counter() - t0
        dense = [p for n, p in dmp.named_parameters() if "embedding_bag_collection" not in n and p.requires_grad]
        opt = torch.optim.SGD(dense, lr=args.lr)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        times, losses = [], []
        counter.bytes = 0
        for i, (x, kjt, y) in enumerate(batches):
            counter.on = i >= args.warmup
            dist.barrier()
            t = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(dmp(x, kjt).squeeze(1), y)
            loss.backward()
            opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
        counter.on = False
        kernels = sorted({ps.compute_kernel for ps in mplan.values()})
        result[kind] = {
            "compute_kernels": kernels,
            "step_ms_median": 1e3 * statistics.median(times),
            "step_ms_all": [1e3 * t for t in times],
            "a2a_bytes_sent_per_step": counter.bytes / args.steps,
            "shard_seconds": shard_s,
            "losses": losses,
        }
        del dmp, model, sparse, opt
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


def run_world(world, args):
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.json")
        mp.spawn(_worker, args=(world, get_free_port(), args, path), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=at_least(1), nargs="+", default=[2, 4], help="numbers of processes (default 2 4)")
    p.add_argument("--cap", type=at_least(1), default=100_000, help="rows per table at most (default 100000)")
    p.add_argument("--dim", type=at_least(1), default=64)
    p.add_argument("--batch", type=at_least(1), default=512, help="samples per rank per step (default 512)")
    p.add_argument("--hots", type=at_least(1), default=1, help="lookups per feature per sample (default 1)")
    p.add_argument("--alpha", type=non_negative, default=1.05, help="Zipf exponent of the indices")
    p.add_argument("--steps", type=at_least(1), default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=at_least(0), default=3)
    p.add_argument("--lr", type=positive, default=0.01)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument(
        "--sharding",
        choices=["tw", "cw", "rw"],
        default="tw",
        help="tw: table-wise, tables placed greedily by rows (default); cw: each table in two column "
        "halves on neighbouring ranks; rw: every table row-wise over all ranks",
    )
    p.add_argument("--methods", nargs="+", default=["pme", "torchrec"], choices=["pme", "torchrec"])
    p.add_argument(
        "--plan-mb",
        type=non_negative,
        default=64.0,
        help="memory per rank (MB) for the planner comparison; 0 skips it (default 64)",
    )
    p.add_argument("--plan-world", type=at_least(1), default=2)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sharding_cpu_<date>.json)")
    args = p.parse_args(argv)

    report = {
        "benchmark": "bench_sharding",
        "date": dt.date.today().isoformat(),
        "device": "cpu",
        "host_cores": os.cpu_count(),
        "threads_per_process": 1,
        "backend": "gloo",
        "torch": torch.__version__,
        "config": vars(args),
        "tables": {"cards": cards_for(args.cap), "dim": args.dim, "pme_size_mix": SIZE_MIX},
        "note": "build machine: 2 cores shared with other work; 4 processes oversubscribe it",
        "worlds": {},
    }
    try:
        import fbgemm_gpu
        import torchrec

        report["torchrec"], report["fbgemm_gpu"] = torchrec.__version__, fbgemm_gpu.__version__
    except Exception as e:  # pragma: no cover
        raise SystemExit(
            f"bench_sharding needs torchrec and fbgemm_gpu (scripts/test_torchrec.sh's venv): {e}"
        ) from None

    if args.plan_mb > 0:
        cap_bytes = int(args.plan_mb * 2**20)
        pl = {}
        for kind in ("pme", "torchrec"):
            c, rows = max_cap(kind, args.dim, args.plan_world, cap_bytes, args.seed)
            pl[kind] = {"max_row_cap": c, "rows": rows, "rows_per_rank": rows / args.plan_world}
        pl["rows_ratio_pme_over_torchrec"] = pl["pme"]["rows"] / pl["torchrec"]["rows"]
        report["planner"] = {"world": args.plan_world, "ddr_cap_bytes_per_rank": cap_bytes, **pl}
        print(
            f"planner, {args.plan_mb:g} MB per rank x {args.plan_world} ranks: pme plans up to cap "
            f"{pl['pme']['max_row_cap']:,} ({pl['pme']['rows_per_rank']:,.0f} rows per rank), dense EBC up to cap "
            f"{pl['torchrec']['max_row_cap']:,} ({pl['torchrec']['rows_per_rank']:,.0f} rows per rank): "
            f"{pl['rows_ratio_pme_over_torchrec']:.2f}x the rows",
            flush=True,
        )

    print(f"{'world':>5} {'method':>9} {'rank':>4} {'step ms':>9} {'sent MB/step':>12}")
    for world in args.worlds:
        t0 = time.perf_counter()
        per_rank = run_world(world, args)
        row = {"per_rank": per_rank, "wall_seconds": time.perf_counter() - t0}
        for kind in args.methods:
            for r, res in enumerate(per_rank):
                print(
                    f"{world:>5} {kind:>9} {r:>4} {res[kind]['step_ms_median']:>9.1f} "
                    f"{res[kind]['a2a_bytes_sent_per_step'] / 1e6:>12.3f}"
                )
            row[kind] = {
                "step_ms_max_over_ranks": max(res[kind]["step_ms_median"] for res in per_rank),
                "a2a_bytes_sent_per_step_all_ranks": sum(res[kind]["a2a_bytes_sent_per_step"] for res in per_rank),
            }
        if set(args.methods) == {"pme", "torchrec"}:
            row["ratio_step_torchrec_over_pme"] = (
                row["torchrec"]["step_ms_max_over_ranks"] / row["pme"]["step_ms_max_over_ranks"]
            )
            row["ratio_bytes_torchrec_over_pme"] = (
                row["torchrec"]["a2a_bytes_sent_per_step_all_ranks"] / row["pme"]["a2a_bytes_sent_per_step_all_ranks"]
            )
            print(
                f"world {world}: step time torchrec / pme = {row['ratio_step_torchrec_over_pme']:.2f}, "
                f"bytes torchrec / pme = {row['ratio_bytes_torchrec_over_pme']:.2f}",
                flush=True,
            )
        report["worlds"][str(world)] = row
    tag = "" if args.sharding == "tw" else f"_{args.sharding}"
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"sharding{tag}_cpu_{report['date']}.json"
    )
    save_json(report, out)


if __name__ == "__main__":
    main()
