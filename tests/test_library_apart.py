"""The library (pme.ops, modules, optim, search, reference, collection, cli, bench) works with the
recommender toolkit pme.recsys blocked: it never imports the toolkit, only the CLI's demo and
search commands do, when they run."""

import ast
import pathlib
import subprocess
import sys

import pme

LIBRARY = ["ops", "modules", "optim", "search", "reference", "collection", "cli", "bench", "_version"]

_BLOCKED = """
import importlib, importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pme.recsys" or name.startswith("pme.recsys."):
            raise ImportError(f"blocked by the test: {name}")
        return None

sys.meta_path.insert(0, Block())
"""


def _run(code):
    out = subprocess.run([sys.executable, "-c", _BLOCKED + code], capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout, out.stderr


def test_library_imports_and_runs_with_the_toolkit_blocked():
    code = f"""
import torch
import pme
for name in {LIBRARY!r}:
    importlib.import_module("pme." + name)
m = pme.MultiSizeEmbeddingBag(10, 8, sizes=torch.tensor([8, 4, 0, 8, 4, 8, 4, 0, 8, 4]), mode="sum",
                              optimizer=pme.optim.RowwiseAdagrad(lr=0.1))
m(torch.tensor([[1, 2, 9], [0, 0, 3]])).sum().backward()
from pme.cli import main
assert main(["info"]) == 0
loaded = sorted(k for k in sys.modules if k.startswith("pme.recsys"))
assert not loaded, loaded
print("library ok")
"""
    rc, out, err = _run(code)
    assert rc == 0, err
    assert "library ok" in out


def test_the_block_is_real():
    """The same blocker makes the toolkit unimportable (so the test above can fail)."""
    rc, _, err = _run("import pme.recsys.data\n")
    assert rc != 0 and "blocked by the test: pme.recsys" in err


def test_no_library_module_imports_the_toolkit_at_module_level():
    """Module-level imports only: the CLI imports the toolkit inside its demo and search commands."""
    root = pathlib.Path(pme.__file__).parent
    for path in [root / "__init__.py"] + [root / f"{n}.py" for n in LIBRARY]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            assert not any("recsys" in n for n in names), f"{path.name}:{node.lineno} imports the toolkit: {names}"
