"""Safety of the toolkit's loaders (README "Safety"): a malformed Criteo or MovieLens file ends in a
clear error naming the file and the line, never a wrong dataset."""

import gzip
import math

import pytest
import torch

from pme.recsys.data import load_criteo, load_movielens_100k


def _criteo_line(i1="5"):
    return "\t".join(["1", i1] + ["3"] * 12 + ["a1b2"] * 26) + "\n"


@pytest.mark.parametrize(
    "bad, why",
    [
        ("9" * 401, "401-digit value, outside the int64"),
        ("-" + "9" * 30, "30-digit value"),
        ("9223372036854775808", "outside the int64"),
        ("1_000", "'1_000'"),
        (" 7 ", "' 7 '"),
        ("\u0661\u0662", "ASCII digits"),
        ("\u00b2", "ASCII digits"),
        ("0x10", "'0x10'"),
        ("1e3", "'1e3'"),
    ],
)
def test_criteo_rejects_bad_integers_naming_file_and_line(tmp_path, bad, why):
    f = tmp_path / "day.tsv"
    f.write_text(_criteo_line() + _criteo_line() + _criteo_line(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"day\.tsv:3: .*{why}"):
        load_criteo(f, min_count=1)


def test_criteo_accepts_int64_extremes(tmp_path):
    f = tmp_path / "ok.tsv"
    f.write_text(_criteo_line("9223372036854775807") + _criteo_line("-9223372036854775808"), encoding="utf-8")
    d = load_criteo(f, min_count=1)
    assert torch.allclose(d.dense[:, 0], torch.tensor([math.log1p(2.0**63), -math.log1p(2.0**63)]))


def test_criteo_non_utf8_and_broken_gzip_name_the_line(tmp_path):
    f = tmp_path / "bin.tsv"
    f.write_bytes(_criteo_line().encode() + b"1\t\xff\xfe\n")
    with pytest.raises(ValueError, match=r"bin\.tsv:2: not valid UTF-8"):
        load_criteo(f, min_count=1)
    g = tmp_path / "cut.tsv.gz"
    g.write_bytes(gzip.compress((_criteo_line() * 2000).encode())[:-40])  # truncated stream
    with pytest.raises(ValueError, match=r"cut\.tsv\.gz:\d+: cannot read the file past line \d+"):
        load_criteo(g, min_count=1)
    h = tmp_path / "junk.tsv.gz"
    h.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=r"junk\.tsv\.gz:1: cannot read"):
        load_criteo(h, min_count=1)
    ok = tmp_path / "ok.tsv.gz"
    ok.write_bytes(gzip.compress((_criteo_line() * 3).encode()))
    assert len(load_criteo(ok, min_count=1)) == 3


@pytest.mark.parametrize("rating", ["nan", "NaN", "inf", "-inf", "1e999", " 4 ", "4_0", "\u0664", "", "four"])
def test_movielens_bad_rating_raises_naming_file_and_line(tmp_path, rating):
    from test_data import write_fake_ml100k

    d = write_fake_ml100k(tmp_path / "ml-100k")
    lines = (d / "ml-100k.inter").read_text().splitlines(keepends=True)
    parts = lines[2].rstrip("\n").split("\t")
    parts[2] = rating
    lines[2] = "\t".join(parts) + "\n"
    (d / "ml-100k.inter").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"ml-100k\.inter:3: bad rating value"):
        load_movielens_100k(d)


def test_movielens_non_utf8_names_the_line(tmp_path):
    from test_data import write_fake_ml100k

    d = write_fake_ml100k(tmp_path / "ml-100k")
    with open(d / "ml-100k.user", "ab") as fh:
        fh.write(b"99\t20\tM\t\xe9tudiant\t00000\n")
    with pytest.raises(ValueError, match=r"ml-100k\.user:\d+: not valid UTF-8"):
        load_movielens_100k(d)


def test_criteo_line_csv_cannot_read_names_the_line(tmp_path):
    """A bare carriage return inside a line (a file mangled between line-ending conventions)."""
    f = tmp_path / "cr.tsv"
    f.write_bytes(_criteo_line().encode() + _criteo_line().replace("a1b2", "a1\rb2", 1).encode())
    with pytest.raises(ValueError, match=r"cr\.tsv:2: cannot read the line"):
        load_criteo(f, min_count=1)
