"""docs/architecture.md maps every module of the package: a module added without a line there fails."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_module_is_in_the_architecture_map():
    text = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "proxy"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        relative = path.relative_to(package)
        named = {f"`{relative.as_posix()}`", f"`{path.name}`", f"`{path.stem}`"}
        if not any(name in text for name in named):
            missing.append(relative.as_posix())
    assert missing == [], f"describe these modules in docs/architecture.md: {missing}"
