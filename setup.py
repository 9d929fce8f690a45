"""The build: the frame core compiled with mypyc when it can be, the pure-Python package otherwise.

The metadata is in pyproject.toml; this file only adds the extension modules. The modules named in
COMPILED_MODULES are compiled with mypyc (from mypy, a build requirement) into C extensions that sit next to
their ``.py`` files, which Python then imports instead. Without a C compiler, without mypy, with
``WSGATE_PURE_PYTHON=1`` in the environment, or when compiling fails, the package installs as plain Python
(the same source, interpreted) and one line on stderr says why.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: What is compiled, chosen by measurement (tests/bench/frame_core_bench.py, relay_bench.py): the frame
#: core and what it calls per frame. deflate.py stays interpreted: its per-message work runs in zlib.
COMPILED_MODULES = ["proxy/protocol.py", "proxy/frames.py", "proxy/rules.py"]


def _say(message: str) -> None:
    print(f"wsgate build: {message}", file=sys.stderr)


def _compiler() -> str | None:
    """The C compiler's command, or None when there is none to run."""
    command = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return shutil.which(command[0]) if command else None


class OptionalBuildExt(build_ext):
    """build_ext, but a failed compile installs the pure-Python package instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # a compiler error, missing Python headers...
            _say(f"compiling failed ({error}); installing pure Python")


def ext_modules() -> list[object]:
    if os.environ.get("WSGATE_PURE_PYTHON", "") not in ("", "0"):
        _say("WSGATE_PURE_PYTHON is set: installing pure Python (no compiled modules)")
        return []
    if _compiler() is None:
        _say("no C compiler found: installing pure Python (no compiled modules)")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypy (mypyc) is not installed: installing pure Python (no compiled modules)")
        return []
    try:
        # One shared library for the group, inside the package (proxy/_frame_core__mypyc*.so), so that an
        # editable install finds it next to the modules. The build environment has mypy but not the
        # runtime dependencies: their imports are typed Any here, as mypy proxy checks them properly.
        modules = mypycify(
            ["--ignore-missing-imports", "--no-warn-unused-ignores", *COMPILED_MODULES],
            opt_level="3",
            group_name="proxy._frame_core",
        )
    except (Exception, SystemExit) as error:  # mypy reports type errors by exiting
        _say(f"mypyc could not compile ({error}): installing pure Python")
        return []
    _say(f"compiling {', '.join(COMPILED_MODULES)} with mypyc")
    return list(modules)


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
