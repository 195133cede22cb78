"""The layout's rules: stage packages never import each other, the shared floor imports no stage,
there are no import circles, and every stage declares its contract once."""

from __future__ import annotations

import ast
import pathlib

import rsdist
from rsdist.pipeline import STAGE_NAMES, job_stages
from rsdist.stage import Resources, Stage

PACKAGE = pathlib.Path(rsdist.__file__).parent
STAGE_PACKAGES = {"ingest", "features", "cluster", "select", "train", "eval"}
FLOOR = {"core", "models"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every rsdist import in the file, lazy ones included; `from a import b`
    counts as a.b when a.b is a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rsdist"):
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names] + [(node.lineno, node.module)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("rsdist")]
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_stage_package_imports_another_and_the_floor_imports_no_stage():
    crossings = []
    for name, path in MODULES.items():
        parts = name.split(".")
        home = parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None
        for line, target in imports_of(path):
            to = target.split(".")[1] if "." in target else None
            if to in STAGE_PACKAGES and to != home and (home in STAGE_PACKAGES or home in FLOOR):
                crossings.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert crossings == []


def test_no_import_circles():
    graph = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, target in imports_of(path):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target != "rsdist" and not name.startswith(target + "."):
                graph[name].add(target)
    # a module in a circle reaches itself
    circles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == start:
                circles.append(start)
                break
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
    assert circles == []


def test_every_stage_declares_its_contract_once():
    stages = job_stages()
    assert [s.name for s in stages] == list(STAGE_NAMES)
    folders = [s.folder for s in stages]
    assert len(set(folders)) == len(folders)  # one owner per folder
    for i, stage in enumerate(stages):
        assert isinstance(stage, Stage)
        assert set(stage.reads) <= set(folders[:i]), f"{stage.name} reads a folder no earlier stage writes"
        assert callable(stage.run) and callable(stage.resources)
    ingest = stages[0]
    assert isinstance(ingest.resources(None), Resources)
