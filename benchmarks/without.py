"""Run a benchmark as if some packages were not installed (how CI, without the ``bench``
extra, sees it):

    python -m benchmarks.without torch,grabsampler benchmarks.ef21_step --quick

A finder at the front of ``sys.meta_path`` refuses every import of the named packages.  (Setting
``sys.modules[name] = None`` instead breaks libraries that look a package up in ``sys.modules``
to recognise its arrays, such as SciPy and diffrax's pretty-printer with ``torch``.)
"""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import ModuleSpec


class BlockImports:
    """A meta-path finder that raises ``ImportError`` for ``names`` and their submodules."""

    def __init__(self, names: list[str]):
        self.names = names

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if any(name == blocked or name.startswith(blocked + ".") for blocked in self.names):
            raise ImportError(f"{name} is blocked (benchmarks.without)")
        return None


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m benchmarks.without PKG[,PKG...] MODULE [ARGS...]")
    sys.meta_path.insert(0, BlockImports(argv[0].split(",")))
    importlib.import_module(argv[1]).main(argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
