"""What the router reads of a request body: only `model`, `stream` and `stream_options`.

Everything else is forwarded untouched; only `model` is rewritten to each upstream's own id, and a
stream asks its upstream for the usage chunk (stripped again if the client did not ask for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from router.errors import InvalidRequest


class Endpoint(StrEnum):
    """The inference endpoints the router relays (paths relative to /v1)."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated inference request."""

    endpoint: Endpoint
    model: str
    stream: bool
    wants_usage: bool
    """The client asked for the usage chunk of a stream itself."""
    data: dict[str, Any]
    raw: bytes

    def body_for(self, model_id: str) -> bytes:
        """The body to send to an upstream that calls this model `model_id`."""
        add_usage = self.stream and not self.wants_usage
        if self.model == model_id and not add_usage:
            return self.raw
        data = dict(self.data)
        data["model"] = model_id
        if add_usage:
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def parse_request(endpoint: Endpoint, body: bytes) -> ParsedRequest:
    """Validate the few fields the router needs; raise :class:`InvalidRequest` naming the bad one."""
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = data.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` must be a non-empty string", param="model")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    if stream and endpoint is Endpoint.EMBEDDINGS:
        raise InvalidRequest("embeddings cannot be streamed", param="stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", param="stream_options")
    if options is not None and not stream:
        raise InvalidRequest("`stream_options` is only allowed when `stream` is true", param="stream_options")
    wants_usage = bool(options and options.get("include_usage") is True)
    return ParsedRequest(endpoint, model, stream, wants_usage, data, body)
