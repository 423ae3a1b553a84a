"""Structured logging through structlog, for Conveyor and stdlib loggers: JSON lines,
or readable lines on a terminal (``CONVEYOR_LOG_FORMAT=auto``, the default).

Context such as ``correlation_id`` and ``job_id`` is bound with structlog's
contextvars, so every line logged while handling a request or a job carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog

from conveyor.settings import Settings


def configure_logging(settings: Settings) -> None:
    """Route structlog and stdlib logging (Celery, uvicorn) to one formatter on stderr."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    terminal = sys.stderr.isatty()
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "console" if terminal else "json"
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=terminal and settings.log_format == "auto")
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
