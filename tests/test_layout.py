"""The import direction between folders (DESIGN.md): models know nothing of methods, methods nothing of data."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adamatch_uan"

FORBIDDEN = {
    "norm": ["adamatch_uan.models", "adamatch_uan.methods", "adamatch_uan.data", "adamatch_uan.augment",
             "adamatch_uan.fit", "lightning", "torchvision", "kornia"],
    "models": ["adamatch_uan.methods", "adamatch_uan.data", "adamatch_uan.augment", "adamatch_uan.fit", "lightning"],
    "methods": ["adamatch_uan.data", "adamatch_uan.fit"],
    "data": ["adamatch_uan.models", "adamatch_uan.methods", "adamatch_uan.norm", "adamatch_uan.fit"],
    "augment.py": ["adamatch_uan.", "lightning"],
    "callbacks": ["adamatch_uan.methods", "adamatch_uan.data", "adamatch_uan.models", "adamatch_uan.fit"],
    "cli": ["adamatch_uan.methods", "adamatch_uan.models", "adamatch_uan.callbacks", "adamatch_uan.fit",
            "adamatch_uan.predict", "adamatch_uan.evaluate", "adamatch_uan.export", "adamatch_uan.classifier"],
    "plots.py": ["adamatch_uan.methods", "adamatch_uan.data", "adamatch_uan.models", "adamatch_uan.callbacks",
                 "adamatch_uan.fit", "lightning"],
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", list(FORBIDDEN))
def test_import_direction(part):
    files = [PACKAGE / part] if part.endswith(".py") else sorted((PACKAGE / part).glob("*.py"))
    for path in files:
        bad = [m for m in imports(path) for f in FORBIDDEN[part] if m == f or m.startswith(f.rstrip(".") + ".")
               or (f.endswith(".") and m.startswith(f))]
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_readme_links_resolve_inside_the_repository():
    import re

    root = PACKAGE.parent
    for document in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", document.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            resolved = (document.parent / target).resolve()
            assert resolved.is_relative_to(root), f"{document.name} links outside the repository: {target}"
            assert resolved.exists(), f"{document.name} links to a missing file: {target}"
