"""Packages import downward only, and no two files import each other (directly or round a circle).

Reference: the layering of docs/ARCHITECTURE.md, read from the source with `ast` — every `import` and
`from ... import`, the lazy ones inside functions and under TYPE_CHECKING included (a lazy import still
ties two files together). A test on a planted package shows the checker finds what it is meant to find.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# Lowest first: a package may import only those before it. The root package and its lazy exports sit above all.
LAYERS = ["errors", "cpu_memory", "data", "attention", "model", "export", "training", "generation", "evaluation", "mtg", "contest",
          "studio", "cli"]


def module_files(src: Path) -> dict[str, Path]:
    modules = {}
    for file in src.rglob("*.py"):
        parts = list(file.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


def import_graph(src: Path) -> dict[str, set[str]]:
    """module -> the modules of the same tree it imports (a name imported from a package counts as the
    submodule when one has that name, else as the package). Importing a submodule runs its package's
    __init__ too; that implicit edge is not counted (else every package re-exporting its modules would be a
    circle)."""
    modules = module_files(src)
    graph: dict[str, set[str]] = {}
    for module, file in modules.items():
        package = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        targets.add(f"{base}.{alias.name}")
                    elif base in modules:
                        targets.add(base)
        graph[module] = targets - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]], layers: list[str]) -> list[str]:
    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else None  # None: the root package

    wrong = []
    for module, targets in graph.items():
        for target in targets:
            source_layer, target_layer = layer(module), layer(target)
            if source_layer is None or source_layer == target_layer:
                continue
            if target_layer is None or layers.index(target_layer) >= layers.index(source_layer):
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def test_no_file_imports_round_a_circle():
    assert circles(import_graph(SRC)) == []


def test_packages_import_downward_only():
    graph = import_graph(SRC)
    packages = {module.split(".")[1] for module in graph if module.count(".") >= 1}
    assert packages <= set(LAYERS), f"a package missing from LAYERS: {packages - set(LAYERS)}"
    assert upward_imports(graph, LAYERS) == []


def test_the_checker_finds_a_planted_circle_and_an_upward_import(tmp_path):
    """Reference: a hand-made tree with one lazy circle (a -> b -> a) and one upward import (data -> cli)."""
    root = tmp_path / "pkg"
    for folder in ("data", "cli"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "data" / "a.py").write_text("from pkg.data import b\n")
    (root / "data" / "b.py").write_text("def f():\n    from .a import x\n    import pkg.cli.verb\n")
    (root / "cli" / "verb.py").write_text("import pkg.data\n")  # downward: fine
    graph = import_graph(tmp_path)
    assert circles(graph) == [["pkg.data.a", "pkg.data.b"]]
    assert upward_imports(graph, ["data", "cli"]) == ["pkg.data.b -> pkg.cli.verb"]


def private_imports(src: Path) -> list[str]:
    """`module -> name` for every private name (a leading underscore, dunders aside) one file of the tree imports
    from another: a private name is its file's own business."""
    found = []
    for module, file in module_files(src).items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flash_experts":
                found += [f"{module} -> {node.module}.{alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    return sorted(found)


def test_no_file_imports_another_files_private_names(tmp_path):
    """Reference: a planted tree with one private import (found) and one public (not)."""
    assert private_imports(SRC) == []
    root = tmp_path / "flash_experts"
    root.mkdir()
    (root / "a.py").write_text("_hidden = 1\nshown = 2\n")
    (root / "b.py").write_text("from flash_experts.a import _hidden, shown\n")
    assert private_imports(tmp_path) == ["flash_experts.b -> flash_experts.a._hidden"]


def test_cli_verbs_do_not_import_each_other():
    """Shared options and helpers live in cli/common.py; cli/main.py registers the verbs (and its error path
    is imported by the example scripts), so those two are the only CLI modules a verb may import."""
    graph = import_graph(SRC)
    shared = {"flash_experts.cli.common", "flash_experts.cli.main", "flash_experts.cli"}
    verbs = [m for m in graph if m.startswith("flash_experts.cli.") and m not in shared]
    crossing = sorted(f"{m} -> {t}" for m in verbs for t in graph[m] if t.startswith("flash_experts.cli.")
                      and t not in shared)
    assert crossing == []


def cli_imports(folder: Path) -> dict[str, list[str]]:
    """file -> the `flash_experts.cli` modules it imports (every import, lazy ones too), for the scripts in `folder`."""
    found = {}
    for file in sorted(folder.rglob("*.py")):
        names = []
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names += [node.module or ""]
        cli = [name for name in names if name == "flash_experts.cli" or name.startswith("flash_experts.cli.")]
        if cli:
            found[file.name] = cli
    return found


def test_examples_and_benchmarks_import_the_library_never_the_command_line(tmp_path):
    """The command line parses and prints; what a script needs lives in the library. Reference: every import of
    the scripts, read with `ast`; a planted script shows the checker finds one."""
    root = SRC.parent
    assert cli_imports(root / "examples") == {}
    assert cli_imports(root / "benchmarks") == {}
    (tmp_path / "planted.py").write_text("def f():\n    from flash_experts.cli.demo import run\n")
    assert cli_imports(tmp_path) == {"planted.py": ["flash_experts.cli.demo"]}
