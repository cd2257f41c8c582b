"""Who did something: the subject of every audit event and authorization decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Actor:
    kind: str  # user | gateway | admin (the bootstrap credential) | system
    name: str
    institution_id: int | None = None
    source_address: str = ""
    permissions: frozenset[str] = field(default_factory=frozenset)
    user_id: int | None = None

    def audit(self) -> dict[str, Any]:
        return {"actor_type": self.kind, "actor": self.name, "source_address": self.source_address}

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def network_wide(self) -> bool:
        """Acts across institutions (the network's administrators), not for one."""
        return self.kind == "admin" or "admin_network" in self.permissions


def manages(actor: Actor, institution_id: int) -> bool:
    """May administer this institution: its own administrators or the network's."""
    return actor.network_wide or (
        actor.institution_id == institution_id and actor.can("admin_institution")
    )
