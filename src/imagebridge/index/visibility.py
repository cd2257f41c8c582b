"""Which studies a caller may see.

Its own institution's studies, and studies transferred to its institution, with
`view_studies`; another institution's studies only with `query_network`, when both
institutions have an agreement in force and the other lets this one discover its studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, false, or_, select
from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.agreements.services import institutions_in_force
from imagebridge.index.models import Study
from imagebridge.institutions.models import DiscoveryRule, Institution
from imagebridge.transfers.models import Transfer, TransferStudy


@dataclass(frozen=True)
class Scope:
    """The institutions whose own studies the caller sees, and the one whose received
    studies it sees too."""

    institutions: frozenset[int]
    receiver: int | None

    def where(self) -> ColumnElement[bool]:
        """A condition on Study: the rows this scope may see."""
        clauses: list[ColumnElement[bool]] = []
        if self.institutions:
            clauses.append(Study.institution_id.in_(self.institutions))
        if self.receiver is not None:
            received = (
                select(TransferStudy.study_id)
                .join(Transfer, Transfer.id == TransferStudy.transfer_id)
                .where(Transfer.receiver_institution_id == self.receiver)
            )
            clauses.append(Study.id.in_(received))
        return or_(*clauses) if clauses else false()


def discovery_sources(viewer_id: int) -> Select[Any]:
    """The institutions that let the viewer's institution discover their studies."""
    return select(DiscoveryRule.source_institution_id).where(
        or_(
            DiscoveryRule.viewer_institution_id.is_(None),
            DiscoveryRule.viewer_institution_id == viewer_id,
        )
    )


def discoverable_by(session: Session, viewer_id: int) -> set[int]:
    """Institutions that let the viewer's institution discover their studies."""
    return set(session.scalars(discovery_sources(viewer_id)))


def scope_of(session: Session, actor: Actor) -> Scope:
    if actor.kind == "admin":
        # The bootstrap credential on the hub's host: the operator sees the whole index.
        return Scope(frozenset(session.scalars(select(Institution.id))), None)
    home = actor.institution_id
    if home is None:
        return Scope(frozenset(), None)
    in_force = institutions_in_force(session)
    own: set[int] = set()
    receiver = None
    if actor.can("view_studies") or actor.can("download"):
        own.add(home)
        receiver = home
    if actor.can("query_network") and home in in_force:
        own.add(home)
        receiver = home
        own |= discoverable_by(session, home) & in_force
    return Scope(frozenset(own), receiver)
