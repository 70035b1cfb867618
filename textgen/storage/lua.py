"""Lua scripts kept as ``.lua`` files next to the store that runs them, read once when the store's module
is imported (a missing file fails the import, not the first request).

Each file starts with comments saying what it gets (KEYS, ARGV) and returns. A store whose scripts
share helpers keeps them in ``prelude.lua``, put in front of each of its scripts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def lua_source(folder: Path, name: str) -> str:
    return (folder / f"{name}.lua").read_text(encoding="utf-8")


def lua_scripts(folder: Path, names: Iterable[str], *, prelude: str | None = None) -> dict[str, str]:
    """``{name: source}`` of ``folder/<name>.lua`` for each name, with ``folder/<prelude>.lua`` in front."""
    head = "" if prelude is None else lua_source(folder, prelude) + "\n"
    return {name: head + lua_source(folder, name) for name in names}
