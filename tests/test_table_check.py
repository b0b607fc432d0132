"""The whole-table check runs once per version of a table (README "Safety").

Every operator that reads a table can check all of its offsets (O(V)); pme.ops remembers that a
table passed and tells the operator (``table_checked=True``) while the offsets tensor, its
version counter, the buffer's length, col_of_size and the width are unchanged. These tests pin
both sides: a change the version counter sees brings the check back, and an unchanged table
really skips it (the per-lookup bound checks still run on every call).
"""

import gc

import pytest
import torch
import torch.nn.functional as F

import pme
from pme import collection, ops

from conftest import DEVICES, make_table

pytestmark = pytest.mark.skipif(ops.backend() != "compiled", reason="the memo feeds the compiled operators")


def _bag(device):
    return torch.tensor([0, 2], device=device), torch.tensor([0], device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_an_in_place_change_after_a_passed_call_is_checked_again(device):
    w, off, col, width, _ = make_table(12, 8, seed=1, device=device)
    idx, bo = _bag(device)
    ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")  # passes, remembered
    assert ops._TABLES_PASSED[id(off)][0]() is off
    with torch.no_grad():
        off[6] = off[5] - 1  # rows 5 and 6 overlap; neither is looked up; the version moves
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.embedding(w, off, idx, width=width)


@pytest.mark.parametrize("device", DEVICES)
def test_a_smaller_width_or_another_buffer_length_is_checked_again(device):
    w, off, col, width, sizes = make_table(12, 8, seed=2, device=device)
    idx, bo = _bag(device)
    ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")
    narrow = int(sizes.max()) - 1  # some row (maybe not looked up) no longer fits
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.embedding_bag(w, off, idx, bo, width=narrow, mode="sum")
    with pytest.raises(RuntimeError, match="stored entries"):
        ops.embedding_bag(torch.cat([w, w[:1]]), off, idx, bo, width=width, mode="sum")


@pytest.mark.parametrize("device", DEVICES)
def test_an_unchanged_table_skips_the_scan_but_not_the_lookup_checks(device):
    """A write through ``.data`` bypasses the version counter (documented): the scan is skipped,
    so a decreasing pair of rows that no lookup touches goes unseen, while a looked-up row that
    overruns the buffer is still refused (no access out of bounds)."""
    w, off, col, width, _ = make_table(12, 8, seed=3, device=device)
    idx, bo = _bag(device)
    ref = ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")
    off.data[6] = off[5] - 1  # unseen by the version counter
    torch.testing.assert_close(ops.embedding_bag(w, off, idx, bo, width=width, mode="sum"), ref)
    off.data[3] = w.numel() + 5  # row 2 (looked up) now overruns the buffer
    with pytest.raises(RuntimeError, match=f"row 2 .*: it overruns the {w.numel()} stored entries"):
        ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")
    off.data[3] = int(off[2]) - 1  # row 2 of negative size: the message says which check failed
    with pytest.raises(RuntimeError, match="row 2 .*: its size -1 is negative"):
        ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")
    off.data[3] = w.numel() + 5
    with pytest.raises(RuntimeError, match="does not fit"):  # a fresh tensor of the same values: checked
        ops.embedding_bag(w, off.clone(), idx, bo, width=width, mode="sum")


def test_the_memo_forgets_a_table_that_is_gone():
    w, off, col, width, _ = make_table(12, 8, seed=4)
    idx, bo = _bag("cpu")
    ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")
    key = id(off)
    assert key in ops._TABLES_PASSED
    del off
    gc.collect()
    assert key not in ops._TABLES_PASSED


def test_inference_tensors_are_checked_every_call():
    with torch.inference_mode():
        w, off, col, width, _ = make_table(12, 8, seed=5)
        idx, bo = _bag("cpu")
        ops.embedding_bag(w, off, idx, bo, width=width, mode="sum")
        assert id(off) not in ops._TABLES_PASSED
        off2 = off.clone()
        off2[6] = off2[5] - 1
        with pytest.raises(RuntimeError, match="non-decreasing"):
            ops.embedding_bag(w, off2, idx, bo, width=width, mode="sum")


def test_a_module_built_in_inference_mode_trusts_its_table_and_pme_ops_does_not():
    """Inference tensors have no version counter, so no memo: a module's own table (built valid,
    or loaded through its checked load_state_dict) skips the scan, as in a traced graph; a table
    handed to pme.ops is scanned on every call; a looked-up row's span is checked either way."""
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(1, 9, (12,), generator=gen)
    with torch.inference_mode():
        m = pme.MultiSizeEmbeddingBag(12, 8, sizes=sizes, mode="sum")
        tables = [collection.EmbeddingBagConfig(12, 8, "a", ["fa"])]
        coll = collection.MultiSizeEmbeddingBagCollection(tables, {"a": sizes})
        coll.weight.copy_(m.weight)  # the same sizes: the same layout
        loaded = pme.MultiSizeEmbeddingBag(12, 8, sizes=sizes.flip(0), mode="sum")
        loaded.load_state_dict(m.state_dict())  # new sizes, through the checked load
        m = loaded
        assert m.offsets.is_inference() and coll.offsets.is_inference() and torch.equal(m.sizes, sizes)
        idx, bo = _bag("cpu")  # rows 0 and 2
        ref = F.embedding_bag(idx, m.to_dense(), bo, mode="sum")
        for t in (m, coll):
            t.offsets[6] = t.offsets[5] - 1  # rows 5 and 6 overlap; no lookup reads them: only a scan sees it
        torch.testing.assert_close(m(idx, bo), ref)
        torch.testing.assert_close(coll({"fa": (idx, torch.tensor([0, 2]))}).values(), ref)
        with pytest.raises(RuntimeError, match="non-decreasing"):
            ops.embedding_bag(m.weight, m.offsets, idx, bo, width=8, mode="sum")
        m.offsets[1] = m.weight.numel() + 5  # row 0, which the batch reads, now overruns the buffer
        with pytest.raises(RuntimeError, match="spans offsets"):
            m(idx, bo)


@pytest.mark.parametrize("kind", ["bag", "bag_weighted", "embedding", "sparse", "collection"])
def test_tables_built_in_inference_mode_give_gradients_outside_it(kind):
    """As nn.EmbeddingBag built under torch.inference_mode(): called outside it with grad enabled,
    the lookup computes gradients (its table's tensors, which autograd cannot save, are kept
    unversioned), equal to those of the same table built normally."""
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 9, (12,), generator=gen)
    values = torch.randn(int(sizes.sum()), generator=gen)

    def build():
        if kind == "collection":
            tables = [collection.EmbeddingBagConfig(12, 8, "a", ["fa"])]
            c = collection.MultiSizeEmbeddingBagCollection(tables, {"a": sizes})
        elif kind == "embedding":
            c = pme.MultiSizeEmbedding(12, 8, sizes=sizes)
        else:
            c = pme.MultiSizeEmbeddingBag(12, 8, sizes=sizes, mode="sum", sparse=kind == "sparse")
        with torch.no_grad():
            c.weight.copy_(values)
        return c

    with torch.inference_mode():
        inf = build()
    plain = build()
    assert inf.weight.is_inference() and not plain.weight.is_inference()
    idx, bo = torch.tensor([0, 2, 2, 11, 5]), torch.tensor([0, 2, 2])
    grads = []
    for m in (inf, plain):
        psw = torch.linspace(0.5, 1.5, 5, requires_grad=True) if kind == "bag_weighted" else None
        if kind == "collection":
            out = m({"fa": (idx, torch.tensor([0, 2, 2, 5]))}).values()
        elif kind == "embedding":
            out = m(idx)
        else:
            out = m(idx, bo, per_sample_weights=psw)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        grads.append((m.weight.grad.to_dense(), psw.grad if psw is not None else None))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("device", DEVICES)
def test_module_training_reuses_the_check_and_sees_a_loaded_table(device):
    """A module's steps pass table_checked after the first call; load_state_dict replaces the
    offsets (a new version), and a bad in-place edit of the module's offsets is refused."""
    gen = torch.Generator().manual_seed(6)
    sizes = torch.randint(0, 9, (30,), generator=gen)
    emb = pme.MultiSizeEmbeddingBag(30, 8, sizes=sizes, mode="sum", optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
    emb = emb.to(device)
    x = torch.randint(0, 30, (4, 3), generator=gen).to(device)
    for _ in range(3):
        emb(x).sum().backward()
    assert ops._TABLES_PASSED[id(emb.offsets)][0]() is emb.offsets
    other = pme.MultiSizeEmbeddingBag(
        30, 8, sizes=sizes.flip(0), mode="sum", optimizer=pme.optim.RowwiseAdagrad(lr=0.1)
    ).to(device)
    emb.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(emb(x), other(x))
    with torch.no_grad():
        emb.offsets[11] = emb.offsets[10] - 1
    with pytest.raises(RuntimeError, match="non-decreasing"):
        emb(x)


@pytest.mark.parametrize("device", DEVICES)
def test_collection_checks_its_table_once_per_version(device):
    """The collection's one call per batch goes through the same memo; the CUDA backend scans
    the whole table as the CPU does (rows that no lookup touches included)."""
    tables = [collection.EmbeddingBagConfig(6, 8, "a", ["fa"]), collection.EmbeddingBagConfig(5, 4, "b", ["fb"])]
    sizes = {"a": torch.tensor([8, 2, 4, 0, 8, 1]), "b": torch.tensor([4, 4, 1, 0, 2])}
    coll = collection.MultiSizeEmbeddingBagCollection(tables, sizes).to(device)
    feats = {
        "fa": (torch.tensor([0, 1], device=device), torch.tensor([0, 1, 2], device=device)),
        "fb": (torch.tensor([4, 0], device=device), torch.tensor([0, 2, 2], device=device)),
    }
    ref = coll(feats).values()
    assert ops._TABLES_PASSED[id(coll.offsets)][0]() is coll.offsets
    torch.testing.assert_close(coll(feats).values(), ref)
    with torch.no_grad():
        coll.offsets[4] = coll.offsets[3] - 1  # rows 3 and 4 of table a: not looked up
    with pytest.raises(RuntimeError, match="non-decreasing"):
        coll(feats)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_operator_with_a_false_promise_stays_in_bounds(device):
    """table_checked=True on a table that never passed: the scan is skipped, every looked-up
    row is still bound-checked (a row of negative size is an error, not a read)."""
    w = torch.randn(10, device=device)
    off = torch.tensor([0, 6, 2, 10], device=device)  # row 1 runs backwards; rows 0 and 2 overlap
    bo = torch.tensor([0, 2], device=device)
    out, _ = torch.ops.pme.bag_forward(
        w, off, torch.tensor([0, 2], device=device), bo, None, None, 8, 0, -1, table_checked=True
    )
    dense = torch.zeros(2, 8, device=device)
    dense[0, :6], dense[1, :8] = w[0:6], w[2:10]
    torch.testing.assert_close(out, dense.sum(0, keepdim=True))
    with pytest.raises(RuntimeError, match="row 1"):
        torch.ops.pme.bag_forward(
            w, off, torch.tensor([1, 0], device=device), bo, None, None, 8, 0, -1, table_checked=True
        )
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.pme.bag_forward(w, off, torch.tensor([0, 2], device=device), bo, None, None, 8, 0, -1)


@pytest.mark.parametrize("kernel", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize(
    "offsets, bad, good, why",
    [
        ([0, 9, 10], 0, 1, "wider than the width (9 > 8)"),
        ([0, 6, -2, 0, 10], 2, 0, "starting before the buffer (-2)"),
        ([0, 6, 12, 10], 1, 0, "ending past the buffer (12 > 10)"),
        ([0, 7, 3, 10], 1, 0, "running backwards (7 > 3)"),
    ],
)
def test_false_promise_every_kernel_refuses_a_bad_span(monkeypatch, kernel, offsets, bad, good, why):
    """table_checked=True on a table that never passed (its first and last offsets right, which
    every call checks), one looked-up row bad in each way the per-lookup check knows (padded
    layout, width 8, buffer of 10): every CPU kernel refuses the lookup and names the row instead
    of reading outside the row's bounds; the good row alone is looked up correctly."""
    monkeypatch.setenv("PME_CPU_KERNEL", kernel)
    w = torch.randn(10)
    off = torch.tensor(offsets)
    with pytest.raises(RuntimeError, match=f"row {bad}"):
        torch.ops.pme.bag_forward(
            w, off, torch.tensor([good, bad]), torch.tensor([0, 2]), None, None, 8, 0, -1, table_checked=True
        )
    out, _ = torch.ops.pme.bag_forward(
        w, off, torch.tensor([good]), torch.tensor([0, 1]), None, None, 8, 0, -1, table_checked=True
    )
    lo, hi = offsets[good], offsets[good + 1]
    expect = torch.zeros(1, 8)
    expect[0, : hi - lo] = w[lo:hi]
    torch.testing.assert_close(out, expect, msg=why)


def test_error_messages_name_the_fault_without_cpp_locations():
    """The operators' messages start with "pme: " and name what is wrong; the C++ function, file
    and line of the check are not part of them; a table of no rows says it has none."""
    with pytest.raises(RuntimeError) as e:
        ops.embedding_bag(
            torch.zeros(0), torch.zeros(1, dtype=torch.int64), torch.tensor([0]), torch.tensor([0]), width=4
        )
    msg = str(e.value)
    assert msg.startswith("pme: index out of range: indices[0] = 0 but the table has 0 rows (it has none to look up)")
    assert ".cpp" not in msg and ".h:" not in msg
