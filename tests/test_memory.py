"""pme.memory: pme's big CPU tables are advised for 2 MiB pages, values and sharing unchanged."""

import sys
import warnings

import pytest
import torch

import pme
from pme import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def _vma_of(addr):
    """The /proc/self/smaps fields of the mapping holding ``addr``."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            if inside:
                break
            inside = lo <= addr < hi
        elif inside:
            fields[head[0].rstrip(":")] = head[1]
    return fields


def _interior(t):
    """An address in the 2 MiB-aligned part of ``t``'s memory."""
    huge = 2 << 20
    return -(-t.data_ptr() // huge) * huge + 4096


def test_fresh_table_copies_big_cpu_tensors_and_leaves_the_rest(monkeypatch):
    big = torch.randn(3 << 20)  # 12 MiB
    out = memory.fresh_table(big)
    assert torch.equal(out, big) and out.dtype == big.dtype and out.is_contiguous()
    if memory.advised():  # pme's advice on, and a THP mode that takes it
        assert out.data_ptr() != big.data_ptr()  # a fresh buffer, advised before the copy
    small = torch.randn(1000)
    assert memory.fresh_table(small) is small and not memory.advise_huge_pages(small)
    own = memory.fresh_table(small, copy=True)  # a buffer of its own either way
    assert torch.equal(own, small) and own.data_ptr() != small.data_ptr()
    strided = big[::2]
    assert memory.fresh_table(strided) is strided and not memory.advise_huge_pages(strided)
    monkeypatch.setenv("PME_HUGE_PAGES", "0")
    assert not memory.huge_pages_enabled()
    assert memory.fresh_table(big) is big and not memory.advise_huge_pages(big)
    for off in ("false", "OFF", "no"):  # the other spellings of off
        monkeypatch.setenv("PME_HUGE_PAGES", off)
        assert not memory.huge_pages_enabled() and not pme.info()["huge_pages_advised"]
        assert pme.info()["huge_pages"].startswith("no")


@linux
@pytest.mark.parametrize(
    "build",
    [
        "from_dense",
        "constructor",
        "collection",
        "checkpoint",
        "float64",
        "embedding",
        "from_pretrained",
        "dense_weight",
        "from_embedding_bag",
        "dense_checkpoint",
        "cast",
        "cast_fused",
    ],
)
def test_tables_are_advised_for_huge_pages(build, monkeypatch):
    """The flat buffer and the offset table of a big table are advised (THPeligible in the kernel's
    own account of the mapping) unless PME_HUGE_PAGES=0; the lookups are the same either way."""
    if not memory.huge_pages_enabled():
        pytest.skip("PME_HUGE_PAGES=0")
    mode = memory.thp_mode()
    if mode not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages: {mode!r}")
    V, D = 600_000, 8  # offsets 4.6 MiB, flat buffer about 14 MiB

    def make():
        if build == "from_dense":
            return pme.MultiSizeEmbeddingBag.from_dense(torch.randn(V, D), torch.full((V,), 6))
        if build == "cast":  # .double() (or .half(), .to(dtype)) makes a new buffer: advised too
            return pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 6)).double()
        if build == "cast_fused":  # the same with a fused optimizer's state kept aside
            opt = pme.optim.Adam(lr=0.1)
            return pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 6), optimizer=opt).to(torch.float64)
        if build == "constructor":
            return pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 6))
        if build == "float64":  # a dtype of its own: the buffer is pme's, not a torch cast of it
            return pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 6), dtype=torch.float64)
        if build == "embedding":
            return pme.MultiSizeEmbedding(V, D, sizes=torch.full((V,), 6))
        if build == "from_pretrained":
            return pme.MultiSizeEmbeddingBag.from_pretrained(torch.randn(V, D), sizes=torch.full((V,), 6))
        if build == "dense_weight":  # nn's _weight [V, D], cast on the way in
            return pme.MultiSizeEmbeddingBag(
                V, D, sizes=torch.full((V,), 6), _weight=torch.randn(V, D), dtype=torch.float64
            )
        if build == "from_embedding_bag":
            return pme.MultiSizeEmbeddingBag.from_embedding_bag(torch.nn.EmbeddingBag(V, D), torch.full((V,), 6))
        if build == "dense_checkpoint":  # an nn.EmbeddingBag checkpoint loaded into the table
            t = pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 6))
            t.load_state_dict(torch.nn.EmbeddingBag(V, D).state_dict())
            return t
        if build == "checkpoint":  # a checkpoint of other sizes: new offsets and a new flat buffer
            t = pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 2))
            t.load_state_dict(pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 6)).state_dict())
            return t
        tables = [pme.collection.EmbeddingBagConfig(name="t", num_embeddings=V, embedding_dim=D, feature_names=["f"])]
        return pme.MultiSizeEmbeddingBagCollection(tables, sizes={"t": torch.full((V,), 6)})

    on = make()
    for t in (on.weight, on.offsets):
        assert _vma_of(_interior(t)).get("THPeligible") == "1", build
    idx = torch.tensor([0, V - 1, 17, 17])
    if build != "collection":
        monkeypatch.setenv("PME_HUGE_PAGES", "0")
        off = make()
        off.weight.data.copy_(on.weight.detach())
        if build == "embedding":
            assert torch.equal(on(idx), off(idx))
            return
        # (not checked: that off's memory is not advised; the allocator may hand it memory that an
        # advised table had before)
        with torch.no_grad():
            assert torch.equal(on(idx, torch.tensor([0, 2])), off(idx, torch.tensor([0, 2])))


def test_a_given_flat_buffer_stays_shared():
    """A flat buffer passed in is advised in place, not copied: the table shares it (as
    nn.Embedding(_weight=...) does)."""
    V, D = 300_000, 8
    flat = torch.randn(V * 4)
    m = pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 4), _weight=flat)
    assert m.weight.data_ptr() == flat.data_ptr()


@linux
def test_fused_optimizer_state_is_advised_and_zero():
    """A fused optimizer's big per-entry state (Adam's two moments) is advised and starts at zero."""
    if not memory.huge_pages_enabled() or memory.thp_mode() not in ("madvise", "always"):
        pytest.skip("no huge pages here")
    V, D = 300_000, 8  # per-entry state 9.6 MiB each
    m = pme.MultiSizeEmbeddingBag(V, D, sizes=torch.full((V,), 8), optimizer=pme.optim.Adam(lr=0.01))
    states = [t for n, t in m.named_buffers() if t.numel() == m.weight.numel() and n != "offsets"]
    assert len(states) == 2
    for t in states:
        assert not bool(t.any())
        assert _vma_of(_interior(t)).get("THPeligible") == "1"


def test_info_says_whether_tables_go_on_huge_pages(monkeypatch):
    line = pme.info()["huge_pages"]
    assert line.startswith("yes" if memory.huge_pages_enabled() and memory.thp_mode() != "never" else "no")
    monkeypatch.setenv("PME_HUGE_PAGES", "0")
    if sys.platform.startswith("linux"):
        assert pme.info()["huge_pages"].startswith("no (PME_HUGE_PAGES=0")


def test_unknown_env_values_warn_and_keep_the_default(monkeypatch):
    """PME_HUGE_PAGES takes 0 / false / off / no (off) and 1 / true / on / yes (on), any case; a
    value it does not know (once silently on) warns, naming it and the spellings of off."""
    monkeypatch.setattr(memory, "_warned", set(), raising=False)
    for value in ("1", "TRUE", " on ", "yes", ""):
        monkeypatch.setenv("PME_HUGE_PAGES", value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert memory.huge_pages_enabled() == (memory._MADVISE is not None)
    if memory._MADVISE is None:
        pytest.skip("not Linux: the variable is not read")
    monkeypatch.setenv("PME_HUGE_PAGES", "disabled")
    with pytest.warns(UserWarning, match=r"PME_HUGE_PAGES='disabled' is not understood.*0, false, off, no"):
        assert memory.huge_pages_enabled()
    with warnings.catch_warnings():  # once per value
        warnings.simplefilter("error")
        assert memory.huge_pages_enabled()
    monkeypatch.setenv("PME_HUGE_PAGES", "No")
    assert not memory.huge_pages_enabled()


def test_no_copy_for_nothing_when_thp_mode_is_never(monkeypatch):
    """With the kernel's THP mode ``never`` huge pages do not apply: a big table is not copied
    (the copy, once made, doubled its memory for nothing while both lived) nor advised."""
    monkeypatch.setattr(memory, "thp_mode", lambda: "never")
    big = torch.randn(3 << 20)  # 12 MiB
    assert memory.fresh_table(big) is big
    assert not memory.advise_huge_pages(big) and not memory.advise_huge_pages(big, fresh=True)
    own = memory.fresh_table(big, copy=True)
    assert torch.equal(own, big) and own.data_ptr() != big.data_ptr()
    out = memory.empty((3 << 20,), torch.float32)
    assert out.shape == (3 << 20,) and not memory.advised()
    if memory._MADVISE is not None and memory.huge_pages_enabled():
        assert pme.info()["huge_pages"] == "no (THP mode never)"


def test_fake_tensors_are_left_alone():
    """Under FakeTensorMode (tracing, memory estimates) a big "CPU" tensor has no memory: pme must
    not read its data_ptr (torch warns that this is undefined behaviour, and madvise was then called
    on the addresses from 0) nor copy it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FakeTensorMode():
            big = torch.empty(3 << 20)
            assert not memory.advise_huge_pages(big) and not memory.advise_huge_pages(big, fresh=True)
            assert memory.fresh_table(big) is big
            assert memory.empty((3 << 20,), torch.float32).shape == (3 << 20,)
