"""pyproject.toml says requires-python >= 3.10: the code must not lean on 3.11-only Python unguarded.

Static checks over every .py file of blitext/ and cli/: the syntax parses as 3.10 (`except*` is the
3.11 addition ast can tell), and 3.11-only stdlib modules and names are used only under a
`sys.version_info >= (3, 11)` branch or in a try whose except catches the ImportError.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p for folder in ("blitext", "cli") for p in (ROOT / folder).rglob("*.py"))

NEW_MODULES = {"tomllib", "wsgiref.types"}  # stdlib modules added in 3.11
NEW_NAMES = {  # names added to existing modules in 3.11
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "Required",
               "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform", "get_overloads", "clear_overloads"},
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember", "global_enum"},
    "datetime": {"UTC"},
    "asyncio": {"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "operator": {"call"},
    "math": {"cbrt", "exp2"},
    "logging": {"getLevelNamesMapping"},
    "inspect": {"getmembers_static", "ismethodwrapper"},
    "re": {"NOFLAG"},
}
NEW_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _is_version_check(test: ast.expr) -> bool:
    return "version_info" in ast.unparse(test)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(ast.unparse(n).split(".")[-1] in IMPORT_ERRORS for n in names)


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside an `if sys.version_info ...` (either branch) or a try body whose except catches ImportError."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.If) and _is_version_check(parent.test):
            return True
        if isinstance(parent, ast.Try) and child in parent.body and any(map(_catches_import_error, parent.handlers)):
            return True
        child, parent = parent, parents.get(parent)
    return False


def unguarded_311_uses(source: str, filename: str = "<src>") -> list[str]:
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    modules: dict[str, str] = {}  # local name -> stdlib module it is bound to (`import typing as t`)
    found = []
    for node in ast.walk(tree):
        uses = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in NEW_MODULES:
                    uses.append(f"import {alias.name}")
                if alias.name in NEW_NAMES:
                    modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in NEW_MODULES or any(f"{node.module}.{a.name}" in NEW_MODULES for a in node.names):
                uses.append(f"from {node.module} import ...")
            uses += [f"from {node.module} import {a.name}" for a in node.names if a.name in NEW_NAMES.get(node.module, ())]
        elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS:
            uses.append(node.id)
        if uses and not _guarded(node, parents):
            found += [f"{filename}:{node.lineno}: {use}" for use in uses]
    for node in ast.walk(tree):  # typing.Self, datetime.UTC, ...
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr in NEW_NAMES[modules[node.value.id]] and not _guarded(node, parents)):
            found.append(f"{filename}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_tells_guarded_from_unguarded():
    assert unguarded_311_uses("import tomllib\n")
    assert unguarded_311_uses("from typing import Self\n")
    assert unguarded_311_uses("import datetime\nnow = datetime.datetime.now(datetime.UTC)\n")
    assert unguarded_311_uses("try:\n    import tomllib\nexcept KeyError:\n    pass\n")
    assert not unguarded_311_uses("try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n")
    assert not unguarded_311_uses("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\n"
                                  "else:\n    import tomli as tomllib\n")
    assert not unguarded_311_uses("from typing_extensions import Self\n")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unguarded_311_only_python(path):
    source = path.read_text(encoding="utf-8")
    ast.parse(source, str(path), feature_version=(3, 10))  # 3.11 syntax (except*) is a SyntaxError here
    assert not unguarded_311_uses(source, str(path.relative_to(ROOT)))


def test_config_reads_toml_with_tomli_before_311(monkeypatch):
    """On 3.10 blitext.config takes the tomli package in place of tomllib (run here with a stand-in)."""
    stand_in = types.ModuleType("tomli")
    monkeypatch.setitem(sys.modules, "tomli", stand_in)
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    spec = importlib.util.spec_from_file_location("blitext_config_on_310", ROOT / "blitext" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.tomllib is stand_in


def test_pyproject_requires_tomli_before_311():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    if project["requires-python"].replace(" ", "") not in (">=3.10", ">=3.10.0"):
        pytest.skip(f"requires-python is {project['requires-python']}")
    assert any(d.replace(" ", "").startswith("tomli") and "python_version<'3.11'" in d.replace(" ", "")
               for d in project["dependencies"])
