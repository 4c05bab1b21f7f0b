"""User-facing errors.

Anything a person can fix (a wrong path, a misshaped tensor, a typo in a config) is raised as `QwenlinkError` with one
line that names the file / field / tensor and says what was expected. The CLI prints that line and exits non-zero;
tracebacks are reserved for `--debug` and for real bugs.
"""

from __future__ import annotations


class QwenlinkError(Exception):
    """An error caused by input the user can fix; its message is shown as-is, without a traceback."""
