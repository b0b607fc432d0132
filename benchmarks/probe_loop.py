"""What each part of pme's CPU lookup loop costs: the single-table case of bench_collection.py
(1M x 64 fp32, sizes 8/16/32/64 at 55/25/15/5%, 2048 bags x 32, Zipf(1.05) or uniform indices, 1
thread) timed as nn.EmbeddingBag, pme's operator (``torch.ops.pme.bag_forward``, no Python
around it) and ten C++ loops over pme's own buffers (benchmarks/probe_loop.cpp, built here with
``$CXX -O3 -mavx2 -mfma``; needs an x86-64 CPU with AVX2):

  reads only        pme's prefetches and row reads, no test (partial steps: two masked loads)
  + index tests     the index range and padding-row tests
  + span test       the row-span test (hi <= total, lo <= hi, size <= width)
  + halves          the last step read by halves (plain loads where the row fills one)
  + prefetch test   the range test before the row prefetch: the same work as pme's kernel
  reads, by halves  the first loop with halves
  pme, masked near  pme's work, a partial step as two masked loads, the second from the row's
                    start when it is empty (no branch on the size, no address past the row)
  reads, masked near the first loop read that way
  pre-pass + clamped pme's work since 2026-11-28: the indices checked in one pass first (no index
                    or prefetch test per lookup), the span test, whole halves read without a
                    branch on the row's size (the AVX2 fp32 kernel's clamped())
  reads, clamped    the first loop read that way

Each loop's output is checked against nn.EmbeddingBag before timing. Every round times each
method for ``--calls`` calls in a row (warm rows, as the benchmarks time), the methods in turn, so
a slow spell of the shared host hits all of them; the figures are medians over ``--rounds`` rounds
of the time per call and of its ratio to nn.EmbeddingBag's in the same round. Compare loops with
each other within one run: between runs this host moves every figure by up to 2x.

Output: a table on stdout and ``benchmarks/results/probe_loop_<dist>_<date>.json``.
Run: python benchmarks/probe_loop.py [--dist zipf|uniform] [--rounds 9] [--calls 20]
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from bench_collection import SINGLE, single_table

import pme  # noqa: F401  (registers torch.ops.pme, timed below)

from _common import at_least, machine, non_negative, parser, save_json  # benchmarks/, the script's folder

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPS = [
    "reads only",
    "+ index tests",
    "+ span test",
    "+ halves",
    "+ prefetch test",
    "reads, by halves",
    "pme, masked near",
    "reads, masked near",
    "pre-pass + clamped",
    "reads, clamped",
]


def build_probe(workdir: str) -> ctypes.CDLL:
    """Compiles probe_loop.cpp into ``workdir`` and loads it."""
    so = os.path.join(workdir, "probe_loop.so")
    cmd = [os.environ.get("CXX", "c++"), "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC"]
    subprocess.run([*cmd, os.path.join(HERE, "probe_loop.cpp"), "-o", so], check=True)
    lib = ctypes.CDLL(so)
    lib.probe_run.restype = ctypes.c_double
    lib.probe_run.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    assert lib.probe_count() == len(LOOPS), "probe_loop.cpp and LOOPS disagree"
    return lib


def main(argv=None):
    p = parser(__doc__, out=os.path.join(HERE, "results"))
    p.add_argument("--dist", choices=["zipf", "uniform"], default="zipf", help="index distribution (zipf)")
    p.add_argument("--alpha", type=non_negative, default=1.05, help="Zipf exponent (1.05)")
    p.add_argument("--rounds", type=at_least(1), default=9, help="interleaved rounds (9)")
    p.add_argument("--calls", type=at_least(1), default=20, help="timed calls of a method per round (20)")
    args = p.parse_args(argv)
    if args.dim != 64:
        p.error("the probe's loops are written for --dim 64")
    torch.set_num_threads(1)
    V, B, L = SINGLE
    D = 64
    m, eb, idx, off = single_table(args.seed, D, args.alpha, args.dist)
    bo = torch.cat([off, torch.tensor([B * L])])
    out = torch.empty(B, D)
    bad = ctypes.c_int64(-1)
    with tempfile.TemporaryDirectory() as tmp:
        lib = build_probe(tmp)
        ptrs = [t.data_ptr() for t in (idx, bo, m.offsets, m.weight, out)]

        def probe(k):
            return lambda: lib.probe_run(k, *ptrs, B, V, m.weight.numel(), ctypes.byref(bad))

        op = torch.ops.pme.bag_forward.default
        methods = {
            "nn.EmbeddingBag": lambda: eb(idx, off),
            "pme operator": lambda: op(m.weight, m.offsets, idx, bo, None, None, D, 0, -1, True),
        }
        methods.update({name: probe(k) for k, name in enumerate(LOOPS)})
        with torch.no_grad():
            expect = eb(idx, off)
            for k, name in enumerate(LOOPS):
                out.zero_()
                probe(k)()
                assert bad.value == -1, f"{name}: reported lookup {bad.value} of a valid batch"
                torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5, msg=name)
            per = {n: [] for n in methods}
            with torch._C._AutoDispatchBelowAutograd():
                for r in range(args.rounds):
                    for name, fn in methods.items():
                        fn()
                        fn()
                        t0 = time.perf_counter()
                        for _ in range(args.calls):
                            fn()
                        per[name].append((time.perf_counter() - t0) / args.calls * 1e3)
                    print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    base = per["nn.EmbeddingBag"]
    rows = []
    print(f"1M x 64 fp32, {B} bags x {L}, {args.dist} indices, 1 thread; medians over {args.rounds} rounds")
    print(f"{'method':18s} {'ms':>7s} {'/ nn':>6s}")
    for name, v in per.items():
        ratio = statistics.median(a / b for a, b in zip(v, base))
        rows.append({"method": name, "ms": statistics.median(v), "ratio_to_nn": ratio, "rounds_ms": v})
        print(f"{name:18s} {statistics.median(v):7.3f} {ratio:6.2f}")
    doc = {
        "meta": {
            **machine(args.note),
            "dist": args.dist,
            "alpha": args.alpha,
            "rows": V,
            "dim": D,
            "bags": B,
            "pooling": L,
            "rounds": args.rounds,
            "calls": args.calls,
            "threads": 1,
        },
        "results": rows,
    }
    day = dt.date.today().isoformat()
    save_json(doc, os.path.join(args.out, f"probe_loop_{args.dist}_{day}.json"))


if __name__ == "__main__":
    main()
