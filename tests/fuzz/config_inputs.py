"""Settings files as a careless or hostile hand writes them: TOML of the wrong shape, values
of the wrong type, unknown keys, and bytes that are no TOML at all."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

from imagebridge.settings import GatewaySettings, HubSettings

HUB_KEYS = sorted(HubSettings.model_fields)
GATEWAY_KEYS = sorted(GatewaySettings.model_fields)

SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", ".", "..", "/", "/nonexistent/x", "0.0.0.0", "IB_RVH", "s3", "local"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)


def toml_value(value: Any) -> str:
    """Inline TOML for a value (TOML 1.0 arrays may mix types)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(values: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in values.items())


@st.composite
def settings_documents(draw: st.DrawFn, keys: list[str]) -> bytes:
    """A settings file: well-formed TOML with known keys set to anything, or damaged text."""
    values = draw(st.dictionaries(st.sampled_from(keys) | st.text(max_size=12), VALUES, max_size=6))
    text = toml_document(values).encode("utf-8")
    damage = draw(st.sampled_from(["none", "none", "cut", "noise", "binary", "table"]))
    if damage == "cut" and text:
        return text[: draw(st.integers(0, len(text) - 1))]
    if damage == "noise":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.binary(min_size=1, max_size=16)) + text[at:]
    if damage == "binary":
        return draw(st.binary(max_size=200))
    if damage == "table":
        return text + b"\n[" + draw(st.sampled_from(keys)).encode() + b"]\nx = 1\n"
    return text
