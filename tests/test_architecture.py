"""The package's layout rules (docs/architecture.md): command modules import library modules only, no module
grows past 450 lines, the Trainer class stays a readable loop."""
import ast
from pathlib import Path

import pytest

from cic_gpt2.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "cic_gpt2"
COMMAND_MODULES = {module.rsplit(".", 1)[1] for module, _ in COMMANDS.values()}


def imported_package_modules(path: Path) -> set[str]:
    """cic_gpt2 modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "cic_gpt2":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("cic_gpt2."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cic_gpt2."))
    return found


def test_every_command_module_has_add_arguments_and_main_and_nothing_else_does():
    for path in PACKAGE.glob("*.py"):
        names = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        is_command = {"add_arguments", "main"} <= names
        assert is_command == (path.stem in COMMAND_MODULES), path.name


@pytest.mark.parametrize("command", sorted(COMMAND_MODULES))
def test_command_modules_import_library_modules_only(command):
    imports = imported_package_modules(PACKAGE / f"{command}.py")
    assert not imports & (COMMAND_MODULES - {command}), imports & COMMAND_MODULES


def test_no_module_over_450_lines():
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long


def test_trainer_class_is_at_most_200_lines():
    tree = ast.parse((PACKAGE / "trainer.py").read_text(encoding="utf-8"))
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 200
