"""Errors raised for bad input volumes.

A builder never lets one broken volume stop a job over thousands: each problem becomes an
``InputError`` that names the file, the reason, and what the user can do about it; the build writes it
to ``errors.jsonl``, skips the volume, and goes on.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """One source volume (or image/label pair) that cannot become a sample."""

    def __init__(self, path: str | Path, reason: str, fix: str = ""):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        msg = f"{self.path}: {reason}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)

    def to_record(self) -> dict:
        return {"file": self.path, "reason": self.reason, "fix": self.fix}
