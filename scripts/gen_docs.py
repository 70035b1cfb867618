"""Regenerate the tables in docs/ from the code, so the reference cannot drift from it.

    python -m scripts.gen_docs          # rewrite the generated sections in place
    python -m scripts.gen_docs --check  # exit 1 (saying which file) when a section is out of date

* docs/configuration.md: the settings table, from ``textgen.config.Settings`` (name, default, meaning,
  allowed values);
* docs/api.md: the routes table, from the app's OpenAPI document (method, path, summary, status codes).

Each section sits between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``;
everything outside the markers is written by hand. Run it after adding a setting or a route.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"


def _format_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list):
        return f"`{','.join(value)}`" if value else "none"
    if isinstance(value, Path):
        home = str(Path.home())
        text = str(value)
        value = "~" + text[len(home) :] if text.startswith(home) else text
    return f"`{value}`"


def _choices(annotation: Any) -> list[str]:
    """The allowed values of a Literal setting (``dtype``, ``engine``...), else none."""
    if typing.get_origin(annotation) is Literal:
        return [str(v) for v in typing.get_args(annotation)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(annotation) for c in _choices(arg)]
    return []


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    from textgen.config import ENV_PREFIX, Settings

    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        meaning = field.description or ""
        choices = _choices(field.annotation)
        if choices:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
        env = f"{ENV_PREFIX}{name.upper()}"
        lines.append(f"| `{env}` | {_format_default(default)} | {_cell(meaning)} |")
    return "\n".join(lines)


def routes_table() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from main import create_app

    schema = create_app().openapi()
    lines = ["| method | path | what it does | success | errors |", "|---|---|---|---|---|"]
    for path, item in schema["paths"].items():
        for method in HTTP_METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            codes = sorted(operation.get("responses", {}), key=int)
            ok = [c for c in codes if c.startswith("2")]
            errors = [c for c in codes if not c.startswith("2")]
            summary = _cell(operation.get("summary", ""))
            lines.append(f"| {method.upper()} | `{path}` | {summary} | {', '.join(ok)} | {', '.join(errors)} |")
    return "\n".join(lines)


SECTIONS: dict[str, tuple[Path, Callable[[], str]]] = {
    "settings": (DOCS / "configuration.md", settings_table),
    "routes": (DOCS / "api.md", routes_table),
}


def replace_section(text: str, name: str, body: str) -> str:
    begin, end = _markers(name)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"{name}: markers {begin!r} ... {end!r} not found in order")
    return text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]


def generated_section(text: str, name: str) -> str:
    begin, end = _markers(name)
    return text[text.index(begin) + len(begin) : text.index(end)].strip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report sections that are out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, (path, build) in SECTIONS.items():
        text = path.read_text(encoding="utf-8")
        updated = replace_section(text, name, build())
        if updated != text:
            stale.append(f"{path.relative_to(REPO_ROOT)} ({name})")
            if not args.check:
                path.write_text(updated, encoding="utf-8")
    if stale:
        verb = "out of date" if args.check else "rewritten"
        sys.stderr.write(f"{verb}: {', '.join(stale)}\n")
        if args.check:
            sys.stderr.write("run: python -m scripts.gen_docs\n")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
