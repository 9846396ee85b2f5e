"""structlog set-up: JSON lines when not on a TTY (or when asked), console lines otherwise."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "auto", level: str = "info", **bound: object) -> None:
    """Configures structlog for this process and binds ``bound`` (role, member id) to every line.

    Args:
        fmt: "json", "console" or "auto" (JSON unless stderr is a TTY).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**bound)


def bind(**values: object) -> None:
    """Adds fields (e.g. the member id once it is known) to every later line of this process."""
    structlog.contextvars.bind_contextvars(**values)
