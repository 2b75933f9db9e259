"""Client authentication: API key -> principal, per-key model allow-lists and request rates.

Keys are kept only as SHA-256 digests and compared in constant time against every stored digest,
so neither the key nor which entry matched leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import yaml
from pydantic import TypeAdapter, ValidationError

from router.config_file import error_message
from router.errors import AuthenticationFailed, PermissionDenied, RateLimited
from router.settings import ApiKey, AuthConfig, ConfigError, RateLimit, Settings
from router.spend_config import Budget


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's name, never the key."""

    name: str
    models: frozenset[str] | None = None
    rate_limit: RateLimit | None = None
    budget: Budget | None = None

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise PermissionDenied(f"the API key {self.name!r} may not use model {model!r}", param="model")


ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """The accepted client keys. An empty store means the router runs open."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._entries = tuple(
            _Entry(
                bytes.fromhex(k.sha256) if k.sha256 else digest(k.key or ""),
                Principal(k.name, frozenset(k.models) if k.models is not None else None, k.rate_limit, k.budget),
            )
            for k in keys
        )

    @classmethod
    def from_config(cls, config: AuthConfig) -> KeyStore:
        """Keys from `keys_file` (a YAML list of ApiKey) and the `keys_env` variable."""
        keys: list[ApiKey] = []
        if config.keys_file is not None:
            try:
                raw = yaml.safe_load(config.keys_file.read_text()) or []
                keys.extend(TypeAdapter(list[ApiKey]).validate_python(raw))
            except OSError as exc:
                raise ConfigError(f"router.auth.keys_file: cannot read {config.keys_file}: {exc.strerror}") from None
            except yaml.YAMLError:
                raise ConfigError(f"router.auth.keys_file: {config.keys_file} is not valid YAML") from None
            except ValidationError as exc:
                where = "; ".join(
                    f"router.auth.keys_file[{'.'.join(map(str, e['loc']))}]: {error_message(e)}" for e in exc.errors()
                )
                raise ConfigError(where) from None
        env_keys = [k.strip() for k in os.environ.get(config.keys_env, "").split(",") if k.strip()]
        for i, k in enumerate(env_keys):
            try:
                keys.append(ApiKey(name=f"{config.keys_env}[{i}]", key=k))
            except ValidationError as exc:
                raise ConfigError(f"{config.keys_env}[{i}]: {error_message(exc.errors()[0])}") from None
        return cls(keys)

    @property
    def principals(self) -> tuple[Principal, ...]:
        """Every key's principal, in file order (names only: no key or digest)."""
        return tuple(entry.principal for entry in self._entries)

    @property
    def open(self) -> bool:
        return not self._entries

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization: Bearer <key>`` header value."""
        if self.open:
            return ANONYMOUS
        if not authorization:
            raise AuthenticationFailed("missing API key: send `Authorization: Bearer <key>`")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("malformed Authorization header: expected `Bearer <key>`")
        presented = digest(key)
        found: Principal | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented) and found is None:
                found = entry.principal
        if found is None:
            raise AuthenticationFailed("invalid API key")
        return found


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_keys(settings: Settings) -> KeyStore:
    """The client keys the router would serve with; :class:`ConfigError` where it would refuse to start.

    Without keys the router serves only on a loopback address, unless ``insecure_no_auth`` is set.
    """
    keys = KeyStore.from_config(settings.router.auth)
    host = settings.router.host
    if keys.open and not is_loopback(host) and not settings.router.auth.insecure_no_auth:
        raise ConfigError(
            f"no client API keys are configured, so the router only serves on a loopback address, "
            f"not {host!r}: set {settings.router.auth.keys_env} or router.auth.keys_file, "
            "or pass --insecure-no-auth"
        )
    return keys


class RateLimiter:
    """Token buckets, one per principal with a rate limit."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, principal: Principal) -> None:
        """Take one token or raise :class:`RateLimited` with the seconds until the next one."""
        limit = principal.rate_limit
        if limit is None:
            return
        rate = limit.requests_per_minute / 60.0
        capacity = float(limit.capacity)
        now = self._clock()
        tokens, last = self._buckets.get(principal.name, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[principal.name] = (tokens, now)
            raise RateLimited(
                f"rate limit of {limit.requests_per_minute:g} requests/minute exceeded for key {principal.name!r}",
                retry_after_s=(1.0 - tokens) / rate,
            )
        self._buckets[principal.name] = (tokens - 1.0, now)
