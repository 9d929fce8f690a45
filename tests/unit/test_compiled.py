"""Which build of the frame core is imported: compiled by mypyc (setup.py) or the pure-Python source.

``WSGATE_EXPECT_COMPILED=1`` (or ``0``) makes the run assert the compiled (or the pure) build: CI runs the
whole suite once on each. Without it, the modules only have to agree with each other and with their source.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from proxy import frames, protocol, rules

#: The modules setup.py compiles (COMPILED_MODULES there).
CORE = (protocol, frames, rules)


def _compiled(module: ModuleType) -> bool:
    assert module.__file__ is not None
    return module.__file__.endswith((".so", ".pyd"))


def test_the_frame_core_is_one_build() -> None:
    assert _compiled(protocol) == protocol.COMPILED
    assert [_compiled(module) for module in CORE] == [protocol.COMPILED] * len(CORE), [
        module.__file__ for module in CORE
    ]


def test_the_expected_build_is_imported() -> None:
    expected = os.environ.get("WSGATE_EXPECT_COMPILED")
    if expected is None:
        pytest.skip("WSGATE_EXPECT_COMPILED is not set (CI sets it to 1, then 0)")
    assert expected in ("0", "1"), f"WSGATE_EXPECT_COMPILED={expected!r}: 1 or 0"
    assert (expected == "1") == protocol.COMPILED, protocol.__file__


def test_a_compiled_module_is_newer_than_its_source() -> None:
    """An editable install imports the extension next to the ``.py``: a source edited after the build
    would not run."""
    for module in CORE:
        if not _compiled(module):
            continue
        assert module.__file__ is not None
        built = Path(module.__file__)
        source = built.parent / (module.__name__.rsplit(".", 1)[1] + ".py")
        assert source.stat().st_mtime <= built.stat().st_mtime, (
            f"{source.name} changed after it was compiled: rebuild (pip install -e .) or delete proxy/*.so"
        )
