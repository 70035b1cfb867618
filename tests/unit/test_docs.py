"""The reference in docs/ matches the code: the generated tables are current, every setting and every
route appears exactly once, and no page names a TEXTGEN_ variable that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts import gen_docs
from textgen.config import ENV_PREFIX, Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
ENV_NAMES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize("name", sorted(gen_docs.SECTIONS))
def test_generated_section_is_current(name: str) -> None:
    path, build = gen_docs.SECTIONS[name]
    assert gen_docs.generated_section(path.read_text(encoding="utf-8"), name) == build(), (
        f"{path.name} is out of date: run python -m scripts.gen_docs"
    )


def test_every_setting_has_exactly_one_row() -> None:
    table = gen_docs.generated_section(
        (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8"), "settings"
    )
    rows = re.findall(r"^\| `(TEXTGEN_[A-Z0-9_]+)` \|", table, flags=re.MULTILINE)
    assert sorted(rows) == sorted(ENV_NAMES)  # each exactly once, nothing else
    for field in Settings.model_fields.values():
        assert field.description, "every setting needs a description: it is the documentation"


def test_every_route_has_exactly_one_row() -> None:
    from main import create_app

    table = gen_docs.generated_section((REPO_ROOT / "docs" / "api.md").read_text(encoding="utf-8"), "routes")
    rows = re.findall(r"^\| ([A-Z]+) \| `([^`]+)` \|", table, flags=re.MULTILINE)
    schema = create_app().openapi()
    expected = [(m.upper(), p) for p, item in schema["paths"].items() for m in item if m in gen_docs.HTTP_METHODS]
    assert sorted(rows) == sorted(expected)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_name_only_settings_that_exist(page: Path) -> None:
    named = set(re.findall(r"TEXTGEN_[A-Z0-9_]*[A-Z0-9]", page.read_text(encoding="utf-8")))
    assert named <= ENV_NAMES, f"{page.name} names unknown settings: {sorted(named - ENV_NAMES)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_check_mode_reports_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("x\n<!-- BEGIN GENERATED: settings -->\n| old |\n<!-- END GENERATED: settings -->\n")
    monkeypatch.setattr(gen_docs, "SECTIONS", {"settings": (stale, gen_docs.settings_table)})
    monkeypatch.setattr(gen_docs, "REPO_ROOT", tmp_path)
    assert gen_docs.main(["--check"]) == 1
    assert gen_docs.main([]) == 0
    assert gen_docs.main(["--check"]) == 0
    assert "`TEXTGEN_MAX_RUNNING` | `64`" in stale.read_text()
