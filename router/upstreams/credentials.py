"""The credentials the router sends an upstream, and keeping them out of everything relayed back.

An upstream may echo what it received (a debugging provider, a proxy's error page, a misconfigured
gateway): its key, a credential header, or the user and password of its URL. Each of them is
replaced by ``<redacted>`` in bodies, and makes a header unfit to relay, in every form an echo
takes: any of its characters percent-encoded (either case of hex) or JSON-escaped (``\\uXXXX``,
``\\/``), and base64 (a Basic authorization, or the key inside a longer base64 text).

Not caught: a credential split across two events of a stream (its halves in two deltas that the
client joins), or transformed in other ways. Providers that echo their own key in answers should
not be configured.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from router.redaction import looks_secret

REDACTED = b"<redacted>"

_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization"})
"""Header names that carry a credential though `looks_secret` would not say so."""

_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}"
    r"(?:[ \t]*;[ \t]*[A-Za-z0-9!#$&^_.+-]{1,32}=(?:[A-Za-z0-9!#$&^_.+-]{1,64}|\"[A-Za-z0-9!#$&^_.+ /=-]{0,64}\"))*"
)


def credential_header(name: str) -> bool:
    """Whether a configured header carries a credential (``x-api-key``, ``Authorization``; not
    ``anthropic-version``): its value is scrubbed from answers. Other headers are not."""
    return name.lower() in _CREDENTIAL_HEADERS or looks_secret(name)


def _char(c: str) -> bytes:
    """A pattern for one character of a secret: as it is, percent-encoded, or JSON-escaped."""
    code = ord(c)
    forms = [re.escape(c.encode()), b"%%(?i:%02x)" % code, rb"\\u(?i:%04x)" % code]
    if c == "/":
        forms.append(rb"\\/")
    return b"(?:" + b"|".join(forms) + b")"


def _base64_runs(secret: bytes) -> list[bytes]:
    """The base64 text of `secret` at each of the three alignments inside a longer base64 text:
    only the characters that depend on the secret's bytes alone."""
    runs = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret)
        first = -(-8 * offset // 6)  # first character whose 6 bits all come from the secret
        last = (8 * (offset + len(secret))) // 6  # one past the last such character
        run = encoded[first:last]
        if len(run) >= 4:
            runs += [run, run.replace(b"+", b"-").replace(b"/", b"_")]
    return runs


class Credentials:
    """Every credential sent to one upstream; empty when it is sent none (the usual cluster)."""

    __slots__ = ("_pattern",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        patterns: list[bytes] = []
        for secret in sorted({s for s in secrets if s}, key=len, reverse=True):  # a longer one is replaced whole
            patterns.append(b"".join(_char(c) for c in secret))
            patterns += [re.escape(run) for run in _base64_runs(secret.encode())]
        self._pattern = re.compile(b"|".join(patterns)) if patterns else None

    @classmethod
    def of(cls, url: str, *, key: str | None = None, headers: dict[str, str] | None = None) -> Credentials:
        """The credentials in an upstream's `url` (user and password), its `key`, and the values of
        its configured credential `headers` (see :func:`credential_header`), with the token alone
        of a ``<scheme> <token>`` value."""
        secrets = [key or ""]
        parts = urlsplit(url)
        if parts.password is not None or parts.username:
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            secrets += [password, f"{user}:{password}"]
        for name, value in (headers or {}).items():
            if credential_header(name):
                secrets.append(value)
                scheme, _, token = value.partition(" ")
                if token.strip() and scheme.isalpha():
                    secrets.append(token.strip())
        return cls(secrets)

    def __bool__(self) -> bool:
        return self._pattern is not None

    def redact(self, data: bytes) -> bytes:
        """`data` with every form of every credential replaced by ``<redacted>``."""
        return data if self._pattern is None else self._pattern.sub(REDACTED, data)

    def fit_header(self, value: str) -> bool:
        """Whether an upstream's header value may be relayed: no credential in it."""
        return self._pattern is None or self._pattern.search(value.encode("latin-1", "replace")) is None


def media_type(value: str | None, credentials: Credentials) -> str | None:
    """An upstream's ``content-type`` when it is a well-formed media type with no credential in it,
    else None (the relay then sends its own default)."""
    if value is None or not _MEDIA_TYPE.fullmatch(value) or not credentials.fit_header(value):
        return None
    return value
