"""A request's structured-output fields -> the engine's GuidedDecodingParams: OpenAI's
response_format, vLLM's structured_outputs (>= 0.12) and its older guided_json /
guided_regex / guided_choice / guided_grammar, and the
schema a forced tool call brings (server/tools.py). At most one may constrain a request."""

from __future__ import annotations

from typing import Any

from pagedserve.engine.sampling_params import GuidedDecodingParams
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import SamplingRequest


def _requested_guides(request: SamplingRequest) -> list[tuple[str, dict[str, Any]]]:
    """(request field, GuidedDecodingParams kwargs) for each constraint the request sets."""
    guides = []
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        guides.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        guides.append(("response_format", {"json": fmt.json_schema.json_schema}))
    if request.guided_json is not None:
        guides.append(("guided_json", {"json": request.guided_json}))
    if request.guided_regex is not None:
        guides.append(("guided_regex", {"regex": request.guided_regex}))
    if request.guided_choice is not None:
        guides.append(("guided_choice", {"choice": request.guided_choice}))
    if request.guided_grammar is not None:
        guides.append(("guided_grammar", {"grammar": request.guided_grammar}))
    outputs = request.structured_outputs
    if outputs is not None:
        kwargs = {kind: value for kind, value in (
            ("json", outputs.json_schema), ("regex", outputs.regex), ("choice", outputs.choice),
            ("grammar", outputs.grammar)) if value is not None}
        if outputs.json_object:
            kwargs["json_object"] = True
        if outputs.disable_any_whitespace is False:  # asked for outright: vLLM's layout
            kwargs["any_whitespace"] = True
        guides.append(("structured_outputs", kwargs))
    return guides


def guided_decoding(request: SamplingRequest, tool_schema: dict[str, Any] | None = None,
                    ) -> tuple[GuidedDecodingParams | None, str | None]:
    """The request's constraint and the field that set it (to name in errors), or
    (None, None). `tool_schema`: the JSON schema of a forced tool call."""
    guides = _requested_guides(request)
    if tool_schema is not None:
        if guides:
            raise APIError(f"{guides[0][0]} cannot be combined with a tool_choice that forces "
                           "a function call (the call's own schema constrains the output)",
                           param=guides[0][0])
        guides = [("tool_choice", {"json": tool_schema})]
    if len(guides) > 1:
        fields = ", ".join(name for name, _ in guides)
        raise APIError(f"at most one of response_format, structured_outputs and the guided_* "
                       f"fields may constrain a request; got {fields}", param=guides[1][0])
    if not guides:
        return None, None
    field, kwargs = guides[0]
    try:
        return GuidedDecodingParams(**kwargs), field
    except ValueError as exc:
        raise APIError(str(exc), param=field) from None
