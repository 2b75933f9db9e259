"""The one interface every upstream implements, the cluster and each provider alike.

An upstream takes an :class:`UpstreamRequest` and returns an :class:`UpstreamResponse` whose
status and headers have arrived; the rest of the body follows chunk by chunk. Failures to get that
far raise :class:`router.errors.UpstreamError` subclasses, never third-party exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """An OpenAI API call, ready to send: `path` is relative to the upstream's /v1 base URL."""

    method: str
    path: str
    body: bytes | None
    request_id: str
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    model: str = ""
    """The model id the body names (the cluster's direct path picks the model's base URL by it)."""


class UpstreamResponse(Protocol):
    """A started response: status, headers and the first body chunk have arrived."""

    status: int
    headers: dict[str, str]
    """Lower-case names; only those the router reads, each value checked (never a credential)."""
    first_chunk: bytes

    async def read_chunk(self) -> bytes:
        """The next part of the body after `first_chunk`, as it arrives; ``b""`` at its end.

        Raises UpstreamError if the exchange breaks or a chunk takes longer than the read timeout.
        """
        ...

    async def aread(self) -> bytes:
        """The whole body, `first_chunk` included."""
        ...

    def redact(self, data: bytes) -> bytes:
        """`data` (part of this body) with every credential the router sent this upstream replaced.

        Call it on what is relayed: whole server-sent events, or the whole body.
        """
        ...

    async def aclose(self) -> None:
        """Release the connection; safe to call more than once."""
        ...


class Upstream(Protocol):
    """An OpenAI-compatible API: the self-hosted cluster or an external provider."""

    name: str

    async def send(self, request: UpstreamRequest, timeout_s: float) -> UpstreamResponse:
        """Send `request` (its body already names this upstream's model id).

        Returns once the status, the headers and the first body chunk arrived, within
        `timeout_s` and the upstream's own connect and first-byte timeouts.
        """
        ...

    async def probe(self) -> bool:
        """Whether the upstream answers its model list now (for the health prober)."""
        ...

    async def aclose(self) -> None:
        """Close pooled connections."""
        ...
