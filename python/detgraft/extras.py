"""Optional packages, imported where they are used: a missing one is one line that says what needs
it and the pip command to run (``detgraft`` the command prints just that line)."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingPackage", "need"]


class MissingPackage(ImportError):
    """An optional package is not installed; the message is the pip command."""


def need(module: str, pip: str, purpose: str) -> ModuleType:
    """``import module``, or ``MissingPackage``: "``purpose`` needs ``module``: pip install ``pip``"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{purpose} needs {module.split('.')[0]}: pip install {pip}") from None
