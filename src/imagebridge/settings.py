"""The settings objects: one per process, read from a TOML file and the environment.

Environment variables win over the file; the hub's start with ``IMAGEBRIDGE_HUB_``
and the gateway's with ``IMAGEBRIDGE_GATEWAY_`` (nested fields use ``__``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from imagebridge.sealing import parse_key


def _ae_title(value: str) -> str:
    value = value.strip()
    if not 0 < len(value) <= 16 or "\\" in value or not value.isascii():
        raise ValueError("an AE title is 1 to 16 ASCII characters without backslash")
    return value


# Files of transport security, relative to the config file like data_dir.
TLS_PATHS = (
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "tls_crl",
    "hub_ca",
    "hub_tls_cert",
    "hub_tls_key",
    "dicom_tls_cert",
    "dicom_tls_key",
    "dicom_tls_ca",
)


class _TomlSettings(BaseSettings):
    """Base for settings read from ``--config FILE`` and then overridden by the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> Any:
        """The settings from ``path`` and the environment; SettingsError says what is wrong."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    values = tomllib.load(fh)
            except OSError as exc:
                raise SettingsError(f"{path}: cannot be read ({exc.strerror})") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise SettingsError(f"{path}: not a valid TOML file ({exc})") from None
            base = path.resolve().parent
            # Relative paths in a config file are relative to that file. A value that is no
            # string is left for validation to name.
            for key in ("data_dir", *TLS_PATHS):
                if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
                    values[key] = str(base / values[key])
            repository = values.get("audit_repository")
            for key in ("ca_file", "cert_file", "key_file"):
                if isinstance(repository, dict) and isinstance(repository.get(key), str):
                    repository[key] = str(base / repository[key])  # an absolute path stays
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, path)) from None
        except PydanticSettingsError as exc:  # an environment variable it cannot parse
            raise SettingsError(str(exc)) from None


class SettingsError(ValueError):
    """Settings a process cannot run with, and why, in plain words."""


def _describe(exc: ValidationError, path: Path | None) -> str:
    """Each wrong setting and why, without its value (a value may be a secret)."""
    problems = [
        f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
        for e in exc.errors()[:10]
    ]
    return f"{path or 'settings'}: " + "; ".join(problems)


class AccountPolicy(BaseModel):
    """How people log in: sessions, lockout and throttling (OWASP ASVS level 2 defaults)."""

    session_idle_minutes: float = Field(30, gt=0, description="Session ends after this idle")
    session_absolute_hours: float = Field(
        12, gt=0, description="Session ends this long after login"
    )
    cookie_secure: bool = Field(True, description="Session cookie only over HTTPS (and localhost)")
    lockout_threshold: int = Field(
        5, ge=1, description="Failed logins in a row that lock an account"
    )
    lockout_minutes: float = Field(15, gt=0, description="How long a lock lasts unless lifted")
    address_failure_limit: int = Field(
        30, ge=1, description="Failed logins per source address per window before throttling"
    )
    address_window_minutes: float = Field(15, gt=0, description="The throttling window")
    api_token_max_days: int = Field(90, ge=1, description="Longest lifetime of an API token")


class AuditRepository(BaseModel):
    """Where the hub sends its audit trail as IHE ATNA messages (syslog, RFC 5424)."""

    url: str = Field(
        "",
        description="syslog+tls://host:6514 (RFC 5425) or syslog+udp://host:514 (RFC 5426); "
        "empty sends nothing",
    )
    ca_file: Path | None = Field(None, description="CA certificates that sign the repository's")
    cert_file: Path | None = Field(None, description="Client certificate, if the repository asks")
    key_file: Path | None = Field(None, description="Private key of the client certificate")
    audit_source_id: str = Field("imagebridge-hub", description="AuditSourceID in every message")
    enterprise_site_id: str = Field(
        "ImageBridge", description="AuditEnterpriseSiteID when an event has no institution"
    )
    retry_seconds: float = Field(2.0, gt=0, description="First wait after the repository fails")
    retry_max_seconds: float = Field(60.0, gt=0, description="Longest wait between attempts")
    poll_seconds: float = Field(1.0, gt=0, description="How often to look for new events")
    batch: int = Field(200, ge=1, description="Most events sent per round")

    @field_validator("url")
    @classmethod
    def _syslog_url(cls, value: str) -> str:
        if value and not value.startswith(("syslog+tls://", "syslog+udp://")):
            raise ValueError("the audit repository is syslog+tls://host:port or syslog+udp://...")
        return value


class Notifications(BaseModel):
    """Who is told when a transfer is delivered: e-mail through an SMTP server, and webhooks.

    Keys of ``email_to`` and ``webhooks`` are receiving institutions' codes, or ``*`` for
    every institution. Messages name the transfer and the institutions, never the patient.
    """

    smtp_host: str = Field("", description="SMTP server; empty sends no e-mail")
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_from: str = Field("imagebridge@localhost", description="The sender's address")
    smtp_starttls: bool = Field(False, description="Upgrade the connection with STARTTLS")
    smtp_username: str = Field("", description="Log in to the SMTP server as this user")
    smtp_password: str = Field("", description="Its password (better: from the environment)")
    email_to: dict[str, list[str]] = Field(
        default_factory=dict, description="Institution code (or *) -> addresses to tell"
    )
    webhooks: dict[str, str] = Field(
        default_factory=dict, description="Institution code (or *) -> URL to POST JSON to"
    )
    webhook_secret: str = Field(
        "", description="Signs each webhook body (HMAC-SHA256, X-ImageBridge-Signature)"
    )
    timeout_seconds: float = Field(10.0, gt=0, description="Longest wait for a server")


class BlobStoreSettings(BaseModel):
    """Where the hub keeps blobs: a local folder (``blob_dir``), or an S3-compatible bucket.

    The access key and secret belong in the environment (``IMAGEBRIDGE_HUB_BLOB_STORE__...``),
    or are left empty for boto3's own chain (``AWS_ACCESS_KEY_ID``, an instance role...).
    """

    kind: Literal["local", "s3"] = Field("local", description="local (a folder) or s3")
    endpoint_url: str = Field("", description="The S3 endpoint; empty for AWS's own")
    bucket: str = Field("", description="The bucket, made beforehand")
    region: str = Field("us-east-1", description="The bucket's region")
    prefix: str = Field("blobs", description="Keys are <prefix>/ab/cd/<sha256>")
    access_key_id: str = Field("", description="Empty: boto3's credential chain")
    secret_access_key: SecretStr = Field(SecretStr(""), description="Better from the environment")
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        "path", description="path suits SeaweedFS, MinIO and Ceph; virtual suits AWS"
    )
    multipart_threshold: int = Field(
        16 * 1024 * 1024, ge=5 * 1024 * 1024, description="Objects this big go in parts"
    )
    multipart_part_size: int = Field(
        8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024 * 1024 * 1024,
        description="Size of each part (S3 allows 5 MiB to 5 GiB)",
    )
    max_connections: int = Field(16, ge=1, description="Uploads and downloads at once")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return value.strip("/")

    @model_validator(mode="after")
    def _bucket(self) -> BlobStoreSettings:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("an s3 blob store needs a bucket")
        return self


class JobSettings(BaseModel):
    """The durable job queue (arrival notices, retention sweeps...) and who runs it."""

    in_process_worker: bool | None = Field(
        None,
        description="Run a worker inside each hub process; default: yes on SQLite, no on "
        "PostgreSQL (run `imagebridge worker` there)",
    )
    concurrency: int = Field(2, ge=1, le=64, description="Jobs a worker runs at once")
    poll_seconds: float = Field(
        1.0, gt=0, description="How often an idle worker looks for jobs queued elsewhere"
    )
    lease_seconds: float = Field(
        60.0,
        ge=1,
        description="A job whose worker stops renewing its lease for this long is taken up "
        "by another worker",
    )
    max_attempts: int = Field(8, ge=1, description="Attempts before a job is given up")
    retry_seconds: float = Field(10.0, gt=0, description="Wait after a first failure")
    retry_max_seconds: float = Field(3600.0, gt=0, description="Longest wait between attempts")
    keep_finished_days: float = Field(
        7.0, gt=0, description="Finished jobs are kept this long, then pruned"
    )


class RetentionPolicy(BaseModel):
    """How long the hub keeps delivered images: the exchange is not an archive.

    Index rows and the audit trail are kept; only the images' (and reports') bytes go.
    """

    enabled: bool = Field(False, description="Remove delivered images after their period")
    routine_days: float = Field(30.0, gt=0, description="Routine transfers: days after delivery")
    urgent_days: float = Field(90.0, gt=0, description="Urgent transfers: days after delivery")
    sweep_interval_seconds: float = Field(
        3600.0, gt=0, description="How often the retention sweep runs"
    )
    batch: int = Field(200, ge=1, description="Transfers examined per sweep")
    grace_seconds: float = Field(
        3600.0,
        ge=0,
        description="Blobs are set aside first, and removed for good only after this long "
        "if nothing came to need them meanwhile",
    )


class MetricsSettings(BaseModel):
    """The Prometheus endpoint /metrics: figures from the database, the same from every hub."""

    scrape_token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token Prometheus presents (better from the environment); "
        "empty: /metrics refuses every caller",
    )
    rate_window_seconds: float = Field(
        60.0, gt=0, description="Instances per second are averaged over this window"
    )
    window_seconds: float = Field(
        3600.0, gt=0, description="Finished transfers, delivery latency and errors: this window"
    )
    cache_seconds: float = Field(5.0, ge=0, description="A scrape's figures are reused this long")


class HubSettings(_TomlSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEBRIDGE_HUB_", env_nested_delimiter="__")

    data_dir: Path = Field(Path("hub-data"), description="Folder for the database, blobs, secrets")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite in data_dir")
    blob_dir: Path | None = Field(None, description="Local blob store; default data_dir/blobs")
    blob_store: BlobStoreSettings = Field(
        default_factory=lambda: BlobStoreSettings(), description="local folder or S3 bucket"
    )
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = Field(
        "", description="URL clients reach the hub at, for DICOMweb links; default: the request's"
    )
    admin_token: str = Field(
        "", description="Network administrator API token; default: generated into data_dir"
    )
    secret_key: SecretStr = Field(
        SecretStr(""),
        description="Seals the secrets the database keeps (second factors): 32 bytes in "
        "base64, the same for every hub process and worker, better from the environment; "
        "default: generated into data_dir/secret-key",
    )
    inbox_wait_seconds: float = Field(20.0, description="Longest a gateway's inbox poll waits")
    urgent_late_seconds: float = Field(
        900.0,
        gt=0,
        description="An urgent transfer not delivered this long after it was created raises "
        "an alert (audit event transfer:transfer:late and a notice), once",
    )
    query_wait_seconds: float = Field(
        5.0, gt=0, description="Longest a network query waits for the gateways' answers"
    )
    tls_cert: Path | None = Field(None, description="Server certificate (PEM): HTTPS when set")
    tls_key: Path | None = Field(None, description="The server certificate's private key")
    tls_client_ca: Path | None = Field(None, description="CA that gateway certificates chain to")
    tls_crl: Path | None = Field(None, description="That CA's CRL, re-read when it changes")
    gateway_port: int | None = Field(
        None, description="Mutual-TLS listener for gateways; then gateways may use only it"
    )
    audit_repository: AuditRepository = Field(default_factory=lambda: AuditRepository())
    accounts: AccountPolicy = Field(default_factory=lambda: AccountPolicy())
    notifications: Notifications = Field(default_factory=lambda: Notifications())
    jobs: JobSettings = Field(default_factory=lambda: JobSettings())
    retention: RetentionPolicy = Field(default_factory=lambda: RetentionPolicy())
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings())

    @field_validator("secret_key")
    @classmethod
    def _sealing_key(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            parse_key(value.get_secret_value())
        return value

    @property
    def runs_worker(self) -> bool:
        """Whether each hub process runs a worker of the job queue itself."""
        if self.jobs.in_process_worker is not None:
            return self.jobs.in_process_worker
        return self.resolved_database_url.startswith("sqlite")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'hub.db'}"

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"


class PacsNode(BaseModel):
    """A local DICOM node the gateway delivers into."""

    name: str = "pacs"
    ae_title: str
    host: str
    port: int

    _check_ae = field_validator("ae_title")(_ae_title)


class CallingNode(BaseModel):
    """A local DICOM node allowed to open associations with the gateway."""

    ae_title: str
    host: str | None = Field(None, description="If set, only from this address")
    permissions: list[Literal["echo", "store", "find", "move", "get"]] = Field(
        ["echo", "store"],
        description="DICOM actions this node may take: echo (C-ECHO), store (C-STORE), "
        "find (C-FIND), move (C-MOVE), get (C-GET)",
    )

    _check_ae = field_validator("ae_title")(_ae_title)


class MoveDestination(BaseModel):
    """A DICOM node that C-MOVE may send to, named by its AE title in the request."""

    ae_title: str
    host: str
    port: int

    _check_ae = field_validator("ae_title")(_ae_title)


class PacsQueryRetrieve(BaseModel):
    """The local PACS as query/retrieve provider: queried and fetched from for the hub."""

    ae_title: str
    host: str
    port: int
    retrieve: Literal["get", "move"] = Field(
        "get", description="How studies are fetched: C-GET, or C-MOVE to the gateway's own AE"
    )
    timeout_seconds: float = Field(120.0, gt=0, description="Longest wait for a PACS response")

    _check_ae = field_validator("ae_title")(_ae_title)


class Reconciliation(BaseModel):
    """How a receiving gateway turns a foreign patient identity into a local one."""

    issuer_of_patient_id: str = Field("", description="This institution's issuer; default code")
    nhs_number_issuer: str = Field("NHS", description="Issuer naming the NHS number")
    nhs_number_tag: str = Field(
        "",
        description="Optional tag holding the NHS number, e.g. '0010,1000'; default: "
        "OtherPatientIDsSequence item with the NHS issuer",
    )
    unmatched_format: str = Field("EXT-{sender}-{patient_id}", description="PatientID if no MRN")
    accession_prefix: str = Field("{sender}-", description="Prefix for AccessionNumber")
    mrn_map: dict[str, str] = Field(
        default_factory=dict, description="NHS number -> local MRN (until the patient index)"
    )

    @field_validator("mrn_map")
    @classmethod
    def _nhs_keys(cls, value: dict[str, str]) -> dict[str, str]:
        from imagebridge.nhs import normalise_nhs_number

        out: dict[str, str] = {}
        for key, mrn in value.items():
            nhs = normalise_nhs_number(key)
            if nhs is None:
                raise ValueError(f"mrn_map key {key!r} is not a valid NHS number")
            out[nhs] = mrn
        return out

    @field_validator("unmatched_format", "accession_prefix")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            value.format(sender="X", patient_id="Y")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError("only {sender} and {patient_id} may be used") from exc
        return value


class GatewaySettings(_TomlSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEBRIDGE_GATEWAY_", env_nested_delimiter="__")

    data_dir: Path = Field(Path("gateway-data"), description="The spool and the gateway's state")
    hub_url: str = "http://127.0.0.1:8080"
    token: str = Field("", description="The gateway's secret token issued by the hub")
    ae_title: str = Field("IB_GATEWAY", description="The gateway's own AE title")
    host: str = Field("127.0.0.1", description="Address the DICOM SCP listens on")
    port: int = 11112
    calling_aes: list[CallingNode] = Field(
        default_factory=list, description="Local nodes allowed to send; empty refuses all"
    )
    pacs: list[PacsNode] = Field(default_factory=list, description="Where inbound studies go")
    pacs_qr: PacsQueryRetrieve | None = Field(
        None, description="The local PACS as query/retrieve provider, for the hub's tasks"
    )
    move_destinations: list[MoveDestination] = Field(
        default_factory=list, description="Where C-MOVE may send, by AE title"
    )
    retrieve_wait_seconds: float = Field(
        300.0, gt=0, description="Longest a retrieve waits for another institution's PACS"
    )
    reconciliation: Reconciliation = Field(default_factory=Reconciliation)
    max_pdu: int = Field(1_048_576, description="Largest PDU the SCP accepts")
    max_associations: int = Field(
        64, ge=1, description="Associations the SCP serves at once; more are rejected (transient)"
    )
    routes_refresh_seconds: float = Field(
        30.0, gt=0, description="How often the routing table and agreements are re-read"
    )
    upload_batch_instances: int = 128
    upload_batch_bytes: int = 64 * 1024 * 1024
    study_stable_seconds: float = Field(
        2.0, description="Quiet time after an association before a study's transfer is closed"
    )
    study_resend_seconds: float = Field(
        300.0,
        ge=0,
        description="After an aborted association, how long a study's transfer waits for the "
        "PACS to send again before it closes as interrupted (never reported complete)",
    )
    shutdown_grace_seconds: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM, how long open associations may finish before they are "
        "aborted (no new ones are taken meanwhile)",
    )
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    spool_min_free_bytes: int = Field(256 * 1024 * 1024, description="Refuse C-STORE below this")
    hub_ca: Path | None = Field(None, description="The network CA, the only one trusted for it")
    hub_tls_cert: Path | None = Field(None, description="This gateway's certificate for the hub")
    hub_tls_key: Path | None = Field(None, description="Its private key")
    dicom_tls_cert: Path | None = Field(None, description="DICOM TLS for the SCP: certificate")
    dicom_tls_key: Path | None = Field(None, description="DICOM TLS: the certificate's key")
    dicom_tls_ca: Path | None = Field(None, description="CA that callers' certificates chain to")
    dicom_tls_require_client_cert: bool = Field(
        True, description="Refuse DICOM TLS callers without a certificate from dicom_tls_ca"
    )

    _check_ae = field_validator("ae_title")(_ae_title)
