"""Named permissions and the built-in roles that bundle them.

Every HTTP route and every DICOM action of a gateway is guarded by one permission; a role is
only a named set of them, so an institution can make custom roles from the same names.
"""

from __future__ import annotations

from enum import StrEnum


class Permission(StrEnum):
    SEND_STUDIES = "send_studies"
    TRACK_TRANSFERS = "track_transfers"
    VIEW_STUDIES = "view_studies"
    QUERY_NETWORK = "query_network"
    DOWNLOAD = "download"
    SHARE_EXTERNAL = "share_external"
    VIEW_SHARED = "view_shared"  # an external user's only right: what was shared with them
    ADMIN_INSTITUTION = "admin_institution"
    ADMIN_NETWORK = "admin_network"
    READ_AUDIT = "read_audit"


P = Permission

BUILTIN_ROLES: dict[str, frozenset[Permission]] = {
    "clerk": frozenset({P.SEND_STUDIES, P.TRACK_TRANSFERS}),
    "radiographer": frozenset({P.SEND_STUDIES, P.TRACK_TRANSFERS, P.VIEW_STUDIES}),
    "radiologist": frozenset(
        {P.TRACK_TRANSFERS, P.VIEW_STUDIES, P.QUERY_NETWORK, P.DOWNLOAD, P.SHARE_EXTERNAL}
    ),
    "pacs_manager": frozenset(
        {
            P.SEND_STUDIES,
            P.TRACK_TRANSFERS,
            P.VIEW_STUDIES,
            P.QUERY_NETWORK,
            P.DOWNLOAD,
            P.ADMIN_INSTITUTION,
        }
    ),
    "network_admin": frozenset({P.ADMIN_NETWORK, P.TRACK_TRANSFERS}),
    "auditor": frozenset({P.READ_AUDIT}),
    "external_legal": frozenset({P.VIEW_SHARED}),
}

# Roles whose holders always log in with a second factor, wherever they are.
ADMIN_PERMISSIONS = frozenset({P.ADMIN_INSTITUTION, P.ADMIN_NETWORK})

# What the network's bootstrap credential (data_dir/admin-token, loopback only) may do.
BOOTSTRAP_PERMISSIONS = frozenset(Permission) - {P.VIEW_SHARED}


def parse_permissions(names: list[str]) -> frozenset[Permission]:
    unknown = sorted(set(names) - {p.value for p in Permission})
    if unknown:
        raise ValueError(f"unknown permission(s): {', '.join(unknown)}")
    return frozenset(Permission(n) for n in names)
