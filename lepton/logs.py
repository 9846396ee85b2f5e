"""structlog set-up: JSON lines when not on a TTY (or when asked), console lines otherwise. Every
line carries the process's fields (role, member, incarnation: ``configure_logging`` and ``bind``)
whichever thread writes it. gRPC's own native log lines are silenced by ``import lepton``
(lepton/__init__.py) unless GRPC_VERBOSITY asks for them."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Fields of this process added to every line. Process-wide, not contextvars: a new thread (every
# gRPC handler thread, the agents' loops) starts with an empty context and would lose them.
_PROCESS_FIELDS: dict[str, object] = {}


def _add_process_fields(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in _PROCESS_FIELDS.items():
        event.setdefault(key, value)
    return event


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
            _add_process_fields,
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
    _PROCESS_FIELDS.clear()
    _PROCESS_FIELDS.update(bound)


def bind(**values: object) -> None:
    """Adds fields (e.g. the member id once it is known) to every later line of this process,
    from every thread (and to this thread's context, which wins where several agents share a
    process, as in tests)."""
    _PROCESS_FIELDS.update(values)
    structlog.contextvars.bind_contextvars(**values)
