"""Suite-wide test settings: Hypothesis profiles.

Two profiles, chosen once per run:

* ``ci`` (when the ``CI`` environment variable is set to anything but empty
  or ``0``): derandomized, so every CI run draws the same examples from a
  seed derived from each test's source; no example database (nothing carries
  over between runs); no per-example deadline (shared CI machines are
  slow); ``print_blob`` so a failure prints the blob that reproduces it with
  ``@reproduce_failure``.
* ``dev`` (otherwise): random draws (``--hypothesis-seed=N`` pins them), the
  example database kept locally in ``.hypothesis/`` (git-ignored) so a
  failure found once is replayed first next time; no deadline either, since
  the tests must never fail on time.

Each test's own ``@settings`` (max_examples, health checks) still applies on
top of the profile; no test sets ``derandomize``, ``database`` or
``deadline`` other than to ``None``.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

ROOT = Path(__file__).resolve().parents[1]

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile(
    "dev", derandomize=False, database=DirectoryBasedExampleDatabase(str(ROOT / ".hypothesis" / "examples")),
    deadline=None,
    print_blob=True,
)


def hypothesis_profile(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """``ci`` when ``CI`` is set to a true-ish value, else ``dev``."""
    return "ci" if environ.get("CI", "").strip() not in ("", "0", "false", "False") else "dev"


settings.load_profile(hypothesis_profile())
