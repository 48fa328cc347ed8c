"""Cheap checks of the Containerfiles (no build): they copy every package folder and pin the package's torch."""

from __future__ import annotations

import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", ["operator", "engine"])
def test_containerfile_copies_every_package_folder(name):
    text = (ROOT / "images" / name / "Containerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+?)/? ", text, re.MULTILINE))
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied, f"images/{name}/Containerfile misses {sorted(folders - copied)}"
    ignored = (ROOT / ".containerignore").read_text().split()
    assert {f"!{folder}/" for folder in folders} <= set(ignored)
    assert re.search(r"^ARG BASE=\S+", text, re.MULTILINE) and "USER 65532:65532" in text


def test_engine_containerfile_torch_matches_the_engine_extra():
    pinned = next(r for r in PYPROJECT["project"]["optional-dependencies"]["engine"] if r.startswith("torch=="))
    text = (ROOT / "images" / "engine" / "Containerfile").read_text()
    assert f"ARG TORCH_VERSION={pinned.removeprefix('torch==')}" in text


def test_every_subpackage_is_in_the_wheel():
    """The images install the package from a wheel (not editable): every folder with an __init__.py is listed."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set(), "pyproject.toml [tool.setuptools] packages misses these"
