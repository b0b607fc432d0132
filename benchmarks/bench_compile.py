"""Eager against compiled and exported calls of a pme table: what a traced graph pays.

A traced graph cannot consult pme.ops' once-per-version memo of the whole-table check (README,
Safety). A module's own table is trusted there and its graph skips the O(V) scan; a table handed
to ``pme.ops.embedding_bag`` inside a traced function is scanned on every run of the graph, as
every traced call was before modules were trusted. For each table size this times, in
interleaved rounds (each case in turn, so a change of the host's load hits all alike), a no-grad
forward of ``pme.MultiSizeEmbeddingBag`` (sum, sizes 8/16/32/64 of D = 64 at 55/25/15/5%,
uniform indices) five ways: eager; ``torch.compile(fullgraph=True)`` (Inductor); the
``torch.export`` program's module; the compiled functional call (``pme.ops.embedding_bag`` on
the module's tensors, scanned each run); and, eagerly, the same module built under
``torch.inference_mode()`` (its tensors have no version counter, so no memo: a module's own table
is trusted there too). Prints medians and writes
``benchmarks/results/compile_<device>_<date>.json``.

On CUDA (``--device cuda``) each round's calls end with a synchronisation, and the scanned
case also pays the validation kernel's read-back.

Run: python benchmarks/bench_compile.py [--device cpu|cuda] [--rows 1000000 4000000] [--bags 2048] [--threads 1]
"""

from __future__ import annotations

import os
import time

import torch

import pme
from pme import ops

from _common import at_least, device_arg, machine, parser, save_json  # benchmarks/, the script's folder

SIZE_MIX = ((8, 0.55), (16, 0.25), (32, 0.15), (64, 0.05))  # of D = 64, as MACHINES.md's configuration


def ms_per_call(fn, calls, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e3


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = parser(__doc__, out=os.path.join(here, "results", "compile_<device>_<date>.json"))
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu (default) or cuda")
    p.add_argument("--rows", type=at_least(1), nargs="+", default=[1_000_000, 4_000_000], help="table rows V (1M 4M)")
    p.add_argument("--bags", type=at_least(1), default=2048, help="bags a batch (default 2048)")
    p.add_argument("--pooling-factor", type=at_least(1), default=32, help="lookups a bag (default 32)")
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads (default 1)")
    p.add_argument("--rounds", type=at_least(1), default=9, help="interleaved rounds (default 9)")
    p.add_argument("--calls", type=at_least(1), default=10, help="timed calls a case a round (default 10)")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dev_name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-").lower()
    a.out = a.out.replace("<device>", dev_name).replace("<date>", time.strftime("%Y-%m-%d"))
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(a.seed)
    D, B, L = a.dim, a.bags, a.pooling_factor
    results = []
    for V in a.rows:
        shares = torch.tensor([s for _, s in SIZE_MIX])
        sizes = torch.tensor([max(1, D * d // 64) for d, _ in SIZE_MIX])[
            torch.multinomial(shares, V, replacement=True, generator=gen)
        ]
        m = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum").eval().to(device)
        with torch.inference_mode():  # inference tensors: no version counter, so no memo either
            m_inf = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, mode="sum").eval().to(device)
            m_inf.weight.copy_(m.weight)
        idx = torch.randint(0, V, (B * L,), generator=gen).to(device)
        off = torch.arange(0, B * L, L).to(device)
        w, o = m.weight.detach(), m.offsets

        def functional(i, b, w=w, o=o):
            return ops.embedding_bag(w, o, i, b, width=D, mode="sum")

        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = torch.compile(m, fullgraph=True)
        compiled_fn = torch.compile(functional, fullgraph=True)
        batch = torch.export.Dim("batch", min=2)
        exported = torch.export.export(m, (idx, off), dynamic_shapes=({0: torch.export.Dim("n")}, {0: batch})).module()
        cases = {
            "eager module": lambda: m(idx, off),
            "eager module built in inference_mode": lambda: m_inf(idx, off),
            "compiled module": lambda: compiled(idx, off),
            "exported module": lambda: exported(idx, off),
            "compiled pme.ops call (table scanned)": lambda: compiled_fn(idx, off),
        }
        with torch.no_grad():
            want = m(idx, off)
            for fn in cases.values():
                torch.testing.assert_close(fn(), want)  # also the warm-up (compiles)
            print(f"V = {V:,}: traced and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
            times = {name: [] for name in cases}
            for _ in range(a.rounds):
                for name, fn in cases.items():
                    times[name].append(ms_per_call(fn, a.calls, device))
        eager = sorted(times["eager module"])[a.rounds // 2]
        for name, t in times.items():
            med = sorted(t)[a.rounds // 2]
            results.append({"rows": V, "case": name, "median_ms": med, "ms_by_round": t, "vs_eager": med / eager})
            print(f"  {name:40s} {med:8.3f} ms  {med / eager:5.2f}x eager", flush=True)
    doc = {
        "what": "no-grad forward of pme.MultiSizeEmbeddingBag (sum) eager, eager when built under "
        "torch.inference_mode(), compiled (Inductor, fullgraph), exported (torch.export, dynamic batch), and a "
        "compiled functional call whose table is scanned each run; medians over interleaved rounds",
        "machine": machine(a.note),
        "device": dev_name,
        "threads": a.threads,
        "dim": D,
        "bags": B,
        "pooling_factor": L,
        "indices": "uniform",
        "size_mix": SIZE_MIX,
        "rounds": a.rounds,
        "calls_a_round": a.calls,
        "results": results,
    }
    save_json(doc, a.out)


if __name__ == "__main__":
    main()
