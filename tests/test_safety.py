"""Safety (README "Safety"): untrusted checkpoints and bad calls end in a clear error or the right
answer; a failed load leaves the module bitwise as it was; NaN scores have a defined order;
double backward and forward-mode AD of the lookups; include_last_offset; optimizer arguments.

The random fuzzing of every operator argument and of checkpoints, each case in a subprocess so
that a crash fails the test, is in test_fuzz.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import pme
from pme import ops, reference

from conftest import DEVICES, make_table, random_bags

CLEAR = (RuntimeError, ValueError, TypeError, IndexError)


def _state(m):
    """Everything of a module a load could change, copied (bitwise comparison)."""
    tensors = {k: v.detach().clone() for k, v in list(m.named_parameters()) + list(m.named_buffers())}
    return tensors, (m.width, list(m.size_classes))


def _same_state(m, before):
    tensors, attrs = _state(m)
    b_tensors, b_attrs = before
    assert attrs == b_attrs
    assert tensors.keys() == b_tensors.keys()
    for k in tensors:
        a, b = tensors[k], b_tensors[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(
            a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
            b.view(-1).view(torch.uint8) if b.is_floating_point() else b,
        ), k


def _grouped_module(optimizer=None, project=False):
    sizes = torch.tensor([4, 8, 0, 4, 8, 2, 8, 4, 2, 8])
    return pme.MultiSizeEmbeddingBag(
        10, 8, sizes=sizes, layout="grouped", project=project, mode="sum", optimizer=optimizer
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [2**63 - 4, 0, -2, 5, 2**62])
def test_tampered_col_of_size_in_a_checkpoint_is_refused(value, tmp_path):
    a = _grouped_module()
    sd = a.state_dict()
    sd["col_of_size"] = sd["col_of_size"].clone()
    sd["col_of_size"][4] = value
    torch.save(sd, tmp_path / "t.pt")
    b = _grouped_module()
    x = torch.randint(0, 10, (6, 3))
    out_before, before = b(x), _state(b)
    with pytest.raises(RuntimeError, match=r"col_of_size\[4\]"):
        b.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    _same_state(b, before)
    assert torch.equal(b(x), out_before)


def test_checkpoint_col_of_size_of_other_classes_rebuilds_the_layout():
    # a legitimate checkpoint whose size classes (a superset of its sizes) differ from the module's
    sizes = torch.tensor([4, 8, 4, 4])
    a = pme.MultiSizeEmbeddingBag(4, 8, sizes=sizes, layout="grouped", size_classes=[2, 4, 8], mode="sum")
    b = pme.MultiSizeEmbeddingBag(4, 8, sizes=8, layout="grouped", mode="sum")
    b.load_state_dict(a.state_dict())
    assert b.size_classes == [2, 4, 8] and b.width == a.width and torch.equal(b.col_of_size, a.col_of_size)
    x = torch.randint(0, 4, (5, 3))
    assert torch.equal(a(x), b(x))


def _checkpoint_corruptions():
    def offsets_decrease(sd):
        sd["offsets"] = sd["offsets"].clone()
        sd["offsets"][3] = sd["offsets"][2] - 1

    def offsets_too_wide(sd):  # one row larger than the width, the total kept
        off = sd["offsets"].clone()
        off[1] = 9
        sd["offsets"] = off.clamp(min=0)

    def offsets_wrong_end(sd):
        sd["offsets"] = sd["offsets"].clone()
        sd["offsets"][-1] += 1

    def offsets_other_rows(sd):
        sd["offsets"] = torch.cat([sd["offsets"], sd["offsets"][-1:]])

    def offsets_float(sd):
        sd["offsets"] = sd["offsets"].double()

    def weight_short(sd):
        sd["weight"] = sd["weight"][:-1].clone()

    def weight_int(sd):
        sd["weight"] = sd["weight"].long()

    def weight_missing_with_new_sizes(sd):
        sd["offsets"] = torch.arange(0, 81, 8)
        del sd["weight"]

    def other_sizes_bad_state(sd):  # valid other sizes, Adam state of the wrong length
        sd["offsets"] = torch.arange(0, 81, 8)
        sd["weight"] = torch.randn(80)
        sd["optim_state1"] = torch.zeros(5)

    def state_nan(sd):
        sd["optim_state2"] = sd["optim_state2"].clone()
        sd["optim_state2"][0] = float("nan")

    def state_negative(sd):
        sd["optim_state2"] = sd["optim_state2"].clone()
        sd["optim_state2"][0] = -1.0

    def step_float(sd):
        sd["optim_step"] = torch.tensor(2.5)

    def step_negative(sd):
        sd["optim_step"] = torch.tensor(-3)

    def step_cannot_increment(sd):  # the next step would wrap to -2**63
        sd["optim_step"] = torch.tensor(2**63 - 1)

    def projection_shape(sd):  # the default loader's own check, after ours passed: rolled back
        sd["offsets"] = torch.arange(0, 81, 8)
        sd["weight"] = torch.randn(80)
        sd["optim_state1"] = torch.zeros(80)
        sd["optim_state2"] = torch.zeros(80)
        sd["projection"] = torch.zeros(3, 3)

    def missing_key(sd):  # strict: torch raises after visiting every module: rolled back too
        sd["offsets"] = torch.arange(0, 81, 8)
        sd["weight"] = torch.randn(80)
        sd["optim_state1"] = torch.zeros(80)
        sd["optim_state2"] = torch.zeros(80)
        del sd["optim_step"]

    return [
        offsets_decrease,
        offsets_too_wide,
        offsets_wrong_end,
        offsets_other_rows,
        offsets_float,
        weight_short,
        weight_int,
        weight_missing_with_new_sizes,
        other_sizes_bad_state,
        state_nan,
        state_negative,
        step_float,
        step_negative,
        step_cannot_increment,
        projection_shape,
        missing_key,
    ]


@pytest.mark.parametrize("corrupt", _checkpoint_corruptions(), ids=lambda f: f.__name__)
def test_failed_load_leaves_the_module_bitwise_unchanged(corrupt):
    torch.manual_seed(0)
    m = _grouped_module(pme.optim.Adam(lr=0.1), project=True)
    x = torch.randint(0, 10, (4, 3))
    m(x).sum().backward()  # some optimizer state
    src = _grouped_module(pme.optim.Adam(lr=0.1), project=True)
    src(x).sum().backward()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    corrupt(sd)
    m.eval()
    out_before, before = m(x), _state(m)
    with pytest.raises(RuntimeError, match="Error"):
        m.load_state_dict(sd)
    _same_state(m, before)
    assert torch.equal(m(x), out_before)


def test_load_with_other_sizes_and_adam_state_round_trips(tmp_path):
    torch.manual_seed(1)
    a = pme.MultiSizeEmbeddingBag(12, 8, sizes=torch.randint(0, 9, (12,)), mode="sum", optimizer=pme.optim.Adam(lr=0.1))
    x = torch.randint(0, 12, (5, 4))
    a(x).sum().backward()
    torch.save(a.state_dict(), tmp_path / "a.pt")
    b = pme.MultiSizeEmbeddingBag(12, 8, sizes=8, mode="sum", optimizer=pme.optim.Adam(lr=0.1))
    b.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    a(x).sum().backward()
    b(x).sum().backward()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.optim_state2, b.optim_state2)


# --------------------------------------------------------------------------------------------
# Bound checks of the raw operators
# --------------------------------------------------------------------------------------------
def _lookup_calls(w, off, col, width, idx, bo, grad_out, argmax):
    """Every lookup-shaped raw operator on one set of (possibly corrupt) table arguments."""
    acc = ops.acc_dtype(w.dtype)
    dev = w.device
    idx, bo, grad_out, argmax = idx.to(dev), bo.to(dev), grad_out.to(dev), argmax.to(dev)
    no_state = torch.empty(0, dtype=acc, device=dev)  # SGD keeps no optimizer state
    sgd = ops.Hyperparameters("sgd", lr=0.1).operator_args(1)  # optimizer code, lr, ..., grad_scale, step
    return {
        "bag_forward": lambda: torch.ops.pme.bag_forward(w, off, idx, bo, None, col, width, 0, -1),
        "bag_backward": lambda: torch.ops.pme.bag_backward(grad_out, w, off, idx, bo, None, col, argmax, 0, -1, False),
        "embedding_forward": lambda: torch.ops.pme.embedding_forward(w, off, idx, col, width, -1),
        "embedding_backward": lambda: torch.ops.pme.embedding_backward(
            grad_out.new_zeros(idx.numel(), width), w, off, idx, col, -1
        ),
        "sparse_update_": lambda: torch.ops.pme.sparse_update_(
            w.clone(), no_state, no_state.clone(), grad_out, off, idx, bo, None, col, argmax, 0, -1, *sgd
        ),
        "accumulate_scores_": lambda: torch.ops.pme.accumulate_scores_(
            torch.zeros(w.numel(), dtype=acc, device=dev), grad_out, w, off, idx, bo, None, col, argmax, 0, -1, 0
        ),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [2**63 - 4, 2**63 - 1, -(2**63), -2, "one past"])
def test_col_of_size_is_validated_by_every_lookup_operator(device, value):
    w, off, col, width, sizes = make_table(10, 8, layout="grouped", seed=3, device=device)
    col = col.clone()
    s = int(sizes[0])
    col[s] = width - s + 1 if value == "one past" else value
    idx, bo = torch.tensor([0, 0]), torch.tensor([0, 2])
    none = torch.empty(0, 0, dtype=torch.long)
    for _name, call in _lookup_calls(w, off, col, width, idx, bo, torch.zeros(1, width), none).items():
        with pytest.raises(RuntimeError, match=rf"col_of_size\[{s}\]"):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_col_of_size_is_refused_by_every_lookup_operator(device):
    """An empty map is not the padded layout (None is): every row's size would have no slot."""
    w, off, col, width, _ = make_table(10, 8, layout="grouped", seed=3, device=device)
    idx, bo = torch.tensor([0, 0]), torch.tensor([0, 2])
    none = torch.empty(0, 0, dtype=torch.long)
    empty = col[:0]
    for name, call in _lookup_calls(w, off, empty, width, idx, bo, torch.zeros(1, width), none).items():
        with pytest.raises(RuntimeError, match="col_of_size is empty"):
            call()
        assert name  # every operator refused it


@pytest.mark.parametrize("device", DEVICES)
def test_int32_offsets_are_refused_by_name_by_every_lookup_operator(device):
    w, off, _, width, _ = make_table(10, 8, seed=3, device=device)
    idx, bo = torch.tensor([0, 9]), torch.tensor([0, 2])
    none = torch.empty(0, 0, dtype=torch.long)
    calls = _lookup_calls(w, off.int(), None, width, idx, bo, torch.zeros(1, width), none)
    for _name, call in calls.items():
        with pytest.raises(RuntimeError, match="offsets must be int64, got int32"):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_an_output_too_large_to_allocate_is_a_clear_error(device):
    w, off, _, _, _ = make_table(10, 8, seed=3, device=device)
    idx, bo = torch.tensor([0, 9], device=device), torch.tensor([0, 2], device=device)
    with pytest.raises(
        RuntimeError, match=r"cannot allocate the output \[bags, out_width\] = \[1, 1099511627776\]"
    ) as e:
        torch.ops.pme.bag_forward(w, off, idx, bo, None, None, 2**40, 0, -1)
    assert ".h, line" not in str(e.value) and "dispatcher" not in str(e.value)  # no C++ call site
    with pytest.raises(RuntimeError, match="more elements than a tensor can hold"):
        torch.ops.pme.embedding_forward(w, off, idx, None, 2**62, -1)
    assert torch.ops.pme.bag_forward(w, off, idx, bo, None, None, 8, 0, -1)[0].shape == (1, 8)  # still usable


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_empty_offsets_give_no_bags_as_nn_embedding_bag(mode):
    """1-D input with no bag starts: zero bags ([0, D]) as nn.EmbeddingBag, indices still checked."""
    w, sizes = torch.randn(6, 4), torch.tensor([4, 1, 0, 3, 2, 4])
    m = pme.MultiSizeEmbeddingBag.from_dense(w, sizes, mode=mode)
    idx, empty = torch.tensor([0, 5, 5]), torch.zeros(0, dtype=torch.int64)
    want = F.embedding_bag(idx, m.to_dense(), empty, mode=mode) if mode != "max" else torch.zeros(0, 4)
    got = m(idx, empty)
    assert got.shape == want.shape == (0, 4)
    with pytest.raises(IndexError, match="indices\\[1\\] = 6"):
        m(torch.tensor([0, 6]), empty)


@pytest.mark.parametrize("device", DEVICES)
def test_decreasing_offsets_are_refused_even_for_rows_not_looked_up(device):
    w = torch.randn(10, device=device)
    off = torch.tensor([0, 6, 2, 10], device=device)  # rows 0 and 2 overlap; only they are looked up
    idx, bo = torch.tensor([0, 2], device=device), torch.tensor([0, 2], device=device)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.embedding_bag(w, off, idx, bo[:1], width=8, mode="sum")
    for _name, call in _lookup_calls(
        w, off, None, 8, idx, bo, torch.zeros(1, 8), torch.empty(0, 0, dtype=torch.long)
    ).items():
        with pytest.raises(RuntimeError, match="non-decreasing"):
            call()


@pytest.mark.parametrize("device", DEVICES[1:])
def test_cuda_validate_off_skips_bad_lookups_without_reading_out_of_bounds(device, monkeypatch):
    """PME_CUDA_VALIDATE=0 gives up the errors, never the bounds: a huge col_of_size entry or
    a decreasing offset table does not fault the device (rows that would read outside the
    buffer or the width are skipped); the process stays usable."""
    w, off, col, width, sizes = make_table(10, 8, layout="grouped", seed=3, device=device)
    col = col.clone()
    col[int(sizes[0])] = 2**63 - 4
    monkeypatch.setenv("PME_CUDA_VALIDATE", "0")
    idx, bo = torch.tensor([0, 1, 2, 0], device=device), torch.tensor([0, 4], device=device)
    for call in _lookup_calls(
        w, off, col, width, idx, bo, torch.zeros(1, width), torch.empty(0, 0, dtype=torch.long)
    ).values():
        call()
    torch.cuda.synchronize()  # no sticky device error
    monkeypatch.setenv("PME_CUDA_VALIDATE", "1")
    with pytest.raises(RuntimeError, match="col_of_size"):
        torch.ops.pme.bag_forward(w, off, idx, bo, None, col, width, 0, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_offsets_that_wrap_are_refused(device):
    # sizes whose sums wrap around int64: each row looks small, the total is consistent
    big = 2**62
    off = torch.tensor([0, big, 2 * big - 1, 4], device=device)  # 2 * big - 1 fits; the last diff wraps
    w = torch.randn(4, device=device)
    with pytest.raises(RuntimeError):
        ops.embedding_bag(w, off, torch.tensor([2], device=device), torch.tensor([0], device=device), width=8)


def test_meta_and_real_tensors_mixed_raise():
    w, off, col, width, _ = make_table(6, 4, seed=1)
    idx, bo = torch.tensor([0, 1]), torch.tensor([0, 2])

    def meta(t):
        return t.to("meta")

    calls = {
        "bag_forward": lambda: torch.ops.pme.bag_forward(w, off, meta(idx), bo, None, None, width, 0, -1),
        "embedding_forward": lambda: torch.ops.pme.embedding_forward(meta(w), off, idx, None, width, -1),
        "bag_backward": lambda: torch.ops.pme.bag_backward(
            torch.zeros(1, width), w, meta(off), idx, bo, None, None, torch.empty(0, 0, dtype=torch.long), 0, -1, False
        ),
        "prune_counts": lambda: torch.ops.pme.prune_counts(torch.zeros(3, 4), meta(torch.tensor(0.5))),
        "prune_pack": lambda: torch.ops.pme.prune_pack(
            torch.zeros(3, 4), meta(torch.zeros(3, 4)), torch.tensor([0, 1, 2, 3]), False
        ),
    }
    for _name, call in calls.items():
        with pytest.raises(RuntimeError, match="one device"):
            call()


def test_in_place_arguments_that_alias_raise():
    buf = torch.zeros(12, dtype=torch.int64)
    buf[:4] = torch.tensor([0, 2, 4, 6])
    off = buf[:4]
    w = buf.view(torch.float64)[4:10]  # does not overlap offsets: fine
    none = torch.empty(0, dtype=torch.float64)
    am = torch.empty(0, 0, dtype=torch.long)
    args = (torch.ones(1, 2, dtype=torch.float64), off, torch.tensor([0]), torch.tensor([0, 1]), None, None, am, 0, -1)
    torch.ops.pme.sparse_update_(w, none, none, *args, 0, 0.1, 0.0, 1e-8, 0.9, 0.999, 1.0, 1)
    w_bad = buf.view(torch.float64)[:6]  # the weight is the offsets' memory
    with pytest.raises(RuntimeError, match="weight is updated in place and must not share memory with offsets"):
        torch.ops.pme.sparse_update_(w_bad, none, none, *args, 0, 0.1, 0.0, 1e-8, 0.9, 0.999, 1.0, 1)
    wa = torch.zeros(6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must not share memory"):  # Adam moments aliasing the weight
        torch.ops.pme.sparse_update_(
            wa, wa, torch.zeros(6, dtype=torch.float64), *args, 2, 0.1, 0.0, 1e-8, 0.9, 0.999, 1.0, 1
        )
    with pytest.raises(RuntimeError, match="scores is updated in place"):
        torch.ops.pme.accumulate_scores_(wa, args[0], wa, *args[1:], 0)


# --------------------------------------------------------------------------------------------
# NaN scores
# --------------------------------------------------------------------------------------------
def _signed_nan(neg):
    x = torch.tensor([float("nan")])
    return (-x.abs() if neg else x.abs())[0]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from(["nan", "-nan", "inf", "-inf", "0", "-0", "1", "-1", "2.5", "1e-40"]), min_size=1, max_size=24
    ),
    st.integers(1, 6),
    st.data(),
)
def test_nan_scores_rank_below_every_number(device, tokens, D, data):
    vals = [float(t) if "nan" not in t else float(_signed_nan(t.startswith("-"))) for t in tokens]
    V = max(1, len(vals) // D)
    vals = (vals * (V * D // len(vals) + 1))[: V * D]
    scores = torch.tensor(vals, dtype=torch.float32).view(V, D).to(device)
    k = data.draw(st.integers(1, V * D))
    t = ops.topk_threshold(scores, k)
    t_ref = reference.topk_threshold(scores.cpu(), k)
    assert (bool(t.isnan()) and bool(t_ref.isnan())) or float(t) == float(t_ref)
    n_num = int((~scores.isnan()).sum())
    assert bool(t.isnan()) == (k > n_num)  # the k-th largest is a NaN only when fewer than k numbers
    counts = ops.prune_counts(scores, t)
    assert torch.equal(counts.cpu(), reference.prune_counts(scores.cpu(), t.cpu()))
    assert int(counts.sum()) >= k
    sizes = data.draw(st.lists(st.integers(0, D), min_size=V, max_size=V))
    dense = torch.arange(V * D, dtype=torch.float32, device=device).view(V, D)
    for order in ("score", "position"):
        packed, offsets = ops.prune_pack(dense, scores, sizes, order)
        ref = reference.prune_pack(dense.cpu(), scores.cpu(), offsets.cpu(), order == "score")
        assert torch.equal(packed.cpu(), ref)
    # a NaN is never kept while a number of its row is dropped
    packed, offsets = ops.prune_pack(dense, scores, sizes, "position")
    for r in range(V):
        kept = set(packed[int(offsets[r]) : int(offsets[r + 1])].long().tolist())
        row = scores[r].cpu()
        for c in range(D):
            if r * D + c in kept and bool(row[c].isnan()):
                assert all(r * D + cc in kept for cc in range(D) if not bool(row[cc].isnan()))


# --------------------------------------------------------------------------------------------
# include_last_offset
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("pad", [None, 1])
def test_include_last_offset_matches_nn_embedding_bag_or_raises(mode, pad):
    torch.manual_seed(0)
    V, D = 9, 4
    dense = torch.randn(V, D)
    m = pme.MultiSizeEmbeddingBag.from_dense(dense, D, mode=mode, include_last_offset=True, padding_idx=pad)
    ref = torch.nn.EmbeddingBag.from_pretrained(dense, mode=mode, include_last_offset=True, padding_idx=pad)
    inp = torch.tensor([1, 2, 3, 4, 5, 6, 1])
    full = torch.tensor([0, 2, 2, 7])
    torch.testing.assert_close(m(inp, full), ref(inp, full))
    short = torch.tensor([0, 2, 4])  # offsets[-1] < len(input): torch disagrees with itself
    with pytest.raises(ValueError, match=r"include_last_offset=True: offsets\[-1\] = 4 must equal"):
        m(inp, short)
    with pytest.raises(ValueError, match="include_last_offset"):
        ops.embedding_bag(m.weight, m.offsets, inp, short, width=D, mode=mode, include_last_offset=True)


def test_torch_include_last_offset_short_is_inconsistent():
    """Why pme raises: nn.EmbeddingBag ends the last bag at offsets[-1] for sum but runs it to the
    end of the input for max (and divides a mean by the long bag's count). If torch ever becomes
    consistent, this test fails and the rule can be revisited."""
    w = torch.randn(8, 3)
    inp, off = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([0, 2, 4])
    s = F.embedding_bag(inp, w, off, mode="sum", include_last_offset=True)
    mx = F.embedding_bag(inp, w, off, mode="max", include_last_offset=True)
    torch.testing.assert_close(s[1], w[[3, 4]].sum(0))
    torch.testing.assert_close(mx[1], w[[3, 4, 5, 6]].max(0).values)


# --------------------------------------------------------------------------------------------
# Optimizer arguments and the fused path's per_sample_weights gradient
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=math.inf),
        dict(lr=math.nan),
        dict(lr=-1.0),
        dict(lr=0.1, weight_decay=math.inf),
        dict(lr=0.1, eps=math.nan),
        dict(lr=0.1, grad_scale=0.0),
        dict(lr=0.1, grad_scale=math.inf),
        dict(lr=0.1, grad_scale=-2.0),
        dict(lr=0.1, grad_scale=math.nan),
        dict(lr="0.1"),
    ],
)
def test_optimizer_arguments_are_validated(kwargs):
    with pytest.raises((ValueError, TypeError)):
        pme.optim.FusedOptimizer(**kwargs)


def test_grad_scale_set_later_is_validated_and_raw_op_refuses_inf_lr():
    opt = pme.optim.SGD(lr=0.1)
    m = pme.MultiSizeEmbeddingBag(5, 4, mode="sum", optimizer=opt)
    w0 = m.weight.detach().clone()
    opt.grad_scale = 0.0
    with pytest.raises(ValueError, match="grad_scale"):
        m(torch.tensor([[1, 2]])).sum().backward()
    assert torch.equal(m.weight, w0) and int(m.optim_step) == 0
    lookup = (torch.ones(1, 4), m.offsets, torch.tensor([1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lr must be >= 0 and finite"):
        ops.sparse_update_(m.weight.detach(), m.optim_state1, m.optim_state2, *lookup, mode="sum", lr=math.inf)
    if ops.backend() == "compiled":  # the operator checks it too
        with pytest.raises(RuntimeError, match="finite"):
            no_argmax = torch.empty(0, 0, dtype=torch.int64)
            head = (m.weight.detach(), m.optim_state1, m.optim_state2, *lookup, None, None, no_argmax, 0, -1)
            torch.ops.pme.sparse_update_(*head, 0, math.inf, 0.0, 1e-8, 0.9, 0.999, 1.0, 1)


@pytest.mark.parametrize("pad", [None, 2])
@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_fused_path_computes_the_per_sample_weights_gradient(pad, layout):
    torch.manual_seed(3)
    w, off, col, width, sizes = make_table(12, 8, layout=layout, seed=4)
    m = pme.MultiSizeEmbeddingBag(
        12,
        8,
        sizes=sizes,
        mode="sum",
        padding_idx=pad,
        layout=layout,
        optimizer=pme.optim.RowwiseAdagrad(lr=0.1),
        _weight=w.clone(),
    )
    idx, bo = random_bags(12, 6, 5, torch.Generator().manual_seed(5), padding_idx=pad)
    psw = torch.rand(idx.numel(), requires_grad=True)
    g = torch.randn(6, m.width)
    m(idx, bo, psw).backward(g)
    psw_ref = psw.detach().clone().requires_grad_()
    ops.embedding_bag(
        w, off, idx, bo, width=width, col_of_size=col, mode="sum", per_sample_weights=psw_ref, padding_idx=pad
    ).backward(g)
    torch.testing.assert_close(psw.grad, psw_ref.grad)


# --------------------------------------------------------------------------------------------
# Double backward and forward-mode AD
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["padded", "grouped"])
@pytest.mark.parametrize("pad", [None, 3])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_bag_double_backward_and_jvp(mode, layout, pad, index_dtype):
    w, off, col, width, _ = make_table(14, 6, torch.float64, layout=layout, seed=7)
    idx, bo = random_bags(14, 5, 6, torch.Generator().manual_seed(8), index_dtype, padding_idx=pad)

    def f(w):
        return ops.embedding_bag(w, off, idx, bo, width=width, col_of_size=col, mode=mode, padding_idx=pad)

    w = w.requires_grad_()
    assert torch.autograd.gradgradcheck(f, (w,))

    # forward mode against the Jacobian of F.embedding_bag on the dense view (torch's own
    # embedding_bag has no forward-mode formula)
    def dense_f(w):
        return F.embedding_bag(
            idx.long(), reference.to_dense(w, off, width, col), bo.long(), mode=mode, padding_idx=pad
        )

    t = torch.randn_like(w)
    out, tangent = torch.func.jvp(f, (w.detach(),), (t,))
    J = torch.autograd.functional.jacobian(dense_f, w.detach())
    torch.testing.assert_close(out, dense_f(w.detach()))
    torch.testing.assert_close(tangent, (J.reshape(-1, w.numel()) @ t).reshape(out.shape))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        y = f(fwAD.make_dual(w.detach(), t))
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, tangent)


def test_bag_double_backward_with_per_sample_weights():
    w, off, col, width, _ = make_table(10, 5, torch.float64, seed=9)
    idx, bo = random_bags(10, 4, 5, torch.Generator().manual_seed(2))
    psw = torch.rand(idx.numel(), dtype=torch.float64, requires_grad=True)

    def f(w, p):
        return ops.embedding_bag(w, off, idx, bo, width=width, mode="sum", per_sample_weights=p)

    assert torch.autograd.gradgradcheck(f, (w.requires_grad_(), psw))
    tw, tp = torch.randn_like(w), torch.randn_like(psw)
    _, tangent = torch.func.jvp(f, (w.detach(), psw.detach()), (tw, tp))
    torch.testing.assert_close(tangent, f(tw, psw.detach()) + f(w.detach(), tp))  # bilinear


@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_eager_lookups_with_grad_take_the_light_autograd_function(layout):
    """Eager calls that want a gradient go through _BagLookupEager / _EmbeddingLookupEager, not
    torch.library's autograd wrapper (about 100 us a call, benchmarks/bench_overhead.py), and their
    gradients equal those of the operator's registered formula, bit for bit."""
    w, off, col, width, _ = make_table(12, 6, torch.float64, layout=layout, seed=5)
    idx, bo = random_bags(12, 5, 5, torch.Generator().manual_seed(3), padding_idx=2)
    psw = torch.rand(idx.numel(), dtype=torch.float64, requires_grad=True)
    w = w.requires_grad_()
    out = ops.embedding_bag(
        w, off, idx, bo, width=width, col_of_size=col, mode="sum", per_sample_weights=psw, padding_idx=2
    )
    assert type(out.grad_fn).__name__ == "_BagLookupEagerBackward"
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (w, psw), g)
    full = torch.cat([bo, bo.new_full((1,), idx.numel())])
    raw = torch.ops.pme.bag_forward(w, off, idx, full, psw, col, width, ops.MODES["sum"], 2)[0]
    assert type(raw.grad_fn).__name__ != "_BagLookupEagerBackward"
    want = torch.autograd.grad(raw, (w, psw), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        assert ops.embedding_bag(w, off, idx, bo, width=width, col_of_size=col).grad_fn is None
    e = ops.embedding(w, off, idx[:7], width=width, col_of_size=col, padding_idx=2)
    assert type(e.grad_fn.next_functions[0][0]).__name__ == "_EmbeddingLookupEagerBackward"  # under a view
    ge = torch.randn_like(e)
    raw_e = torch.ops.pme.embedding_forward(w, off, idx[:7], col, width, 2)
    torch.testing.assert_close(torch.autograd.grad(e, w, ge)[0], torch.autograd.grad(raw_e, w, ge)[0], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["no_grad", "grad", "forward_ad"])
def test_bad_index_is_an_index_error_on_every_path(path):
    """An index past the table raises pme's IndexOutOfRangeError (an IndexError, as nn.Embedding's)
    naming its position, whichever route the call takes: no gradient, an eager graded call
    (_BagLookupEager / _EmbeddingLookupEager), or forward AD (_BagLookup / _EmbeddingLookup)."""
    import torch.autograd.forward_ad as fwAD

    w, off, col, width, _ = make_table(10, 4, torch.float64, seed=1)
    idx = torch.tensor([1, 2, 10, 3])
    bo = torch.tensor([0, 2])
    calls = {
        "bag": lambda w: ops.embedding_bag(w, off, idx, bo, width=width, mode="sum"),
        "embedding": lambda w: ops.embedding(w, off, idx, width=width),
    }
    for name, call in calls.items():
        with pytest.raises(ops.IndexOutOfRangeError, match=r"indices\[2\] = 10"):
            if path == "no_grad":
                with torch.no_grad():
                    call(w)
            elif path == "grad":
                call(w.clone().requires_grad_())
            else:
                with fwAD.dual_level():
                    call(fwAD.make_dual(w, torch.ones_like(w)))
        assert issubclass(ops.IndexOutOfRangeError, IndexError), name
    assert ops.embedding_bag(w, off, idx[:2], bo[:1], width=width).shape == (1, width)  # still usable


@pytest.mark.parametrize("pad", [None, 2])
@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_embedding_double_backward_and_jvp(pad, layout):
    w, off, col, width, _ = make_table(9, 6, torch.float64, layout=layout, seed=11)
    idx = torch.tensor([[0, 2, 8], [2, 5, 5]])

    def f(w):
        return ops.embedding(w, off, idx, width=width, col_of_size=col, padding_idx=pad)

    assert torch.autograd.gradgradcheck(f, (w.requires_grad_(),))
    t = torch.randn_like(w)

    def dense_f(w):
        return F.embedding(idx, reference.to_dense(w, off, width, col), padding_idx=pad)

    out, tangent = torch.func.jvp(f, (w.detach(),), (t,))
    out_ref, tangent_ref = torch.func.jvp(dense_f, (w.detach(),), (t,))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(tangent, tangent_ref)


@pytest.mark.filterwarnings("error:There is a performance drop")  # torch's generic batching fallback
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "embedding"])
@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_torch_func_transforms(mode, layout):
    """torch.func's grad, vjp, jacrev, vmap, per-sample gradients (vmap of grad), grad of grad and
    hessian (forward over reverse) over a lookup equal torch.autograd on the same function, and
    the lookup's Jacobian equals that of F.embedding_bag / F.embedding on the dense view (the
    backward operators inside a transform go through Functions with setup_context; vmap calls
    the lookup once per batch element)."""
    from torch.func import grad, jacrev, vjp, vmap

    w, off, col, width, _ = make_table(11, 6, torch.float64, layout=layout, seed=4)
    idx, bo = random_bags(11, 4, 5, torch.Generator().manual_seed(6), torch.int32, padding_idx=3)
    pad = 3 if mode != "max" else None
    w0 = w.detach()

    def f(w, p=None):
        if mode == "embedding":
            return ops.embedding(w, off, idx, width=width, col_of_size=col, padding_idx=pad)
        kw = {"per_sample_weights": p} if p is not None else {}
        return ops.embedding_bag(w, off, idx, bo, width=width, col_of_size=col, mode=mode, padding_idx=pad, **kw)

    def dense_f(w):
        dense = reference.to_dense(w, off, width, col)
        if mode == "embedding":
            return F.embedding(idx.long(), dense, padding_idx=pad)
        return F.embedding_bag(idx.long(), dense, bo.long(), mode=mode, padding_idx=pad)

    g_out = torch.randn_like(f(w0))

    def loss(w):
        return (f(w) * g_out).sum() + (f(w) ** 2).sum()

    wr = w0.clone().requires_grad_()
    want = torch.autograd.grad(loss(wr), wr)[0]
    torch.testing.assert_close(grad(loss)(w0), want)
    out, pull = vjp(f, w0)
    torch.testing.assert_close(out, f(w0))
    torch.testing.assert_close(pull(g_out)[0], torch.autograd.grad(f(wr), wr, g_out)[0])
    J = jacrev(f)(w0)
    torch.testing.assert_close(J, torch.autograd.functional.jacobian(dense_f, w0))
    tangents = torch.randn(3, w0.numel(), dtype=w0.dtype)
    torch.testing.assert_close(vmap(f)(w0 + tangents), torch.stack([f(w0 + t) for t in tangents]))
    hess = torch.autograd.functional.hessian(loss, w0)
    torch.testing.assert_close(jacrev(grad(loss))(w0), hess)
    torch.testing.assert_close(torch.func.hessian(loss)(w0), hess)  # forward over reverse

    # per-sample gradients: one gradient per bag (vmap over the bags, grad over the table)
    rows = torch.randint(0, 11, (5, 3), generator=torch.Generator().manual_seed(1))

    def per_bag(w, r):
        if mode == "embedding":
            return (ops.embedding(w, off, r, width=width, col_of_size=col) ** 2).sum()
        return (ops.embedding_bag(w, off, r.unsqueeze(0), width=width, col_of_size=col, mode=mode) ** 2).sum()

    got = vmap(grad(per_bag), in_dims=(None, 0))(w0, rows)
    for r, g in zip(rows, got):
        wr = w0.clone().requires_grad_()
        torch.testing.assert_close(g, torch.autograd.grad(per_bag(wr, r), wr)[0])
    if mode == "sum":  # per_sample_weights: both gradients, and the weights' gradient of the weights' gradient
        p0 = torch.rand(idx.numel(), dtype=w0.dtype)

        def loss_p(w, p):
            return (f(w, p) ** 2).sum()

        wr, pr = w0.clone().requires_grad_(), p0.clone().requires_grad_()
        for a, b in zip(grad(loss_p, argnums=(0, 1))(w0, p0), torch.autograd.grad(loss_p(wr, pr), (wr, pr))):
            torch.testing.assert_close(a, b)
        hp = torch.autograd.functional.hessian(lambda p: loss_p(w0, p), p0)
        torch.testing.assert_close(jacrev(grad(loss_p, argnums=1), argnums=1)(w0, p0), hp)
        torch.testing.assert_close(torch.func.hessian(lambda p: loss_p(w0, p))(p0), hp)
        hw = torch.autograd.functional.hessian(lambda w: loss_p(w, p0), w0)
        torch.testing.assert_close(torch.func.hessian(lambda w: loss_p(w, p0))(w0), hw)


def test_to_dense_checks_the_table_whole():
    w, off, col, width, sizes = make_table(10, 8, layout="grouped", seed=3)
    bad = col.clone()
    bad[int(sizes[0])] = 2**63 - 4
    with pytest.raises(ValueError, match=r"col_of_size\[\d+\]"):
        ops.to_dense(w, off, width, bad)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.to_dense(torch.randn(10), torch.tensor([0, 6, 2, 10]), 8)
    torch.testing.assert_close(ops.to_dense(w, off, width, col), reference.to_dense(w, off, width, col))


def test_reference_fallback_checks_the_table_too(monkeypatch):
    """Without the compiled extension the same calls raise (the pure-PyTorch fallback)."""
    monkeypatch.setattr(ops, "_compiled", lambda t: False)
    w, off, col, width, sizes = make_table(10, 8, layout="grouped", seed=3)
    bad = col.clone()
    bad[int(sizes[0])] = 2**63 - 4
    idx, bo = torch.tensor([0, 1]), torch.tensor([0, 2])
    g = torch.ones(1, width)
    with pytest.raises(ValueError, match="col_of_size"):
        ops.embedding_bag(w, off, idx, bo[:1], width=width, col_of_size=bad, mode="sum")
    with pytest.raises(ValueError, match="col_of_size"):
        ops.sparse_update_(w.clone(), torch.empty(0), torch.empty(0), g, off, idx, bo, col_of_size=bad, mode="sum")
    with pytest.raises(ValueError, match="col_of_size"):
        ops.accumulate_scores_(torch.zeros(w.numel()), g, w, off, idx, bo, col_of_size=bad, mode="sum")
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.sparse_update_(
            torch.randn(10),
            torch.empty(0),
            torch.empty(0),
            torch.ones(1, 8),
            torch.tensor([0, 6, 2, 10]),
            idx,
            bo,
            mode="sum",
        )
    # and a valid call still matches the compiled kernels
    w1, w2 = w.clone(), w.clone()
    ops.sparse_update_(w1, torch.empty(0), torch.empty(0), g, off, idx, bo, col_of_size=col, mode="sum")
    monkeypatch.undo()
    ops.sparse_update_(w2, torch.empty(0), torch.empty(0), g, off, idx, bo, col_of_size=col, mode="sum")
    torch.testing.assert_close(w1, w2)


def test_api_mistakes_get_errors_that_say_what_to_do():
    """Mistakes a torch user makes with pme's API: each a clear error naming the fix, instead of a
    silently wrong table (sizes in freeze's place, 2-D sizes, a third beta) or an unrelated error
    later (attach() to an nn table, parameters or a torch optimizer given to pme.optim)."""
    import subprocess
    import sys

    with pytest.raises(TypeError, match=r"attach\(\) takes a pme table or collection.*got EmbeddingBag"):
        pme.optim.Adam(lr=0.1).attach(torch.nn.EmbeddingBag(5, 4))
    with pytest.raises(TypeError, match="freeze must be a bool, got list.*sizes is keyword-only"):
        pme.MultiSizeEmbeddingBag.from_pretrained(torch.randn(3, 4), [1, 2, 3])
    with pytest.raises(ValueError, match=r"sizes must be 1-D with 10 entries, got shape \(2, 5\)"):
        pme.MultiSizeEmbeddingBag(10, 4, sizes=torch.full((2, 5), 2))
    with pytest.raises(TypeError, match="sizes must be an int, a sequence of ints or a tensor, got a str"):
        pme.MultiSizeEmbeddingBag(10, 4, sizes="4")
    with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\), got 3 values"):
        pme.optim.Adam(betas=(0.9, 0.99, 0.9))
    with pytest.raises(TypeError, match="SGD takes no parameters"):
        pme.optim.SGD(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(TypeError, match="optimizer must be a pme.optim optimizer"):
        pme.MultiSizeEmbeddingBag(10, 4, optimizer=torch.optim.SGD)
    run = subprocess.run(
        [sys.executable, "-m", "pme", "bench", "--quick", "--dim", "12", "--no-save"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "argument --dim: must be a positive multiple of 8" in run.stderr
