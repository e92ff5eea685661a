"""Errors that reach users: one clear line naming the argument and what was expected.

The command-line tool prints ``l2o: error: <message>`` and exits with code 2 for
every :class:`L2OError`; Python users catch them like any ``ValueError``.
"""

from __future__ import annotations


class L2OError(ValueError):
    """A user-facing error: bad input, a missing or corrupt file, a failed run."""


class CheckpointError(L2OError):
    """A checkpoint or artifact is missing, corrupt, truncated or does not match."""


class NonFiniteError(L2OError):
    """Meta-training stopped because too many meta-steps in a row were non-finite."""
