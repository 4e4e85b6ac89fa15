"""The structure of shared/: one declared writer interface; imports without circles, shared/ apart
from harvest/ and train/."""

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

from shared.cache import CacheWriter, ShardWriter
from shared.remote import RemoteCacheWriter


def test_both_writers_declare_the_one_interface():
    abstract = ShardWriter.__abstractmethods__
    assert abstract == {"done_shards", "write_shard", "seal"}
    for cls in (CacheWriter, RemoteCacheWriter):
        assert issubclass(cls, ShardWriter) and not cls.__abstractmethods__, cls
        for name in [*abstract, "shard_bounds"]:
            want = list(inspect.signature(getattr(ShardWriter, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls, name)


# --------------------------------------------------------------------------- imports

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "harvest", "train")


def modules(package: str) -> list[str]:
    return sorted(f"{package}.{p.stem}" for p in (ROOT / package).glob("*.py") if p.stem != "__init__")


def project_imports(module: str) -> set[str]:
    """Project modules that `module` imports anywhere in its source (function-local imports too)."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            if name.split(".")[0] in PACKAGES:
                # `from shared import faults` names a module, `from shared.cache import Cache` a module's name
                if isinstance(node, ast.ImportFrom) and name in PACKAGES:
                    found.update(f"{name}.{a.name}" for a in node.names)
                else:
                    found.add(name)
    return found


def test_no_import_circle_in_shared_or_harvest():
    graph = {m: project_imports(m) for p in ("shared", "harvest") for m in modules(p)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import circle: " + " -> ".join([*path[path.index(n):], n])
            if n in graph and n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_shared_imports_nothing_from_harvest_or_train():
    for m in modules("shared"):
        assert not {n for n in project_imports(m) if n.split(".")[0] in ("harvest", "train")}, m


def test_each_shared_module_imports_alone_in_a_fresh_interpreter():
    """Every module of shared/ imports by itself (no order it silently relies on) and pulls in no
    module of harvest/ or train/."""
    check = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('harvest', 'train')); "
             "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    runs = {m: subprocess.Popen([sys.executable, "-c", check, m], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for m in modules("shared")}
    for m, proc in runs.items():
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{m}: {out}"
