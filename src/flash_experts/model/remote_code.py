"""Checkpoint folders that load without this package: the modeling code travels inside them.

transformers' remote-code convention: `config.json` carries an `auto_map` naming a module file in the folder
and a class in it; `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` imports that file
(and the files it imports relatively) needing only torch and transformers.

transformers' own `register_for_auto_class` copies just the class's file and its `from .x import` siblings,
flat; our model spans `model/`, `attention/` and `errors.py` with absolute imports. So the bundle is made here:
every module of this package the model needs (found by reading the imports with `ast`, lazy ones included)
is written flat as `<package>_<module>.py` (`model/moe.py` -> `model_moe.py`, `attention/__init__.py` ->
`attention.py`), each `from flash_experts.a.b import` rewritten to `from .a_b import`.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from flash_experts.errors import UserError

PACKAGE = "flash_experts"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_ABSOLUTE_IMPORT = re.compile(rf"^(\s*)from {PACKAGE}((?:\.\w+)*) import ", flags=re.MULTILINE)


def flat_name(module: str) -> str:
    """`flash_experts.model.moe` -> `model_moe`: the file's name (without .py) inside a checkpoint folder."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        raise UserError(f"{module!r} is not a module of {PACKAGE}")
    return "_".join(parts[1:])


def _find_source(module: str) -> Path | None:
    relative = Path(*module.split(".")[1:])
    for candidate in (_PACKAGE_ROOT / relative.with_suffix(".py"), _PACKAGE_ROOT / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _source_file(module: str) -> Path:
    source = _find_source(module)
    if source is None:
        raise UserError(f"source of {module} not found under {_PACKAGE_ROOT}")
    return source


def _imported_modules(file: Path) -> set[str]:
    """The modules of this package a file imports (`from flash_experts.x import name`: the submodule
    `flash_experts.x.name` when there is one, else `flash_experts.x`)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == PACKAGE for alias in node.names):
            raise UserError(f"{file}: write `from {PACKAGE}.x import y`; a plain import cannot be bundled")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            if node.module == PACKAGE:
                raise UserError(f"{file}: import from a module of {PACKAGE}, not from the package root")
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _find_source(submodule) is not None else node.module)
    return found


def module_closure(module: str) -> list[str]:
    """`module` and every module of this package it needs, directly or not, sorted."""
    needed, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in needed:
            continue
        needed.add(current)
        todo.extend(_imported_modules(_source_file(current)) - needed)
    return sorted(needed)


def bundled_source(module: str) -> str:
    """The module's source with its absolute imports of this package made relative to the flat bundle."""
    return _ABSOLUTE_IMPORT.sub(
        lambda match: f"{match.group(1)}from .{flat_name(PACKAGE + match.group(2))} import ",
        _source_file(module).read_text(encoding="utf-8"),
    )


def write_modeling_code(model_class: type, config_class: type, folder: Path) -> dict[str, str]:
    """Write the modeling code of `model_class` into `folder`; return the `auto_map` for config.json.

    A model that was itself loaded as remote code (its module lives in transformers' module cache) carries
    its bundle in its own folder: those files are copied as they are.
    """
    folder = Path(folder)
    module = model_class.__module__
    if module.split(".")[0] == PACKAGE:
        for needed in module_closure(module):
            (folder / f"{flat_name(needed)}.py").write_text(bundled_source(needed), encoding="utf-8")
        model_file, config_file = flat_name(module), flat_name(config_class.__module__)
    else:
        from transformers.dynamic_module_utils import get_relative_import_files

        source = Path(sys.modules[module].__file__)
        for file in [source, *map(Path, get_relative_import_files(source))]:
            if file.resolve() != (folder / file.name).resolve():
                (folder / file.name).write_text(file.read_text(encoding="utf-8"), encoding="utf-8")
        model_file, config_file = module.split(".")[-1], config_class.__module__.split(".")[-1]
    return {
        "AutoConfig": f"{config_file}.{config_class.__name__}",
        "AutoModelForCausalLM": f"{model_file}.{model_class.__name__}",
    }
