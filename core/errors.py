"""The one error type both planes raise for a user's mistake.

The ``moeshard`` command line prints any :class:`UserError` as one line
(``moeshard COMMAND: error: MESSAGE``) and exits with status 2; anything else
is a bug and keeps its traceback. Bad specs (``SpecError``), config.json files
(``ConfigError``), placement files (``PlacementError``) and command arguments
(``CommandError``) all derive from it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave us; the message names the field or argument."""


class CommandError(UserError):
    """A bad command-line argument or environment, printed as one line with exit status 2."""
