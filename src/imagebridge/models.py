"""Import every area's models so that the metadata (and Alembic) sees all tables."""

from imagebridge.audit.models import AuditEvent, AuditForwarding
from imagebridge.db import Base
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.institutions.models import Gateway, Institution
from imagebridge.storage.models import Blob
from imagebridge.transfers.models import Report, Transfer, TransferInstance, TransferStudy

__all__ = [
    "AuditEvent",
    "AuditForwarding",
    "Base",
    "Blob",
    "Gateway",
    "Instance",
    "Institution",
    "Patient",
    "Report",
    "Series",
    "Study",
    "Transfer",
    "TransferInstance",
    "TransferStudy",
]
