#!/usr/bin/env python
"""Benchmark of pme.MultiSizeEmbeddingBagCollection on a Criteo-Kaggle-shaped collection (CPU).

What it measures
----------------
26 tables with the published Criteo Kaggle cardinalities (the 26 categorical features of the
Kaggle display-advertising set, as DLRM's preprocessing counts them), capped at ``--cap`` rows
(2M), width ``--dim`` (64). pme row sizes are drawn per row: D/8, D/4, D/2, D with probabilities
55/25/15/5% (8/16/32/64 at D = 64: 25.6% of the dense entries). Every table is read by one
feature; a batch is ``--batch`` (2048) samples with ``--hots`` lookups per feature (1: one-hot,
20: multi-hot), indices Zipf(``--alpha`` = 1.05) over the table's rows (ranks mapped to rows by a
random permutation), int64. The same batch is replayed at every call. For each number of threads
(``--threads``, 1 and 2) and each hotness:

forward (under torch.no_grad()), output ``[B, 26 * D]``:
  ``pme_collection``  the collection, one operator call for all features (KeyedJaggedTensor in).
  ``pme_per_table``   one pme.MultiSizeEmbeddingBag per table (views of the same flat buffer), a
                      Python loop of 26 calls + torch.cat (the inputs split per feature beforehand).
  ``fbgemm_tbe``      FBGEMM's table-batched embedding (SplitTableBatchedEmbeddingBagsCodegen,
                      CPU, fp32) on the dense tables (each pme table's zero-padded dense view).
  ``torchrec_ebc``    torchrec.EmbeddingBagCollection (one nn.EmbeddingBag per table) on the same
                      dense tables (sharing TBE's weights: no second copy).
step (forward + backward of a fixed random output gradient + fused row-wise Adagrad):
  ``pme_collection_fused``  the collection with optimizer=pme.optim.RowwiseAdagrad.
  ``fbgemm_tbe_fused``      TBE with EXACT_ROWWISE_ADAGRAD (the update runs in its backward).
with ``--vbe SHARE``, the forward on VBE batches (a variable batch per feature: every odd feature
has B / SHARE bags, each sample reading one through the KJT's inverse indices), pme's collection
against ``torchrec_ebc``;
and, as the issue's third target, one table (1M x D, 2048 bags x 32 Zipf lookups, the same size
mix): ``single_pme`` vs ``single_nn_embedding_bag`` forward.

Timing: torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time=``--min-run-time``) with
``num_threads`` set, median per call; methods run one after the other for each configuration, so
the ratios of a configuration come from one run. With ``--rounds N`` the methods of a configuration
take turns N times (min-run-time / N seconds each) and each figure is the median over rounds; the
ratios then say in how many rounds pme was the faster (the shared host's slow spells fall on
every method alike). FBGEMM's CPU TBE backward ran its scalar
reference kernels on this machine (it reported no AVX2 in-process; see /work/shared/MACHINES.md),
which flatters any rival's step figures. The build machine is shared: say so next to any figure.

Output: a table on stdout, ``benchmarks/results/collection_<device>_<date>.json`` (device, sizes,
distribution, every median) and a PNG of the same name; ``--out`` names another folder for them,
or, ending in ``.json``, the file itself (the PNG next to it).
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.benchmark import Timer

import pme
from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

from _common import at_least, machine, non_negative, parser, positive, save_json  # benchmarks/, the script's folder

CRITEO_KAGGLE = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]
SIZE_MIX = ((8, 0.55), (4, 0.25), (2, 0.15), (1, 0.05))  # (D / divisor, probability)


def draw_sizes(V, D, gen):
    sizes = torch.tensor([max(1, D // d) for d, _ in SIZE_MIX])
    probs = torch.tensor([p for _, p in SIZE_MIX])
    return sizes[torch.multinomial(probs, V, replacement=True, generator=gen)]


def zipf_rows(V, n, alpha, gen):
    """n rows of a table of V: Zipf(alpha) ranks by inverse CDF, ranks -> rows by a permutation."""
    if V == 1:
        return torch.zeros(n, dtype=torch.int64)
    p = torch.arange(1, V + 1, dtype=torch.float64).pow(-alpha)
    cdf = torch.cumsum(p, 0)
    cdf /= cdf[-1].clone()
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    ranks = torch.searchsorted(cdf, u).clamp(max=V - 1)
    return torch.randperm(V, generator=gen)[ranks]


def median_ms(fn, threads, min_run_time):
    gc.collect()
    t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def time_methods(methods, threads, args):
    """``{name: fn}`` -> ``({name: median ms}, {name: [ms per round]})``: ``args.rounds`` rounds, each
    timing every method once in turn (``min_run_time / rounds`` seconds each), so that a slow spell
    of the shared host falls on every method alike; the figure is the median over the rounds."""
    per = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            per[name].append(median_ms(fn, threads, args.min_run_time / args.rounds))
    return {n: statistics.median(v) for n, v in per.items()}, per


def build(args):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig as TRConfig

    gen = torch.Generator().manual_seed(args.seed)
    D = args.dim
    cards = [max(3, min(args.cap, int(c * args.scale))) for c in CRITEO_KAGGLE]
    names = [f"t{i}" for i in range(len(cards))]
    cfgs = [EmbeddingBagConfig(V, D, n, [f"f{i}"]) for i, (V, n) in enumerate(zip(cards, names))]
    sizes = {n: draw_sizes(V, D, gen) for n, V in zip(names, cards)}
    t0 = time.perf_counter()
    coll = MultiSizeEmbeddingBagCollection(cfgs, sizes, optimizer=pme.optim.RowwiseAdagrad(lr=0.01, eps=1e-8))
    print(
        f"pme collection: {sum(cards):,} rows, {coll.weight.numel():,} stored entries "
        f"({100 * coll.weight.numel() / (sum(cards) * D):.1f}% of dense) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    # The per-table loop: modules over views of the collection's buffer (no copy).
    per_table = []
    for i, n in enumerate(names):
        m = pme.MultiSizeEmbeddingBag(
            cards[i], D, sizes=sizes[n], mode="sum", include_last_offset=True, _weight=coll.table_weight(n).detach()
        )
        m.weight.requires_grad_(False)
        per_table.append(m)
    assert per_table[2].weight.data_ptr() == coll.table_weight(names[2]).data_ptr()
    t0 = time.perf_counter()
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(V, D, EmbeddingLocation.HOST, ComputeDevice.CPU) for V in cards],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.01,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32,
    )
    with torch.no_grad():
        for n, w in zip(names, tbe.split_embedding_weights()):
            w.copy_(coll.to_dense(n))
    ebc = EmbeddingBagCollection(
        [
            TRConfig(num_embeddings=V, embedding_dim=D, name=n, feature_names=[f"f{i}"])
            for i, (V, n) in enumerate(zip(cards, names))
        ],
        device=torch.device("meta"),
    )
    for n, w in zip(names, tbe.split_embedding_weights()):
        ebc.embedding_bags[n].weight = torch.nn.Parameter(w, requires_grad=False)  # TBE's storage, shared
    print(
        f"dense tables (TBE, shared with the EBC): {sum(cards) * D * 4 / 2**30:.2f} GiB in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return coll, per_table, tbe, ebc, cards, sizes


def batch(cards, B, hots, alpha, gen):
    from torchrec import KeyedJaggedTensor

    vals = [zipf_rows(V, B * hots, alpha, gen) for V in cards]
    per = [(v, torch.arange(0, B * hots + 1, hots, dtype=torch.int64)) for v in vals]
    values = torch.cat(vals)
    offsets = torch.arange(0, len(cards) * B * hots + 1, hots, dtype=torch.int64)
    kjt = KeyedJaggedTensor.from_offsets_sync(
        keys=[f"f{i}" for i in range(len(cards))], values=values, offsets=offsets, stride=B
    )
    return kjt, values, offsets, per


def vbe_batch(cards, B, hots, alpha, gen, share):
    """A KJT with a variable batch per feature (TorchRec's VBE): every odd feature is a per-user
    feature deduplicated ``share`` times (``B / share`` bags, each sample reading a random one
    through the inverse indices), the even ones have a bag per sample."""
    from torchrec import KeyedJaggedTensor

    keys = [f"f{i}" for i in range(len(cards))]
    strides = [B if i % 2 == 0 else max(1, B // share) for i in range(len(cards))]
    values = torch.cat([zipf_rows(V, n * hots, alpha, gen) for V, n in zip(cards, strides)])
    inverse = torch.stack([torch.arange(B) if n == B else torch.randint(0, n, (B,), generator=gen) for n in strides])
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=torch.full((sum(strides),), hots, dtype=torch.int64),
        stride_per_key_per_rank=[[n] for n in strides],
        inverse_indices=(keys, inverse),
    )


def run_vbe(args, built, results):
    """The forward on VBE batches (``--vbe SHARE``): pme's collection against TorchRec's
    EmbeddingBagCollection, which pools each feature's own bags and then expands them."""
    coll, _, _, ebc, cards, _ = built
    gen = torch.Generator().manual_seed(args.seed + 3)
    coll.eval()
    for hots in args.hots:
        kjt = vbe_batch(cards, args.batch, hots, args.alpha, gen, args.vbe)
        with torch.no_grad():
            torch.testing.assert_close(ebc(kjt).values(), coll(kjt).values(), rtol=1e-4, atol=1e-4)

        def fwd_pme(kjt=kjt):
            with torch.no_grad():
                return coll(kjt).values()

        def fwd_ebc(kjt=kjt):
            with torch.no_grad():
                return ebc(kjt).values()

        for threads in args.threads:
            row = {
                "config": f"criteo26_{hots}hot_vbe{args.vbe}",
                "hots": hots,
                "batch": args.batch,
                "threads": threads,
                "lookups": int(kjt.values().numel()),
                "ms": {},
            }
            med, by_round = time_methods({"pme_collection": fwd_pme, "torchrec_ebc": fwd_ebc}, threads, args)
            row["rounds"] = {f"forward/{n}": v for n, v in by_round.items()}
            for name in med:
                row["ms"][f"forward/{name}"] = med[name]
                print(f"  {row['config']} {threads}t forward  {name:22s} {med[name]:9.3f} ms", flush=True)
            results.append(row)
    coll.train()


def run_collection(args, built, results):
    coll, per_table, tbe, ebc, cards, sizes = built
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, D = args.batch, args.dim
    batches = {hots: batch(cards, B, hots, args.alpha, gen) for hots in args.hots}
    # The same answer from every method before anything is timed (the timed steps then move
    # pme's and TBE's weights apart: TBE also updates the padding of its dense rows).
    for kjt, values, offsets, per in batches.values():
        with torch.no_grad():
            ref = coll(kjt).values()
            torch.testing.assert_close(tbe(values, offsets), ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ebc(kjt).values(), ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                torch.cat([m(v, o) for m, (v, o) in zip(per_table, per)], 1), ref, rtol=1e-5, atol=1e-5
            )
    for hots in args.hots:
        kjt, values, offsets, per = batches[hots]
        go = torch.randn(B, len(cards) * D, generator=gen)

        def fwd_pme():
            with torch.no_grad():
                return coll(kjt).values()

        def fwd_loop():
            with torch.no_grad():
                return torch.cat([m(v, o) for m, (v, o) in zip(per_table, per)], 1)

        def fwd_tbe():
            with torch.no_grad():
                return tbe(values, offsets)

        def fwd_ebc():
            with torch.no_grad():
                return ebc(kjt).values()

        def step_pme():
            coll(kjt).values().backward(go)

        def step_tbe():
            tbe(values, offsets).backward(go)

        methods = {
            "forward": {
                "pme_collection": fwd_pme,
                "pme_per_table": fwd_loop,
                "fbgemm_tbe": fwd_tbe,
                "torchrec_ebc": fwd_ebc,
            },
            "step": {"pme_collection_fused": step_pme, "fbgemm_tbe_fused": step_tbe},
        }
        coll.train()
        for threads in args.threads:
            row = {
                "config": f"criteo26_{hots}hot",
                "hots": hots,
                "batch": B,
                "threads": threads,
                "lookups": int(values.numel()),
                "ms": {},
            }
            row["rounds"] = {}
            for phase, ms in methods.items():
                med, by_round = time_methods(ms, threads, args)
                for name in ms:
                    row["ms"][f"{phase}/{name}"] = med[name]
                    row["rounds"][f"{phase}/{name}"] = by_round[name]
                    print(
                        f"  {row['config']} {threads}t {phase:8s} {name:22s} {row['ms'][f'{phase}/{name}']:9.3f} ms",
                        flush=True,
                    )
            results.append(row)


SINGLE = (1_000_000, 2048, 32)  # the single-table case: rows, bags, lookups a bag


def single_table(seed, D, alpha, dist="zipf"):
    """The single-table case (also benchmarks/probe_loop.py's): a 1M x D pme table with the size mix,
    nn.EmbeddingBag on its dense view, and 2048 bags of 32 indices (Zipf(alpha) or uniform).
    Returns ``(pme module, nn module, indices [N], offsets [B])``."""
    V, B, L = SINGLE
    gen = torch.Generator().manual_seed(seed + 2)
    sizes = draw_sizes(V, D, gen)
    m = pme.MultiSizeEmbeddingBag.from_dense(torch.randn(V, D, generator=gen), sizes, mode="sum")
    eb = torch.nn.EmbeddingBag.from_pretrained(m.to_dense(), mode="sum")
    if dist == "zipf":
        idx = zipf_rows(V, B * L, alpha, gen)
    else:
        idx = torch.randint(0, V, (B * L,), generator=gen)
    return m, eb, idx, torch.arange(0, B * L, L)


def run_single(args, results):
    V, B, L = SINGLE
    D = args.dim
    m, eb, idx, off = single_table(args.seed, D, args.alpha)
    with torch.no_grad():
        torch.testing.assert_close(m(idx, off), eb(idx, off), rtol=1e-5, atol=1e-5)

    def f_pme():
        with torch.no_grad():
            return m(idx, off)

    def f_eb():
        with torch.no_grad():
            return eb(idx, off)

    for threads in args.threads:
        row = {"config": f"single_1Mx{D}_zipf", "batch": B, "threads": threads, "lookups": B * L, "ms": {}}
        med, by_round = time_methods({"single_pme": f_pme, "single_nn_embedding_bag": f_eb}, threads, args)
        row["rounds"] = {f"forward/{n}": v for n, v in by_round.items()}
        for name in med:
            row["ms"][f"forward/{name}"] = med[name]
            print(
                f"  {row['config']} {threads}t forward  {name:22s} {row['ms'][f'forward/{name}']:9.3f} ms", flush=True
            )
        results.append(row)


# Each ratio: its label, the other method's timing key, pme's timing key (> 1: pme faster).
RATIOS = (
    ("forward: fbgemm_tbe / pme_collection", "forward/fbgemm_tbe", "forward/pme_collection"),
    ("forward: torchrec_ebc / pme_collection", "forward/torchrec_ebc", "forward/pme_collection"),
    ("forward: pme_per_table / pme_collection", "forward/pme_per_table", "forward/pme_collection"),
    ("step: fbgemm_tbe_fused / pme_collection_fused", "step/fbgemm_tbe_fused", "step/pme_collection_fused"),
    ("forward: nn_embedding_bag / pme", "forward/single_nn_embedding_bag", "forward/single_pme"),
)


def ratios(row):
    """The ratios of ``RATIOS`` whose methods ``row`` timed."""
    ms = row["ms"]
    return {k: ms[a] / ms[b] for k, a, b in RATIOS if a in ms and b in ms}


def round_wins(row):
    """Per ratio of ``ratios``: in how many rounds pme was the faster (the rounds are paired)."""
    rd = row.get("rounds", {})
    return {k: sum(o > p for o, p in zip(rd[a], rd[b])) for k, a, b in RATIOS if a in rd and b in rd}


def plot(path, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    rows = [r for r in results if "forward/pme_collection" in r["ms"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{r['hots']}-hot\n{r['threads']} thr" for r in rows]

    def bars(ax, phase, names, title):
        w = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([x + i * w for x in range(len(rows))], [r["ms"][f"{phase}/{name}"] for r in rows], w, label=name)
        ax.set_xticks([x + 0.4 - w / 2 for x in range(len(rows))], labels)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=8)

    bars(
        axes[0],
        "forward",
        ["pme_collection", "pme_per_table", "fbgemm_tbe", "torchrec_ebc"],
        "forward, 26 Criteo tables, batch 2048",
    )
    axes[0].set_ylabel("ms per batch (median)")
    bars(axes[1], "step", ["pme_collection_fused", "fbgemm_tbe_fused"], "forward + backward + fused row-wise Adagrad")
    fig.suptitle("pme collection vs FBGEMM TBE / TorchRec EBC (CPU, pme at 25.6% of the dense entries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    p = parser(__doc__, out=results_dir)
    p.add_argument("--threads", type=at_least(1), nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    p.add_argument("--hots", type=at_least(1), nargs="+", default=[1, 20], help="lookups per feature and sample (1 20)")
    p.add_argument("--batch", type=at_least(1), default=2048, help="samples per batch (2048)")
    p.add_argument("--cap", type=at_least(1), default=2_000_000, help="rows per table at most (2M)")
    p.add_argument("--scale", type=positive, default=1.0, help="multiply the cardinalities (quick runs: 0.01)")
    p.add_argument("--alpha", type=non_negative, default=1.05, help="Zipf exponent of the indices (1.05)")
    p.add_argument("--min-run-time", type=positive, default=1.0, help="seconds per blocked_autorange (1.0)")
    p.add_argument("--no-single", action="store_true", help="skip the single-table comparison")
    p.add_argument(
        "--vbe",
        type=at_least(0),
        default=0,
        metavar="SHARE",
        help="also time the forward on VBE batches (a variable batch per feature): every odd feature "
        "deduplicated SHARE times, pme against TorchRec's EmbeddingBagCollection (default 0: off)",
    )
    p.add_argument("--no-collection", action="store_true", help="skip the collection's own configurations")
    p.add_argument(
        "--rounds",
        type=at_least(1),
        default=1,
        help="interleaved rounds: each round times every method of a configuration once in turn, "
        "min-run-time / rounds seconds each; figures are medians over rounds (default 1: one after the other)",
    )
    args = p.parse_args(argv)
    import fbgemm_gpu
    import torchrec  # noqa: F401

    meta = {
        **machine(args.note),
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
        "tables": "Criteo Kaggle cardinalities capped",
        "cap": args.cap,
        "scale": args.scale,
        "dim": args.dim,
        "size_mix": {f"D/{d}": pr for d, pr in SIZE_MIX},
        "indices": f"zipf({args.alpha}), int64",
        "min_run_time": args.min_run_time,
        "timer": "torch.utils.benchmark.Timer.blocked_autorange, median",
        "rounds": args.rounds,
    }
    print(json.dumps(meta))
    results = []
    built = build(args)
    meta["rows"] = sum(built[4])
    meta["stored_fraction"] = built[0].weight.numel() / (meta["rows"] * args.dim)
    if not args.no_collection:
        run_collection(args, built, results)
    if args.vbe:
        run_vbe(args, built, results)
    del built
    gc.collect()
    if not args.no_single:
        run_single(args, results)
    print("\nratios (> 1: pme faster)")
    for r in results:
        r["ratios"] = ratios(r)
        r["rounds_pme_faster"] = round_wins(r)
        for k, v in r["ratios"].items():
            w = r["rounds_pme_faster"].get(k)
            print(f"  {r['config']:20s} {r['threads']}t  {k:48s} {v:6.2f}x  (pme faster in {w}/{args.rounds} rounds)")
    if args.out.endswith(".json"):  # a file named by the caller (else a folder, the dated name inside)
        stem = args.out[: -len(".json")]
    else:
        stem = os.path.join(args.out, f"collection_cpu_{dt.date.today().isoformat()}")
    save_json({"meta": meta, "results": results}, stem + ".json")
    plot(stem + ".png", results)


if __name__ == "__main__":
    main()
