"""QIDO-RS (PS3.18 10.6): searching the index for studies, series and instances.

Query parameters are matching keys (keywords or tags) matched as C-FIND matches them
(index/query.py), plus `limit`, `offset`, `includefield` and `fuzzymatching`. Each answer
carries the attributes PS3.18 Table 10.6.3-3/4/5 requires that the index holds, the matching
keys, and those `includefield` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from imagebridge.actors import Actor
from imagebridge.audit.services import record
from imagebridge.counts import INT32_MAX, whole_number
from imagebridge.dicomweb import dicomjson
from imagebridge.dicomweb.dicomjson import UnknownAttribute
from imagebridge.index import query
from imagebridge.index.query import KEYS, MAX_LIMIT, MODALITIES_IN_STUDY, QueryError
from imagebridge.index.visibility import scope_of

RESOURCE_LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
PATIENT_FIELDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
DEFAULT_FIELDS = {
    "STUDY": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        MODALITIES_IN_STUDY,
        *PATIENT_FIELDS,
        "StudyInstanceUID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    ),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber"),
}
# What the index holds beyond the defaults, for `includefield`.
EXTRA_FIELDS = ("IssuerOfPatientID", "StudyDescription")
# Keys a client may give several times, or as a list: values of one list.
LIST_KEYS = frozenset({k for k, key in KEYS.items() if key.vr == "UI"} | {MODALITIES_IN_STUDY})
INSTANCE_AVAILABILITY = "ONLINE"  # everything indexed is held in the hub's blob store


class SearchError(ValueError):
    """A search the standard does not allow, with the reason."""


@dataclass
class Search:
    resource: str  # studies | series | instances: what the client asked for
    level: str
    keys: dict[str, str]
    returned: list[str]  # keywords, in the order given
    limit: int
    offset: int
    server_limit: bool  # the limit is the server's, not the client's
    warnings: list[str] = field(default_factory=list)


def parse(resource: str, params: list[tuple[str, str]], path_keys: dict[str, str]) -> Search:
    """The search a request asks for; SearchError says what is wrong with it."""
    level = RESOURCE_LEVELS[resource]
    keys: dict[str, str] = {}
    include: list[str] = []
    include_all = False
    limit, offset, warnings, server_limit = MAX_LIMIT, 0, [], True
    for name, value in params:
        if name == "limit":
            limit = _count(name, value, minimum=1)
            server_limit = limit >= MAX_LIMIT
            if limit > MAX_LIMIT:
                limit = MAX_LIMIT
                warnings.append(
                    f"The number of results exceeded the maximum supported by the server "
                    f"({MAX_LIMIT}). Additional results can be requested."
                )
        elif name == "offset":
            offset = _count(name, value, minimum=0)
        elif name == "fuzzymatching":
            # Allowed to be ignored (PS3.18 8.3.4.5): matching is exact, as in C-FIND.
            if value.lower() not in ("true", "false"):
                raise SearchError("fuzzymatching is true or false")
        elif name == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item == "all":
                    include_all = True
                elif item:
                    include.append(_keyword(item))
        else:
            keyword = _keyword(name)
            if keyword in keys:
                if keyword not in LIST_KEYS:
                    raise SearchError(f"{keyword} is given more than once")
                value = keys[keyword] + "\\" + value
            keys[keyword] = value
    keys.update(path_keys)
    returned = _returned(resource, level, keys, include, include_all)
    return Search(resource, level, keys, returned, limit, offset, server_limit, warnings)


def _count(name: str, value: str, minimum: int) -> int:
    count = whole_number(value, minimum)
    if count is None:
        raise SearchError(f"{name} is a whole number from {minimum} to {INT32_MAX}")
    return count


def _keyword(name: str) -> str:
    if "." in name:
        raise SearchError(f"sequence matching is not supported: {name[:64]}")
    try:
        return dicomjson.keyword_of(name)
    except UnknownAttribute as exc:
        raise SearchError(str(exc)) from exc


def _returned(
    resource: str, level: str, keys: dict[str, str], include: list[str], include_all: bool
) -> list[str]:
    # PS3.18 10.6.3.3: series and instances searched across studies carry the study's
    # attributes too, and instances across series the series'.
    levels = {"STUDY": ["STUDY"], "SERIES": ["SERIES"], "IMAGE": ["IMAGE"]}[level]
    if resource == "series" and "StudyInstanceUID" not in keys:
        levels.insert(0, "STUDY")
    if resource == "instances":
        if "SeriesInstanceUID" not in keys:
            levels.insert(0, "SERIES")
        if "StudyInstanceUID" not in keys:
            levels.insert(0, "STUDY")
    if include_all:
        levels = ["STUDY", "SERIES", "IMAGE"][: ["STUDY", "SERIES", "IMAGE"].index(level) + 1]
        include = [*include, *EXTRA_FIELDS]
    returned = [f for lv in levels for f in DEFAULT_FIELDS[lv]]
    for keyword in [*keys, *include]:
        if keyword not in returned:
            returned.append(keyword)
    return returned


def search(session: Session, actor: Actor, spec: Search, base_url: str) -> list[dict[str, Any]]:
    """The matches as DICOM JSON, audited with what they were."""
    try:
        rows = query.find(
            session,
            spec.level,
            spec.keys,
            scope_of(session, actor),
            limit=spec.limit,
            offset=spec.offset,
        )
    except QueryError as exc:
        raise SearchError(str(exc)) from exc
    if len(rows) == spec.limit and spec.server_limit and not spec.warnings:
        spec.warnings.append("There may be more results: ask again with offset.")
    answers = [_answer(row, spec, base_url) for row in rows]
    studies = sorted({row["StudyInstanceUID"] for row in rows})
    patients = {row["PatientID"] for row in rows}
    record(
        session,
        f"dicomweb:query:{spec.resource}",
        institution_id=actor.institution_id,
        patient_ref=next(iter(patients)) if len(patients) == 1 else "",
        study_ref=studies[0] if len(studies) == 1 else "",
        detail={
            "level": spec.level,
            "results": len(rows),
            "keys": sorted(spec.keys),
            "studies": studies[:100],
        },
        **actor.audit(),
    )
    return answers


def _answer(row: dict[str, Any], spec: Search, base_url: str) -> dict[str, Any]:
    values = {k: row[k] for k in spec.returned if k in row}
    url = f"{base_url}/studies/{row['StudyInstanceUID']}"
    if spec.level in ("SERIES", "IMAGE"):
        url += f"/series/{row['SeriesInstanceUID']}"
    if spec.level == "IMAGE":
        url += f"/instances/{row['SOPInstanceUID']}"
    values["RetrieveURL"] = url
    values["InstanceAvailability"] = INSTANCE_AVAILABILITY
    return dicomjson.attributes(values)
