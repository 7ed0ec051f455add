"""Pure protocol cores import no I/O, no event loop and no clock (DESIGN.md §1).

Each pure module's source is parsed (never imported) and every ``import`` in it is checked, at any depth
(function bodies and ``TYPE_CHECKING`` blocks included), together with ``__import__("x")`` and
``importlib.import_module("x")`` calls on literal names. Project modules they import are followed
transitively, package ``__init__`` files included because importing ``a.b.c`` runs ``a/__init__.py`` and
``a/b/__init__.py``. ``core.clock`` is the one project module allowed to read the real time; it is not
followed.

To declare a new pure module, add it to :data:`PURE_MODULES`, or its package to :data:`PURE_PACKAGES`; gateway
codecs, numbers, channels and registries are found by :data:`PURE_GLOBS` without being listed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("core", "gateways", "hardware")

FORBIDDEN = frozenset(
    {"asyncio", "socket", "serial", "asyncio_dgram", "time", "threading", "selectors", "uvloop"}
)
"""Top-level names a pure module may not import, directly or through project modules it imports."""

NOT_FOLLOWED = frozenset({"core.clock"})
"""Project modules allowed to touch the real world: importing them is fine; their imports are not checked."""

PURE_MODULES: tuple[str, ...] = (
    "core.errors",
    "core.topics",
    "core.mqtt.numbers",
    "core.mqtt.codec",
    "core.mqtt.connection",
    "hardware.link",
    "hardware.framing",
    "gateways.lwm2m.content",
    "gateways.lwm2m.senml",
    "gateways.lwm2m.tlv",
)
PURE_PACKAGES: tuple[str, ...] = ("core.broker", "hardware.framing")
"""Every module directly in these packages is pure."""
PURE_GLOBS: tuple[str, ...] = (
    "gateways/**/codec.py",
    "gateways/**/numbers.py",
    "gateways/**/channel.py",
    "gateways/**/registry.py",
)


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pure_modules(root: Path = ROOT) -> list[str]:
    names = set(PURE_MODULES)
    for package in PURE_PACKAGES:
        directory = root.joinpath(*package.split("."))
        names.update(_module_name(p, root) for p in directory.glob("*.py") if p.name != "__init__.py")
    for pattern in PURE_GLOBS:
        names.update(_module_name(p, root) for p in root.glob(pattern))
    return sorted(names)


def _source_of(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class Violation:
    chain: tuple[str, ...]
    imported: str
    line: int

    def __str__(self) -> str:
        via = f" (reached through {' -> '.join(self.chain[:-1])})" if len(self.chain) > 1 else ""
        return f"{self.chain[-1]} imports {self.imported!r} at line {self.line}{via}"


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every absolute module name ``tree`` imports, with its line; ``from a import b`` yields a and a.b."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, node.module] if node.module else package)
            else:
                base = node.module or ""
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Name):
                name = func.id
            else:
                name = func.attr if isinstance(func, ast.Attribute) else ""
            first = node.args[0]
            if name in ("__import__", "import_module") and isinstance(first, ast.Constant):
                found.extend((value, node.lineno) for value in (first.value,) if isinstance(value, str))
    return found


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_violations(start: str, root: Path = ROOT) -> list[Violation]:
    """Forbidden imports of ``start`` and of every project module it imports, transitively."""
    violations: list[Violation] = []
    seen: set[str] = set()
    stack: list[tuple[str, ...]] = [(start,)]
    while stack:
        chain = stack.pop()
        module = chain[-1]
        if module in seen or module in NOT_FOLLOWED:
            continue
        seen.add(module)
        path = _source_of(module, root)
        if path is None:
            continue  # "from pkg import name" where name is not a module
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        targets = [(name, line) for name, line in _imports(tree, module, path.name == "__init__.py")]
        targets += [(parent, 0) for parent in _parents(module)]
        for name, line in targets:
            top = name.split(".")[0]
            if top in FORBIDDEN:
                violations.append(Violation(chain, name, line))
            elif top in PROJECT_PACKAGES and name not in seen:
                stack.append((*chain, name))
    return violations


def test_pure_module_list_names_existing_modules() -> None:
    modules = pure_modules()
    missing = [m for m in (*PURE_MODULES, *PURE_PACKAGES) if _source_of(m, ROOT) is None]
    assert not missing, f"listed as pure but not found: {missing}"
    assert "core.broker.broker" in modules
    assert "core.clock" not in modules


@pytest.mark.parametrize("module", pure_modules())
def test_pure_module_imports_no_io_loop_or_clock(module: str) -> None:
    violations = find_violations(module)
    assert not violations, f"{module} is meant to be pure:\n" + "\n".join(f"  {v}" for v in violations)


# --- the checker checks what it claims to


def _write(root: Path, module: str, source: str) -> None:
    path = root.joinpath(*module.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    for parent in [path.parent, *path.parent.parents]:
        if parent == root:
            break
        (parent / "__init__.py").touch()
    path.write_text(source, encoding="utf-8")


def test_checker_finds_direct_lazy_dynamic_and_transitive_imports(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "core.pure",
        "import os\n"
        "import asyncio.events\n"
        "from core import helper\n"
        "from .sibling import thing\n"
        "def later():\n"
        "    import socket as s\n"
        "    __import__('selectors')\n"
        "    importlib.import_module('threading')\n",
    )
    _write(tmp_path, "core.helper", "from time import monotonic\n")
    _write(tmp_path, "core.sibling", "from serial import Serial\nimport core.clock\n")
    _write(tmp_path, "core.clock", "import time\n")
    found = {(v.chain[-1], v.imported.split(".")[0]) for v in find_violations("core.pure", tmp_path)}
    assert found == {
        ("core.pure", "asyncio"),
        ("core.pure", "socket"),
        ("core.pure", "selectors"),
        ("core.pure", "threading"),
        ("core.helper", "time"),
        ("core.sibling", "serial"),
    }


def test_checker_follows_package_init_files(tmp_path: Path) -> None:
    _write(tmp_path, "gateways.x.codec", "import struct\n")
    (tmp_path / "gateways" / "x" / "__init__.py").write_text("from gateways.x import adapter\n")
    _write(tmp_path, "gateways.x.adapter", "import asyncio\n")
    [violation] = find_violations("gateways.x.codec", tmp_path)
    assert violation.chain == ("gateways.x.codec", "gateways.x", "gateways.x.adapter")
    assert violation.imported == "asyncio"
    assert "gateways.x.adapter imports 'asyncio' at line 1" in str(violation)


def test_checker_passes_a_clean_module(tmp_path: Path) -> None:
    _write(
        tmp_path, "core.clean", "import struct\nfrom dataclasses import dataclass\nfrom core import other\n"
    )
    _write(tmp_path, "core.other", "import logging\nimport random\n")
    assert find_violations("core.clean", tmp_path) == []
