"""The package layout's promise: imports point one way, from the CLI down to procfs. Each
package's docstring ends with `May import: ...`; every import in every module (at module
level, in functions and under TYPE_CHECKING alike) is held to it, and no modules import
each other in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ctprofd

PACKAGE = Path(ctprofd.__file__).parent
PACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every ctprofd module or package `path` imports, as a dotted name."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package a relative import starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ctprofd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1] + (node.module.split(".")
                                                            if node.module else [])
            elif (node.module or "").split(".")[0] == "ctprofd":
                base = node.module.split(".")
            else:
                continue
            for alias in node.names:  # `from .x import y`: y may be a module of x
                candidate = ".".join(base + [alias.name])
                found.add(candidate if module_path(candidate) else ".".join(base))
    return found


def module_path(dotted: str) -> Path | None:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def allowed_imports(package: str) -> set[str]:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    match = re.search(r"May import: (.*)\.\s*$", doc or "")
    assert match, f"ctprofd/{package}/__init__.py: the docstring must end with `May import:`"
    named = match.group(1)
    return set() if named.startswith("nothing") else {n.strip() for n in named.split(",")}


def stage_of(dotted: str) -> str:
    """The subpackage a module belongs to; "" for the top-level modules (cli, __init__)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in PACKAGES) else ""


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_package_says_what_it_may_import_and_names_real_packages():
    assert {"procfs", "resolve", "probe", "export", "service"} <= set(PACKAGES)
    for package in PACKAGES:
        assert allowed_imports(package) <= set(PACKAGES) - {package}, package


def test_imports_point_only_where_the_package_docstrings_allow():
    wrong = []
    for path in modules():
        stage = stage_of(module_name(path))
        if not stage:  # cli and the top level may import every stage
            continue
        allowed = allowed_imports(stage) | {stage}
        for target in imported_modules(path):
            if target != "ctprofd" and stage_of(target) not in allowed:
                wrong.append(f"{module_name(path)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_package_imports_the_command_line():
    for path in modules():
        if stage_of(module_name(path)):
            assert "ctprofd.cli" not in imported_modules(path), path


def test_the_allowed_imports_have_no_cycle():
    graph = {package: allowed_imports(package) for package in PACKAGES}
    assert not find_cycle(graph), find_cycle(graph)


def test_modules_do_not_import_each_other_in_a_circle():
    graph = {module_name(p): {t for t in imported_modules(p) if t != "ctprofd"}
             for p in modules() if p.name != "__init__.py"}
    assert not find_cycle(graph), find_cycle(graph)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as a path, or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_checker_sees_a_forbidden_import_and_a_cycle():
    """The checks above can fail: a relative import two levels up is resolved, and a cycle
    is found."""
    probe = PACKAGE / "probe" / "capture.py"
    assert "ctprofd.resolve.attach" in imported_modules(probe)
    assert "ctprofd.probe.threads" in imported_modules(probe)
    assert stage_of("ctprofd.service.daemon") == "service" and stage_of("ctprofd.cli") == ""
    assert "service" not in allowed_imports("probe")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
