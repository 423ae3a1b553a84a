"""Assembling the HTTP API: routes, middleware, error handling and the lifespan.

Middleware, outermost first::

    SecurityHeaders ─> Traces ─> CorrelationId ─> RequestTimer ─> ErrorBoundary
        ─> HeaderLimit ─> Methods ─> Authentication ─> RateLimit ─> BodyLimit
        ─> routes (+ problem handlers)

so every response, a 500 included, carries its request id, is measured and has
its server span, and no body is read before the headers' size, the method, the
path, the key and its request budget have been checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

import structlog
from fastapi import FastAPI

from conveyor import tracing, workloads
from conveyor.ai.book import AiTaskBook
from conveyor.ai.metrics import TokenCollector
from conveyor.api import ai_tasks as ai_task_routes
from conveyor.api import (
    audit,
    breakers,
    dead_letters,
    docs,
    events,
    health,
    jobs,
    keys,
    openapi,
    pipelines,
    problems,
    queues,
    schedules,
    tasks,
    throughput,
    topics,
    workers,
)
from conveyor.api import email_templates as email_template_routes
from conveyor.api import notifications as notification_routes
from conveyor.api.auth import Authentication
from conveyor.api.dashboard import pages as dashboard
from conveyor.api.middleware import (
    BodyLimit,
    CorrelationId,
    HeaderLimit,
    Methods,
    RequestTimer,
    SecurityHeaders,
    Traces,
)
from conveyor.api.ratelimit import RateLimit, limiter_for
from conveyor.api.state import ApiState
from conveyor.app import Conveyor
from conveyor.errors import ConfigurationError
from conveyor.events import EventHub
from conveyor.keys import MAX_CACHE_SECONDS, KeyVerifier, bootstrap_admin_key
from conveyor.logs import configure_logging
from conveyor.metrics import Metrics
from conveyor.settings import load_settings

log = structlog.get_logger("conveyor.api")


def create_app(conveyor: Conveyor, *, key_cache_seconds: float | None = None) -> FastAPI:
    """The API for ``conveyor``; its lifespan runs the event hub and makes the admin key.

    ``key_cache_seconds`` (default: the setting) bounds how long a revoked key keeps
    working; more than :data:`~conveyor.keys.MAX_CACHE_SECONDS` is refused, since
    revocation must reach every process within 5 seconds.
    """
    settings = conveyor.settings
    if key_cache_seconds is None:
        key_cache_seconds = settings.key_cache_seconds
    if not 0 <= key_cache_seconds <= MAX_CACHE_SECONDS:
        raise ConfigurationError(
            f"the key cache may hold keys 0 to {MAX_CACHE_SECONDS:g} seconds, not"
            f" {key_cache_seconds:g}: revoked keys must stop working within 5 seconds"
        )
    hub = EventHub(conveyor.store, settings)
    metrics = Metrics(
        conveyor.store,
        lambda: list(conveyor.tasks),
        lambda: list(conveyor.breakers.configs),
        queue_names=lambda: conveyor.queues,
        heartbeat_timeout=settings.heartbeat_timeout,
        stream_clients=lambda: dict(hub.clients),
    )
    state = ApiState(
        conveyor=conveyor,
        hub=hub,
        metrics=metrics,
        keys=KeyVerifier(conveyor.store, ttl=key_cache_seconds),
    )
    limiter = limiter_for(settings, on_fallback=metrics.rate_limit_fallbacks.inc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(_prepare, conveyor)
        await hub.start()
        follower = asyncio.create_task(metrics.follow(hub), name="conveyor-metrics")
        log.info("api.started", events=hub.source, embedded_broker=settings.embedded)
        try:
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await hub.stop()
            await limiter.close()
            await asyncio.to_thread(tracing.shutdown)  # the spans still batched

    app = FastAPI(
        title="Conveyor",
        version=_version(),
        summary="Submit background jobs, follow their progress, read their results.",
        lifespan=lifespan,
        docs_url=None,  # docs.install serves them without a CDN
        redoc_url=None,
        redirect_slashes=False,  # Methods redirects, relatively
    )
    app.state.conveyor = state
    problems.install(app)
    workloads.install(conveyor, settings)  # idempotent: the factory's load did it already
    larger: dict[str, int] = {}
    if settings.documents:
        # Imported only when switched on: it needs the conveyor[documents] extra.
        from conveyor.documents import api as documents_api

        larger[documents_api.UPLOAD_PATH] = settings.documents_max_bytes
    # Added innermost first.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, paths=larger)
    app.add_middleware(RateLimit, limiter=limiter, settings=settings, refused=metrics.rate_limited)
    app.add_middleware(Authentication, keys=state.keys)
    app.add_middleware(Methods, routes=app.router.routes, paths=lambda: app.openapi()["paths"])
    app.add_middleware(HeaderLimit)
    app.add_middleware(problems.ErrorBoundary)
    app.add_middleware(RequestTimer, histogram=metrics.http_duration)
    app.add_middleware(CorrelationId)
    app.add_middleware(Traces)
    app.add_middleware(SecurityHeaders, cacheable=docs.ASSETS_URL)
    routers = (
        *(jobs, pipelines, dead_letters, schedules, events, tasks),
        *(queues, throughput, workers, topics, breakers, keys, audit, health),
    )
    for module in routers:
        app.include_router(module.router)
    if settings.documents:
        documents_api.install(app, settings)
    if settings.notifications:
        app.include_router(notification_routes.router)
        app.include_router(email_template_routes.router)
    if settings.ai_tasks:
        app.include_router(ai_task_routes.router)
        metrics.registry.register(TokenCollector(AiTaskBook(conveyor.store.engine)))
    docs.install(app)
    dashboard.install(app, settings)
    openapi.install(app, conveyor)
    return app


def factory() -> FastAPI:
    """For ``uvicorn --factory conveyor.api.app:factory``: everything from the environment."""
    settings = load_settings()
    configure_logging(settings)
    conveyor = workloads.load(settings)
    tracing.configure("conveyor-api")  # after the app's import, which may install its own
    conveyor.configure(settings)
    app = create_app(conveyor)
    # What exists by now (modules, the app, its models and schemas: 150,000 objects)
    # lives as long as the process, and each full pass of the collector walked it all:
    # with a thousand streams open, pauses of the event loop of 0.1-0.9 s every few
    # seconds, during which no stream got its events. Frozen, the passes skip it.
    gc.collect()
    gc.freeze()
    return app


def _prepare(conveyor: Conveyor) -> None:
    """Blocking start-up: the schema check, the admin key, and the Celery app."""
    conveyor.store.check_schema()
    bootstrap_admin_key(conveyor.store, conveyor.settings)
    conveyor.celery  # noqa: B018 - built for its side effect


def _version() -> str:
    try:
        return version("conveyor")
    except PackageNotFoundError:
        return "0+unknown"
