"""How a job names a user factory, kept free of torch so that the command line can normalise the
name before any heavy import: ``package.module:factory`` or ``path/to/file.py:factory``."""

from __future__ import annotations

from pathlib import Path


def is_file_factory(spec: str) -> bool:
    """Whether ``spec`` names a factory in a Python file (``path/to/file.py:factory``)."""
    return spec.partition(":")[0].endswith(".py")


def absolute_factory(spec: str) -> str:
    """``spec`` with a file path made absolute (so that processes started elsewhere find the same
    file); any other spec unchanged."""
    if not is_file_factory(spec):
        return spec
    path, _, attr = spec.partition(":")
    return f"{Path(path).expanduser().resolve()}:{attr}"
