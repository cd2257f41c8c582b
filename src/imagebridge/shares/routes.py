"""HTTP API of legal access: share named studies with an external user for a time; the
external user lists and downloads what was shared, and nothing else."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from imagebridge.actors import Actor
from imagebridge.audit.services import record
from imagebridge.counts import RowId
from imagebridge.hub.auth import SharedViewer, Sharer, get_hub
from imagebridge.hub.state import Hub
from imagebridge.shares import services
from imagebridge.shares.models import Share
from imagebridge.shares.package import PackageError

router = APIRouter(prefix="/api/v1", tags=["legal access"])
HubDep = Annotated[Hub, Depends(get_hub)]
# One answer for a share that never existed, expired, was revoked or is someone else's.
NOT_SHARED = "nothing is shared with you under this reference"


class ShareIn(BaseModel):
    grantee: str = Field(min_length=1, max_length=64, description="External user's name")
    study_instance_uids: list[str] = Field(min_length=1, max_length=100)
    purpose: str = Field(min_length=1, max_length=500)
    days: int = Field(30, description="How long the access lasts")


@router.post("/shares", status_code=201)
def create_share(body: ShareIn, actor: Sharer, hub: HubDep) -> dict[str, Any]:
    if actor.institution_id is None or actor.user_id is None:
        raise HTTPException(403, "shares are granted by an institution's users")
    with hub.sessions() as session, session.begin():
        try:
            share = services.create_share(
                session,
                institution_id=actor.institution_id,
                granted_by_id=actor.user_id,
                grantee=body.grantee,
                study_uids=body.study_instance_uids,
                purpose=body.purpose,
                days=body.days,
                now=hub.clock(),
            )
        except services.ShareError as exc:
            raise HTTPException(exc.status, exc.reason) from exc
        for study in share.studies:
            record(
                session,
                "share:access:granted",
                institution_id=actor.institution_id,
                study_ref=study.study_instance_uid,
                detail={"share_id": share.id, "grantee": body.grantee, "days": body.days},
                **actor.audit(),
            )
        return services.described(session, share)


@router.get("/shares")
def list_shares(actor: Sharer, hub: HubDep) -> list[dict[str, Any]]:
    with hub.sessions() as session:
        if actor.institution_id is None:
            return []  # shares are an institution's
        return services.institution_shares(session, actor.institution_id)


@router.post("/shares/{share_id}/revoke")
def revoke_share(share_id: RowId, actor: Sharer, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        share = session.get(Share, share_id)
        if share is None or share.institution_id != actor.institution_id:
            raise HTTPException(404, "no such share")
        share.revoked_at = share.revoked_at or hub.clock()
        record(
            session,
            "share:access:revoked",
            institution_id=actor.institution_id,
            detail={"share_id": share.id},
            **actor.audit(),
        )
        return services.described(session, share)


@router.get("/shared")
def shared_with_me(actor: SharedViewer, hub: HubDep) -> list[dict[str, Any]]:
    """What is shared with the calling external user, and until when."""
    with hub.sessions() as session, session.begin():
        return services.shared_with(session, actor, hub.clock())


def _live(session: Session, actor: Actor, share_id: int, hub: Hub) -> Share:
    assert actor.user_id is not None
    share = services.live_share(session, share_id, actor.user_id, hub.clock())
    if share is None:
        raise HTTPException(403, NOT_SHARED)
    return share


@router.get("/shared/{share_id}")
def view_share(share_id: RowId, actor: SharedViewer, hub: HubDep) -> dict[str, Any]:
    with hub.sessions() as session, session.begin():
        share = _live(session, actor, share_id, hub)
        services.viewed(session, actor, share, "share:study:viewed")
        return services.shown(session, share)


@router.get("/shared/{share_id}/package", response_class=FileResponse)
def download_package(share_id: RowId, actor: SharedViewer, hub: HubDep) -> FileResponse:
    """The shared studies and their reports as a zip of DICOM files with a DICOMDIR."""
    fd, name = tempfile.mkstemp(prefix="ib-share-", suffix=".zip")
    os.close(fd)
    path = Path(name)
    try:
        with hub.sessions() as session, session.begin():
            share = _live(session, actor, share_id, hub)
            try:
                files = services.build_package(session, hub.blobs, share, path)
            except PackageError as exc:
                # A stored file that cannot be packed: say so rather than send a broken zip.
                raise HTTPException(409, f"the package cannot be made: {exc}") from exc
            services.viewed(session, actor, share, "share:package:exported", files=files)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return FileResponse(
        path,
        media_type="application/zip",
        filename=f"imagebridge-share-{share_id}.zip",
        background=BackgroundTask(path.unlink, missing_ok=True),
    )
