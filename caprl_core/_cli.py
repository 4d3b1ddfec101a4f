"""What the commands share: warnings raised by caprl_core print as one `warning: ...` block, without Python's
`file:line: UserWarning:` prefix and the echo of the source line that raised them (meaningless to a user)."""

from __future__ import annotations

import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def plain_warnings() -> None:
    """Install the format for the rest of the process (idempotent); warnings from other packages keep Python's."""
    python_format = getattr(warnings.formatwarning, "python_format", warnings.formatwarning)

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if Path(filename).resolve().is_relative_to(_PACKAGE):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    formatwarning.python_format = python_format
    warnings.formatwarning = formatwarning
