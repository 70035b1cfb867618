"""The fused kernels load only from a folder this user owns and nobody else can write (issue 20, HIGH 3).

The attack: another local user creates the kernel folder first, or plants a library under the computable
name, and the service (root, often) loads it. Each test plants a real shared library whose constructor
writes a marker file, so "never loaded" is checked by what the library would have done, not by a mock.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from textgen.api.health import core_details
from textgen.engine.core import fused
from textgen.engine.core.fused import build_fused_kernels, load_fused_kernels

NOBODY = 65534
PLANTED_SOURCE = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen(MARKER, "w");
    if (marker) fclose(marker);
}
"""


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert found is not None, "these tests need a C compiler (gcc)"
    return found


def library_name() -> str:
    """The name the service looks for: computable by anyone from world-readable inputs."""
    return f"fused-{fused._build_key(compiler())}.so"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "planted-library-ran"


@pytest.fixture
def plant(tmp_path: Path, marker: Path) -> Callable[[Path], Path]:
    """plant(folder) puts an attacker's library under the service's library name in folder (created)."""

    def build(folder: Path) -> Path:
        source = tmp_path / "planted.c"
        source.write_text(PLANTED_SOURCE)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / library_name()
        command = [compiler(), "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(target), str(source)]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        return target

    return build


@pytest.fixture
def as_other_user(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Make a path belong to another user: chown to nobody as root (as here), else this process pretends
    to be another uid, which makes its own files foreign the same way."""

    def give_away(path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        else:
            real = os.geteuid()
            monkeypatch.setattr(fused.os, "geteuid", lambda: real + 1)

    return give_away


def loaded_libraries() -> str:
    return Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""


def assert_refused(folder: Path, marker: Path, expected: str, caplog: pytest.LogCaptureFixture) -> str:
    with caplog.at_level(logging.WARNING, logger="textgen.engine.core.fused"):
        build = build_fused_kernels(folder)
    assert build.kernels is None
    assert not marker.exists(), "the planted library was loaded"
    assert str(folder) not in loaded_libraries()
    assert expected in build.problem and "fix:" in build.problem
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Fused CPU kernels off" in r.message]
    assert len(warnings) == 1 and expected in warnings[0].getMessage()
    return build.problem


def test_a_library_planted_in_a_folder_owned_by_another_user_is_never_loaded(
    tmp_path: Path,
    plant: Callable[[Path], Path],
    as_other_user: Callable[[Path], None],
    marker: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The attacker created the folder first (mode 0755, theirs) and planted the library in it."""
    folder = tmp_path / "kernels"
    library = plant(folder)
    folder.chmod(0o755)
    as_other_user(library)
    as_other_user(folder)
    problem = assert_refused(folder, marker, f"kernel folder {folder} is owned by uid", caplog)
    assert "XDG_CACHE_HOME" in problem  # the fix names where else the folder can go
    assert library.exists()  # refused, not deleted: the operator sees what was there


def test_an_empty_folder_created_by_another_user_is_not_compiled_into(
    tmp_path: Path, as_other_user: Callable[[Path], None], marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The other way the attack went: an empty folder of theirs, compiled into by root, swapped later."""
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o755)
    as_other_user(folder)
    assert_refused(folder, marker, "is owned by uid", caplog)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o703, 0o777])
def test_a_folder_writable_by_group_or_others_is_refused(
    tmp_path: Path, plant: Callable[[Path], Path], marker: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    folder = tmp_path / "kernels"
    plant(folder)
    folder.chmod(mode)
    assert_refused(folder, marker, "is writable by group or others", caplog)


def test_a_symlinked_folder_is_refused_even_when_it_points_at_our_own(
    tmp_path: Path, plant: Callable[[Path], Path], marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    real = tmp_path / "real"
    plant(real)
    real.chmod(0o700)
    link = tmp_path / "kernels"
    link.symlink_to(real)
    assert_refused(link, marker, f"{link} is a symlink", caplog)


def test_a_symlink_higher_up_the_path_is_refused(
    tmp_path: Path, plant: Callable[[Path], Path], marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    plant(tmp_path / "real" / "kernels").parent.chmod(0o700)
    (tmp_path / "cache").symlink_to(tmp_path / "real")
    assert_refused(tmp_path / "cache" / "kernels", marker, f"{tmp_path / 'cache'} is a symlink", caplog)


def test_a_symlinked_library_is_refused(
    tmp_path: Path, plant: Callable[[Path], Path], marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Our folder, but the library name points somewhere else (a library elsewhere, even one we own)."""
    elsewhere = plant(tmp_path / "elsewhere")
    folder = tmp_path / "kernels"
    folder.mkdir(mode=0o700)
    (folder / library_name()).symlink_to(elsewhere)
    assert_refused(folder, marker, "is a symlink", caplog)


@pytest.mark.parametrize("mode", [0o666, 0o722, 0o757])
def test_a_library_writable_by_group_or_others_in_our_folder_is_refused(
    tmp_path: Path, plant: Callable[[Path], Path], marker: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    folder = tmp_path / "kernels"
    library = plant(folder)
    folder.chmod(0o700)
    library.chmod(mode)
    problem = assert_refused(folder, marker, f"kernel library {library} is writable by group or others", caplog)
    assert f"rm {library}" in problem


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away to another uid needs root")
def test_a_library_owned_by_another_user_in_our_folder_is_refused(
    tmp_path: Path, plant: Callable[[Path], Path], marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "kernels"
    library = plant(folder)
    folder.chmod(0o700)
    library.chmod(0o700)
    os.chown(library, NOBODY, NOBODY)
    assert_refused(folder, marker, f"kernel library {library} is owned by uid {NOBODY}", caplog)


def test_a_file_at_the_folder_path_turns_kernels_off_loudly(
    tmp_path: Path, marker: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not silently (the issue measured 51 vs 69 tok/s): the reason is logged and reported."""
    (tmp_path / "kernels").write_text("not a folder")
    assert_refused(tmp_path / "kernels", marker, "is not a directory", caplog)


def test_a_fresh_folder_is_created_0700_and_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.umask(previous := os.umask(0))  # the library must not come out world-writable even with umask 0
    folder = tmp_path / "cache" / "textgen" / "kernels"
    try:
        with caplog.at_level(logging.WARNING):
            build = build_fused_kernels(folder)
    finally:
        os.umask(previous)
    assert build.kernels is not None and build.problem == ""
    for created in (tmp_path / "cache", tmp_path / "cache" / "textgen", folder):
        assert stat.S_IMODE(created.lstat().st_mode) == 0o700 and created.lstat().st_uid == os.geteuid()
    (library,) = folder.iterdir()  # no temporary files left behind
    assert library.name == library_name()
    assert library.lstat().st_mode & (stat.S_IWGRP | stat.S_IWOTH) == 0
    assert str(library) in loaded_libraries()
    assert "Fused CPU kernels off" not in caplog.text
    assert load_fused_kernels(folder) is build.kernels  # once per process: the sampler gets the same library


def test_the_default_folder_is_in_the_users_cache_not_a_shared_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fused.kernel_folder() == tmp_path / "textgen" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fused.kernel_folder() == tmp_path / "home" / ".cache" / "textgen" / "kernels"


def test_ready_details_name_the_fallback_reason() -> None:
    assert core_details({"core": "textgen-llama", "weights": "bf16", "fused_kernels": True}) == {
        "core": "textgen-llama", "weights": "bf16", "fused_kernels": "on"
    }
    off = core_details({"core": "textgen-llama", "fused_kernels": False, "fused_kernels_off": "folder refused"})
    assert off["fused_kernels"] == "off: folder refused"
