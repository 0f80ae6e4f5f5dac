"""The package's shape, checked by parsing imports (no module is run): imports run one way,
kernels <- layers/routing <- model <- stages (generation, training, eval, serve, ...) <- CLI, and the
layers never import Triton (the kernels' dispatchers choose the backend)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "blackmamba"
# Rank of each part of the package; a module may import its own rank or below. Modules not named here are
# support code (config, errors, devices, tokenizer, ...): importable from anywhere, importing only support.
RANKS = {"kernels": 0, "layers": 1, "routing": 1, "model": 2, "cli": 4, "__main__": 4}
STAGES = ("generation", "training", "eval", "serve", "checkpoint", "demo", "hf", "experiments")
SUPPORT = -1


def rank_of(part: str) -> int:
    return 3 if part in STAGES else RANKS.get(part, SUPPORT)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, inside functions too."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from . import scan_triton` names modules too
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if not node.module]
    return found


def package_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "blackmamba" and len(parts) > 1 else None


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_the_parser_resolves_relative_imports():
    found = dict((target, line) for line, target in imports(PACKAGE / "layers" / "mamba.py"))
    assert "blackmamba.kernels" in found and "blackmamba.layers.mixer" in found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    own = package_part(module_name(path)) or path.stem
    own_rank = rank_of(own)
    for line, target in imports(path):
        part = package_part(target)
        if part is None or part == own:
            continue
        rank = rank_of(part)
        if own_rank == SUPPORT:
            assert rank == SUPPORT, f"{path.name}:{line}: support module imports {target}"
        else:
            assert rank <= own_rank, f"{path.relative_to(PACKAGE)}:{line}: {own} (rank {own_rank}) imports {target}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "layers").glob("*.py")) + [PACKAGE / "model.py"])
def test_layers_and_model_never_import_triton(path):
    for line, target in imports(path):
        assert target.split(".")[0] != "triton", f"{path.name}:{line} imports {target}"


def test_the_model_imports_kernels_by_public_name_only():
    for path in sorted((PACKAGE / "layers").glob("*.py")) + [PACKAGE / "model.py"]:
        for line, target in imports(path):
            assert not target.startswith("blackmamba.kernels."), f"{path.name}:{line} imports {target}"
