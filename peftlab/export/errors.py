"""Errors of ``peftlab export``: one line each, naming what was refused and what is allowed."""

from __future__ import annotations

from peftlab.core.config import ConfigError


class ExportError(ConfigError):
    """An export was refused: a bad argument, a source or model the format cannot take."""


class ExportVerificationError(ExportError):
    """The reloaded export does not compute what base + adapter compute (outside tolerance)."""

    report: dict | None = None
    """The failed check's figures and tolerance."""

    def with_report(self, report: dict) -> ExportVerificationError:
        self.report = report
        return self
