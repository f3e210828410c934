"""The one exception family that user mistakes raise; the CLI turns it into one line and exit code 2."""

from __future__ import annotations


class DeadNeuronError(Exception):
    """A problem the user can fix: a missing file, a refused file, bad data, a bad option.

    Messages say what happened, what was expected and received, and how to fix it, in one or two lines.
    """

    exit_code = 2

