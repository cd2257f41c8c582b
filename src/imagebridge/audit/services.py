"""Recording audit events. Events go into the same transaction as the action they record."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from imagebridge.audit.models import AuditEvent

log = logging.getLogger(__name__)


def record(
    session: Session,
    action: str,
    outcome: str = "success",
    *,
    actor_type: str = "system",
    actor: str = "",
    institution_id: int | None = None,
    patient_ref: str = "",
    study_ref: str = "",
    transfer_ref: str = "",
    source_address: str = "",
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    if action.count(":") != 2:
        raise ValueError("audit actions are tagged area:subject:action")
    event = AuditEvent(
        action=action,
        outcome=outcome,
        actor_type=actor_type,
        actor=actor,
        institution_id=institution_id,
        patient_ref=patient_ref[:130],
        study_ref=study_ref[:64],
        transfer_ref=transfer_ref,
        source_address=source_address[:64],
        detail=detail or {},
    )
    session.add(event)
    # The application log names the event, never the patient.
    log.info("audit %s %s actor=%s:%s", action, outcome, actor_type, actor)
    return event
