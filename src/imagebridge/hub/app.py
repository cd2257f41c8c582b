"""The hub's web application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagebridge import __version__
from imagebridge.accounts.routes import router as accounts_router
from imagebridge.actors import Actor
from imagebridge.agreements.routes import router as agreements_router
from imagebridge.audit.routes import router as audit_router
from imagebridge.audit.services import record
from imagebridge.dicomweb.routes import router as dicomweb_router
from imagebridge.hub.auth import PageRefused
from imagebridge.hub.gateway_api import router as gateway_router
from imagebridge.hub.state import Hub
from imagebridge.hub.unavailable import install as install_unavailable
from imagebridge.institutions.routes import router as directory_router
from imagebridge.observability.routes import router as operations_router
from imagebridge.patients.routes import router as patients_router
from imagebridge.portal.routes import refusal_page
from imagebridge.portal.routes import router as portal_router
from imagebridge.queries.routes import router as queries_router
from imagebridge.retention.routes import router as retention_router
from imagebridge.shares.routes import router as shares_router
from imagebridge.transfers.routes import router as transfers_router

MAX_BODY_BYTES = 8 * 1024**2


def create_app(hub: Hub) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.start_background(asyncio.get_running_loop())
        yield
        hub.stop_background()
        hub.engine.dispose()

    app = FastAPI(
        title="ImageBridge hub",
        version=__version__,
        description="Exchange of medical images and reports between institutions.",
        lifespan=lifespan,
        # Bodies read whole (JSON) are small; the routes that stream to disk set their own.
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.hub = hub
    install_unavailable(app)  # the database away: 503 with the reason

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        await run_in_threadpool(_audit_refusal, hub, request, exc.status_code, str(exc.detail))
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        reason = "; ".join(str(e.get("msg", "")) for e in exc.errors())[:300]
        await run_in_threadpool(_audit_refusal, hub, request, 422, reason)
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(FileNotFoundError)
    async def retained_away(request: Request, exc: FileNotFoundError) -> Response:
        # A stored file that is gone: removed by retention. Say so, rather than fail.
        reason = "the images asked for are no longer held: removed under the retention policy"
        await run_in_threadpool(_audit_refusal, hub, request, 410, reason)
        return JSONResponse({"detail": reason}, status_code=410)

    @app.exception_handler(DataError)
    async def unstorable(request: Request, exc: DataError) -> Response:
        # A value PostgreSQL cannot hold or compare: a NUL character in text, a number beyond
        # its column (SQLite takes whatever it is given). Its kind only: the value may name
        # a patient.
        orig = exc.orig
        if "NUL" in str(orig):
            reason = "text may not contain NUL characters"
        else:
            reason = f"a value the database cannot hold ({type(orig).__name__})"
        await run_in_threadpool(_audit_refusal, hub, request, 400, reason)
        return JSONResponse({"detail": reason}, status_code=400)

    @app.exception_handler(PageRefused)
    async def page_refused(request: Request, exc: PageRefused) -> Response:
        await run_in_threadpool(_audit_refusal, hub, request, exc.status_code, str(exc.detail))
        return refusal_page(request, exc)

    for router in (
        gateway_router,
        accounts_router,
        directory_router,
        agreements_router,
        transfers_router,
        shares_router,
        audit_router,
        queries_router,
        dicomweb_router,
        patients_router,
        retention_router,
        operations_router,
        portal_router,
    ):
        app.include_router(router)
    return app


def _audit_refusal(hub: Hub, request: Request, status: int, reason: str) -> None:
    """Every refused request is evidence too: who tried what, from where, and why not."""
    if status < 400 or status >= 500:
        return
    actor: Actor | None = getattr(request.state, "actor", None)
    with hub.sessions() as session, session.begin():
        record(
            session,
            "http:request:refused",
            "refused" if status in (401, 403) else "failure",
            actor_type=actor.kind if actor else "unknown",
            actor=actor.name if actor else "",
            institution_id=actor.institution_id if actor else None,
            source_address=request.client.host if request.client else "",
            # The path only: query strings may name studies or patients.
            detail={
                "method": request.method,
                "path": request.url.path,
                "status": status,
                "reason": reason[:300],
            },
        )
