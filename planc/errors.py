"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Internal invariants use ``assert``; anything a user can get wrong in their input raises
``PlancError`` (or a subclass) with a message that names the file or field and the problem.
"""
from __future__ import annotations


class PlancError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class SpecError(PlancError):
    """model.yaml is malformed or names something that does not exist."""


class CheckpointError(PlancError):
    """A checkpoint, adapter or tokenizer on disk cannot be used."""


class BundleError(PlancError):
    """A bundle is missing files, or a file does not match its recorded hash."""


class PassError(PlancError):
    """A pass failed; the message names the pass and the passes that ran before it."""
