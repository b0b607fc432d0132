"""What the benchmark scripts share (the timer and the machine description are in pme/bench.py)."""

from __future__ import annotations

import json
import os


def save_json(doc, path):
    """Writes ``doc`` to ``path`` as JSON (indent 1), creating its folder; the file is replaced
    atomically, so a run cut short leaves the previous complete file. Prints the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", flush=True)
