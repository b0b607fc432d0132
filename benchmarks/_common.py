"""What the benchmark scripts share: their common options, the machine a result was measured on,
and the JSON writer (the timer and the full device description are in pme/bench.py)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os

import torch

import pme
from pme.bench import cpu_model
from pme.cli import _count, _device, _fraction, _non_negative, _positive, _seed

# argparse types the scripts share: pme's own, so a bad value is refused as `pme` refuses it
at_least, device_arg, fraction, non_negative, positive, seed_arg = (
    _count,
    _device,
    _fraction,
    _non_negative,
    _positive,
    _seed,
)


def parser(doc: str, *, out: str, dim: int = 64) -> argparse.ArgumentParser:
    """An argparse parser (``doc`` as its description) with the options every benchmark here
    takes: ``--dim`` (the table width), ``--seed`` (of the generated data), ``--note`` (free text
    stored in the JSON) and ``--out`` (where the results go)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=at_least(1), default=dim, help=f"D, the table width (default {dim})")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the generated tables and batches (default 0)")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine shared with 4 jobs')")
    p.add_argument("--out", default=out, help=f"where the results go (default {out})")
    return p


def machine(note: str = "") -> dict:
    """The machine and software a result was measured on, and when, for its JSON."""
    info = pme.info()
    return {
        "device": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pme": info["version"],
        "backend": info["backend"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "note": note,
    }


def save_json(doc, path):
    """Writes ``doc`` to ``path`` as JSON (indent 1), creating its folder; the file is replaced
    atomically, so a run cut short leaves the previous complete file. Prints the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", flush=True)
