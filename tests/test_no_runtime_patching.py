"""The code that runs is the code you read: no module reassigns a class, a method, an imported module's (or
class's) attribute, or Python's import machinery at run time.

Reference: the source read with `ast`. Flagged: assigning `__class__` or any other dunder on an object, or a
`forward` (a patched method); assigning an attribute of an imported name (`torch._dynamo.config.x = ...`, a
global of another module, a class attribute from outside) or a name other modules import from the package
(`modules[0].attention = recording`: another module's global, reached through a variable); `setattr` on an
imported name; any use of `sys.meta_path` / `sys.path_hooks`. Scoped settings through a library's own context
manager (`torch._dynamo.config.patch(...)`), an object's own values, and replacing a child module of a model
(quantization) are not patching. The old tree's patches (class swaps in the compiled decode step, the patched
head, the studio's swapped attention, the import hook, dynamo's global settings) are each of a flagged kind; a
planted file shows the checker finds each.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "flash_experts"
PATCHED_METHODS = {"forward"}


def imported_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def root_name(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def package_functions(src: Path) -> set[str]:
    """The package's top-level functions and classes that other modules import by name: assigning one of those
    names on an object (`modules[0].attention = recording`) replaces another module's global."""
    defined, imported = set(), set()
    for file in src.rglob("*.py"):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        defined.update(node.name for node in tree.body
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
        imported.update(alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                        and (node.module or "").startswith("flash_experts") for alias in node.names)
    return defined & imported


def patches(source: str, functions: set[str] = frozenset()) -> list[str]:
    """'line: what' for every run-time patch in `source` (`functions`: names a module global may have)."""
    tree = ast.parse(source)
    imported = imported_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        for target in targets:
            for element in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if not isinstance(element, ast.Attribute):
                    continue
                if element.attr.startswith("__") or element.attr in PATCHED_METHODS:
                    found.append(f"{node.lineno}: assigns .{element.attr}")
                elif root_name(element) in imported:
                    found.append(f"{node.lineno}: assigns an attribute of imported {root_name(element)}")
                elif element.attr in functions and root_name(element) != "self":
                    found.append(f"{node.lineno}: replaces a module's {element.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and root_name(node.args[0]) in imported:
                found.append(f"{node.lineno}: {node.func.id} on imported {root_name(node.args[0])}")
        if isinstance(node, ast.Attribute) and node.attr in ("meta_path", "path_hooks") and root_name(node) == "sys":
            found.append(f"{node.lineno}: uses sys.{node.attr}")
    return sorted(set(found), key=lambda line: int(line.split(":")[0]))


def test_no_module_patches_anything_at_run_time():
    functions = package_functions(SRC)
    found = {str(file.relative_to(SRC)): patches(file.read_text(encoding="utf-8"), functions)
             for file in SRC.rglob("*.py")}
    assert {file: lines for file, lines in found.items() if lines} == {}


def test_the_checker_finds_each_kind_of_patch():
    """Reference: a planted file with one patch of each kind on known lines, and the allowed look-alikes."""
    planted = "\n".join([
        "import sys",                                            # 1
        "import torch",                                          # 2
        "from flash_experts.model import gpt2_moe",              # 3
        "module.__class__ = Other",                              # 4  class swap
        "head.forward = faster",                                 # 5  patched method
        "torch._dynamo.config.recompile_limit = 64",             # 6  global setting
        "gpt2_moe.attention = recording",                        # 7  another module's global
        "setattr(torch.nn.Linear, 'forward', faster)",           # 8  setattr on a class
        "sys.meta_path.insert(0, finder)",                       # 9  import hook
        "self.weight = weight",                                  # 10 fine: an object's own state
        "config.attention_implementation = recorder",            # 11 fine: a value, not code
        "setattr(parent, name, quantized)",                      # 12 fine: a model's child module
        "with torch._dynamo.config.patch(recompile_limit=64):",  # 13 fine: scoped by the library
        "    pass",
        "modules[0].attention = recording",                      # 15 another module's global, reached indirectly
    ])
    assert [int(line.split(":")[0]) for line in patches(planted, {"attention"})] == [4, 5, 6, 7, 8, 9, 15]
