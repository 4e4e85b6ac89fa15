"""The structure between the packages: train/ never imports harvest/ (what both command lines
need lives in shared/), and every error a user can hit derives from shared.errors.UserError, which
each command line catches in one place (shared.cli_common.run_user_errors)."""

import ast
import subprocess
import sys
from pathlib import Path

import click
import pytest

from shared.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def package_modules(package: str) -> list[Path]:
    """Every module file of `package`, subpackages included."""
    return sorted((ROOT / package).rglob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Absolute module names imported anywhere in `path` (function-local imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_no_module_of_train_imports_harvest():
    files = package_modules("train")
    assert len(files) > 10  # the glob found the package
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported_names(p) if n.split(".")[0] == "harvest")
                 for p in files}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_importing_the_train_cli_loads_no_harvest_module():
    check = ("import sys, train.cli, train.training, train.evaluation; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'harvest'); assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr


def user_error_classes() -> dict[str, type]:
    from shared.cache import CacheError
    from shared.devices import DeviceError
    from shared.hook_sites import HookSiteError
    from shared.models import ModelLoadError
    from shared.object_store import RemoteError
    from shared.tokens import DatasetError
    from train.checkpoints import CheckpointError
    from train.config import ConfigError
    from train.errors import EvalError, TrainingError
    from train.export import ExportError

    return {c.__name__: c for c in (CacheError, RemoteError, DeviceError, HookSiteError, ModelLoadError, DatasetError,
                                    CheckpointError, ConfigError, EvalError, TrainingError, ExportError)}


def test_every_user_error_derives_from_user_error():
    for name, cls in user_error_classes().items():
        assert issubclass(cls, UserError), name
    from train.config import ConfigError
    from shared.devices import DeviceError

    assert issubclass(ConfigError, ValueError) and issubclass(DeviceError, ValueError)  # as before


def test_no_module_defines_an_error_class_outside_the_user_error_tree():
    """A new `class XError(Exception)` in shared/, harvest/ or train/ is a user error (derive it from
    UserError) or internal (give it no Error name); the command lines would let it through."""
    loose = []
    for package in ("shared", "harvest", "train"):
        for path in package_modules(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "UserError":
                    bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                    if bases & {"Exception", "ValueError", "RuntimeError"} and "UserError" not in bases:
                        loose.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not loose, loose


@pytest.mark.parametrize("name", sorted(user_error_classes()))
def test_run_user_errors_prints_one_line_and_exits_2(name, capsys):
    from shared.cli_common import run_user_errors

    def fail():
        raise user_error_classes()[name]("the thing at fault; do this")

    with pytest.raises(SystemExit) as e:
        run_user_errors(fail)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: the thing at fault; do this\n"


def test_run_user_errors_reports_an_os_error_in_one_line(capsys, tmp_path):
    from shared.cli_common import run_user_errors

    with pytest.raises(SystemExit) as e:
        run_user_errors(open, tmp_path / "absent.txt")
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: No such file or directory ({tmp_path / 'absent.txt'})\n"


def test_run_user_errors_lets_a_bug_through():
    from shared.cli_common import run_user_errors

    with pytest.raises(KeyError):
        run_user_errors(dict().__getitem__, "x")


@pytest.mark.parametrize("text,n", [("200000", 200_000), ("200k", 200_000), ("50M", 50_000_000), ("1.5G", 1_500_000_000),
                                    ("1e6", 1_000_000), ("20_000", 20_000), (7, 7)])
def test_count_reads_suffixes_and_exponents(text, n):
    from shared.cli_common import COUNT, format_count

    assert COUNT.convert(text, None, None) == n
    assert COUNT.convert(format_count(n), None, None) == n


@pytest.mark.parametrize("text,message", [("12x", "'12x' is not a count (examples: 200000, 200k, 50M)"),
                                          ("1.5", "'1.5' must be a positive whole number"),
                                          ("0", "'0' must be a positive whole number")])
def test_count_refuses_what_is_not_a_count(text, message):
    from shared.cli_common import COUNT

    with pytest.raises(click.BadParameter, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        COUNT.convert(text, None, None)


def test_format_count_is_short():
    from shared.cli_common import format_count

    assert [format_count(n) for n in (10_000_000, 5_000_000, 4096, 1000, 2_000_000_000, 65_536)] == \
        ["10M", "5M", "4096", "1k", "2G", "65536"]
