"""The engine and the front-ends reach model families only through the small typed interfaces.

Every import of `vllm_zipar.models` from `engine/` must be of `image_grid` (the engine's view of a family)
or `registry` (which family serves a directory); `serving/` may also import the front-ends' interfaces
(`image_model`, `image_prompts`, `image_decoder`, `prompt_error`). So adding a family touches `models/` and
the registry only, and the engine never types against a front-end member. The runtime packages never import
`vllm_zipar.testing` (tiny directories for tests).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_zipar"
ENGINE_ALLOWED = {"vllm_zipar.models.image_grid", "vllm_zipar.models.registry"}
ALLOWED = {
    "engine": ENGINE_ALLOWED,
    "serving": ENGINE_ALLOWED
    | {
        "vllm_zipar.models.image_model",
        "vllm_zipar.models.image_prompts",
        "vllm_zipar.models.image_decoder",
        "vllm_zipar.models.prompt_error",
    },
}


def imports(path: Path, prefix: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [name for name in names if name.startswith(prefix)]


@pytest.mark.parametrize("layer", ["engine", "serving"])
def test_engine_and_serving_import_no_model_family(layer):
    offending = {
        str(path.relative_to(PACKAGE)): sorted(set(imports(path, "vllm_zipar.models")) - ALLOWED[layer])
        for path in sorted((PACKAGE / layer).rglob("*.py"))
    }
    assert {path: names for path, names in offending.items() if names} == {}


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_models_import_neither_engine_nor_serving():
    """Families build plain vLLM layers; the engine chooses their attention (engine/attention_backends.py)."""
    upward = ("vllm_zipar.engine", "vllm_zipar.serving")
    offending = {
        str(path.relative_to(PACKAGE)): [name for name in imports_of(path) if name.startswith(upward)]
        for path in sorted((PACKAGE / "models").rglob("*.py"))
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_zipar_planning_is_pure_python():
    """Layer 1 imports neither torch nor vLLM nor any layer above it."""
    banned = ("torch", "vllm.", "vllm_zipar.models", "vllm_zipar.engine", "vllm_zipar.serving")
    offending = {
        str(path.relative_to(PACKAGE)): [
            name for name in imports_of(path) if name in ("torch", "vllm") or name.startswith(banned)
        ]
        for path in sorted((PACKAGE / "zipar").rglob("*.py"))
    }
    assert {path: names for path, names in offending.items() if names} == {}


@pytest.mark.parametrize("layer", ["zipar", "models", "engine", "serving"])
def test_the_runtime_imports_no_test_helpers(layer):
    offending = [
        str(path.relative_to(PACKAGE))
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        if imports(path, "vllm_zipar.testing")
    ]
    assert offending == []
