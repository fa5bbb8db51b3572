"""The mutation check's table matches the code, and covers every test the docs credit.

``scripts/mutation-check`` proves that each promise's test fails when the promise's code is
removed; these checks keep its table honest without running it: every snippet still occurs
exactly once in its file, every test it names exists, and every test that
docs/failure-handling.md names as a proof is the catcher of at least one mutant.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
FAILURE_DOC = ROOT / "docs" / "failure-handling.md"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mutation_check", ROOT / "scripts/mutation_check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutation_check", module)
    spec.loader.exec_module(module)
    return module


def _test_names(path: Path) -> set[str]:
    """The test functions of a file as pytest names them: ``test_x``, ``TestY::test_z``."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.update(
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return {name for name in names if name.rsplit("::", 1)[-1].startswith("test")}


def _credited_tests() -> set[str]:
    """``tests/test_x.py::test_y`` node ids named in the failure-handling table."""
    return {
        f"tests/{file}::{name}"
        for file, name in re.findall(r"`(test_\w+\.py)::(test_\w+)`", FAILURE_DOC.read_text())
    }


def test_every_mutation_snippet_occurs_exactly_once_and_every_named_test_exists() -> None:
    mutants = _script().load_table()  # raises TableError naming each stale row
    assert len(mutants) >= 30
    for mutant in mutants:
        assert mutant.test.split("::", 1)[1] in _test_names(ROOT / mutant.test_file), mutant.test


def test_every_test_the_failure_doc_credits_exists_and_catches_a_mutant() -> None:
    credited = _credited_tests()
    caught_by = {m.test for m in _script().load_table()}
    assert len(credited) >= 15
    for node in sorted(credited):
        file, name = node.split("::")
        assert name in _test_names(ROOT / file), f"{node} is credited but does not exist"
        assert node in caught_by, f"{node} is credited but no mutant in the table is its to catch"


def test_a_stale_snippet_is_refused(tmp_path: Path) -> None:
    script = _script()
    table = tmp_path / "mutations.toml"
    table.write_text(
        "[[mutant]]\n"
        'guarantee = "gone"\n'
        'file = "wayang_mq/runtime/worker.py"\n'
        "find = '''this text is in no file'''\n"
        "replace = '''x'''\n"
        'test = "tests/test_runtime.py::test_x"\n'
    )
    try:
        script.load_table(table)
    except script.TableError as exc:
        assert "occurs 0 times" in str(exc)
    else:
        raise AssertionError("a stale row was accepted")
