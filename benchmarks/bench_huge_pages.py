"""What 2 MiB pages do for the single-table CPU forward (pme.memory), measured in one process.

The single table of bench_collection.py (1M rows, width 64, the 55/25/15/5% size mix, 2048 bags of
32 indices, Zipf 1.05 or uniform) four ways, in interleaved rounds:

- ``nn``: nn.EmbeddingBag on the dense view, as PyTorch allocates it (small pages unless
  ``THP_MEM_ALLOC_ENABLE=1`` or THP mode ``always``);
- ``nn_huge``: the same table copied onto memory advised for huge pages (what
  ``THP_MEM_ALLOC_ENABLE=1`` would give it);
- ``pme_small``: the pme table built with ``PME_HUGE_PAGES=0`` (built first, so that it gets no
  memory an advised table had);
- ``pme``: the pme table as pme builds it (advised).

``--step``: instead, the training step (forward, backward and pme's fused Adam update, whose two
moments are as large as the table) of the pme table on small and on huge pages.

Each (distribution, threads) runs in its own process, ``--repeats`` times; every run prints and
the JSON keeps the medians of ``--rounds`` rounds of ``--calls`` calls, the time ratios and how
much of each table the kernel put on huge pages (``AnonHugePages`` of its mappings).

Run: python benchmarks/bench_huge_pages.py [--repeats 3] [--threads 1 2] [--dist zipf uniform] [--step]
Writes benchmarks/results/huge_pages_cpu_<date>.json (``huge_pages_step_cpu_<date>.json``).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def at_least(least: int):
    """argparse type: an integer >= least (pme.cli's, without importing torch in the parent)."""

    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if x < least:
            raise argparse.ArgumentTypeError(f"{text} is below {least}")
        return x

    return parse


def _huge_mib(t) -> int:
    """MiB of ``t``'s memory that the kernel backs with huge pages (AnonHugePages of its mappings)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    kib, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                a, b = (int(x, 16) for x in head[0].split("-"))
                inside = a < hi and b > lo
            elif inside and head[0] == "AnonHugePages:":
                kib += int(head[1])
    return kib >> 10


def _interleaved(fns: dict, rounds: int, calls: int) -> dict:
    """``{name: median ms per call}``: every ``fn()`` timed for ``calls`` calls in turn, ``rounds``
    times, so that a slow spell of the host falls on all of them alike."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times[k].append((time.perf_counter() - t0) / calls)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def one(dist: str, threads: int, rounds: int, calls: int) -> dict:
    import torch

    sys.path.insert(0, HERE)
    import bench_collection as bc

    from pme import memory

    torch.set_num_threads(threads)
    os.environ["PME_HUGE_PAGES"] = "0"
    pme_small, nn_small, idx, off = bc.single_table(0, 64, 1.05, dist)
    os.environ["PME_HUGE_PAGES"] = "1"
    pme_huge, _, _, _ = bc.single_table(0, 64, 1.05, dist)
    nn_huge = torch.nn.EmbeddingBag.from_pretrained(memory.fresh_table(nn_small.weight.detach()), mode="sum")
    fns = {"nn": nn_small, "nn_huge": nn_huge, "pme_small": pme_small, "pme": pme_huge}
    huge = {
        "nn": _huge_mib(nn_small.weight),
        "nn_huge": _huge_mib(nn_huge.weight),
        "pme_small": [_huge_mib(pme_small.weight), _huge_mib(pme_small.offsets)],
        "pme": [_huge_mib(pme_huge.weight), _huge_mib(pme_huge.offsets)],
    }
    with torch.no_grad():
        ref = nn_small(idx, off)
        for f in fns.values():
            torch.testing.assert_close(f(idx, off), ref, rtol=1e-5, atol=1e-5)
        ms = _interleaved({k: (lambda f=f: f(idx, off)) for k, f in fns.items()}, rounds, calls)
    return {
        "dist": dist,
        "threads": threads,
        "ms": ms,
        "pme/nn": ms["pme"] / ms["nn"],
        "pme/pme_small": ms["pme"] / ms["pme_small"],
        "pme_small/nn": ms["pme_small"] / ms["nn"],
        "pme/nn_huge": ms["pme"] / ms["nn_huge"],
        "nn_huge/nn": ms["nn_huge"] / ms["nn"],
        "huge_pages_mib": huge,
    }


def one_step(dist: str, threads: int, rounds: int, calls: int) -> dict:
    import torch

    sys.path.insert(0, HERE)
    import bench_collection as bc

    import pme

    torch.set_num_threads(threads)

    def build():
        m, _, idx, off = bc.single_table(0, 64, 1.05, dist)
        t = pme.MultiSizeEmbeddingBag(m.num_embeddings, 64, sizes=m.sizes, mode="sum", optimizer=pme.optim.Adam())
        with torch.no_grad():
            t.weight.copy_(m.weight)
        return t, idx, off

    os.environ["PME_HUGE_PAGES"] = "0"
    small, idx, off = build()
    os.environ["PME_HUGE_PAGES"] = "1"
    huge, _, _ = build()
    grad = torch.ones(off.numel(), 64)
    fns = {"pme_small": small, "pme": huge}
    for t in fns.values():
        t(idx, off).backward(grad)
    ms = _interleaved({k: (lambda t=t: t(idx, off).backward(grad)) for k, t in fns.items()}, rounds, calls)
    state = [b for n, b in huge.named_buffers() if b.numel() == huge.weight.numel() and n != "offsets"]
    return {
        "dist": dist,
        "threads": threads,
        "ms": ms,
        "pme/pme_small": ms["pme"] / ms["pme_small"],
        "huge_pages_mib": {"pme": [_huge_mib(huge.weight)] + [_huge_mib(b) for b in state]},
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dist", nargs="+", default=["zipf", "uniform"], choices=["zipf", "uniform"])
    p.add_argument("--threads", type=at_least(1), nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=at_least(1), default=3, help="processes per (distribution, threads)")
    p.add_argument("--rounds", type=at_least(1), default=9)
    p.add_argument("--calls", type=at_least(1), default=20)
    p.add_argument("--step", action="store_true", help="time the fused Adam training step instead")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--one", nargs=2, metavar=("DIST", "THREADS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps((one_step if a.step else one)(a.one[0], int(a.one[1]), a.rounds, a.calls)))
        return
    runs = []
    for r in range(a.repeats):
        for dist in a.dist:
            for th in a.threads:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    dist,
                    str(th),
                    "--rounds",
                    str(a.rounds),
                    "--calls",
                    str(a.calls),
                ] + (["--step"] if a.step else [])
                env = {k: v for k, v in os.environ.items() if k not in ("PME_HUGE_PAGES", "THP_MEM_ALLOC_ENABLE")}
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
                runs.append(res)
                if a.step:
                    print(
                        f"[{r + 1}/{a.repeats}] {dist:7s} {th}t  step ms pme_small {res['ms']['pme_small']:.2f} "
                        f"pme {res['ms']['pme']:.2f} | pme/pme_small {res['pme/pme_small']:.2f} "
                        f"| huge MiB {res['huge_pages_mib']}",
                        flush=True,
                    )
                    continue
                print(
                    f"[{r + 1}/{a.repeats}] {dist:7s} {th}t  ms nn {res['ms']['nn']:.3f} "
                    f"nn_huge {res['ms']['nn_huge']:.3f} "
                    f"pme_small {res['ms']['pme_small']:.3f} pme {res['ms']['pme']:.3f} | pme/pme_small "
                    f"{res['pme/pme_small']:.2f} pme/nn {res['pme/nn']:.2f} pme_small/nn {res['pme_small/nn']:.2f} "
                    f"pme/nn_huge {res['pme/nn_huge']:.2f} | huge MiB {res['huge_pages_mib']}",
                    flush=True,
                )
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        thp = None
    meta = {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "table": "1M x 64, sizes 55/25/15/5%, 2048 bags x 32, Zipf 1.05 or uniform (bench_collection.single_table)",
        "transparent_hugepage": thp,
        "time ratios": "lower is better for the numerator",
    }
    os.makedirs(a.out, exist_ok=True)
    kind = "huge_pages_step_cpu" if a.step else "huge_pages_cpu"
    path = os.path.join(a.out, f"{kind}_{meta['date']}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
