"""Import every area's models so that the metadata (and Alembic) sees all tables."""

from imagebridge.accounts.models import ApiToken, LoginThrottle, Role, User, UserRole, WebSession
from imagebridge.agreements.models import Agreement
from imagebridge.audit.models import AuditEvent, AuditEventPatient, AuditForwarding
from imagebridge.db import Base
from imagebridge.index.models import Instance, Patient, Series, Study
from imagebridge.institutions.models import DiscoveryRule, Gateway, Institution, TrustedNetwork
from imagebridge.jobs.models import Job, JobSchedule
from imagebridge.patients.models import IdentityFlag, PatientIdentifier, Person
from imagebridge.queries.models import GatewayTask
from imagebridge.retention.models import BlobRemoval, LegalHold, RetentionMark
from imagebridge.sealing import SealingKey
from imagebridge.shares.models import Share, ShareStudy
from imagebridge.storage.models import Blob
from imagebridge.transfers.models import Report, Transfer, TransferInstance, TransferStudy

__all__ = [
    "Agreement",
    "ApiToken",
    "AuditEvent",
    "AuditEventPatient",
    "AuditForwarding",
    "Base",
    "Blob",
    "BlobRemoval",
    "DiscoveryRule",
    "Gateway",
    "GatewayTask",
    "IdentityFlag",
    "Instance",
    "Institution",
    "Job",
    "JobSchedule",
    "LegalHold",
    "LoginThrottle",
    "Patient",
    "PatientIdentifier",
    "Person",
    "Report",
    "RetentionMark",
    "Role",
    "SealingKey",
    "Series",
    "Share",
    "ShareStudy",
    "Study",
    "Transfer",
    "TransferInstance",
    "TransferStudy",
    "TrustedNetwork",
    "User",
    "UserRole",
    "WebSession",
]
