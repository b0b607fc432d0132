# ruff: noqa: F811  (the worker functions take torch as an argument: it is imported in the subprocess)
"""Fuzz suite: hypothesis draws corruptions of every operator argument and of checkpoints; each
batch of cases runs in a fresh subprocess, so that a crash (SIGSEGV, abort, heap corruption)
fails the test instead of killing pytest.

Every case ends in one of two verdicts, judged by an independent oracle written from the
contract (README "Semantics" and "Safety"):
- "raised": a clear Python exception (RuntimeError, ValueError, TypeError, IndexError) for an
  argument the oracle calls invalid;
- "correct": a result equal to the pure-PyTorch reference for arguments the oracle calls valid.
Anything else fails: an invalid call accepted, a valid one refused, a wrong answer, a canary
overwritten, or the worker dying. Buffers sit between canary values (7777) so that a read out of
bounds shows up in an output and a write out of bounds in the canary.

Cost: about 20 cases per subprocess (one torch import each); CUDA variants skip visibly
without a GPU. Run as a script (``python tests/test_fuzz.py --worker``) it is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CANARY = 7777.0
INT64_MAX = 2**63 - 1
BATCH = 30


# --------------------------------------------------------------------------------------------
# Worker side (runs in the subprocess)
# --------------------------------------------------------------------------------------------
def _guarded(t, torch):
    """A copy of t placed inside a larger buffer whose other entries are CANARY."""
    flat = t.reshape(-1)
    big = torch.full((flat.numel() + 64,), CANARY, dtype=t.dtype, device=t.device)
    big[32 : 32 + flat.numel()] = flat
    return big, big[32 : 32 + flat.numel()].view(t.shape)


def _canaries_ok(big, n):
    return bool((big[:32] == CANARY).all()) and bool((big[32 + n :] == CANARY).all())


def _guard(a, keys, case, torch):
    """Puts the 1-D float buffers ``a[k]`` (``keys``) that an operator writes or reads between
    canaries (not when the case is about aliasing: a copy would undo it); ``{k: big buffer}``."""
    guards = {}
    for k in keys:
        t = a[k]
        if (
            case["how"] != "alias"
            and hasattr(t, "dim")
            and t.dim() == 1
            and t.device.type != "meta"
            and t.is_floating_point()
        ):
            guards[k], a[k] = _guarded(t, torch)
    return guards


def _judge(call, a, guards, valid, device, torch):
    """Runs ``call()``: ``((verdict, message), None)`` when it raised, broke a canary, accepted an
    invalid call or read a canary; ``(None, result)`` for a result to compare with the reference."""
    try:
        res = call()
        if device == "cuda":
            torch.cuda.synchronize()
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        for k, big in guards.items():
            if not _canaries_ok(big, a[k].numel()):
                return ("canary overwritten (" + k + ")", str(e)[:200]), None
        return (("raised" if not valid else "refused a valid call"), str(e)[:300]), None
    for k, big in guards.items():
        if not _canaries_ok(big, a[k].numel()):
            return ("canary overwritten (" + k + ")", ""), None
    if not valid:
        return ("accepted an invalid call", ""), None
    if res.is_floating_point() and bool((res == CANARY).any()):
        return ("canary read", ""), None
    return None, res


def _build_lookup(case, torch, pme, device):  # noqa: C901
    """Valid normal-form arguments of one lookup-shaped call, from the case's seed and shape."""
    g = torch.Generator().manual_seed(case["seed"])
    V, D, B, L = case["V"], case["D"], case["B"], case["L"]
    layout, mode = case["layout"], case["mode"]
    if layout == "grouped":
        classes = sorted({max(1, D // 4), max(1, D // 2), D})
        sizes = torch.tensor(classes)[torch.randint(0, len(classes), (V,), generator=g)]
        sizes[0] = 0
    else:
        sizes = torch.randint(0, D + 1, (V,), generator=g)
    m = pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, layout=layout)
    width = m.width
    w = torch.randn(m.weight.numel(), generator=g, dtype=torch.float64).to(torch.float32)
    lens = torch.randint(0, L + 1, (B,), generator=g)
    idx = torch.randint(0, V, (int(lens.sum()),), generator=g)
    bo = torch.zeros(B + 1, dtype=torch.int64)
    bo[1:] = torch.cumsum(lens, 0)
    idt = torch.int32 if case["int32"] else torch.int64
    a = {
        "weight": w,
        "offsets": m.offsets.clone(),
        "indices": idx.to(idt),
        "bag_offsets": bo.to(idt),
        "psw": torch.rand(idx.numel(), generator=g) if case["psw"] and mode == 0 else None,
        "col_of_size": None if m.col_of_size is None else m.col_of_size.clone(),
        "width": width,
        "mode": mode,
        "pad": case["pad"] % V if case["pad"] >= 0 and V else -1,
        "grad_out": torch.randn(idx.numel() if case["op"].startswith("embedding") else B, width, generator=g),
        "argmax": None,
        "lr": 0.1,
        "step": 1,
        "beta1": 0.9,
        "beta2": 0.999,
        "grad_scale": 1.0,
        "optimizer": case["optimizer"],
        "eps": 1e-8,
        "weight_decay": 0.0,
        "rule": 0,
    }
    if mode == 2:
        _, a["argmax"] = _call("bag_forward", {**a, "psw": None, "mode": 2}, torch)
    else:
        a["argmax"] = torch.empty(0, 0, dtype=torch.int64)
    total = w.numel()
    acc = torch.float32
    a["state1"] = (
        torch.zeros(V, dtype=acc)
        if a["optimizer"] == 1
        else torch.rand(total, generator=g)
        if a["optimizer"] == 2
        else torch.empty(0)
    )
    a["state2"] = torch.rand(total, generator=g) if a["optimizer"] == 2 else torch.empty(0)
    a["scores"] = torch.zeros(total)
    for k, v in a.items():
        if hasattr(v, "to"):
            a[k] = v.to(device)
    return a


def _corrupt(a, case, torch):
    """Applies the case's corruption (target, how, value) to the argument dict, in place."""
    target, how, value = case["target"], case["how"], case["value"]
    if how == "none" or target not in a:
        return
    t = a[target]
    if how == "set":
        if isinstance(t, (int, float)):
            if target == "width" and value > 4096:
                value = 4096 + value % 7  # a huge width is a valid request for a huge output: not fuzzed
            a[target] = value
        elif t is not None and t.numel():
            t = t.clone()
            i = case["pos"] % t.numel()
            v = value
            if not t.is_floating_point():
                v = int(v) if v == v and abs(v) != float("inf") else 0
            if t.dtype == torch.int32:
                v = max(-(2**31), min(2**31 - 1, v))
            t.view(-1)[i] = v
            a[target] = t
    elif how == "drop":  # one entry shorter
        if t is not None and hasattr(t, "numel") and t.dim() >= 1 and t.shape[0]:
            a[target] = t[:-1].contiguous()
    elif how == "grow":
        if t is not None and hasattr(t, "numel") and t.dim() >= 1:
            a[target] = torch.cat([t, t[-1:] if t.shape[0] else t.new_zeros((1,) + tuple(t.shape[1:]))])
    elif how == "dtype":
        if t is not None and hasattr(t, "dtype"):
            a[target] = t.to(torch.float64 if not t.is_floating_point() else torch.int64)
    elif how == "meta":
        if t is not None and hasattr(t, "to"):
            a[target] = t.to("meta")
    elif how == "2d":
        if t is not None and hasattr(t, "dim") and t.dim() == 1:
            a[target] = t.view(1, -1)
    elif how == "alias":  # the in-place tensor becomes a view of the target's memory
        if t is not None and hasattr(t, "numel") and t.numel() and t.dtype in (torch.float32, torch.int32):
            n = a["weight"].numel()
            if t.numel() >= n:
                a["weight"] = t.view(torch.float32)[:n] if t.dtype == torch.int32 else t[:n]


def _lookup_valid(a, op, torch):
    """The contract's verdict on a lookup-shaped call (independent of the kernels' own code)."""
    devs = {v.device for k, v in a.items() if hasattr(v, "device") and v is not None and (k in _USED[op])}
    if len(devs) != 1:
        return False
    w, off, idx, bo, psw, col = (a[k] for k in ("weight", "offsets", "indices", "bag_offsets", "psw", "col_of_size"))
    W, mode, pad = a["width"], a["mode"], a["pad"]
    backward_shaped = op in ("bag_backward", "sparse_update_", "accumulate_scores_", "embedding_backward")
    if backward_shaped:  # these take the width from grad_out
        if a["grad_out"].dim() != 2:
            return False
        W = a["grad_out"].shape[1]
    if w.dim() != 1 or w.dtype != torch.float32 or off.dim() != 1 or off.dtype != torch.int64 or off.numel() < 1:
        return False
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        return False
    V = off.numel() - 1
    o = off.tolist()
    if o[0] != 0 or o[-1] != w.numel() or any(o[i + 1] < o[i] for i in range(V)):
        return False
    if not isinstance(W, int) or W < 0:
        return False
    sizes = [o[i + 1] - o[i] for i in range(V)]
    if col is None:
        if any(s > W for s in sizes):
            return False
    else:
        if col.dim() != 1 or col.dtype != torch.int64:
            return False
        c = col.tolist()
        if any(not (x == -1 or (x >= 0 and s <= W and x <= W - s)) for s, x in enumerate(c)):
            return False
        if any(s >= len(c) or c[s] < 0 for s in sizes):
            return False
    N = idx.numel()
    if any(not 0 <= r < V for r in idx.tolist()):
        return False
    pooled = op in ("bag_forward", "bag_backward", "sparse_update_", "accumulate_scores_")
    if pooled:
        if bo.dim() != 1 or bo.dtype != idx.dtype or bo.numel() < 1:
            return False
        b = bo.tolist()
        if b[0] != 0 or any(b[i + 1] < b[i] for i in range(len(b) - 1)) or b[-1] > N:
            return False
        if mode not in (0, 1, 2) or not -1 <= pad < V:
            return False
        if psw is not None and (mode != 0 or psw.dim() != 1 or psw.numel() != N or psw.dtype != w.dtype):
            return False
    if op == "embedding_forward" and not -1 <= pad < V:  # padding_idx is an argument of the operator
        return False
    B = bo.numel() - 1 if pooled else N
    if op in ("bag_backward", "sparse_update_", "accumulate_scores_", "embedding_backward"):
        go = a["grad_out"]
        if go.dim() != 2 or go.shape[0] != B or go.dtype != w.dtype:
            return False
        if op == "embedding_backward" and not -1 <= pad < V:
            return False
        if pooled and mode == 2:
            am = a["argmax"]
            if am.dim() != 2 or tuple(am.shape) != (B, W) or am.dtype != torch.int64:
                return False
    if op == "sparse_update_":
        opt = a["optimizer"]
        if opt not in (0, 1, 2):
            return False
        for h in (a["lr"], a["eps"], a["weight_decay"]):
            if not (isinstance(h, (int, float)) and h == h and abs(h) != float("inf") and h >= 0):
                return False
        g_s = a["grad_scale"]
        if not (isinstance(g_s, (int, float)) and g_s == g_s and abs(g_s) != float("inf") and g_s > 0):
            return False
        s1, s2 = a["state1"], a["state2"]
        if opt == 1 and (s1.dim() != 1 or s1.numel() != V or s1.dtype != torch.float32):
            return False
        if opt == 2:
            if a["step"] < 1 or not (0 <= a["beta1"] < 1 and 0 <= a["beta2"] < 1):
                return False
            for s in (s1, s2):
                if s.dim() != 1 or s.numel() != w.numel() or s.dtype != torch.float32:
                    return False
        outs = [w] + ([s1] if opt >= 1 else []) + ([s2] if opt == 2 else [])
        if _overlaps(
            outs,
            [a[k] for k in ("grad_out", "offsets", "indices", "bag_offsets", "psw", "col_of_size", "argmax")]
            + [s1, s2],
        ):
            return False
    if op == "accumulate_scores_":
        if a["rule"] not in (0, 1):
            return False
        sc = a["scores"]
        if sc.dim() != 1 or sc.numel() != w.numel() or sc.dtype != torch.float32:
            return False
        if _overlaps(
            [sc],
            [a[k] for k in ("grad_out", "weight", "offsets", "indices", "bag_offsets", "psw", "col_of_size", "argmax")],
        ):
            return False
    return True


def _overlaps(outs, others):
    def span(t):
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()

    for o in outs:
        for t in others:
            if t is None or t is o or not t.numel() or not o.numel() or t.device.type == "meta":
                continue
            (a0, a1), (b0, b1) = span(o), span(t)
            if a0 < b1 and b0 < a1:
                return True
    return False


# Each lookup-shaped operator's arguments in schema order, named as in the argument dict
_TABLE = ("weight", "offsets", "indices", "bag_offsets", "psw", "col_of_size")
_HYPER = ("optimizer", "lr", "weight_decay", "eps", "beta1", "beta2", "grad_scale", "step")
_ARGS = {
    "bag_forward": (*_TABLE, "width", "mode", "pad"),
    "bag_backward": ("grad_out", *_TABLE, "argmax", "mode", "pad"),  # then psw_grad
    "embedding_forward": ("weight", "offsets", "indices", "col_of_size", "width", "pad"),
    "embedding_backward": ("grad_out", "weight", "offsets", "indices", "col_of_size", "pad"),
    "sparse_update_": ("weight", "state1", "state2", "grad_out", *_TABLE[1:], "argmax", "mode", "pad", *_HYPER),
    "accumulate_scores_": ("scores", "grad_out", *_TABLE, "argmax", "mode", "pad", "rule"),
}
# the tensors each one reads or writes (they must share a device)
_USED = {op: set(names) - {"width", "mode", "pad", "rule", *_HYPER} for op, names in _ARGS.items()}


def _call(op, a, torch, **kw):
    """torch.ops.pme.<op> on the argument dict a (keywords: the arguments a does not hold)."""
    return getattr(torch.ops.pme, op)(*(a[k] for k in _ARGS[op]), **kw)


def _run_lookup(case, torch, pme, device):
    from pme import reference

    a = _build_lookup(case, torch, pme, device)
    _corrupt(a, case, torch)
    op = case["op"]
    if a["mode"] == 2 and case["target"] != "argmax" and op in ("bag_backward", "sparse_update_", "accumulate_scores_"):
        # a corrupted but still valid table or batch: the argmax must be the forward's on it
        try:
            a["argmax"] = _call("bag_forward", {**a, "width": a["grad_out"].shape[-1], "mode": 2}, torch)[1]
        except (RuntimeError, ValueError, TypeError, IndexError):
            pass  # invalid: the operator under test must say so itself
    guards = _guard(a, ("weight", "state1", "state2", "scores"), case, torch)
    valid = _lookup_valid(a, op, torch)
    before = {k: v.clone() for k, v in a.items() if hasattr(v, "clone") and v is not None and v.device.type != "meta"}
    modes = {0: "sum", 1: "mean", 2: "max"}

    def call():
        res = _call(op, a, torch, **({"psw_grad": False} if op == "bag_backward" else {}))
        if op in ("bag_forward", "bag_backward"):
            return res[0]  # (output, argmax) / (grad_weight, grad_psw)
        if op in ("sparse_update_", "accumulate_scores_"):
            return a["weight" if op == "sparse_update_" else "scores"]  # updated in place
        return res

    verdict, res = _judge(call, a, guards, valid, device, torch)
    if verdict is not None:
        return verdict
    if case["target"] == "argmax" and case["how"] == "set" and a["mode"] == 2:
        # argmax is trusted to be the forward's (its values only pick which lookup gets a
        # column's gradient; they are compared, never used as addresses): no crash is the bar
        return "correct", "argmax values not compared"
    # the reference on the same (valid) arguments
    cpu = {k: (v.cpu() if hasattr(v, "cpu") else v) for k, v in before.items()}
    w, off, idx, bo, col, W = (
        cpu["weight"],
        cpu["offsets"],
        cpu["indices"],
        cpu.get("bag_offsets"),
        cpu.get("col_of_size"),
        a["width"],
    )
    if op not in ("bag_forward", "embedding_forward"):
        W = a["grad_out"].shape[1]
    psw = cpu.get("psw") if a["psw"] is not None else None
    pad = None if a["pad"] < 0 else a["pad"]
    if op in ("embedding_forward", "embedding_backward"):
        if op == "embedding_forward":
            ref = reference.embedding(w, off, idx.long(), W, col, None)
        else:
            bo2 = torch.arange(idx.numel() + 1)
            lookup = reference.Lookup(off, idx.long(), bo2, W, col, "sum", None, pad)
            ref, _ = reference.summed_row_grads(cpu["grad_out"], w, lookup)
    else:  # the pooled operators: the reference takes the same lookup arguments after their own
        lookup = reference.Lookup(off, idx.long(), bo.long(), W, col, modes[a["mode"]], psw, pad)
        if op == "bag_forward":
            ref = reference.embedding_bag(w, *lookup)
        elif op == "bag_backward":
            ref, _ = reference.summed_row_grads(cpu["grad_out"], w, lookup)
        elif op == "sparse_update_":
            ref = w.clone()
            s1, s2 = cpu["state1"].clone(), cpu["state2"].clone()
            optimizer = ["sgd", "rowwise_adagrad", "adam"][a["optimizer"]]
            # the raw operator takes any betas for SGD and Adagrad, which Hyperparameters refuses: duck-typed
            hyper = types.SimpleNamespace(optimizer=optimizer, **{k: a[k] for k in _HYPER[1:-1]})
            reference.sparse_update_(ref, s1, s2, cpu["grad_out"], lookup, hyper, a["step"])
        else:
            ref = cpu["scores"].clone()
            reference.accumulate_scores_(ref, cpu["grad_out"], w, lookup, ["snip", "grad"][a["rule"]])
    ok = torch.allclose(res.cpu().double(), ref.double(), rtol=1e-4, atol=1e-5, equal_nan=True)
    return ("correct" if ok else "wrong answer"), ""


def _run_prune(case, torch, pme, device):
    from pme import reference

    g = torch.Generator().manual_seed(case["seed"])
    V, D = case["V"], case["D"]
    scores = torch.randn(V, D, generator=g)
    special = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    mask = torch.rand(V, D, generator=g) < 0.2
    scores[mask] = special[torch.randint(0, 6, (int(mask.sum()),), generator=g)]
    dense = torch.randn(V, D, generator=g)
    sizes = torch.randint(0, D + 1, (V,), generator=g)
    off = torch.zeros(V + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(sizes, 0)
    a = {
        "scores": scores,
        "dense": dense,
        "offsets": off,
        "k": 1 + case["seed"] % max(1, V * D),
        "threshold": torch.tensor(float(scores.view(-1)[0]) if V * D else 0.0),
    }
    target = case["target"]
    if case["how"] == "set" and target == "k":
        a["k"] = case["value"]
    else:
        _corrupt(a, case, torch)
    a = {k: (v.to(device) if hasattr(v, "to") and v.device.type != "meta" else v) for k, v in a.items()}
    op = case["op"]
    s, d, o = a["scores"], a["dense"], a["offsets"]
    used = {"topk_threshold": (s,), "prune_counts": (s, a["threshold"]), "prune_pack": (d, s, o)}[op]
    devs_ok = len({t.device for t in used}) == 1
    try:
        if op == "topk_threshold":
            res = torch.ops.pme.topk_threshold(s, a["k"])
        elif op == "prune_counts":
            res = torch.ops.pme.prune_counts(s, a["threshold"])
        else:
            res = torch.ops.pme.prune_pack(d, s, o, bool(case["seed"] % 2))
        if device == "cuda":
            torch.cuda.synchronize()
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        return "raised", str(e)[:300]
    if devs_ok and used[0].device.type == "meta":
        return "correct", "a meta (fake) evaluation: shapes only"
    # accepted: must be a valid call and the reference's answer
    sc = s.cpu()
    if op == "topk_threshold":
        if s.dtype != torch.float32 or not 1 <= a["k"] <= s.numel():
            return "accepted an invalid call", ""
        ref = reference.topk_threshold(sc, a["k"])
        ok = (bool(res.isnan()) and bool(ref.isnan())) or float(res) == float(ref)
    elif op == "prune_counts":
        t = a["threshold"]
        if not devs_ok or s.dim() != 2 or s.dtype != torch.float32 or t.numel() != 1 or t.dtype != torch.float32:
            return "accepted an invalid call", ""
        ref = reference.prune_counts(sc, t.cpu().reshape(()))
        ok = torch.equal(res.cpu(), ref)
    else:
        oc = o.cpu()
        sz = (oc[1:] - oc[:-1]) if oc.dim() == 1 and oc.dtype == torch.int64 else None
        valid = (
            devs_ok
            and d.dim() == 2
            and s.shape == d.shape
            and s.dtype == torch.float32
            and sz is not None
            and oc.numel() == d.shape[0] + 1
            and int(oc[0]) == 0
            and bool((sz >= 0).all())
            and bool((sz <= d.shape[1]).all())
        )
        if not valid:
            return "accepted an invalid call", ""
        ref = reference.prune_pack(d.cpu(), sc, oc, bool(case["seed"] % 2))
        ok = res.shape == ref.shape and bool(
            ((res.cpu() == ref) | (res.cpu().isnan() & ref.isnan())).all()
        )  # NaN is data
    return ("correct" if ok else "wrong answer"), ""


def _run_checkpoint(case, torch, pme, device):
    g = torch.Generator().manual_seed(case["seed"])
    V, D = case["V"], case["D"]
    layout = case["layout"]
    opt = [None, pme.optim.RowwiseAdagrad(lr=0.1), pme.optim.Adam(lr=0.1)][case["optimizer"]]

    def make(sizes_seed):
        gg = torch.Generator().manual_seed(sizes_seed)
        if layout == "grouped":
            classes = sorted({max(1, D // 4), max(1, D // 2), D})
            sizes = torch.tensor(classes)[torch.randint(0, len(classes), (V,), generator=gg)]
        else:
            sizes = torch.randint(0, D + 1, (V,), generator=gg)
        o = None if opt is None else type(opt)(lr=0.1)
        return pme.MultiSizeEmbeddingBag(V, D, sizes=sizes, layout=layout, mode="sum", optimizer=o, device=device)

    src, dst = make(case["seed"]), make(case["seed"] + 1)
    x = torch.randint(0, V, (4, 3), generator=g).to(device)
    if opt is not None:
        src(x).sum().backward()
        dst(x).sum().backward()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    key = case["target"]
    if key in sd:
        a = dict(sd)
        _corrupt(a, case, torch)
        if case["how"] == "delete":
            del a[key]
        sd = a
    elif case["how"] == "add":
        sd[key] = torch.zeros(3)
    dst.eval()
    before = {k: v.detach().clone() for k, v in list(dst.named_parameters()) + list(dst.named_buffers())}
    out_before = dst(x)
    try:
        dst.load_state_dict(sd, strict=bool(case["strict"]))
    except (RuntimeError, ValueError, TypeError) as e:
        now = {k: v.detach().clone() for k, v in list(dst.named_parameters()) + list(dst.named_buffers())}
        if now.keys() != before.keys() or any(
            now[k].shape != before[k].shape
            or now[k].dtype != before[k].dtype
            or not torch.equal(now[k].cpu().view(-1).view(torch.uint8), before[k].cpu().view(-1).view(torch.uint8))
            for k in now
        ):
            return "failed load changed the module", str(e)[:200]
        if not torch.equal(dst(x), out_before):
            return "failed load changed the output", ""
        return "raised", str(e)[:200]
    # loaded: the module must be consistent and equal to the reference on its own table
    from pme import ops, reference

    try:
        ops.check_offsets(dst.offsets.cpu(), dst.weight.numel(), D)
        if dst.col_of_size is not None:
            ops.check_col_of_size(dst.col_of_size.cpu(), dst.offsets.cpu(), dst.width)
    except ValueError as e:
        return "loaded an inconsistent table", str(e)[:200]
    xs = torch.randint(0, V, (5, 4), generator=g).to(device)
    out = dst(xs)
    ref = reference.embedding_bag(
        dst.weight.detach().cpu(),
        dst.offsets.cpu(),
        xs.reshape(-1).cpu(),
        torch.arange(0, 21, 4),
        dst.width,
        None if dst.col_of_size is None else dst.col_of_size.cpu(),
        "sum",
    )
    if dst.projection is not None:
        ref = ref @ dst.projection.detach().cpu()
    if not torch.allclose(out.detach().cpu(), ref, rtol=1e-4, atol=1e-5, equal_nan=True):  # NaN values are data
        return "wrong answer after load", ""
    if opt is not None:
        dst.train()
        dst(xs).sum().backward()  # a fused step on the loaded state must not crash
        if not bool(torch.isfinite(dst.weight).all()) and bool(torch.isfinite(sd.get("weight", dst.weight)).all()):
            return "non-finite weight after a step", ""
    return "correct", ""


# --- collections: collection_forward / collection_backward / collection_update_ -------------
_COLL_ARGS = {
    "collection_forward": (
        "weight",
        "offsets",
        "table_rows",
        "features",
        "indices",
        "bag_offsets",
        "psw",
        "B",
        "width",
    ),
    "collection_backward": (
        "grad_out",
        "weight",
        "offsets",
        "table_rows",
        "features",
        "indices",
        "bag_offsets",
        "psw",
        "B",
    ),  # then psw_grad
    "collection_update_": (
        "weight",
        "state1",
        "state2",
        "grad_out",
        "offsets",
        "table_rows",
        "features",
        "indices",
        "bag_offsets",
        "psw",
        "B",
        *_HYPER,
    ),
}
_COLL_SCALARS = {"B", "width", *_HYPER}


def _build_collection(case, torch, pme, device):
    """Valid normal-form arguments of one collection call: 1-3 tables of widths 1-9 and random
    row sizes, each read by one or two of 1-3 keys (a key may be read by two tables)."""
    from pme.collection import EmbeddingBagConfig, MultiSizeEmbeddingBagCollection

    g = torch.Generator().manual_seed(case["seed"])
    T, G, B, L = case["T"], case["G"], case["B"], case["L"]
    weighted = case["psw"]
    tables, sizes = [], {}
    for t in range(T):
        V = int(torch.randint(1, 8, (1,), generator=g))
        D = int(torch.randint(1, 10, (1,), generator=g))
        keys = sorted(
            {f"k{int(k)}" for k in torch.randint(0, G, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g)}
        )
        pool = "sum" if weighted else ["sum", "mean"][int(torch.randint(0, 2, (1,), generator=g))]
        tables.append(EmbeddingBagConfig(V, D, f"t{t}", keys, pool))
        sizes[f"t{t}"] = torch.randint(0, D + 1, (V,), generator=g)
    m = MultiSizeEmbeddingBagCollection(tables, sizes, is_weighted=weighted)
    rows = {}
    for c in tables:
        for k in c.feature_names:
            rows[k] = min(rows.get(k, c.num_embeddings), c.num_embeddings)
    inp = {}
    for k in sorted(rows):
        lens = torch.randint(0, L + 1, (B,), generator=g)
        o = torch.zeros(B + 1, dtype=torch.int64)
        o[1:] = torch.cumsum(lens, 0)
        v = torch.randint(0, rows[k], (int(o[-1]),), generator=g)
        inp[k] = (v, o, torch.rand(v.numel(), generator=g)) if weighted else (v, o)
    keys, idx, bo, psw, B = m._normal_form(inp)
    idt = torch.int32 if case["int32"] else torch.int64
    total, V = m.weight.numel(), m.offsets.numel() - 1
    opt = case["optimizer"]
    a = {
        "weight": torch.randn(total, generator=g),
        "offsets": m.offsets.clone(),
        "table_rows": m.table_rows.clone(),
        "features": m._features(keys).clone(),
        "indices": idx.to(idt),
        "bag_offsets": bo.to(idt),
        "psw": psw,
        "B": B,
        "width": m.out_width,
        "grad_out": torch.randn(B, m.out_width, generator=g),
        "state1": torch.zeros(V) if opt == 1 else torch.rand(total, generator=g) if opt == 2 else torch.empty(0),
        "state2": torch.rand(total, generator=g) if opt == 2 else torch.empty(0),
        "optimizer": opt,
        "lr": 0.1,
        "weight_decay": 0.0,
        "eps": 1e-8,
        "beta1": 0.9,
        "beta2": 0.999,
        "grad_scale": 1.0,
        "step": 1,
    }
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in a.items()}


def _collection_valid(a, op, torch):  # noqa: C901
    """The contract's verdict on a collection call (csrc/collection.h), from the arguments alone."""
    used = [a[k] for k in _COLL_ARGS[op] if k not in _COLL_SCALARS and a[k] is not None]
    if len({t.device for t in used}) != 1:
        return False
    w, off, tr, feats, idx, bo, psw, B = (
        a[k] for k in ("weight", "offsets", "table_rows", "features", "indices", "bag_offsets", "psw", "B")
    )
    W = a["width"] if op == "collection_forward" else (a["grad_out"].shape[1] if a["grad_out"].dim() == 2 else -1)
    if w.dim() != 1 or w.dtype != torch.float32 or off.dim() != 1 or off.dtype != torch.int64 or off.numel() < 1:
        return False
    if tr.dim() != 1 or tr.dtype != torch.int64 or tr.numel() < 1:
        return False
    if feats.dim() != 2 or feats.shape[1] != 5 or feats.dtype != torch.int64:
        return False
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64) or bo.dim() != 1 or bo.dtype != idx.dtype:
        return False
    if not isinstance(B, int) or B < 0 or bo.numel() < 1 or (B > 0 and (bo.numel() - 1) % B):
        return False
    if not isinstance(W, int) or W < 0:
        return False
    G = (bo.numel() - 1) // B if B > 0 else 0
    o, r, f, b = off.tolist(), tr.tolist(), feats.tolist(), bo.tolist()
    V, T, N = len(o) - 1, len(r) - 1, idx.numel()
    if o[0] != 0 or o[-1] != w.numel() or any(o[i + 1] < o[i] for i in range(V)):
        return False
    if r[0] != 0 or r[-1] != V or any(r[t + 1] < r[t] for t in range(T)):
        return False
    for t_, k_, c_, d_, p_ in f:
        if not (0 <= t_ < T and (B == 0 or 0 <= k_ < G) and d_ >= 0 and 0 <= c_ <= W - d_ and p_ in (0, 1)):
            return False
        if psw is not None and p_ != 0:
            return False
    spans = sorted((c_, c_ + d_) for _, _, c_, d_, _ in f if d_ > 0)
    if any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)):
        return False
    widest = max([d_ for *_, d_, _ in f] + [1])
    if any(o[i + 1] - o[i] > widest for i in range(V)):
        return False
    if b[0] != 0 or any(b[i + 1] < b[i] for i in range(len(b) - 1)) or b[-1] > N:
        return False
    if psw is not None and (psw.dim() != 1 or psw.numel() != N or psw.dtype != w.dtype):
        return False
    ix = idx.tolist()
    for t_, k_, _, d_, _ in f:  # every lookup of every block: index in its table, row fits the block
        for j in range(b[k_ * B] if B else 0, b[k_ * B + B] if B else 0):
            if not 0 <= ix[j] < r[t_ + 1] - r[t_] or o[r[t_] + ix[j] + 1] - o[r[t_] + ix[j]] > d_:
                return False
    if op != "collection_forward":
        go = a["grad_out"]
        if go.dim() != 2 or go.shape[0] != B or go.dtype != w.dtype:
            return False
    if op == "collection_update_":
        opt, s1, s2 = a["optimizer"], a["state1"], a["state2"]
        if opt not in (0, 1, 2):
            return False
        for h in (a["lr"], a["eps"], a["weight_decay"]):
            if not (isinstance(h, (int, float)) and h == h and abs(h) != float("inf") and h >= 0):
                return False
        g_s = a["grad_scale"]
        if not (isinstance(g_s, (int, float)) and g_s == g_s and abs(g_s) != float("inf") and g_s > 0):
            return False
        if opt == 1 and (s1.dim() != 1 or s1.numel() != V or s1.dtype != torch.float32):
            return False
        if opt == 2:
            if a["step"] < 1 or not (0 <= a["beta1"] < 1 and 0 <= a["beta2"] < 1):
                return False
            if any(s.dim() != 1 or s.numel() != w.numel() or s.dtype != torch.float32 for s in (s1, s2)):
                return False
        outs = [w] + ([s1] if opt >= 1 else []) + ([s2] if opt == 2 else [])
        if _overlaps(
            outs,
            [a[k] for k in ("grad_out", "offsets", "table_rows", "features", "indices", "bag_offsets", "psw")]
            + [s1, s2],
        ):
            return False
    return True


def _run_collection(case, torch, pme, device):
    from unittest import mock

    from pme import collection

    a = _build_collection(case, torch, pme, device)
    _corrupt(a, case, torch)
    op = case["op"]
    guards = _guard(a, ("weight", "state1", "state2"), case, torch)
    valid = _collection_valid(a, op, torch)
    before = {k: v.clone() for k, v in a.items() if hasattr(v, "clone") and v.device.type != "meta"}

    def call():
        res = getattr(torch.ops.pme, op)(
            *(a[k] for k in _COLL_ARGS[op]), *((False,) if op == "collection_backward" else ())
        )
        return res[0] if op == "collection_backward" else a["weight"] if op == "collection_update_" else res

    verdict, res = _judge(call, a, guards, valid, device, torch)
    if verdict is not None:
        return verdict
    cpu = {k: v.cpu() for k, v in before.items()}
    batch = collection.Batch(*(cpu.get(k) for k in ("table_rows", "features", "indices", "bag_offsets", "psw")), a["B"])
    w = cpu["weight"]
    if op == "collection_forward":
        ref = collection._reference_forward(w, cpu["offsets"], batch, a["width"])
    elif op == "collection_backward":
        wg = w.clone().requires_grad_(True)
        out = collection._reference_forward(wg, cpu["offsets"], batch, cpu["grad_out"].shape[1])
        (ref,) = torch.autograd.grad(out, wg, cpu["grad_out"], allow_unused=True)
        ref = torch.zeros_like(w) if ref is None else ref
    else:
        ref = w.clone()
        s1, s2 = cpu["state1"].clone(), cpu["state2"].clone()
        name = ["sgd", "rowwise_adagrad", "adam"][a["optimizer"]]
        hyper = {k: a[k] for k in ("lr", "weight_decay", "eps")}
        if name == "adam":
            hyper.update(beta1=a["beta1"], beta2=a["beta2"])
        with mock.patch.object(pme.ops, "_compiled", lambda t: False):  # the reference path
            collection.collection_update_(
                ref, s1, s2, cpu["grad_out"], cpu["offsets"], batch, optimizer=name, step=a["step"], **hyper
            )
    ok = torch.allclose(res.detach().cpu().double(), ref.detach().double(), rtol=1e-4, atol=1e-5, equal_nan=True)
    return ("correct" if ok else "wrong answer"), ""


def _worker():
    if json.loads(os.environ.get("PME_FUZZ_DEVICE", '"cpu"')) == "cpu":
        import resource  # a runaway allocation fails with an error instead of waking the OOM killer

        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.RLIM_INFINITY))
    import torch

    import pme

    job = json.loads(sys.stdin.read())
    device = job["device"]
    run = {
        "lookup": _run_lookup,
        "prune": _run_prune,
        "checkpoint": _run_checkpoint,
        "collection": _run_collection,
        "abort": lambda *args: os.abort(),
    }[job["kind"]]
    out = []
    for case in job["cases"]:
        verdict, msg = run(case, torch, pme, device)
        out.append({"case": case, "verdict": verdict, "message": msg})
    print(json.dumps(out))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
    sys.exit(0)


# --------------------------------------------------------------------------------------------
# Test side: hypothesis draws batches of cases; each batch runs in one subprocess
# --------------------------------------------------------------------------------------------
from hypothesis import (  # noqa: E402
    HealthCheck,
    Phase,
    given,
    settings,
    strategies as st,  # noqa: E402
)

from conftest import DEVICES  # noqa: E402

# No shrinking: every example costs a subprocess; the failing batch is printed whole instead.
# Fixed draws by default (a CI run is repeatable); PME_FUZZ_RANDOM=1 draws fresh cases to explore.
_SETTINGS = settings(
    max_examples=int(os.environ.get("PME_FUZZ_BATCHES", "3")),
    deadline=None,
    derandomize=os.environ.get("PME_FUZZ_RANDOM", "0") != "1",
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

_NASTY = [
    -1,
    -2,
    0,
    1,
    2,
    3,
    7,
    8,
    9,
    255,
    2**31 - 1,
    2**31,
    2**32 + 1,
    2**62,
    INT64_MAX - 3,
    INT64_MAX,
    -(2**63),
    -(2**31),
]


def _values():
    return st.one_of(st.sampled_from(_NASTY), st.integers(-100, 100))


def _corruption():
    """How a case corrupts its target: the strategies of ``_corrupt``'s "how", "pos" and "value"."""
    return {
        "how": st.sampled_from(["set", "set", "set", "set", "drop", "grow", "dtype", "meta", "2d", "alias", "none"]),
        "pos": st.integers(0, 2**16),
        "value": _values(),
    }


def _lookup_case():
    return st.fixed_dictionaries(
        {
            "op": st.sampled_from(list(_USED)),
            "seed": st.integers(0, 2**20),
            "V": st.integers(1, 12),
            "D": st.integers(1, 9),
            "B": st.integers(0, 5),
            "L": st.integers(0, 4),
            "layout": st.sampled_from(["padded", "grouped"]),
            "mode": st.integers(0, 2),
            "int32": st.booleans(),
            "psw": st.booleans(),
            "pad": st.integers(-1, 12),
            "optimizer": st.integers(0, 2),
            "target": st.sampled_from(
                [
                    "offsets",
                    "col_of_size",
                    "indices",
                    "bag_offsets",
                    "psw",
                    "weight",
                    "grad_out",
                    "argmax",
                    "width",
                    "mode",
                    "pad",
                    "lr",
                    "step",
                    "beta1",
                    "beta2",
                    "grad_scale",
                    "eps",
                    "weight_decay",
                    "optimizer",
                    "rule",
                    "state1",
                    "state2",
                    "scores",
                ]
            ),
            **_corruption(),
        }
    )


def _run_batch(kind, cases, device):
    payload = json.dumps({"kind": kind, "device": device, "cases": cases})
    env = dict(
        os.environ,
        OMP_NUM_THREADS="2",
        PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PME_FUZZ_DEVICE=json.dumps(device),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker"],
        input=payload,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, (
        f"the worker died (exit status {proc.returncode}): a crash on one of these cases\n"
        f"{json.dumps(cases)[:4000]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = [r for r in results if r["verdict"] not in ("raised", "correct")]
    assert not bad, json.dumps(bad[:3], indent=1)
    return results


def _fuzz(case):
    """A fuzz test's decorators: on every device, hypothesis draws batches of BATCH ``case()`` cases."""

    def wrap(test):
        test = given(cases=st.lists(case(), min_size=BATCH, max_size=BATCH))(test)
        return pytest.mark.parametrize("device", DEVICES)(_SETTINGS(test))

    return wrap


@_fuzz(_lookup_case)
def test_fuzz_lookup_operators(device, cases):
    if device == "cuda":  # meta mixes and aliases are host-side checks: the same on both
        cases = [dict(c) for c in cases]
    _run_batch("lookup", cases, device)


def _prune_case():
    return st.fixed_dictionaries(
        {
            "op": st.sampled_from(["topk_threshold", "prune_counts", "prune_pack"]),
            "seed": st.integers(0, 2**20),
            "V": st.integers(1, 10),
            "D": st.integers(1, 9),
            "target": st.sampled_from(["scores", "dense", "offsets", "k", "threshold"]),
            "how": st.sampled_from(["set", "set", "drop", "grow", "dtype", "meta", "2d", "none"]),
            "pos": st.integers(0, 2**16),
            "value": st.one_of(_values(), st.sampled_from([float("nan"), float("inf")])),
        }
    )


@_fuzz(_prune_case)
def test_fuzz_pruning_operators(device, cases):
    _run_batch("prune", cases, device)


def _checkpoint_case():
    return st.fixed_dictionaries(
        {
            "seed": st.integers(0, 2**20),
            "V": st.integers(1, 10),
            "D": st.integers(1, 9),
            "layout": st.sampled_from(["padded", "grouped"]),
            "optimizer": st.integers(0, 2),
            "strict": st.booleans(),
            "target": st.sampled_from(
                ["offsets", "weight", "col_of_size", "optim_state1", "optim_state2", "optim_step", "extra"]
            ),
            "how": st.sampled_from(["set", "set", "set", "drop", "grow", "dtype", "2d", "delete", "add", "none"]),
            "pos": st.integers(0, 2**16),
            "value": st.one_of(_values(), st.sampled_from([float("nan"), float("inf"), -1.5])),
        }
    )


@_fuzz(_checkpoint_case)
def test_fuzz_checkpoints(device, cases):
    _run_batch("checkpoint", cases, device)


def _collection_case():
    return st.fixed_dictionaries(
        {
            "op": st.sampled_from(list(_COLL_ARGS)),
            "seed": st.integers(0, 2**20),
            "T": st.integers(1, 3),
            "G": st.integers(1, 3),
            "B": st.integers(0, 4),
            "L": st.integers(0, 3),
            "int32": st.booleans(),
            "psw": st.booleans(),
            "optimizer": st.integers(0, 2),
            "target": st.sampled_from(
                [
                    "offsets",
                    "table_rows",
                    "features",
                    "indices",
                    "bag_offsets",
                    "psw",
                    "weight",
                    "grad_out",
                    "B",
                    "width",
                    "state1",
                    "state2",
                    "lr",
                    "optimizer",
                    "step",
                    "beta1",
                ]
            ),
            **_corruption(),
        }
    )


@_fuzz(_collection_case)
def test_fuzz_collection_operators(device, cases):
    _run_batch("collection", cases, device)


def test_fuzz_worker_reports_a_crash():
    """The harness itself: a worker that dies (here by abort(), as heap corruption would) fails."""
    with pytest.raises(AssertionError, match="the worker died"):
        _run_batch("abort", [{}], "cpu")
