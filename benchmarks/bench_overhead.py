"""Per-call cost of a small lookup: pme.MultiSizeEmbeddingBag against nn.EmbeddingBag, and
pme.MultiSizeEmbedding against nn.Embedding on the same indices (B x L of them, no pooling).

A batch of a few bags moves almost no bytes, so its time is the fixed cost of one call: Python,
the operator dispatch (torch.library's autograd wrapper for pme), the input checks and the kernel
launch. Both modules get the same table shape (V x D, sum pooling), the same indices (uniform, L
lookups a bag) and the same bags; pme's rows have random sizes in [1, D]. Each case runs
``--warmup`` calls, then ``--calls`` timed calls split into ``--rounds`` interleaved rounds (every
case in turn each round, time.perf_counter, CUDA synchronised after each round's loop), so a change
of the machine's load hits every case alike; the script prints the minimum and the median
microseconds per call over the rounds and writes benchmarks/results/overhead_<device>_<date>.json.
The case "pme, no grad, via autograd wrapper" is pme's no-grad call as it was before it skipped
torch.library's autograd wrapper (taken by pretending to be inside torch.compile).

Run: python benchmarks/bench_overhead.py [--device cpu|cuda] [--bags 1 16 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time

import torch

import pme

from _common import at_least, device_arg, save_json  # benchmarks/, the script's folder


def per_call_us(fn, calls, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


@contextlib.contextmanager
def through_autograd_wrapper():
    """pme's no-grad lookups as they were before they skipped torch.library's autograd wrapper:
    pme.ops takes the plain (wrapped) call while ``torch.compiler.is_compiling()`` is True."""
    real = torch.compiler.is_compiling
    torch.compiler.is_compiling = lambda: True
    try:
        yield
    finally:
        torch.compiler.is_compiling = real


def interleaved_us(cases, calls, warmup, rounds, device):
    """{name: (min, median) microseconds per call}: ``rounds`` rounds, each timing every case
    for calls // rounds calls in turn, so that a change of the machine's load hits all alike."""
    times = {name: [] for name in cases}
    for fn, ctx in cases.values():
        with ctx():
            per_call_us(fn, warmup, 0, device)
    for _ in range(rounds):
        for name, (fn, ctx) in cases.items():
            with ctx():
                times[name].append(per_call_us(fn, max(1, calls // rounds), 0, device))
    return {name: (min(t), sorted(t)[len(t) // 2]) for name, t in times.items()}


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    p.add_argument("--rows", type=at_least(1), default=100_000, help="table rows V (default 100,000)")
    p.add_argument("--dim", type=at_least(1), default=64, help="table width D (default 64)")
    p.add_argument("--bags", type=at_least(1), nargs="+", default=[1, 16, 256], help="batch sizes (default 1 16 256)")
    p.add_argument("--pooling-factor", type=at_least(1), default=32, help="lookups a bag L (default 32)")
    p.add_argument("--calls", type=at_least(1), default=3000, help="timed calls a case (default 3000)")
    p.add_argument("--warmup", type=at_least(0), default=200, help="untimed calls first (default 200)")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads on CPU (default 1)")
    p.add_argument(
        "--rounds", type=at_least(1), default=20, help="interleaved rounds the calls are split into (default 20)"
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/overhead_<device>_<date>.json)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, a.dim + 1, (a.rows,), generator=g)
    tables = {  # name: (module, pooled: called with the bags' offsets)
        "pme": (pme.MultiSizeEmbeddingBag(a.rows, a.dim, mode="sum", sizes=sizes).to(dev), True),
        "nn.EmbeddingBag": (torch.nn.EmbeddingBag(a.rows, a.dim, mode="sum").to(dev), True),
        "pme.MultiSizeEmbedding": (pme.MultiSizeEmbedding(a.rows, a.dim, sizes=sizes).to(dev), False),
        "nn.Embedding": (torch.nn.Embedding(a.rows, a.dim).to(dev), False),
    }
    rows = []
    print(f"{'bags':>6} {'case':40} {'min us':>8} {'median us':>10}")
    for B in a.bags:
        idx = torch.randint(0, a.rows, (B * a.pooling_factor,), generator=g).to(dev)
        off = (torch.arange(B) * a.pooling_factor).to(dev)
        cases = {}
        for name, (m, pooled) in tables.items():

            def call(m=m, pooled=pooled):
                return m(idx, off) if pooled else m(idx)

            cases[f"{name}, no grad"] = (lambda call=call: _no_grad(call), contextlib.nullcontext)
            cases[f"{name}, grad"] = (call, contextlib.nullcontext)
        cases["pme, no grad, via autograd wrapper"] = (
            lambda: _no_grad(lambda: tables["pme"][0](idx, off)),
            through_autograd_wrapper,
        )
        for case, (lo, mid) in interleaved_us(cases, a.calls, a.warmup, a.rounds, dev).items():
            rows.append({"bags": B, "case": case, "min_us": lo, "median_us": mid})
            print(f"{B:>6} {case:40} {lo:8.1f} {mid:10.1f}", flush=True)
    name = dev.type if dev.type == "cpu" else torch.cuda.get_device_name(dev).replace(" ", "-").lower()
    doc = {
        "what": "microseconds per call of a small sum-pooled lookup, and of the non-pooled lookup of the same "
        "indices (pme.MultiSizeEmbedding, nn.Embedding) (forward only; 'grad': weight requires grad); "
        "min and median over interleaved rounds; 'via autograd wrapper': pme's no-grad call as before it skipped "
        "torch.library's autograd wrapper",
        "device": name,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "pme": pme.info(),
        "threads": torch.get_num_threads(),
        "rows": a.rows,
        "dim": a.dim,
        "pooling_factor": a.pooling_factor,
        "indices": "uniform",
        "calls": a.calls,
        "load_average": os.getloadavg()[0],
        "results": rows,
    }
    here = os.path.dirname(os.path.abspath(__file__))
    save_json(doc, a.out or os.path.join(here, "results", f"overhead_{name}_{time.strftime('%Y-%m-%d')}.json"))


if __name__ == "__main__":
    main()
