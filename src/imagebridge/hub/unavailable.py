"""What the hub answers while its database cannot: 503 with the reason, never a crash.

A SQLite file held locked by another process beyond the busy timeout, a PostgreSQL server
restarting: the request fails cleanly, the caller (a gateway backs off and retries) tries
again, and nothing half done is kept (the transaction rolled back). Nothing can be audited
while the database is away; the log says which route failed and why, without its values.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 5


def reason(exc: Exception) -> str:
    """The driver's own words, first line only: SQLAlchemy's text carries the statement
    and its parameters, which may name a patient."""
    orig = getattr(exc, "orig", None)
    words = str(orig).strip().splitlines()[0][:120] if orig is not None and str(orig) else ""
    return f"the database is unavailable ({words or type(exc).__name__}); try again shortly"


def install(app: FastAPI) -> None:
    async def unavailable(request: Request, exc: Exception) -> Response:
        why = reason(exc)
        route = getattr(request.scope.get("route"), "path", "")
        log.warning("%s %s answered 503: %s", request.method, route, why)
        return JSONResponse(
            {"detail": why}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
        )

    app.add_exception_handler(OperationalError, unavailable)
    app.add_exception_handler(PoolTimeout, unavailable)
