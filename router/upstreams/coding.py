"""Content codings of upstream answers: the router reads every body it relays in plain text.

Upstreams are asked for ``Accept-Encoding: identity``. One that compresses anyway (gzip or
deflate) is decoded here, strictly: one coding in one header, the compressed data must end where
the body ends, and the decoded text must not itself be compressed. Anything else (another coding,
two content-encoding headers, a transfer coding other than chunked) is refused before a byte is
relayed, so the router never relays a body it could not inspect: the HTTP client's own decoding
reads such headers differently from a client that would decode what it relayed.
"""

from __future__ import annotations

import zlib

from multidict import CIMultiDictProxy

from router.errors import UpstreamProtocolError

MAX_OUT = 1 << 20
"""Most bytes one call returns: a small compressed chunk may inflate a thousandfold."""
_GZIP_MAGIC = b"\x1f\x8b"
_BLANK = " \t"
_GZIP = frozenset({"gzip", "x-gzip"})  # RFC 9110 8.4.1.3: x-gzip is gzip


class Decoder:
    """Incremental gzip/deflate decoding of one body."""

    __slots__ = ("_decoder", "_first", "_tail", "_upstream")

    def __init__(self, upstream: str, gzip: bool) -> None:
        self._upstream = upstream
        # gzip: its own header; deflate: decided by the first byte (zlib-wrapped, or raw as some servers send).
        self._decoder: zlib._Decompress | None = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self._tail = b""
        self._first = True

    @property
    def pending(self) -> bool:
        """Decoded output is waiting (the last call stopped at :data:`MAX_OUT`)."""
        return bool(self._tail)

    def feed(self, data: bytes) -> bytes:
        """Decode the next compressed bytes (or, with none, more of what is pending)."""
        if self._decoder is None:
            if not data:
                return b""
            raw = (data[0] & 0x0F) != 8  # RFC 1950: a zlib stream's method is 8 (deflate)
            self._decoder = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        try:
            out = self._decoder.decompress(self._tail + data, MAX_OUT)
        except zlib.error:
            raise UpstreamProtocolError(f"{self._upstream}: a compressed answer that does not decode") from None
        self._tail = self._decoder.unconsumed_tail
        if self._decoder.unused_data:
            raise UpstreamProtocolError(f"{self._upstream}: bytes after the end of a compressed answer")
        if self._first and out:
            self._first = False
            if out.startswith(_GZIP_MAGIC):
                raise UpstreamProtocolError(f"{self._upstream}: an answer compressed twice")
        return out

    def end(self) -> None:
        """At the end of the body: the compressed data must have ended too."""
        if self._decoder is None or not self._decoder.eof or self._tail:
            raise UpstreamProtocolError(f"{self._upstream}: a compressed answer cut short")


def decoder_for(upstream: str, headers: CIMultiDictProxy[str]) -> Decoder | None:
    """The decoder a response needs (None: plain), or :class:`UpstreamProtocolError` for a coding the
    router does not read the way every client would."""
    codings = headers.getall("content-encoding", [])
    transfer = headers.getall("transfer-encoding", [])
    if any(value.strip(_BLANK).lower() != "chunked" for value in transfer) or len(transfer) > 1:
        raise UpstreamProtocolError(f"{upstream}: a transfer coding other than chunked")
    if len(codings) > 1:
        raise UpstreamProtocolError(f"{upstream}: more than one content-encoding header")
    coding = codings[0].strip(_BLANK).lower() if codings else ""
    if coding in ("", "identity"):
        return None
    if coding in _GZIP or coding == "deflate":
        return Decoder(upstream, gzip=coding in _GZIP)
    raise UpstreamProtocolError(f"{upstream}: an answer in a content-encoding the router does not decode")
