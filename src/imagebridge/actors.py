"""Who did something: the subject of every audit event and authorization decision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Actor:
    kind: str  # admin | gateway | system
    name: str
    institution_id: int | None = None
    source_address: str = ""

    def audit(self) -> dict[str, Any]:
        return {"actor_type": self.kind, "actor": self.name, "source_address": self.source_address}
