"""What check-config, logs and errors show of a secret: which setting names hold one, and URLs with
their credentials replaced. The bottom layer of the router: this module imports nothing of ours."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_SECRET_WORDS = frozenset({"token", "secret", "password", "passwd", "key", "apikey", "credential", "credentials",
                           "auth", "cookie"})


def looks_secret(name: str) -> bool:
    """Whether a setting's name says it holds a credential (``HF_TOKEN``, ``api_key``; not ``tokenizer``)."""
    return any(word in _SECRET_WORDS for word in re.split(r"[_\-.]", name.lower()))


def redact_url(url: str, *, query: bool = False) -> str:
    """`url` fit to show: its user and password replaced by ``<redacted>``; with `query`, its query too
    (a Redis URL may carry ``?password=``) and no fragment."""
    parts = urlsplit(url)
    hide_query = query and bool(parts.query or parts.fragment)
    if parts.username is None and parts.password is None and not hide_query:
        return url
    try:
        port = parts.port
    except ValueError:  # not a number: shown without it
        port = None
    host = (parts.hostname or "") + (f":{port}" if port else "")
    if parts.username is not None or parts.password is not None:
        host = f"<redacted>@{host}"
    if query:
        parts = parts._replace(query="<redacted>" if parts.query else "", fragment="")
    return urlunsplit(parts._replace(netloc=host))
