"""The request fields that constrain the output, in OpenAI's and vLLM's shapes, to one
`StructuredOutputsParams`: OpenAI's `response_format` (`text`, `json_object`, `json_schema`
with `strict`), vLLM's `structured_outputs` object and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. At most one may ask for a constraint; a bad
one is a 400 naming the field it came from (the engine parses it again at admission and
compiles it off the event loop)."""

from __future__ import annotations

from typing import Any

from graphwise.engine.structured import check_constraint
from graphwise.sampling_params import StructuredOutputsParams
from graphwise.server.protocol import APIError, shown

GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def _from_response_format(value: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(
                400,
                "response_format.json_schema must be an object with the schema under 'schema'",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", spec.get("json_schema"))
        if schema is None:  # OpenAI allows a schema-less json_schema: any JSON object
            return StructuredOutputsParams(json_object=True)
        # `strict` is what xgrammar's strict mode always does: properties not listed are
        # refused unless the schema allows them.
        return StructuredOutputsParams(json=schema)
    raise APIError(
        400,
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {shown(kind)}",
        param="response_format.type",
    )


def structured_outputs_of(req: Any) -> StructuredOutputsParams | None:
    """The request's constraint (None if it asks for none), checked."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    try:
        field = "response_format"
        if req.response_format is not None:
            so = _from_response_format(req.response_format)
            if so is not None:
                found.append((field, so))
        field = "structured_outputs"
        if req.structured_outputs is not None:
            found.append((field, StructuredOutputsParams(**req.structured_outputs)))
        for field, key in GUIDED.items():
            value = getattr(req, field)
            if value is not None:
                found.append((field, StructuredOutputsParams(**{key: value})))
    except TypeError as exc:  # an unknown key in structured_outputs
        raise APIError(400, f"{field}: {exc}", param=field) from exc
    except ValueError as exc:
        raise APIError(400, f"{field}: {exc}", param=field) from exc
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(400, f"only one output constraint may be given, got {names}",
                       param=found[1][0])  # fmt: skip
    field, so = found[0]
    try:
        check_constraint(so)
    except ValueError as exc:
        raise APIError(400, f"{field}: {exc}", param=field) from exc
    return so
