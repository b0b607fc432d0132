"""Microbenchmark of multi-size embedding lookups and fused sparse updates: ``pme bench``.

Shipped inside the package, so an installed wheel runs it: ``pme bench --quick`` (or
``python -m pme.bench``; ``benchmarks/bench_lookup.py`` in a checkout calls the same ``main``).

Runs on CPU or on one CUDA GPU (whichever ``--device`` says; default: CUDA when available).

What it measures
----------------
1. The device's copy bandwidth, the yardstick of every figure below: bytes read + written per
   second by a copy of a large buffer into another, median of repeats, timed as everything else
   (below). CUDA: ``dst.copy_(src)``. CPU: ``dst.copy_(src)`` into a
   preallocated buffer (the reference) and of ``src.clone()`` (recorded too; on Linux it also pays
   the page faults of a fresh allocation, so it is much slower).

2. For each configuration (a table of V rows x D columns, a batch of B bags x L lookups, an index
   distribution, a weight dtype) these *lookup* methods, each in two phases, ``forward`` (under
   ``torch.no_grad()``) and ``forward_backward`` (forward + ``out.backward(g)``, gradient of the
   whole table):

   ``pme``               pme.MultiSizeEmbeddingBag(mode="sum"), padded layout, output [B, D].
   ``eb_dense``          nn.EmbeddingBag(mode="sum") on the full-width V x D table, dense gradient.
   ``eb_sparse``         the same with sparse=True (forward+backward only: its forward is eb_dense's).
   ``per_size``          one nn.EmbeddingBag per size class: rows remapped into one table per size,
                         each class's outputs padded to D and summed into [B, D]. Splitting the
                         batch's indices by class is done once, outside the timing (as an input
                         pipeline would).
   ``gather_index_add``  plain PyTorch over the flat buffer: a ragged index built from the batch
                         (repeat_interleave of the looked-up rows' sizes) gathers every entry of every
                         looked-up row, and index_add sums them into the [B * D] output. Building
                         the ragged index is part of the timed work (it depends on the batch).

   and these *training-step* methods, phase ``step`` (one forward, backward and
   optimizer update of the table; the output gradient g is a fixed random [B, D] tensor):

   ``pme_fused_rowwise_adagrad``  pme module with optimizer=pme.optim.RowwiseAdagrad: out.backward(g)
                                  performs the fused update. Also ``pme_fused_sgd``, ``pme_fused_adam``.
   ``eb_sparse_sparseadam``, ``eb_sparse_adagrad``, ``eb_sparse_sgd``
                                  nn.EmbeddingBag(sparse=True) + torch.optim.SparseAdam / Adagrad / SGD.
   ``eb_dense_adagrad``           nn.EmbeddingBag, dense gradient + torch.optim.Adagrad.
   ``pme_dense_adagrad``          pme module's dense-gradient path + torch.optim.Adagrad on the flat weight.

   Row sizes are drawn per row, independently of index frequency: D/8, D/4, D/2, D with
   probabilities 55/25/15/5% (16/32/64/128 for D = 128; about 26% of the dense entries).
   Indices: ``zipf`` draws ranks k = 1..V with P(k) proportional to k^-alpha (alpha = 1.05 by default)
   by inverse CDF (torch.searchsorted over a precomputed CDF) and maps ranks to rows through a random
   permutation, so hot rows are spread over the table; ``uniform`` draws rows uniformly. Indices and
   offsets are int64, bags all have L lookups. The same batch is replayed at every repeat.

Timing: ``--warmup`` untimed calls, then up to ``--repeats`` timed calls (at least 3, fewer when
``--max-seconds`` is reached); the median is reported. Python's garbage collector is paused while a
phase is timed (as timeit does), so a collection triggered by one method's allocations does not land
in another's timings. Each timed call is one ``torch.utils.benchmark.Timer.timeit(1)``: wall clock
(``time.perf_counter``), with ``torch.cuda.synchronize()`` before and after the call on CUDA, so a
GPU time includes one launch and one synchronisation (a few microseconds: it shows on the smallest
batches; ``--cuda-graph`` removes the Python and launch overhead of the forward). The optional
``--flush-l2`` overwrites a buffer twice the L2 size before each timed call, in the Timer's untimed
setup. The CPU warm-up (5 calls by default: the first calls after a table is built run on cold caches and take up
to 3x longer) stops early once it has taken half of ``--max-seconds``.

Bytes and effective bandwidth
-----------------------------
Effective bandwidth = bytes the operation must move / median time; its ratio to the copy bandwidth
is printed as %copy. The bytes are those the *task* needs, whatever the implementation does:

    E = element size of the weights; N = B * L lookups; I = (N + B) * 8 (int64 indices and offsets)
    O = B * D * E                      (the pooled output, and the output gradient read by backward)
    R = sum over the N lookups of the looked-up row's stored bytes
        (multi-size methods: size[idx] * E; full-width nn.EmbeddingBag: D * E)
    U = stored bytes of the distinct rows of the batch (same rule); u = number of distinct rows
    forward                      = R + I + O
    forward_backward (dense)     = R + I + O  +  O + I + (entries of the table) * E   (the whole gradient,
                                                                                      zeros included, is written)
    forward_backward (sparse)    = R + I + O  +  O + I + N * D * E + N * 8             (COO values + indices)
    step                         = R + I + O  +  O + I + 2 * U + state
        state = optimizer state of the distinct rows, read and written: rowwise Adagrad 2 * 4 * u;
        per-entry Adagrad 2 * s * U / E; Adam (two moments) 4 * s * U / E; SGD 0;
        s = state element size (4 for pme's float32 state, E for torch's state in the weight dtype).

The "floor" lines are pme's bytes / copy bandwidth: the time a lookup moving only those bytes at copy
speed would take. "pme speed-up" = the method's time / pme's time for the same phase (for steps: /
pme_fused_rowwise_adagrad's time).

Memory guard: before building a method's tables, its peak memory is estimated (tables, gradients,
optimizer state, temporaries) and compared with free memory (CUDA: torch.cuda.mem_get_info; CPU:
MemAvailable of /proc/meminfo); a method that would not fit is skipped with the reason printed.
``--dry-run`` prints those decisions without building any table; ``--mem-limit-gb`` pretends less
memory is free.

Output: a table per configuration on stdout, and ``benchmarks/results/lookup_<device>_<date>.json``
(``./lookup_<device>_<date>.json`` when the current folder has no ``benchmarks/``)
(device, versions, pme.info(), copy bandwidth, every timing with all repeats, bytes, formulas) with a
PNG of grouped bars (time per method per configuration, log scale) beside it. The JSON is rewritten
after every configuration (``"complete": false`` until the last), so a run cut short keeps what it
measured (``--replot`` draws its PNG).

Examples::

    pme bench                    # CPU: the "cpu" group of configs; GPU: the "gpu" group
    pme bench --quick            # a small run (seconds)
    pme bench --configs machines,latency --methods pme,eb_dense
    pme bench --configs gpu --dry-run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

import pme

# --------------------------------------------------------------------------------------------
# Configurations and methods
# --------------------------------------------------------------------------------------------
_MACHINES = dict(rows=10_000_000, dim=128, bags=16384, pooling=32, dist="zipf", dtype="fp32")
CONFIGS = {
    "machines_zipf": dict(_MACHINES),
    "machines_uniform": dict(_MACHINES, dist="uniform"),
    "mid": dict(rows=2_000_000, dim=64, bags=65536, pooling=20, dist="zipf", dtype="fp32"),
    "latency": dict(_MACHINES, bags=1024),
    "bf16": dict(_MACHINES, dtype="bf16"),
    "cpu_d64": dict(rows=1_000_000, dim=64, bags=2048, pooling=32, dist="zipf", dtype="fp32"),
    "cpu_d128": dict(rows=1_000_000, dim=128, bags=2048, pooling=32, dist="zipf", dtype="fp32"),
    "cpu_d128_uniform": dict(rows=1_000_000, dim=128, bags=2048, pooling=32, dist="uniform", dtype="fp32"),
    "cpu_d128_bf16": dict(rows=1_000_000, dim=128, bags=2048, pooling=32, dist="zipf", dtype="bf16"),
    "quick": dict(rows=100_000, dim=64, bags=512, pooling=16, dist="zipf", dtype="fp32"),
}
GROUPS = {
    "gpu": ["machines_zipf", "machines_uniform", "mid", "latency", "bf16"],
    "machines": ["machines_zipf", "machines_uniform"],
    "cpu": ["cpu_d64", "cpu_d128", "cpu_d128_uniform", "cpu_d128_bf16"],
    "all": list(CONFIGS),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZE_FRACTIONS = (8, 4, 2, 1)  # row sizes D/8, D/4, D/2, D ...
SIZE_PROBS = (0.55, 0.25, 0.15, 0.05)  # ... drawn with these probabilities

LOOKUP_METHODS = ["pme", "eb_dense", "eb_sparse", "per_size", "gather_index_add"]
STEP_METHODS = [
    "pme_fused_rowwise_adagrad",
    "pme_fused_sgd",
    "pme_fused_adam",
    "eb_sparse_sparseadam",
    "eb_sparse_adagrad",
    "eb_sparse_sgd",
    "eb_dense_adagrad",
    "pme_dense_adagrad",
]
ALL_METHODS = LOOKUP_METHODS + STEP_METHODS
PHASES = ["forward", "forward_backward", "step"]

BYTES_FORMULA = {
    "notation": "E = weight element size; N = B*L lookups; I = (N + B)*8 (int64 indices + offsets); "
    "O = B*D*E (output, and output gradient); R = sum over lookups of the looked-up row's stored "
    "bytes (multi-size: size[idx]*E, full-width: D*E); U = stored bytes of the distinct rows of the "
    "batch, u = their number; s = optimizer-state element size (pme: 4, torch: E)",
    "forward": "R + I + O",
    "forward_backward_dense": "R + I + O + O + I + table_entries*E (the whole gradient is written)",
    "forward_backward_sparse": "R + I + O + O + I + N*D*E + N*8 (COO gradient values + indices)",
    "step": "R + I + O + O + I + 2*U + state, state = rowwise Adagrad 2*4*u | per-entry Adagrad 2*s*U/E | "
    "Adam 4*s*U/E | SGD 0",
    "effective_bandwidth": "bytes / median time; copy_ratio = effective bandwidth / copy bandwidth",
}


# --------------------------------------------------------------------------------------------
# Device, memory, timing
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    info = {
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "pme": pme.info(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")},
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device),
            gpu_memory_bytes=p.total_memory,
            sm_count=p.multi_processor_count,
            l2_cache_bytes=getattr(p, "L2_cache_size", None),
            capability=f"{p.major}.{p.minor}",
        )
    else:
        info["name"] = f"{cpu_model()} ({torch.get_num_threads()} threads)"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {cpu_model()} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def free_memory(device: torch.device, limit_bytes: int | None) -> int:
    """Bytes free for a new allocation now (after collecting garbage)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
        except OSError:
            pass
        if free is None:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free if limit_bytes is None else min(free, limit_bytes)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Times(list):
    """Per-call milliseconds; ``graph`` tells whether they are CUDA-graph replays."""

    graph = False


class Timer:
    """Times a callable: warm-up, then repeats until ``repeats`` or ``max_seconds``; returns ms per call.

    With ``cuda_graph``, a call made with ``graph_ok=True`` is captured once into a CUDA graph and
    the replays are timed (no Python or launch overhead); if the capture fails it is timed eagerly.
    """

    def __init__(self, device, warmup, repeats, max_seconds, flush_l2=False, cuda_graph=False):
        self.device, self.warmup, self.repeats, self.max_seconds = device, warmup, repeats, max_seconds
        self.cuda_graph = cuda_graph and device.type == "cuda"
        self.flush_buf = None
        if flush_l2 and device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
            self.flush_buf = torch.empty(2 * l2, dtype=torch.uint8, device=device)

    def _capture(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(self.warmup, 2)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:  # something in fn cannot be captured (e.g. a host sync)
            torch.cuda.synchronize()
            print(f"(CUDA graph capture failed, timing eagerly: {type(e).__name__})", end=" ", flush=True)
            return None
        return graph

    def _flush(self):
        if self.flush_buf is not None:
            self.flush_buf.zero_()

    def __call__(self, fn, graph_ok=False) -> Times:
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()  # no collection inside a timed call (timeit does the same)
        try:
            return self._time(fn, graph_ok)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _time(self, fn, graph_ok) -> Times:
        times = Times()
        if self.cuda_graph and graph_ok:
            graph = self._capture(fn)
            if graph is not None:
                fn, times.graph = graph.replay, True
        start = time.perf_counter()
        for _ in range(self.warmup):
            fn()
            if self.device.type == "cpu" and time.perf_counter() - start > self.max_seconds / 2:
                break  # slow phases (a dense backward) are warm after a call or two
        sync(self.device)
        # torch's Timer: perf_counter, synchronising CUDA around the call; setup (the L2 flush) untimed
        timer = benchmark.Timer("fn()", setup="flush()", globals={"fn": fn, "flush": self._flush})
        start = time.perf_counter()
        while len(times) < self.repeats and (len(times) < 3 or time.perf_counter() - start < self.max_seconds):
            times.append(timer.timeit(1).times[0] * 1e3)
        return times


def copy_bandwidth(device, nbytes, repeats) -> dict:
    """Bytes read + written per second of a large copy (median of repeats)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = Timer(device, warmup=2, repeats=repeats, max_seconds=30)
    t_copy = statistics.median(timer(lambda: dst.copy_(src)))
    out = {
        "buffer_bytes": n * 4,
        "method": "dst.copy_(src), torch.utils.benchmark.Timer",
        "copy_ms": t_copy,
        "bytes_per_s": 2 * n * 4 / (t_copy * 1e-3),
    }
    if device.type == "cpu":
        t_clone = statistics.median(timer(lambda: src.clone()))
        out["clone_ms"] = t_clone
        out["clone_bytes_per_s"] = 2 * n * 4 / (t_clone * 1e-3)
    return out


# --------------------------------------------------------------------------------------------
# Inputs of one configuration
# --------------------------------------------------------------------------------------------
def zipf_rows(V, N, alpha, gen, device):
    """N rows with P(rank k) ~ k^-alpha, ranks mapped to rows by a random permutation."""
    cdf = torch.arange(1, V + 1, dtype=torch.float64, device=device).pow_(-alpha)
    torch.cumsum(cdf, 0, out=cdf)
    cdf /= cdf[-1].clone()
    u = torch.rand(N, dtype=torch.float64, generator=gen, device=device)
    ranks = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)
    del cdf, u
    perm = torch.randperm(V, generator=gen, device=device)
    return perm[ranks]


class Case:
    """The shared inputs of one configuration: batch, sizes, byte counts."""

    def __init__(self, name, cfg, device, seed, alpha):
        self.name, self.cfg, self.device = name, dict(cfg), device
        V, D, B, L = cfg["rows"], cfg["dim"], cfg["bags"], cfg["pooling"]
        if D % 8:
            raise ValueError(f"{name}: dim must be a multiple of 8 (sizes D/8 ... D), got {D}")
        self.V, self.D, self.B, self.L, self.N = V, D, B, L, B * L
        self.dtype = DTYPES[cfg["dtype"]]
        self.E = torch.empty((), dtype=self.dtype).element_size()
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        if cfg["dist"] == "zipf":
            self.idx = zipf_rows(V, self.N, alpha, gen, device)
        elif cfg["dist"] == "uniform":
            self.idx = torch.randint(V, (self.N,), generator=gen, device=device)
        else:
            raise ValueError(f"dist must be zipf or uniform, got {cfg['dist']!r}")
        self.offsets = torch.arange(0, self.N, L, device=device)
        self.classes = [D // f for f in SIZE_FRACTIONS]
        probs = torch.tensor(SIZE_PROBS, dtype=torch.float32, device=device)
        self.cls = torch.multinomial(probs, V, replacement=True, generator=gen)  # size class of every row
        self.sizes = torch.tensor(self.classes, device=device)[self.cls]
        self.row_off = torch.zeros(V + 1, dtype=torch.int64, device=device)
        torch.cumsum(self.sizes, 0, out=self.row_off[1:])
        self.total = int(self.row_off[-1])
        self.grad = torch.randn(B, D, generator=gen, device=device).to(self.dtype)
        uniq = torch.unique(self.idx)
        self.n_unique = uniq.numel()
        self.unique_entries = int(self.sizes[uniq].sum())
        self.lookup_entries = int(self.sizes[self.idx].sum())
        del uniq

    # ---- bytes ------------------------------------------------------------------------------
    def nbytes(self, method: str, phase: str) -> int:
        multi = method.startswith("pme") or method in ("per_size", "gather_index_add")
        E, N, B, D = self.E, self.N, self.B, self.D
        idx_bytes, out_bytes = (N + B) * 8, B * D * E
        R = self.lookup_entries * E if multi else N * D * E
        U_entries = self.unique_entries if multi else self.n_unique * D
        table_entries = self.total if multi else self.V * D
        fwd = R + idx_bytes + out_bytes
        if phase == "forward":
            return fwd
        if phase == "forward_backward":
            if method == "eb_sparse":
                return fwd + out_bytes + idx_bytes + N * D * E + N * 8
            return fwd + out_bytes + idx_bytes + table_entries * E
        s = 4 if method.startswith("pme_fused") else E
        if method.endswith("rowwise_adagrad"):
            state = 2 * 4 * self.n_unique
        elif method.endswith("adagrad"):
            state = 2 * s * U_entries
        elif method.endswith("adam"):
            state = 4 * s * U_entries
        else:
            state = 0
        return fwd + out_bytes + idx_bytes + 2 * U_entries * E + state

    def estimate(self, method: str) -> int:
        """Peak bytes a method allocates beyond the shared inputs (a generous estimate)."""
        E, V, D, N, B = self.E, self.V, self.D, self.N, self.B
        dense, ms = V * D * E, self.total * E
        io = 8 * B * D * E + 8 * N * 8
        sparse_grad = 4 * N * D * E + 4 * N * 8
        est = {
            "pme": 2 * ms + V * 8,
            "eb_dense": 2 * dense,
            "eb_sparse": dense + sparse_grad,
            "per_size": 2 * ms + 2 * V * 8,
            "gather_index_add": 2 * ms + self.lookup_entries * (6 * 8 + 3 * E),
            "pme_fused_rowwise_adagrad": ms + V * 12,
            "pme_fused_sgd": ms + V * 8,
            "pme_fused_adam": ms + 8 * self.total + V * 8,
            "eb_sparse_sparseadam": 3 * dense + 2 * sparse_grad,
            "eb_sparse_adagrad": 2 * dense + 2 * sparse_grad,
            "eb_sparse_sgd": dense + 2 * sparse_grad,
            "eb_dense_adagrad": 5 * dense,
            "pme_dense_adagrad": 5 * ms + V * 8,
        }[method]
        return est + io

    def describe(self) -> str:
        return (
            f"{self.V:,} x {self.D} {self.cfg['dtype']}, {self.B} bags x {self.L} lookups ({self.N:,}), "
            f"{self.cfg['dist']}, {self.n_unique:,} distinct rows; multi-size table "
            f"{100 * self.total / (self.V * self.D):.1f}% of the dense entries"
        )

    def summary(self) -> dict:
        return dict(
            self.cfg,
            name=self.name,
            lookups=self.N,
            distinct_rows=self.n_unique,
            size_classes=self.classes,
            size_probs=list(SIZE_PROBS),
            stored_entries=self.total,
            dense_entries=self.V * self.D,
            stored_fraction=self.total / (self.V * self.D),
            lookup_entries=self.lookup_entries,
            distinct_row_entries=self.unique_entries,
        )


# --------------------------------------------------------------------------------------------
# The methods: each builds its tables, times its phases and returns {phase: [ms, ...]}
# --------------------------------------------------------------------------------------------
def dense_table(c: Case, sparse=False) -> nn.EmbeddingBag:
    w = torch.empty(c.V, c.D, device=c.device, dtype=c.dtype).normal_()
    return nn.EmbeddingBag(c.V, c.D, mode="sum", sparse=sparse, _weight=w)


def pme_table(c: Case, optimizer=None) -> pme.MultiSizeEmbeddingBag:
    return pme.MultiSizeEmbeddingBag(
        c.V, c.D, sizes=c.sizes, mode="sum", device=c.device, dtype=c.dtype, optimizer=optimizer
    )


def fwd_and_fwd_bwd(module, forward, c: Case, timer, graph_ok=True) -> dict:
    with torch.no_grad():
        res = {"forward": timer(forward, graph_ok=graph_ok)}

    def fb():
        for p in module.parameters():
            p.grad = None
        forward().backward(c.grad)

    res["forward_backward"] = timer(fb)
    return res


def run_pme(c, timer):
    m = pme_table(c)
    return fwd_and_fwd_bwd(m, lambda: m(c.idx, c.offsets), c, timer)


def run_eb_dense(c, timer):
    eb = dense_table(c)
    return fwd_and_fwd_bwd(eb, lambda: eb(c.idx, c.offsets), c, timer)


def run_eb_sparse(c, timer):
    eb = dense_table(c, sparse=True)

    def fb():
        eb.weight.grad = None
        eb(c.idx, c.offsets).backward(c.grad)

    return {"forward_backward": timer(fb)}


def build_per_size(c, flat=None):
    """One nn.EmbeddingBag per size class and its forward; the batch is split by class here (not timed).

    ``flat``: optional multi-size flat buffer to copy the values from (random otherwise).
    """
    local = torch.empty(c.V, dtype=torch.int64, device=c.device)  # row -> row in its class's table
    cls_of_lookup = c.cls[c.idx]
    bag_of_lookup = torch.arange(c.B, device=c.device).repeat_interleave(c.L)
    tables, parts = nn.ModuleList(), []
    for k, s in enumerate(c.classes):
        rows = (c.cls == k).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        local[rows] = torch.arange(rows.numel(), device=c.device)
        if flat is None:
            w = torch.empty(rows.numel(), s, device=c.device, dtype=c.dtype).normal_()
        else:
            w = flat[c.row_off[rows].unsqueeze(1) + torch.arange(s, device=c.device)].clone()
        eb = nn.EmbeddingBag(rows.numel(), s, mode="sum", _weight=w)
        mask = cls_of_lookup == k
        idx_k = local[c.idx[mask]]
        counts = torch.bincount(bag_of_lookup[mask], minlength=c.B)
        off_k = torch.cumsum(counts, 0) - counts
        tables.append(eb)
        parts.append((eb, s, idx_k, off_k))
    del local, cls_of_lookup, bag_of_lookup

    def forward():
        out = None
        for eb, s, idx_k, off_k in parts:
            o = eb(idx_k, off_k)
            if s < c.D:
                o = F.pad(o, (0, c.D - s))
            out = o if out is None else out + o
        return out

    return tables, forward


def run_per_size(c, timer):
    tables, forward = build_per_size(c)
    return fwd_and_fwd_bwd(tables, forward, c, timer)


def gather_index_add(weight, row_off, sizes, idx, offsets, B, D):
    """Plain PyTorch multi-size sum lookup: gather every entry of every looked-up row, index_add."""
    N = idx.numel()
    s = sizes[idx]
    start = row_off[idx]
    ends = torch.cumsum(s, 0)
    T = int(ends[-1]) if N else 0  # entries to gather (a host sync)
    lk = torch.repeat_interleave(s, output_size=T)  # lookup of every gathered entry
    pos = torch.arange(T, device=idx.device) - (ends - s)[lk]  # column inside its row
    counts = torch.diff(offsets, append=offsets.new_full((1,), N))
    bag = torch.repeat_interleave(counts, output_size=N)  # bag of every lookup
    vals = weight[start[lk] + pos]
    out = torch.zeros(B * D, dtype=weight.dtype, device=weight.device).index_add(0, bag[lk] * D + pos, vals)
    return out.view(B, D)


def run_gather_index_add(c, timer):
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(c.total, device=c.device, dtype=c.dtype).normal_())
    return fwd_and_fwd_bwd(
        holder,
        lambda: gather_index_add(holder.weight, c.row_off, c.sizes, c.idx, c.offsets, c.B, c.D),
        c,
        timer,
        graph_ok=False,
    )  # host sync


def run_pme_fused(name):
    def run(c, timer):
        opt = {
            "rowwise_adagrad": lambda: pme.optim.RowwiseAdagrad(lr=0.01),
            "sgd": lambda: pme.optim.SGD(lr=0.01),
            "adam": lambda: pme.optim.Adam(lr=1e-3),
        }[name]()
        m = pme_table(c, optimizer=opt)
        m.train()
        return {"step": timer(lambda: m(c.idx, c.offsets).backward(c.grad))}

    return run


def torch_step(module, optimizer, c, timer):
    def step():
        module(c.idx, c.offsets).backward(c.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"step": timer(step)}


def run_eb_sparse_opt(name):
    def run(c, timer):
        eb = dense_table(c, sparse=True)
        opt = {
            "sparseadam": lambda: torch.optim.SparseAdam([eb.weight], lr=1e-3),
            "adagrad": lambda: torch.optim.Adagrad([eb.weight], lr=0.01, foreach=False),
            "sgd": lambda: torch.optim.SGD([eb.weight], lr=0.01, foreach=False),
        }[name]()
        return torch_step(eb, opt, c, timer)

    return run


def run_eb_dense_adagrad(c, timer):
    eb = dense_table(c)
    return torch_step(eb, torch.optim.Adagrad([eb.weight], lr=0.01), c, timer)


def run_pme_dense_adagrad(c, timer):
    m = pme_table(c)
    return torch_step(m, torch.optim.Adagrad([m.weight], lr=0.01), c, timer)


RUNNERS = {
    "pme": run_pme,
    "eb_dense": run_eb_dense,
    "eb_sparse": run_eb_sparse,
    "per_size": run_per_size,
    "gather_index_add": run_gather_index_add,
    "pme_fused_rowwise_adagrad": run_pme_fused("rowwise_adagrad"),
    "pme_fused_sgd": run_pme_fused("sgd"),
    "pme_fused_adam": run_pme_fused("adam"),
    "eb_sparse_sparseadam": run_eb_sparse_opt("sparseadam"),
    "eb_sparse_adagrad": run_eb_sparse_opt("adagrad"),
    "eb_sparse_sgd": run_eb_sparse_opt("sgd"),
    "eb_dense_adagrad": run_eb_dense_adagrad,
    "pme_dense_adagrad": run_pme_dense_adagrad,
}
REFERENCE = {"forward": "pme", "forward_backward": "pme", "step": "pme_fused_rowwise_adagrad"}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def gb(x):
    return f"{x / 1e9:.2f} GB"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _cfg_summary(cfg: dict) -> str:
    """A config's sizes in one phrase, for an error."""
    return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in cfg.items())


def run_case(c: Case, methods, timer, copy_bps, mem_limit, dry_run, progress) -> dict:
    rows = []  # one per (method, phase)
    for i, name in enumerate(methods):
        need = int(c.estimate(name) * 1.1) + 256 * 2**20
        free = free_memory(c.device, mem_limit)
        base = {"method": name, "estimated_bytes": need, "free_bytes": free}
        if need > free:
            reason = f"needs about {gb(need)}, {gb(free)} free"
            print(f"{progress} [{i + 1}/{len(methods)}] {name}: SKIPPED ({reason})", flush=True)
            rows.append(dict(base, skipped=reason))
            continue
        if dry_run:
            print(
                f"{progress} [{i + 1}/{len(methods)}] {name}: would run (about {gb(need)}, {gb(free)} free)", flush=True
            )
            rows.append(dict(base, skipped="dry run"))
            continue
        print(f"{progress} [{i + 1}/{len(methods)}] {name} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            res = RUNNERS[name](c, timer)
            sync(c.device)
        except Exception as e:  # a method failing (e.g. a dtype torch lacks) must not stop the run
            if c.device.type == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
                reason = "out of memory"
            else:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"FAILED ({reason})", flush=True)
            rows.append(dict(base, error=reason))
            gc.collect()
            continue
        parts = []
        for phase, times in res.items():
            ms = statistics.median(times)
            nbytes = c.nbytes(name, phase)
            bps = nbytes / (ms * 1e-3)
            rows.append(
                dict(
                    base,
                    phase=phase,
                    ms=ms,
                    times_ms=list(times),
                    repeats=len(times),
                    bytes=nbytes,
                    bytes_per_s=bps,
                    copy_ratio=bps / copy_bps,
                    cuda_graph=times.graph,
                )
            )
            parts.append(f"{phase} {ms:.3f} ms")
        print(", ".join(parts) + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
        del res
    floors = {}
    for phase, ref in REFERENCE.items():
        floors[phase] = {"method": ref, "bytes": c.nbytes(ref, phase), "ms": c.nbytes(ref, phase) / copy_bps * 1e3}
    speedups = {}
    for phase, ref in REFERENCE.items():
        ref_row = next((r for r in rows if r["method"] == ref and r.get("phase") == phase), None)
        if ref_row is None:
            continue
        speedups[phase] = {
            r["method"]: r["ms"] / ref_row["ms"] for r in rows if r.get("phase") == phase and r["method"] != ref
        }
    return {"config": c.summary(), "results": rows, "floor": floors, "pme_speedup": speedups}


def print_case(out, copy_bps, describe):
    rows, sp = out["results"], out["pme_speedup"]

    def get(m, phase):
        return next((r for r in rows if r["method"] == m and r.get("phase") == phase), None)

    def cells(m, phase):
        r = get(m, phase)
        if r is None:
            return ["-"] * 4
        ratio = sp.get(phase, {}).get(m, 1.0 if m == REFERENCE[phase] else None)
        return [
            fmt(r["ms"], ".3f"),
            fmt(r["bytes_per_s"] / 1e9, ".1f"),
            fmt(100 * r["copy_ratio"], ".0f") + "%",
            fmt(ratio, ".2f"),
        ]

    print(f"\n== {out['config']['name']}: {describe}")
    methods = [m for m in LOOKUP_METHODS if any(r["method"] == m for r in rows)]
    if methods:
        head = ["method", "fwd ms", "GB/s", "%copy", "pme x", "fwd+bwd ms", "GB/s", "%copy", "pme x"]
        table = [head]
        for m in methods:
            table.append([m] + cells(m, "forward") + cells(m, "forward_backward"))
        for m in methods:
            r = next(r for r in rows if r["method"] == m)
            if "skipped" in r or "error" in r:
                table.append([f"  {m}: " + r.get("skipped", r.get("error", ""))] + [""] * 8)
        fl = out["floor"]
        table.append(
            [
                "floor (pme bytes / copy bw)",
                fmt(fl["forward"]["ms"], ".3f"),
                "",
                "",
                "",
                fmt(fl["forward_backward"]["ms"], ".3f"),
                "",
                "",
                "",
            ]
        )
        print_table(table)
        print("  pme x = the method's time / pme's time (pme's speed-up over it)")
    methods = [m for m in STEP_METHODS if any(r["method"] == m for r in rows)]
    if methods:
        table = [["training step (fwd+bwd+update)", "step ms", "GB/s", "%copy", "pme x"]]
        for m in methods:
            r = get(m, "step")
            if r is None:
                r0 = next(r for r in rows if r["method"] == m)
                table.append([f"  {m}: " + r0.get("skipped", r0.get("error", ""))] + [""] * 4)
            else:
                table.append([m] + cells(m, "step"))
        table.append(["floor (pme fused bytes / copy bw)", fmt(out["floor"]["step"]["ms"], ".3f"), "", "", ""])
        print_table(table)
        print("  pme x = the method's time / pme_fused_rowwise_adagrad's time")


def print_table(table):
    """Left-aligned first column, right-aligned others; a row whose other cells are all "" is a note."""

    def is_note(row):
        return all(x == "" for x in row[1:])

    widths = [max(len(str(row[i])) for row in table if not is_note(row)) for i in range(len(table[0]))]
    for row in table:
        if is_note(row):
            print(row[0])
            continue
        print("  ".join(str(x).ljust(widths[0]) if i == 0 else str(x).rjust(widths[i]) for i, x in enumerate(row)))


def plot(path, outs, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    configs = [o["config"]["name"] for o in outs]
    palette = plt.get_cmap("tab20").colors
    color = {m: palette[i % len(palette)] for i, m in enumerate(ALL_METHODS)}  # same colour in every panel
    fig, axes = plt.subplots(1, 3, figsize=(6 + 3 * len(configs), 7))
    for ax, phase, methods in zip(axes, PHASES, [LOOKUP_METHODS, LOOKUP_METHODS, STEP_METHODS]):
        data = {}
        for m in methods:
            vals = []
            for o in outs:
                r = next((r for r in o["results"] if r["method"] == m and r.get("phase") == phase), None)
                vals.append(r["ms"] if r else math.nan)
            if not all(math.isnan(v) for v in vals):
                data[m] = vals
        if not data:
            ax.set_visible(False)
            continue
        width = 0.8 / len(data)
        for k, (m, vals) in enumerate(data.items()):
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(configs))]
            ax.bar(xs, vals, width, label=m, color=color[m])
        floors = [o["floor"][phase]["ms"] for o in outs]
        ax.scatter(
            range(len(configs)), floors, marker="_", s=600, color="black", zorder=3, label="floor: pme bytes / copy bw"
        )
        ax.set_yscale("log")
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=20, ha="right")
        ax.set_ylabel("ms (median)")
        ax.set_title(
            {
                "forward": "forward",
                "forward_backward": "forward + backward",
                "step": "training step (fwd + bwd + update)",
            }[phase]
        )
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _dim_arg(text: str) -> int:
    """argparse type of --dim: the sizes are D/8 ... D, so D is a positive multiple of 8."""
    try:
        d = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if d <= 0 or d % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (sizes D/8 ... D), got {d}")
    return d


def parse_args(argv=None):
    from .cli import _count, _device, _non_negative, _positive, _seed

    configs = "\n".join(
        f"  {k:17s} {v['rows']:>12,} x {v['dim']:<4d} {v['dtype']:5s} {v['bags']:>6d} bags x "
        f"{v['pooling']:<3d} {v['dist']}"
        for k, v in CONFIGS.items()
    )
    groups = "\n".join(f"  {k:17s} {', '.join(v)}" for k, v in GROUPS.items())
    p = argparse.ArgumentParser(
        prog="pme bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"configurations:\n{configs}\n\ngroups (usable in --configs):\n{groups}\n\nmethods:\n  "
        + "\n  ".join(ALL_METHODS),
    )
    p.add_argument("--configs", help="comma-separated configs or groups (default: gpu on CUDA, cpu on CPU)")
    p.add_argument("--quick", action="store_true", help="small CPU-sized run: config 'quick', few repeats")
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--rows", type=_count(1), help="override V, the table's rows, of every selected config")
    p.add_argument("--dim", type=_dim_arg, help="override D (a positive multiple of 8)")
    p.add_argument("--bags", type=_count(1), help="override B, bags per batch")
    p.add_argument("--pooling-factor", type=_count(1), help="override L, lookups per bag")
    p.add_argument("--dist", choices=["zipf", "uniform"], help="override the index distribution")
    p.add_argument("--dtype", choices=list(DTYPES), help="override the weight dtype")
    p.add_argument(
        "--zipf-alpha", type=_non_negative, default=1.05, help="Zipf exponent, >= 0 (0: uniform; default 1.05)"
    )
    p.add_argument(
        "--warmup", type=_count(0), help="untimed calls first (default 5; on CPU at most max-seconds / 2 of them)"
    )
    p.add_argument("--repeats", type=_count(1), help="timed calls, median reported (default 50 on CUDA, 30 on CPU)")
    p.add_argument(
        "--max-seconds",
        type=_positive,
        help="stop repeating a phase after this many seconds (at least 3 repeats; default 5 on CUDA, 2 on CPU)",
    )
    p.add_argument("--copy-mb", type=_count(1), help="copy-bandwidth buffer in MiB (default 1024 on CUDA, 512 on CPU)")
    p.add_argument("--flush-l2", action="store_true", help="CUDA: overwrite 2x L2 before each timed call")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA: time the forward phase as CUDA-graph replays (kernel time without Python/launch "
        "overhead; gather_index_add stays eager); the output file name gets a _graph suffix",
    )
    p.add_argument("--threads", type=_count(1), help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument(
        "--mem-limit-gb", type=_positive, help="treat at most this many GiB of memory as free (tests the guard)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build the inputs, print which methods would run or be skipped, time nothing",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the sizes, indices and gradient (default 0)")
    p.add_argument(
        "--out", help="JSON path (default benchmarks/results/lookup_<device>_<date>.json; the PNG goes beside it)"
    )
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON or PNG")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an earlier result file, run nothing")
    args = p.parse_args(argv)
    args.error = p.error
    return args


def pick_device(name: str | None) -> torch.device:
    """The device to run on: ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``), by default CUDA where it
    is available; ``"cuda"`` without an index means the current CUDA device (``torch.cuda.set_device``
    refuses a device without an index)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _cannot_save(path):
    """Why the result file ``path`` (its folder made when missing) cannot be written, or None."""
    from .cli import _folder_problem

    if os.path.isdir(path):
        return f"--out {path} is a folder; give a file name"
    why = _folder_problem(os.path.dirname(os.path.abspath(path)))
    return f"cannot save the results to {path}: {why}" if why else None


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        try:
            with open(args.replot) as f:
                doc = json.load(f)
            doc["configs"], doc["device"]["name"], doc["device"]["torch"], doc["copy_bandwidth"]["bytes_per_s"]
        except OSError as e:
            args.error(f"--replot {args.replot}: {e.strerror or e}")
        except (ValueError, KeyError, TypeError) as e:
            args.error(f"--replot {args.replot} is not a result file of pme bench ({type(e).__name__}: {e})")
        png = plot(
            os.path.splitext(args.replot)[0] + ".png",
            doc["configs"],
            f"{doc['device']['name']}, torch {doc['device']['torch']}, copy "
            f"{doc['copy_bandwidth']['bytes_per_s'] / 1e9:.0f} GB/s",
        )
        print(f"wrote {png}")
        return doc["configs"]
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # torch's sparse optimizers, each step
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cuda = device.type == "cuda"

    names = args.configs.split(",") if args.configs else (["quick"] if args.quick else GROUPS["gpu" if cuda else "cpu"])
    configs = []
    for n in names:
        for k in GROUPS.get(n.strip(), [n.strip()]):
            if k not in CONFIGS:
                sys.exit(f"unknown config {k!r}; known: {', '.join(CONFIGS)}; groups: {', '.join(GROUPS)}")
            if k not in configs:
                configs.append(k)
    methods = ALL_METHODS if not args.methods else [m.strip() for m in args.methods.split(",")]
    for m in methods:
        if m not in RUNNERS:
            sys.exit(f"unknown method {m!r}; known: {', '.join(ALL_METHODS)}")
    overrides = {
        "rows": args.rows,
        "dim": args.dim,
        "bags": args.bags,
        "pooling": args.pooling_factor,
        "dist": args.dist,
        "dtype": args.dtype,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    warmup = args.warmup if args.warmup is not None else 5
    max_seconds = args.max_seconds if args.max_seconds is not None else (5.0 if cuda else 2.0)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else (50 if cuda else 30))
    mem_limit = int(args.mem_limit_gb * 2**30) if args.mem_limit_gb is not None else None

    folder = os.path.join("benchmarks", "results") if os.path.isdir("benchmarks") else "."
    path = args.out or os.path.join(
        folder,
        f"lookup_{device_slug(device)}_{time.strftime('%Y-%m-%d')}{'_graph' if args.cuda_graph and cuda else ''}.json",
    )
    if not (args.dry_run or args.no_save):  # before any timing: the JSON is written after the first config
        why = _cannot_save(path)
        if why:
            args.error(why)

    info = device_info(device)
    print(f"device: {info['name']}  [{device}]")
    print(f"cpu: {info['cpu_model']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}")
    print(f"torch {info['torch']}, CUDA {info['cuda']}, python {info['python']}")
    print(f"pme.info(): {info['pme']}")
    if info["pme"].get("backend") != "compiled":
        print("WARNING: pme runs on its pure-PyTorch reference, not the compiled kernels")
    print(f"configs: {', '.join(configs)}" + (f" with overrides {overrides}" if overrides else ""))
    print(f"methods: {', '.join(methods)}; warm-up {warmup}, repeats {repeats} (max {max_seconds} s per phase)")

    copy_mb = args.copy_mb or (64 if args.quick else (1024 if cuda else 512))
    copy_mb = min(copy_mb, max(16, free_memory(device, mem_limit) // 2**20 // 4))
    if args.dry_run:
        copy = {"bytes_per_s": float("nan"), "dry_run": True}
    else:
        copy = copy_bandwidth(device, copy_mb * 2**20, repeats=max(repeats, 10))
        print(
            f"copy bandwidth: {copy['bytes_per_s'] / 1e9:.1f} GB/s (read + write, {copy['method']}, "
            f"{copy_mb} MiB buffer, median)"
            + (f"; clone: {copy['clone_bytes_per_s'] / 1e9:.1f} GB/s" if "clone_bytes_per_s" in copy else "")
        )
    timer = Timer(device, warmup, repeats, max_seconds, args.flush_l2, args.cuda_graph)

    outs = []

    def save(complete):
        """Writes the JSON (atomically); called after every configuration, so a cut-short run keeps its results."""
        if args.dry_run or args.no_save:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        doc = {
            "benchmark": "bench_lookup",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["pme bench"] + (sys.argv[1:] if argv is None else list(argv))),
            "device": info,
            "complete": complete,
            "configs_requested": list(configs),
            "copy_bandwidth": copy,
            "timing": {
                "warmup": warmup,
                "repeats": repeats,
                "max_seconds": max_seconds,
                "flush_l2": bool(args.flush_l2 and cuda),
                "cuda_graph_forward": bool(args.cuda_graph and cuda),
                "clock": "torch.utils.benchmark.Timer (time.perf_counter"
                + (", CUDA synchronize around each call)" if cuda else ")"),
                "statistic": "median",
                "gc_paused_while_timing": True,
            },
            "mode": "sum",
            "index_dtype": "int64",
            "zipf_alpha": args.zipf_alpha,
            "seed": args.seed,
            "bytes_formula": BYTES_FORMULA,
            "configs": outs,
        }
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(path + ".tmp", path)

    t_start = time.perf_counter()
    for ci, name in enumerate(configs):
        cfg = dict(CONFIGS[name], **overrides)
        progress = f"[{ci + 1}/{len(configs)} {name}]"
        print(f"\n{progress} building inputs ...", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            c = Case(name, cfg, device, args.seed, args.zipf_alpha)
        except (MemoryError, RuntimeError) as e:  # e.g. --rows beyond the memory: one line, not a traceback
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            sys.exit(f"\npme bench: cannot build the inputs of {name} ({_cfg_summary(cfg)}): {first}")
        print(f"{time.perf_counter() - t0:.1f} s: {c.describe()}", flush=True)
        load_before = os.getloadavg()[0]
        out = run_case(c, methods, timer, copy["bytes_per_s"], mem_limit, args.dry_run, progress)
        load_after = os.getloadavg()[0]
        out["loadavg_1min"] = {"before": load_before, "after": load_after}
        outs.append(out)
        if not args.dry_run:
            print_case(out, copy["bytes_per_s"], c.describe())
            if not cuda and max(load_before, load_after) > (os.cpu_count() or 1):
                print(
                    f"NOTE: the 1-minute load average ({load_before:.1f} -> {load_after:.1f}) exceeds the "
                    f"{os.cpu_count()} cores: other processes share the CPU and these timings are inflated"
                )
        del c
        gc.collect()
        save(complete=False)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")

    if args.dry_run or args.no_save:
        return outs
    save(complete=True)
    png = plot(
        os.path.splitext(path)[0] + ".png",
        outs,
        f"{info['name']}, torch {info['torch']}, copy {copy['bytes_per_s'] / 1e9:.0f} GB/s",
    )
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    rows = [r for o in outs for r in o["results"]]
    if rows and all("error" in r for r in rows):  # nothing was timed: a failed run, not a result
        sys.exit(f"pme bench: every method failed ({rows[0]['error']}); the JSON records the errors")
    return outs


if __name__ == "__main__":
    main()
