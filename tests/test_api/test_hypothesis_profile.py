"""The suite-wide Hypothesis profiles (tests/conftest.py): derandomized without a database in CI."""

from __future__ import annotations

import importlib.util
import pathlib

from hypothesis import settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _conftest():
    spec = importlib.util.spec_from_file_location("root_conftest_copy", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_selects_a_derandomized_profile_without_database():
    conftest = _conftest()
    assert conftest.hypothesis_profile({"CI": "1"}) == "ci"
    assert conftest.hypothesis_profile({"CI": "true"}) == "ci"
    for environ in ({}, {"CI": ""}, {"CI": "0"}):
        assert conftest.hypothesis_profile(environ) == "dev"
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.deadline is None and ci.print_blob
    dev = settings.get_profile("dev")
    assert not dev.derandomize and dev.database is not None and dev.deadline is None


def test_the_loaded_profile_follows_the_environment():
    import os

    expected = _conftest().hypothesis_profile(os.environ)
    assert settings.default.derandomize == (expected == "ci")
