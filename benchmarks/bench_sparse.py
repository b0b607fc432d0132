#!/usr/bin/env python
"""Training step with sparse gradients: pme ``sparse=True`` vs ``nn.EmbeddingBag(sparse=True)``.

For each configuration (a V x D table, B bags of L lookups, Zipf or uniform indices) it times,
with ``torch.utils.benchmark.Timer`` on the CPU (or ``--device cuda``):

  ``nn``            nn.EmbeddingBag(V, D, mode="sum", sparse=True) on the dense table
  ``pme_full``      pme.MultiSizeEmbeddingBag(V, D, mode="sum", sparse=True), every size D
  ``pme_multisize`` the same with sizes D/8, D/4, D/2, D drawn per row with probabilities
                    55/25/15/5% (about 26% of the dense entries; bench_lookup.py's rule)

in three phases: ``fwd_bwd`` (forward + ``out.backward(g)``, the sparse gradient built),
``step`` (``zero_grad``, forward, backward and ``torch.optim.SparseAdam.step()``) and
``step_pme_adam`` (the same with ``pme.optim.SparseAdam``, torch's optimizer with pme's one-pass
step, on every table, nn's included); and, for
context, pme's fused lazy Adam (``optimizer=pme.optim.Adam``, SparseAdam's formula applied inside
backward, no gradient tensor) on both tables (``pme_full_fused_adam``, ``pme_multisize_fused_adam``,
phase ``step``). The output
gradient g is a fixed random [B, D] tensor, the same batch is replayed every call. The table
trains while it is timed (every step changes it), as in real use.

Zipf indices: ranks k = 1..V with P(k) ~ k^-alpha (alpha 1.05) mapped to rows by a random
permutation; uniform: rows drawn uniformly. Indices int64, fp32 tables.

Writes ``benchmarks/results/sparse_<device>_<date>.json`` (medians and IQR in ms, machine,
threads, sizes, distribution) and prints a table.

    python benchmarks/bench_sparse.py                 # 1M x 128 and 1M x 64, Zipf and uniform
    python benchmarks/bench_sparse.py --quick         # a 100k-row smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import warnings

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pme  # noqa: E402
from pme.bench import _dim_arg, cpu_model  # noqa: E402

from _common import at_least, device_arg, non_negative, positive, save_json, seed_arg  # noqa: E402  (benchmarks/)

warnings.filterwarnings("ignore", message="Sparse invariant checks")

SIZE_FRACTIONS = (8, 4, 2, 1)  # D / f
SIZE_PROBS = (0.55, 0.25, 0.15, 0.05)


def zipf_rows(V, N, alpha, gen):
    cdf = torch.arange(1, V + 1, dtype=torch.float64).pow_(-alpha)
    torch.cumsum(cdf, 0, out=cdf)
    cdf /= cdf[-1].clone()
    ranks = torch.searchsorted(cdf, torch.rand(N, dtype=torch.float64, generator=gen), right=True).clamp_(max=V - 1)
    return torch.randperm(V, generator=gen)[ranks]


def multisize(V, D, gen):
    choice = torch.multinomial(torch.tensor(SIZE_PROBS), V, replacement=True, generator=gen)
    return torch.tensor([D // f for f in SIZE_FRACTIONS])[choice]


def _time(name, phase, fn, device, min_run_time):
    for _ in range(2):
        fn()  # warm-up: the first calls allocate and fault in the optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
    t = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    print(f"  {name:24s} {phase:8s} {t.median * 1e3:9.2f} ms  (IQR {t.iqr * 1e3:.2f}, {len(t.times)} runs)", flush=True)
    return {
        f"{name}/{phase}": {
            "median_ms": t.median * 1e3,
            "iqr_ms": t.iqr * 1e3,
            "runs": len(t.times),
            "calls_per_run": t.number_per_run,
        }
    }


def run_config(V, D, B, L, dist, device, gen, min_run_time, alpha):
    N = B * L
    idx = (zipf_rows(V, N, alpha, gen) if dist == "zipf" else torch.randint(0, V, (N,), generator=gen)).to(device)
    offsets = torch.arange(0, N, L, device=device)
    g = torch.randn(B, D, generator=gen).to(device)
    init = torch.randn(V, D, generator=gen)
    tables = {
        "nn": lambda: torch.nn.EmbeddingBag.from_pretrained(init.to(device), freeze=False, mode="sum", sparse=True),
        "pme_full": lambda: pme.MultiSizeEmbeddingBag.from_pretrained(init.to(device), False, mode="sum", sparse=True),
    }
    sizes = multisize(V, D, gen)
    tables["pme_multisize"] = lambda: pme.MultiSizeEmbeddingBag.from_pretrained(
        init.to(device), False, mode="sum", sparse=True, sizes=sizes
    )
    fused = {
        "pme_full_fused_adam": lambda: pme.MultiSizeEmbeddingBag.from_pretrained(
            init.to(device), False, mode="sum", optimizer=pme.optim.Adam(lr=1e-3)
        ),
        "pme_multisize_fused_adam": lambda: pme.MultiSizeEmbeddingBag.from_pretrained(
            init.to(device), False, mode="sum", sizes=sizes, optimizer=pme.optim.Adam(lr=1e-3)
        ),
    }
    results = {}
    for name, make in fused.items():
        m = make()

        def fused_step(m=m):
            m(idx, offsets).backward(g)

        results.update(_time(name, "step", fused_step, device, min_run_time))
        del m
    for name, make in tables.items():
        m = make()

        def fwd_bwd(m=m):
            m.weight.grad = None
            m(idx, offsets).backward(g)

        results.update(_time(name, "fwd_bwd", fwd_bwd, device, min_run_time))
        for phase, opt_class in (("step", torch.optim.SparseAdam), ("step_pme_adam", pme.optim.SparseAdam)):
            opt = opt_class(m.parameters(), lr=1e-3)

            def step(m=m, opt=opt):
                opt.zero_grad()
                m(idx, offsets).backward(g)
                opt.step()

            results.update(_time(name, phase, step, device, min_run_time))
        stored = m.weight.numel()
        results[f"{name}/stored_entries"] = stored
        del m, opt
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=at_least(1), default=1, help="CPU threads (default 1)")
    p.add_argument("--bags", type=at_least(1), default=2048, help="bags per batch (default 2048)")
    p.add_argument("--pooling", type=at_least(1), default=32, help="lookups per bag (default 32)")
    p.add_argument("--rows", type=at_least(1), default=1_000_000, help="table rows (default 1M)")
    p.add_argument(
        "--dims", type=_dim_arg, nargs="+", default=[128, 64], help="widths, multiples of 8 (default 128 64)"
    )
    p.add_argument("--dists", nargs="+", default=["zipf", "uniform"], choices=["zipf", "uniform"])
    p.add_argument("--zipf-alpha", type=non_negative, default=1.05)
    p.add_argument("--min-run-time", type=positive, default=2.0, help="seconds per measurement (default 2)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--quick", action="store_true", help="100k rows, width 64, Zipf only, short runs")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'shared machine')")
    p.add_argument("--out", help="JSON path (default benchmarks/results/sparse_<device>_<date>.json)")
    args = p.parse_args()
    if args.quick:
        args.rows, args.dims, args.dists, args.min_run_time = 100_000, [64], ["zipf"], 0.5
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    info = pme.info()
    machine = {
        "device": args.device,
        "cpu": cpu_model(),
        "threads": args.threads,
        "torch": torch.__version__,
        "pme": info["version"],
        "backend": info["backend"],
        "python": platform.python_version(),
    }
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    doc = {
        "benchmark": "bench_sparse",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine,
        "note": args.note,
        "bags": args.bags,
        "pooling": args.pooling,
        "mode": "sum",
        "optimizer": "SparseAdam(lr=1e-3)",
        "index_dtype": "int64",
        "weight_dtype": "float32",
        "zipf_alpha": args.zipf_alpha,
        "multisize_rule": {"fractions_of_D": SIZE_FRACTIONS, "probs": SIZE_PROBS},
        "configs": [],
    }
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"sparse_{args.device}_{datetime.date.today().isoformat()}.json",
    )
    for D in args.dims:
        for dist in args.dists:
            print(f"{args.rows} x {D}, {dist}, {args.bags} bags x {args.pooling}, {args.threads} thread(s)", flush=True)
            res = run_config(
                args.rows, D, args.bags, args.pooling, dist, args.device, gen, args.min_run_time, args.zipf_alpha
            )
            doc["configs"].append({"rows": args.rows, "dim": D, "dist": dist, "results": res})
            save_json(doc, out)  # after every configuration: a run cut short keeps its results


if __name__ == "__main__":
    main()
