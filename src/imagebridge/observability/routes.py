"""Liveness, readiness and metrics, for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from imagebridge.hub.auth import get_hub, public, require_scraper
from imagebridge.hub.state import Hub
from imagebridge.observability.metrics import CONTENT_TYPE, DatabaseCollector, Exposition
from imagebridge.observability.readiness import blob_store_state, database_state

router = APIRouter(tags=["operations"])
HubDep = Annotated[Hub, Depends(get_hub)]


@router.get("/health", dependencies=[Depends(public)])
def health() -> dict[str, str]:
    """The process is alive and answering (it checks nothing else: see /ready)."""
    return {"status": "ok"}


@router.get("/ready", dependencies=[Depends(public)])
def ready(hub: HubDep) -> Response:
    """200 when this process can serve: its database reachable and at the newest schema,
    its blob store reachable; 503 otherwise, saying which part is not."""
    checks = {"database": database_state(hub.engine), "blob_store": blob_store_state(hub.blobs)}
    ok = all(state == "ok" for state in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", **checks}, 200 if ok else 503)


@router.get("/metrics", dependencies=[Depends(require_scraper)], response_class=Response)
async def metrics(request: Request, hub: HubDep) -> Response:
    """Prometheus text format: transfers by status, instances per second, delivery latency,
    job queue depth and errors, the same from every hub process."""
    state = request.app.state
    if not hasattr(state, "metrics"):
        collector = DatabaseCollector(hub.sessions, hub.settings.metrics, hub.clock)
        state.metrics = Exposition(collector, hub.settings.metrics.cache_seconds)
    exposition: Exposition = state.metrics
    body = await run_in_threadpool(exposition.render)
    return Response(body, media_type=CONTENT_TYPE)
