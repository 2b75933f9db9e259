"""What the router reads of a request body: only `model`, `stream` and `stream_options`.

Everything else is forwarded untouched; only `model` is rewritten to each upstream's own id, and a
stream asks its upstream for the usage chunk (stripped again if the client did not ask for it).

A body is refused (400) unless it is strict JSON (RFC 8259): no `NaN`/`Infinity`, and no top-level
key twice. JSON parsers disagree on which of two equal keys wins, so with a duplicate the router
could decide on one value (the model, whether to stream) while the upstream acts on the other.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from router.errors import InvalidRequest

_WHITESPACE = " \t\n\r"
_SPACE = re.compile(r"[ \t\n\r]*")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON text, but no number a parser can hold
        raise ValueError(f"{text} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_READ_KEYS = frozenset({"model", "stream", "stream_options"})
_MAX_OPTIONS_DEPTH = 16
_SCAN_STRING = json.decoder.scanstring  # type: ignore[attr-defined]
_SCAN_VALUE: Any = _DECODER.scan_once  # type: ignore[attr-defined]
_encode_string = json.encoder.encode_basestring
_ASK_USAGE = '"stream_options":{"include_usage":true},'
Spans = dict[str, tuple[int, int]]
"""Where each top-level value of the body's text starts and ends: edits splice there."""


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
    text: str = ""
    """`raw` decoded (empty when `spans` is None)."""
    spans: Spans | None = None

    def body_for(self, model_id: str) -> bytes:
        """The body to send to an upstream that calls this model `model_id`.

        The client's bytes are kept: the new `model` and `stream_options` values are spliced in
        where the old ones were (`stream_options` after the opening brace when there was none),
        never re-encoding the rest, which for a long prompt costs more than all else the router does.
        """
        add_usage = self.stream and not self.wants_usage
        if self.model == model_id and not add_usage:
            return self.raw
        if self.spans is None or "model" not in self.spans:
            data = dict(self.data)
            data["model"] = model_id
            if add_usage:
                data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
            # ASCII escapes: a lone surrogate the client sent as `\\ud800` stays an escape, never a 500.
            return json.dumps(data, separators=(",", ":")).encode()
        edits = []  # (start, end, replacement) in the text
        if self.model != model_id:
            edits.append((*self.spans["model"], _encode_string(model_id)))
        if add_usage:
            where = self.spans.get("stream_options")
            if where is None:
                brace = self.text.index("{") + 1
                edits.append((brace, brace, _ASK_USAGE))
            else:
                options = {**(self.data.get("stream_options") or {}), "include_usage": True}
                edits.append((*where, json.dumps(options, separators=(",", ":"))))
        edits.sort()
        if len(self.text) != len(self.raw):  # not all ASCII: text offsets are not byte offsets
            return "".join(_pieces(self.text, edits)).encode()
        return b"".join(_pieces(memoryview(self.raw), [(a, b, r.encode()) for a, b, r in edits]))


def _pieces(whole: Any, edits: list[tuple[int, int, Any]]) -> list[Any]:
    """`whole` cut around `edits` (sorted, not overlapping), each range replaced by its replacement."""
    pieces: list[Any] = []
    done = 0
    for start, end, replacement in edits:
        pieces += (whole[done:start], replacement)
        done = end
    pieces.append(whole[done:])
    return pieces


class _Duplicate(Exception):
    """A top-level key that appears twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses any object with a key twice."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _Duplicate(key)
        data[key] = value
    return data


def _duplicate(key: str) -> InvalidRequest:
    return InvalidRequest(f"the request body has the key {key!r} more than once", param=key)


def _scan_object(text: str) -> tuple[dict[str, Any], Spans] | None:
    """A JSON object and the span of each top-level value, or None for anything else or any error
    (then :func:`json.loads` gives the verdict and its message). Keys and values are decoded by the
    json module's own C scanner, so this costs little more than ``json.loads``. Raises
    :class:`_Duplicate` for a top-level key seen twice."""
    space, scan_key, scan_value = _SPACE.match, _SCAN_STRING, _SCAN_VALUE
    data: dict[str, Any] = {}
    spans: Spans = {}
    try:
        at = space(text).end()  # type: ignore[union-attr]
        if text[at] != "{":
            return None
        at += 1
        while True:
            if text[at] in _WHITESPACE:
                at = at + 1 if text[at + 1] not in _WHITESPACE else space(text, at).end()  # type: ignore[union-attr]
            if text[at] != '"':
                if spans:
                    return None  # a comma with no member after it
                break  # `}` of an empty object, or an error
            key, at = scan_key(text, at + 1)
            if text[at] in _WHITESPACE:
                at = at + 1 if text[at + 1] not in _WHITESPACE else space(text, at).end()  # type: ignore[union-attr]
            if text[at] != ":":
                return None
            at += 1
            if text[at] in _WHITESPACE:
                at = at + 1 if text[at + 1] not in _WHITESPACE else space(text, at).end()  # type: ignore[union-attr]
            if key in spans:
                raise _Duplicate(key)
            data[key], end = scan_value(text, at)
            spans[key] = (at, end)
            at = end
            if text[at] in _WHITESPACE:
                at = at + 1 if text[at + 1] not in _WHITESPACE else space(text, at).end()  # type: ignore[union-attr]
            if text[at] != ",":
                break
            at += 1
        if text[at] != "}" or text[at + 1 :].strip(_WHITESPACE):
            return None
    except (ValueError, IndexError, StopIteration, RecursionError):
        return None
    return data, spans


def parse_request(endpoint: Endpoint, body: bytes) -> ParsedRequest:
    """Validate the few fields the router needs; raise :class:`InvalidRequest` naming the bad one."""
    if not body:
        raise InvalidRequest("the request body is empty; send a JSON object")
    encoding = json.detect_encoding(body)
    try:
        text = body.decode(encoding)  # strict: a lone surrogate could not be re-encoded
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    if encoding != "utf-8":  # UTF-16/32 or a byte-order mark: upstreams get UTF-8, as JSON on the wire must be
        body = text.encode()
    try:
        scanned = _scan_object(text)
    except _Duplicate as dup:
        raise _duplicate(dup.key) from None
    spans: Spans | None = None
    if scanned is not None:
        data, spans = scanned
    else:
        try:
            data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        except _Duplicate as dup:
            raise _duplicate(dup.key) from None
        except ValueError as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequest("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for key in data:
        # A parser that matches keys without regard to case (Go's encoding/json, which also folds
        # the long s and the Kelvin sign) would read `MODEL` as the key the router read as `model`.
        if len(key) in (5, 6, 14) and key not in _READ_KEYS and key.casefold() in _READ_KEYS:
            raise InvalidRequest(f"the request body has the key {key!r}: write {key.casefold()!r}", param=key)
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
    if options is not None and _depth(options) > _MAX_OPTIONS_DEPTH:  # it is re-encoded: keep clear of recursion limits
        raise InvalidRequest("`stream_options` is nested too deeply", param="stream_options")
    if spans is not None and "stream_options" in spans:
        # The router reads `include_usage`: a key twice inside would leave the usage chunk to the upstream's parser.
        try:
            json.loads(text[slice(*spans["stream_options"])], object_pairs_hook=_pairs)
        except _Duplicate as dup:
            raise _duplicate(f"stream_options.{dup.key}") from None
    if options is not None and not stream:
        raise InvalidRequest("`stream_options` is only allowed when `stream` is true", param="stream_options")
    wants_usage = bool(options and options.get("include_usage") is True)
    return ParsedRequest(endpoint, model, stream, wants_usage, data, body, text if spans else "", spans)


def _depth(value: object) -> int:
    """How deeply `value` nests lists and objects (no recursion: the value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                deepest = max(deepest, level + 1)
                stack.append((child, level + 1))
    return max(deepest, 1)


def usage_of(payload: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a decoded response or chunk that carries `usage`."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else 0,
        completion if isinstance(completion, int) else 0,
    )
