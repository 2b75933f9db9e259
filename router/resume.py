"""Streams that survive: a stream that breaks after its first byte continues on another upstream.

The relay keeps the events it forwarded; when the stream breaks it hands them here. The text so far
is read out of them, and the generation continues from it on the next target of the plan after the
one that broke (or on the same upstream again when none is left, where Ray Serve picks another
replica): `/v1/completions` with the prompt followed by the text so far, `/v1/chat/completions` with
the original messages plus an assistant message holding it, in the form the target understands.
The continuation's events are rewritten (`id`, `created`, `model`, `system_fingerprint`, and the
final usage summed over both parts) so that the client reads one stream.

A continuation is a fresh sample of the rest given the text so far, not a replay of the tokens the
broken upstream would have sent; the text so far may end inside a token.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from router.dispatch import Committed, Dispatcher
from router.errors import UpstreamError
from router.metrics import RequestObserver
from router.policy import Plan, Target
from router.schemas import Endpoint, ParsedRequest, usage_of
from router.settings import CLUSTER, Continuation, Settings

_STREAM_FIELDS = ("id", "created", "model", "system_fingerprint")
"""What identifies a stream in each chunk: the continuation's chunks carry the first part's values."""


def _events(stream: bytes) -> Iterator[Any]:
    """The decoded JSON payload of each `data:` event (normalised line ends, as the relay forwards them)."""
    for event in stream.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
                try:
                    yield json.loads(line[5:])
                except ValueError:
                    continue


@dataclass
class Delivered:
    """What the client has received of a stream so far."""

    text: str = ""
    content_events: int = 0
    """Events that carried generated text: a lower bound on the tokens delivered."""
    tool_call: bool = False
    finished: bool = False
    """A choice reached its `finish_reason`: the generation was complete."""
    identity: dict[str, Any] = field(default_factory=dict)
    """The first chunk's `id`, `created`, `model` and `system_fingerprint`."""
    usage: tuple[int, int] | None = None
    """The last running usage the upstream streamed (vLLM's `continuous_usage_stats`), if any."""

    @classmethod
    def read(cls, endpoint: Endpoint, stream: bytes) -> Delivered:
        found = cls()
        parts: list[str] = []
        for payload in _events(stream):
            if not isinstance(payload, dict):
                continue
            if not found.identity:
                found.identity = {k: payload[k] for k in _STREAM_FIELDS if k in payload}
            usage = payload.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                found.usage = usage_of(payload)
            for choice in payload.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                if choice.get("finish_reason"):
                    found.finished = True
                if endpoint is Endpoint.COMPLETIONS:
                    text = choice.get("text")
                else:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(delta, dict) and (delta.get("tool_calls") or delta.get("function_call")):
                        found.tool_call = True
                if isinstance(text, str) and text:
                    parts.append(text)
                    found.content_events += 1
        found.text = "".join(parts)
        return found

    @property
    def completion_tokens(self) -> int:
        """The tokens delivered: the upstream's own running count, else an estimate that errs towards fewer."""
        return self.usage[1] if self.usage is not None else self.content_events


def eligible(parsed: ParsedRequest) -> bool:
    """Whether a stream of this request may be continued at all (what the body asks decides it)."""
    data = parsed.data
    if not parsed.stream or parsed.endpoint is Endpoint.EMBEDDINGS:
        return False
    if data.get("n") not in (None, 1) or data.get("best_of") not in (None, 1):
        return False
    if parsed.endpoint is Endpoint.CHAT:
        return not data.get("logprobs") and data.get("top_logprobs") is None
    prompt = data.get("prompt")
    single = isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str))
    return single and data.get("logprobs") is None and not data.get("echo")


def continuation_body(parsed: ParsedRequest, delivered: Delivered, how: Continuation) -> dict[str, Any]:
    """The original request asking for the rest after `delivered`, for an upstream that continues `how`."""
    data = dict(parsed.data)
    for limit in ("max_tokens", "max_completion_tokens"):
        if isinstance(data.get(limit), int):
            data[limit] = max(1, data[limit] - delivered.completion_tokens)
    if not delivered.text:
        return data  # nothing reached the client yet but the stream's opening: ask again
    if parsed.endpoint is Endpoint.COMPLETIONS:
        prompt = data["prompt"]
        data["prompt"] = (prompt if isinstance(prompt, str) else prompt[0]) + delivered.text
        return data
    message: dict[str, Any] = {"role": "assistant", "content": delivered.text}
    if how == Continuation.PREFIX:
        message["prefix"] = True
    data["messages"] = [*data.get("messages", []), message]
    if how == Continuation.CONTINUE_FINAL_MESSAGE:
        data["continue_final_message"] = True
        data["add_generation_prompt"] = False
    return data


class Rewriter:
    """Makes a continuation's events read as the first part's stream."""

    def __init__(self, delivered: Delivered, before: tuple[int, int]) -> None:
        self._identity = delivered.identity
        self._before = before
        """Tokens (prompt, completion) of the parts before this one, added to its final usage."""

    def __call__(self, events: bytes) -> bytes:
        out: list[bytes] = []
        for event in events.split(b"\n\n")[:-1]:
            out.append(self._event(event) + b"\n\n")
        return b"".join(out)

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data:") or event[5:].strip() == b"[DONE]":
            return event
        try:
            payload = json.loads(event[5:])
        except ValueError:
            return event
        if not isinstance(payload, dict):
            return event
        payload.update(self._identity)
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                delta.pop("role", None)  # the client had the opening already
        usage = payload.get("usage")
        if isinstance(usage, dict):
            own = usage_of(payload) or (0, 0)
            usage["prompt_tokens"] = self._before[0] + own[0]
            usage["completion_tokens"] = self._before[1] + own[1]
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode()


@dataclass
class Resumed:
    """A continuation under way: its answer, and how to make its events part of the client's stream."""

    committed: Committed
    rewrite: Rewriter
    gap_started: float


class Resumer:
    """Continues one request's broken stream; built per request by the endpoints when it is eligible."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher, parsed: ParsedRequest, plan: Plan,
                 request_id: str, observer: RequestObserver) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._parsed = parsed
        self.endpoint = parsed.endpoint
        self._targets = plan.targets
        self._request_id = request_id
        self._observer = observer
        self.resumes = 0
        self._before = (0, 0)

    def _how(self, target: Target) -> Continuation:
        if target.upstream == CLUSTER:
            return Continuation.CONTINUE_FINAL_MESSAGE  # vLLM
        provider = self._settings.providers.get(target.upstream)
        return provider.continuation if provider is not None else Continuation.NONE

    def _next(self, broken: str) -> list[Target]:
        """The targets after the one that broke that can continue, else that one again when it can."""
        names = [t.upstream for t in self._targets]
        at = names.index(broken) if broken in names else len(names)
        later = [t for t in self._targets[at + 1:] if self._how(t) != Continuation.NONE]
        if later:
            return later
        return [t for t in self._targets[at:at + 1] if self._how(t) != Continuation.NONE]

    def why_not(self, delivered: Delivered, broken: str) -> str | None:
        """Why this break cannot be continued (None: it can)."""
        if self.resumes >= self._settings.router.max_resumes:
            return f"it was continued {self.resumes} times already"
        if delivered.tool_call:
            return "a tool call was streamed"
        if delivered.finished:
            return "the generation had finished"
        if not self._next(broken):
            return "no upstream can continue it"
        return None

    async def resume(self, delivered: Delivered, broken: str, part_usage: tuple[int, int]) -> Resumed:
        """Send the continuation to the first target that takes it; raise UpstreamError when none does.

        Its attempts are bounded by `router.deadline_s` from now, as a request's first answer is.
        `part_usage` is what the part that broke used: counted towards the final usage chunk.
        """
        started = time.perf_counter()
        self.resumes += 1
        self._before = (self._before[0] + part_usage[0], self._before[1] + part_usage[1])
        last_error: UpstreamError | None = None
        for target in self._next(broken):
            body = continuation_body(self._parsed, delivered, self._how(target))
            request = dataclasses.replace(self._parsed, data=body, raw=b"", text="", spans=None)
            try:
                committed = await self._dispatcher.dispatch(request, Plan((target,)), self._request_id, self._observer)
            except UpstreamError as exc:
                last_error = exc
                continue
            if committed.response.status >= 300:
                await committed.response.aclose()
                committed.release()
                last_error = UpstreamError(f"{target.upstream}: refused the continuation ({committed.response.status})")
                continue
            return Resumed(committed, Rewriter(delivered, self._before), started)
        raise last_error or UpstreamError("no upstream could continue the stream")
