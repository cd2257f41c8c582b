"""What the hub answers while its database or blob store cannot: 503 with the reason, never
a crash.

A SQLite file held locked by another process beyond the busy timeout, a PostgreSQL server
restarting: the request fails cleanly, the caller (a gateway backs off and retries) tries
again, and nothing half done is kept (the transaction rolled back). The same holds for an
S3 bucket that cannot be reached or refuses a write: the batch being stored is dropped whole.
Nothing can be audited while the database is away; the log says which route failed and why,
without its values.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from imagebridge.storage.blobs import BlobStoreError

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 5


def reason(exc: Exception) -> str:
    """Why the hub cannot answer, in words that name no patient: for the database, the
    driver's own, first line only (SQLAlchemy's text carries the statement and its
    parameters); for the blob store, its own (an operation and the S3 error code)."""
    if isinstance(exc, BlobStoreError):
        return f"the blob store is unavailable ({exc}); try again shortly"
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

    for unavailable_kind in (OperationalError, PoolTimeout, BlobStoreError):
        app.add_exception_handler(unavailable_kind, unavailable)
