"""Shared fixtures: devices (CUDA variants skip visibly without a GPU) and random tables.

Environment switches:
  PME_REQUIRE_COMPILED=1  fail unless the compiled extension is the live backend (CI sets it).
  PME_REQUIRE_CUDA=1      fail, instead of skipping, when no GPU or no CUDA kernels are present.
"""

import os

import pytest
import torch

import pme

REQUIRE_COMPILED = os.environ.get("PME_REQUIRE_COMPILED") == "1"
REQUIRE_CUDA = os.environ.get("PME_REQUIRE_CUDA") == "1"


def pytest_report_header(config):
    i = pme.info()
    return (
        f"pme {i['version']} backend={i['backend']} built_cuda={i['built_cuda']} torch={i['torch']} "
        f"cuda_available={i['cuda_available']}"
    )


def pytest_sessionstart(session):
    if REQUIRE_COMPILED and pme.ops.backend() != "compiled":
        raise pytest.UsageError(f"PME_REQUIRE_COMPILED=1 but pme runs on the reference: {pme.ops.LOAD_ERROR}")


def cuda_ready():
    return (
        torch.cuda.is_available()
        and pme.ops.BUILD_INFO is not None
        and pme.ops.BUILD_INFO.get("cuda", "none") != "none"
    )


def _device_params():
    params = [pytest.param("cpu", id="cpu")]
    if cuda_ready() or REQUIRE_CUDA:
        params.append(pytest.param("cuda", id="cuda"))
    else:
        why = "no GPU" if not torch.cuda.is_available() else "pme built without CUDA kernels"
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skip(reason=f"CUDA variant: {why}")))
    return params


DEVICES = _device_params()


def random_sizes(V, D, gen, quantum=1, allow_zero=True):
    """Row sizes in [0, D] (multiples of quantum), with some zero and some full rows."""
    lo = 0 if allow_zero else 1
    s = torch.randint(lo, D // quantum + 1, (V,), generator=gen) * quantum
    s = s.clamp(max=D)
    if V >= 3:
        s[0] = D
        if allow_zero:
            s[1] = 0
    return s


def make_table(V, D, dtype=torch.float32, device="cpu", layout="padded", seed=0, quantum=1, sizes=None):
    """Random multi-size table: (module-free) weight, offsets, col_of_size, width, sizes."""
    gen = torch.Generator().manual_seed(seed)
    if sizes is None:
        if layout == "grouped":
            classes = sorted({max(1, D // 4), max(1, D // 2), D})
            sizes = torch.tensor(classes)[torch.randint(0, len(classes), (V,), generator=gen)]
            if V >= 2:
                sizes[1] = 0
        else:
            sizes = random_sizes(V, D, gen, quantum)
    m = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, layout=layout, dtype=torch.float64)
    w = torch.randn(m.weight.numel(), generator=gen, dtype=torch.float64).to(dtype).to(device)
    return w, m.offsets.to(device), (None if m.col_of_size is None else m.col_of_size.to(device)), m.width, sizes


def random_jagged(V, B, max_len, gen, empty=0):
    """One feature's bags, int64: indices in [0, V) and [B] lengths in [0, max_len], bag ``empty``
    empty (None: no bag forced empty); the first index is the largest (V - 1), the second a duplicate."""
    lens = torch.randint(0, max_len + 1, (B,), generator=gen)
    if empty is not None:
        lens[empty] = 0
    idx = torch.randint(0, V, (int(lens.sum()),), generator=gen)
    if idx.numel() >= 3:
        idx[0] = V - 1
        idx[1] = idx[2]
    return idx, lens


def random_bags(V, B, max_len, gen, index_dtype=torch.int64, device="cpu", padding_idx=None):
    """1-D indices and [B] offsets with duplicates, empty bags, the largest index and padding."""
    idx, lens = random_jagged(V, B, max_len, gen, empty=0 if B >= 2 else None)
    n = idx.numel()
    if padding_idx is not None and n >= 4:
        idx[3] = padding_idx
    offsets = torch.zeros(B, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens, 0)[:-1]
    return idx.to(index_dtype).to(device), offsets.to(index_dtype).to(device)
