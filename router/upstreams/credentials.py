"""The credentials the router sends an upstream, and keeping them out of everything relayed back.

An upstream may echo what it received (a debugging provider, a proxy's error page, a misconfigured
gateway): its key, its configured headers, or the user and password of its URL. Every one of
them, in each form an echo could take (as sent, JSON-escaped, percent-encoded, inside a Basic
authorization), is replaced by ``<redacted>`` in bodies and makes a header unfit to relay.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

REDACTED = b"<redacted>"

MIN_HEADER_SECRET = 8
"""Configured header values shorter than this are not scrubbed: a value such as ``true`` or ``1``
cannot be told apart from ordinary text, and replacing it would corrupt every answer. Keys and URL
passwords are scrubbed whatever their length."""

_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}"
    r"(?:[ \t]*;[ \t]*[A-Za-z0-9!#$&^_.+-]{1,32}=(?:[A-Za-z0-9!#$&^_.+-]{1,64}|\"[A-Za-z0-9!#$&^_.+ /=-]{0,64}\"))*"
)


def _forms(secret: str) -> set[bytes]:
    """The ways `secret` may come back: as sent, JSON-escaped (also with ``\\/``) and percent-encoded
    (upper- or lower-case hex)."""
    escaped = json.dumps(secret)[1:-1]
    percent = quote(secret, safe="")
    lower = re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), percent)
    return {form.encode() for form in (secret, escaped, escaped.replace("/", "\\/"), percent, lower)}


class Credentials:
    """Every credential sent to one upstream; empty when it is sent none (the usual cluster)."""

    __slots__ = ("_forms",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms: set[bytes] = set()
        for secret in secrets:
            if secret:
                forms |= _forms(secret)
        # Longest first: a secret that contains another is replaced whole.
        self._forms = tuple(sorted(forms, key=len, reverse=True))

    @classmethod
    def of(cls, url: str, *, key: str | None = None, headers: dict[str, str] | None = None) -> Credentials:
        """The credentials in an upstream's `url` (user, password and their Basic form), its `key`
        and its configured `headers` (values of at least :data:`MIN_HEADER_SECRET` characters)."""
        secrets = [key or ""]
        parts = urlsplit(url)
        if parts.password is not None or parts.username:
            user, password = unquote(parts.username or ""), unquote(parts.password or "")
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            secrets += [password, f"{user}:{password}", basic, parts.netloc.rpartition("@")[0]]
        secrets += [v for v in (headers or {}).values() if len(v) >= MIN_HEADER_SECRET]
        return cls(secrets)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def redact(self, data: bytes) -> bytes:
        """`data` with every form of every credential replaced by ``<redacted>``."""
        for form in self._forms:
            if form in data:
                data = data.replace(form, REDACTED)
        return data

    def fit_header(self, value: str) -> bool:
        """Whether an upstream's header value may be relayed: no credential in it."""
        raw = value.encode("latin-1", "replace")
        return not any(form in raw for form in self._forms)


def media_type(value: str | None, credentials: Credentials) -> str | None:
    """An upstream's ``content-type`` when it is a well-formed media type with no credential in it,
    else None (the relay then sends its own default)."""
    if value is None or not _MEDIA_TYPE.fullmatch(value) or not credentials.fit_header(value):
        return None
    return value
