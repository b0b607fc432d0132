"""Cost of the whole-table check (README, Safety) next to a lookup, on the CPU.

Times ``torch.ops.pme.bag_forward`` (sum, padded, fp32), median of --repeats calls:
- ``check``: 1 lookup on a V-row table, whole-table check on every call (a raw operator call):
  the O(V) check dominates;
- ``checked``: the same with ``table_checked=True``, as ``pme.ops`` calls it once the table has
  passed (the per-lookup checks only);
- ``tiny``: 1 lookup on a 1-row table: the fixed cost of a call;
- ``forward`` / ``forward_checked``: --bags x --lookups uniform lookups on the V-row table,
  without / with ``table_checked=True``;
- ``ops_forward``: the same through ``pme.ops.embedding_bag`` (its memo of passed tables).
Prints and saves JSON (sizes, threads, the machine: CPU model, torch, pme) to --out.

    python benchmarks/bench_validation.py --rows 1000000 --threads 1
"""

from __future__ import annotations

import json
import statistics

import torch
from torch.utils import benchmark

import pme

from _common import at_least, machine, parser, save_json  # benchmarks/, the script's folder


def median_ms(f, repeats):
    """Median of ``repeats`` timed calls (each one ``torch.utils.benchmark.Timer.timeit(1)``), after 5 untimed."""
    for _ in range(5):
        f()
    timer = benchmark.Timer("f()", globals={"f": f}, num_threads=torch.get_num_threads())
    return statistics.median(timer.timeit(1).median for _ in range(repeats)) * 1e3


def main():
    ap = parser(__doc__, out="benchmarks/results/validation_cpu.json")
    ap.add_argument("--rows", type=at_least(1), default=1_000_000, help="V, rows of the table (default 1M)")
    ap.add_argument("--bags", type=at_least(1), default=2048, help="bags of the forward (default 2048)")
    ap.add_argument("--lookups", type=at_least(1), default=32, help="lookups per bag (default 32)")
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=at_least(1), default=40, help="timed calls per figure (default 40)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(a.seed)
    V, D = a.rows, a.dim
    sizes = (torch.randint(1, 9, (V,), generator=g) * D) // 8
    off = torch.zeros(V + 1, dtype=torch.int64)
    off[1:] = sizes.cumsum(0)
    w = torch.randn(int(off[-1]), generator=g)
    idx = torch.randint(0, V, (a.bags * a.lookups,), generator=g)
    bo = torch.arange(0, a.bags * a.lookups + 1, a.lookups)
    one, one_bo = idx[:1].clone(), torch.tensor([0, 1])
    w1, off1 = w[: int(off[1])].clone(), off[:2].clone()
    op = torch.ops.pme.bag_forward
    res = {
        "forward_ms": median_ms(lambda: op(w, off, idx, bo, None, None, D, 0, -1), a.repeats),
        "forward_checked_ms": median_ms(
            lambda: op(w, off, idx, bo, None, None, D, 0, -1, table_checked=True), a.repeats
        ),
        "ops_forward_ms": median_ms(
            lambda: pme.ops.embedding_bag(w, off, idx, bo[:-1], width=D, mode="sum"), a.repeats
        ),
        "check_ms": median_ms(lambda: op(w, off, one, one_bo, None, None, D, 0, -1), a.repeats),
        "checked_ms": median_ms(lambda: op(w, off, one, one_bo, None, None, D, 0, -1, table_checked=True), a.repeats),
        "tiny_ms": median_ms(
            lambda: torch.ops.pme.bag_forward(w1, off1, torch.tensor([0]), one_bo, None, None, D, 0, -1), a.repeats
        ),
    }
    res.update(
        rows=V,
        dim=D,
        bags=a.bags,
        lookups=a.lookups,
        threads=a.threads,
        repeats=a.repeats,
        seed=a.seed,
        **machine(a.note),
    )
    print(json.dumps(res, indent=1))
    save_json(res, a.out)


if __name__ == "__main__":
    main()
