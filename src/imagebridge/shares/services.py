"""Granting, finding and revoking external users' access to named studies, and building the
package they download."""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from imagebridge.accounts.models import User
from imagebridge.actors import Actor
from imagebridge.audit.services import record
from imagebridge.dicom import reports as dicom_reports
from imagebridge.index.models import Instance, Series, Study
from imagebridge.shares.models import Share
from imagebridge.shares.package import write_package
from imagebridge.storage.blobs import BlobStore
from imagebridge.transfers.models import Report, Transfer, TransferStudy

MAX_SHARE_DAYS = 366


class ShareError(Exception):
    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def visible_studies(session: Session, institution_id: int, uids: list[str]) -> list[Study]:
    """The studies, by UID, that the institution holds: sent by it or transferred to it."""
    received = (
        select(TransferStudy.study_id)
        .join(Transfer, Transfer.id == TransferStudy.transfer_id)
        .where(Transfer.receiver_institution_id == institution_id)
    )
    return list(
        session.scalars(
            select(Study).where(
                Study.study_instance_uid.in_(uids),
                or_(Study.institution_id == institution_id, Study.id.in_(received)),
            )
        )
    )


def create_share(
    session: Session,
    *,
    institution_id: int,
    granted_by_id: int,
    grantee: str,
    study_uids: list[str],
    purpose: str,
    days: int,
    now: datetime,
) -> Share:
    if not purpose.strip():
        raise ShareError("state the purpose of the access")
    if not 1 <= days <= MAX_SHARE_DAYS:
        raise ShareError(f"access lasts 1 to {MAX_SHARE_DAYS} days")
    user = session.scalar(select(User).where(User.username == grantee.strip().lower()))
    if user is None or user.kind != "external" or user.disabled_at is not None:
        raise ShareError("no such external user", 404)
    uids = list(dict.fromkeys(study_uids))
    studies = visible_studies(session, institution_id, uids)
    if not uids or len({s.study_instance_uid for s in studies}) != len(uids):
        # The same answer whether a study does not exist or belongs to someone else.
        raise ShareError("one or more studies are not held by your institution", 404)
    share = Share(
        institution_id=institution_id,
        granted_by_id=granted_by_id,
        grantee_id=user.id,
        purpose=purpose.strip(),
        created_at=now,
        expires_at=now + timedelta(days=days),
        studies=studies,
    )
    session.add(share)
    session.flush()
    return share


def live_share(session: Session, share_id: int, grantee_id: int, now: datetime) -> Share | None:
    share = session.get(Share, share_id)
    if (
        share is None
        or share.grantee_id != grantee_id
        or share.revoked_at is not None
        or share.expires_at <= now
    ):
        return None
    return share


def live_shares(session: Session, grantee_id: int, now: datetime) -> list[Share]:
    return list(
        session.scalars(
            select(Share)
            .where(
                Share.grantee_id == grantee_id,
                Share.revoked_at.is_(None),
                Share.expires_at > now,
            )
            .order_by(Share.created_at.desc())
        )
    )


def described(session: Session, share: Share) -> dict[str, Any]:
    """A share as its grantor's institution sees it."""
    grantee = session.get(User, share.grantee_id)
    return {
        "id": share.id,
        "grantee": grantee.username if grantee else None,
        "purpose": share.purpose,
        "created_at": share.created_at,
        "expires_at": share.expires_at,
        "revoked": share.revoked_at is not None,
        "study_instance_uids": [s.study_instance_uid for s in share.studies],
    }


def institution_shares(session: Session, institution_id: int) -> list[dict[str, Any]]:
    """The shares an institution granted, newest first."""
    rows = session.scalars(
        select(Share).where(Share.institution_id == institution_id).order_by(Share.id.desc())
    )
    return [described(session, s) for s in rows]


def viewed(session: Session, actor: Actor, share: Share, action: str, **detail: Any) -> None:
    """What the grantee saw of a share, audited per study and patient."""
    for study in share.studies:
        record(
            session,
            action,
            institution_id=share.institution_id,
            patient_ref=study.patient.patient_id,
            study_ref=study.study_instance_uid,
            detail={"share_id": share.id, **detail},
            **actor.audit(),
        )


def shown(session: Session, share: Share) -> dict[str, Any]:
    """A share as its grantee sees it: the purpose, until when, and the studies."""
    return {
        "id": share.id,
        "purpose": share.purpose,
        "expires_at": share.expires_at,
        "studies": [_study_shown(s) for s in share.studies],
    }


def shared_with(session: Session, actor: Actor, now: datetime) -> list[dict[str, Any]]:
    """What is shared with an external user now, each share's listing audited."""
    assert actor.user_id is not None
    out = []
    for share in live_shares(session, actor.user_id, now):
        viewed(session, actor, share, "share:study:listed")
        out.append(shown(session, share))
    return out


def _study_shown(study: Study) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "patient_name": study.patient.patient_name,
        "instances": study.number_of_instances,  # kept as instances are indexed
    }


def _study_instances(session: Session, study: Study) -> list[Instance]:
    return list(
        session.scalars(
            select(Instance)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id)
            .order_by(Series.series_number, Instance.instance_number, Instance.id)
        )
    )


def _study_reports(session: Session, study: Study) -> list[Report]:
    return list(
        session.scalars(
            select(Report)
            .join(TransferStudy, TransferStudy.transfer_id == Report.transfer_id)
            .where(
                TransferStudy.study_id == study.id,
                Report.study_instance_uid == study.study_instance_uid,
            )
            .order_by(Report.id)
        )
    )


def _file_of(blobs: BlobStore, sha256: str, spare: Path) -> Path:
    """A path to the blob's bytes: the store's own file, or a copy out of an object store."""
    path = blobs.local_path(sha256)
    if path is None:
        with blobs.open(sha256) as src, open(spare, "wb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
        path = spare
    return path


def build_package(session: Session, blobs: BlobStore, share: Share, out: Path) -> int:
    """Write the share's studies and their reports as a zip with a DICOMDIR; returns the
    number of files."""
    with tempfile.TemporaryDirectory(prefix="ib-share-") as tmp:
        folder = Path(tmp)
        files: list[tuple[str, Path]] = []
        for study in share.studies:
            instances = _study_instances(session, study)
            for inst in instances:
                path = _file_of(blobs, inst.blob_sha256, folder / f"i{inst.id}.dcm")
                files.append((inst.sop_instance_uid, path))
            if instances:
                files.extend(_report_files(session, blobs, study, files[-1][1], folder))
        with open(out, "wb") as fh:
            write_package(files, fh)
        return len(files)


def _report_files(
    session: Session, blobs: BlobStore, study: Study, sample: Path, folder: Path
) -> list[tuple[str, Path]]:
    """The study's reports as DICOM documents in the same study (as the PACS receives
    them), built from the header of one of its images."""
    header = pydicom.dcmread(sample, stop_before_pixels=True)
    made = []
    for report in _study_reports(session, study):
        with blobs.open(report.blob_sha256) as fh:
            content = fh.read()
        if report.media_type == "application/pdf":
            ds = dicom_reports.encapsulated_pdf(content, header, title=report.title)
        else:
            ds = dicom_reports.basic_text_sr(content.decode("utf-8"), header, title=report.title)
        path = folder / f"report-{report.id}.dcm"
        path.write_bytes(dicom_reports.to_part10(ds))
        made.append((f"report {report.id}", path))
    return made
