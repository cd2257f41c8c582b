"""The hub's web application."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from imagebridge import __version__
from imagebridge.audit.routes import router as audit_router
from imagebridge.hub.gateway_api import router as gateway_router
from imagebridge.hub.state import Hub
from imagebridge.institutions.routes import router as directory_router
from imagebridge.transfers.routes import router as transfers_router


def create_app(hub: Hub) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub.notifier.bind(asyncio.get_running_loop())
        yield
        hub.engine.dispose()

    app = FastAPI(
        title="ImageBridge hub",
        version=__version__,
        description="Exchange of medical images and reports between institutions.",
        lifespan=lifespan,
    )
    app.state.hub = hub
    for router in (gateway_router, directory_router, transfers_router, audit_router):
        app.include_router(router)
    return app
