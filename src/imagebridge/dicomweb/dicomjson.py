"""The DICOM JSON model (PS3.18 F.2): attributes keyed by tag, each with its VR and Value.

Query results become JSON from the index's values; metadata from the stored dataset, with
bulk data (pixel data and other long binary values) replaced by a BulkDataURI that the
client retrieves separately.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

PIXEL_DATA = 0x7FE00010
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Binary values longer than this go by reference; shorter ones inline, as base64.
BULK_THRESHOLD = 1024
_INTEGER_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_DECIMAL_VRS = frozenset({"DS", "FL", "FD"})


class UnknownAttribute(ValueError):
    """A name that is neither a DICOM keyword nor a tag."""


def tag_of(name: str) -> int:
    """The tag of a keyword (`PatientID`) or of eight hex digits (`00100020`)."""
    found = tag_for_keyword(name)
    if found is not None:
        return int(found)
    if len(name) == 8:
        try:
            return int(name, 16)
        except ValueError:
            pass
    raise UnknownAttribute(f"not a DICOM attribute keyword or tag: {name[:64]}")


def keyword_of(name: str) -> str:
    """The keyword of a keyword or tag; a tag without a keyword stays a tag."""
    tag = tag_of(name)
    return keyword_for_tag(tag) or f"{tag:08X}"


def _vr(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def value_element(vr: str, value: Any) -> dict[str, Any]:
    if isinstance(value, list | tuple):
        values = [v for v in value if v not in ("", None)]
    elif value in ("", None):
        return {"vr": vr}
    else:
        values = [value]
    if not values:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in values]}
    if vr in _INTEGER_VRS:
        numbers = [int(v) for v in values if str(v).strip().lstrip("-").isdigit()]
        return {"vr": vr, "Value": numbers} if numbers else {"vr": vr}
    if vr in _DECIMAL_VRS:
        return {"vr": vr, "Value": [float(v) for v in values]}
    return {"vr": vr, "Value": [str(v) for v in values]}


@lru_cache(maxsize=4096)
def _key_and_vr(keyword: str) -> tuple[str, str]:
    tag = tag_of(keyword)
    return f"{tag:08X}", _vr(tag)


def attributes(values: dict[str, Any]) -> dict[str, Any]:
    """Keyword -> value pairs as DICOM JSON attributes, in tag order."""
    out = {}
    for keyword, value in values.items():
        key, vr = _key_and_vr(keyword)
        out[key] = value_element(vr, value)
    return dict(sorted(out.items()))


BulkDataURI = Callable[[str], str]


def dataset_json(ds: Dataset, bulk_uri: BulkDataURI, path: str = "") -> dict[str, Any]:
    """A dataset as DICOM JSON, without its bulk data: each long binary value becomes a
    BulkDataURI naming its path (`7FE00010`, or `00540016/0/00181072` inside a sequence).

    Values deferred by the reader stay on disk: only their length is looked at.
    """
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        if tag.element == 0 or tag.group == 0x0002:
            continue  # group lengths and the file meta group are not part of the model
        key = f"{int(tag):08X}"
        raw = ds.get_item(tag, keep_deferred=True)
        vr = _element_vr(ds, tag, raw)
        if vr == "SQ":
            items = ds[tag].value or []
            out[key] = {"vr": "SQ"}
            if items:
                out[key]["Value"] = [
                    dataset_json(item, bulk_uri, f"{path}{key}/{i}/")
                    for i, item in enumerate(items)
                ]
        elif vr in BULK_VRS or int(tag) in PIXEL_DATA_TAGS:
            length = _length(ds, tag, raw)
            if length == 0:
                out[key] = {"vr": vr}
            elif int(tag) in PIXEL_DATA_TAGS or length > BULK_THRESHOLD:
                out[key] = {"vr": vr, "BulkDataURI": bulk_uri(path + key)}
            else:
                value = ds[tag].value
                out[key] = {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
        else:
            element = ds[tag]
            element.VR = vr
            out[key] = element.to_json_dict(None, 2**32)
    return out


def _element_vr(ds: Dataset, tag: Any, raw: Any) -> str:
    vr = raw.VR if raw is not None else None
    if vr and " or " not in vr:
        return str(vr)
    if int(tag) == PIXEL_DATA:
        return "OW" if int(ds.get("BitsAllocated", 16) or 16) > 8 else "OB"
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length:
        return _vr(int(tag)) if not vr else str(vr).split(" or ")[0]
    element: DataElement = ds[tag]
    vr = str(element.VR)
    if " or " in vr:
        # xs: US or SS by Pixel Representation; the others have one usual form.
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        vr = "SS" if vr.startswith("US or SS") and signed else vr.split(" or ")[0]
    return vr


def _length(ds: Dataset, tag: Any, raw: Any) -> int:
    if isinstance(raw, RawDataElement) and raw.value is None:
        return int(raw.length)
    value = ds[tag].value
    return len(value) if value is not None else 0


def element_at(ds: Dataset, path: str) -> DataElement:
    """The element a bulk data path names, in ``ds`` or in its sequences' items."""
    parts = path.strip("/").split("/")
    if len(parts) % 2 != 1:
        raise KeyError(path)
    current = ds
    for i in range(0, len(parts) - 1, 2):
        sequence = current[Tag(int(parts[i], 16))].value
        current = sequence[int(parts[i + 1])]
    return current[Tag(int(parts[-1], 16))]
