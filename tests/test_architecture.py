"""The import rules of docs/architecture.md, checked on the source (nothing is imported or run).

Layers, bottom up: utils; models and data; ssl and telemetry; eval; config; runtime; lit; then the
entry points in train/ and scripts/. A package imports only from the layers below it. The pure packages
(models, data, ssl, telemetry, eval, utils) never import Lightning, Hydra/OmegaConf, W&B or submitit.
data, telemetry and eval see the backbone only through its public API: no module of vitreg.models but the
public ones, and no attribute of its insides (blocks, attention, patch embedding, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vitreg"

ALLOWED = {  # package -> the vitreg packages it may import
    "utils": set(),
    "models": {"utils"},
    "data": {"utils"},
    "ssl": {"models", "utils"},
    "telemetry": {"models", "data", "utils"},
    "eval": {"models", "data", "telemetry", "utils"},
    "config": {"models", "data", "ssl", "telemetry", "eval", "utils"},
    "runtime": {"config", "models", "data", "telemetry", "utils"},
    "lit": {"models", "data", "ssl", "telemetry", "eval", "utils", "config", "runtime"},
}
PURE = ("utils", "models", "data", "ssl", "telemetry", "eval")
FRAMEWORKS = {"lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "submitit"}
BACKBONE_CONSUMERS = ("data", "telemetry", "eval")
PUBLIC_MODEL_MODULES = {
    "vitreg.models",
    "vitreg.models.export",
    "vitreg.models.layout",
    "vitreg.models.load",
    "vitreg.models.vision_transformer",
}
BACKBONE_INSIDES = {"blocks", "prepare_tokens_with_masks", "patch_embed", "attn", "mlp", "norm1", "norm2", "ls1", "ls2"}


def package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_every_package_has_its_layer():
    assert {package_of(p) for p in source_files()} <= set(ALLOWED) | {"__init__"}


def test_packages_import_only_from_the_layers_below():
    wrong = []
    for path in source_files():
        own = package_of(path)
        for line, module in imports(path):
            parts = module.split(".")
            if parts[0] == "vitreg" and len(parts) > 1 and parts[1] != own and parts[1] not in ALLOWED.get(own, set()):
                wrong.append(f"{where(path, line)}: {own} imports {module}")
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(wrong)


def test_pure_packages_import_no_framework():
    wrong = [
        f"{where(path, line)}: {module}"
        for path in source_files()
        if package_of(path) in PURE
        for line, module in imports(path)
        if module.split(".")[0] in FRAMEWORKS
    ]
    assert not wrong, "Lightning/Hydra/W&B belong to lit/, runtime/, config.py and the entry points:\n" + "\n".join(
        wrong
    )


@pytest.mark.parametrize("consumer", BACKBONE_CONSUMERS)
def test_backbone_consumers_use_its_public_api(consumer):
    wrong = []
    for path in sorted((PACKAGE / consumer).rglob("*.py")):
        for line, module in imports(path):
            if module.startswith("vitreg.models") and module not in PUBLIC_MODEL_MODULES:
                wrong.append(f"{where(path, line)}: imports {module}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in BACKBONE_INSIDES:
                wrong.append(f"{where(path, node.lineno)}: .{node.attr}")
    assert not wrong, f"{consumer}/ reaches into the backbone; use its public API instead:\n" + "\n".join(wrong)


def test_the_rules_catch_a_violation(tmp_path, monkeypatch):
    """The checks above would see an upward import and a reach into the backbone."""
    fake = tmp_path / "vitreg"
    (fake / "models").mkdir(parents=True)
    (fake / "eval").mkdir()
    (fake / "models" / "bad.py").write_text("from vitreg.lit.module import DINOv2Module\nimport lightning\n")
    (fake / "eval" / "bad.py").write_text("from vitreg.models.block import Block\nx = model.blocks[0]\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    for check in (test_packages_import_only_from_the_layers_below, test_pure_packages_import_no_framework):
        with pytest.raises(AssertionError):
            check()
    with pytest.raises(AssertionError, match=r"imports vitreg\.models\.block(.|\n)*\.blocks"):
        test_backbone_consumers_use_its_public_api("eval")
