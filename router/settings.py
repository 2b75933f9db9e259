"""The one configuration file: models, the self-hosted cluster, providers and the router itself.

The file is YAML (``--config FILE`` or ``OPENWEIGHT_CONFIG``); any field can be overridden from the
environment with the ``OPENWEIGHT_`` prefix and ``__`` between nested keys, e.g.
``OPENWEIGHT_ROUTER__PORT=9000`` or ``OPENWEIGHT_CLUSTER__URL=http://ray-head:8000/v1``.

Secrets are never part of the file: providers name the environment variable that holds their key
(``api_key_env``) and client keys come from a file or an environment variable.

The cluster side (``cluster.config``) reads the same file; each model's ``serve`` block is validated
there, so that the router does not depend on Ray or vLLM.
"""

from __future__ import annotations

import math
import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from router.capacity_config import CapacityConfig
from router.cluster_routes import DataPath, model_base_url, slug_conflicts, url_prefix
from router.config_model import Strict
from router.redaction import looks_secret, redact_url
from router.spend_config import (
    Budget,
    Price,
    StateConfig,
    serve_cost_problems,
)

CLUSTER = "cluster"
"""The upstream name of the self-hosted cluster (metrics labels, ``x-openweight-upstream``)."""


class ConfigError(Exception):
    """The configuration cannot be used; the message names every bad key."""


class Policy(StrEnum):
    """How a model's requests are routed between the cluster and its provider fallbacks."""

    SELF_HOSTED_FIRST = "self_hosted_first"
    SELF_HOSTED_ONLY = "self_hosted_only"
    PROVIDER_FIRST = "provider_first"
    PROVIDER_ONLY = "provider_only"
    SPILLOVER = "spillover"


class Continuation(StrEnum):
    """How an upstream takes the rest of a broken chat stream: the original messages plus an
    assistant message holding the text so far, in the form it understands."""

    NONE = "none"
    """It cannot continue a stream: a stream that breaks ends with an error event."""
    CONTINUE_FINAL_MESSAGE = "continue_final_message"
    """vLLM and SGLang: `continue_final_message: true` with `add_generation_prompt: false`."""
    PREFIX = "prefix"
    """The assistant message carries `"prefix": true` (Mistral, DeepSeek)."""
    TRAILING_ASSISTANT = "trailing_assistant"
    """A trailing assistant message alone is continued."""


class CircuitConfig(Strict):
    """Circuit breaker of one upstream."""

    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the circuit.")
    reset_timeout_s: float = Field(
        15.0, gt=0, description="Seconds an open circuit waits before letting one trial request through."
    )
    success_threshold: int = Field(
        1, ge=1, description="Successful trial requests in half-open state that close the circuit."
    )


class UpstreamConfig(Strict):
    """Fields shared by the cluster and every provider."""

    url: str = Field(description="Base URL of the OpenAI-compatible API, including the /v1 suffix.")
    connect_timeout_s: float = Field(2.0, gt=0, description="Seconds to establish a connection.")
    first_byte_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds from sending the request to the first body byte; past it the router falls back. "
        "A non-streamed answer's first byte comes when it is complete: allow for the longest generation.",
    )
    read_timeout_s: float = Field(
        60.0, gt=0, description="Seconds allowed between two chunks once a response is streaming."
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="Most requests in flight towards this upstream (each holds a connection); past it a "
        "request moves on at once as if the upstream were overloaded, without counting against its "
        "circuit. None: no limit of the router's own (the upstream's back-pressure, 429/503, decides).",
    )
    max_response_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Largest answer (decoded) relayed from this upstream when it is not streamed; a larger one "
        "counts as a protocol error. A stream is not bounded, each of its events is (4 MiB).",
    )
    circuit: CircuitConfig = Field(default_factory=CircuitConfig, description="Circuit breaker settings.")
    probe: bool = Field(True, description="Probe GET {url}/models in the background to feed the circuit.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class ClusterConfig(UpstreamConfig):
    """The self-hosted Ray Serve cluster (its OpenAI ingress)."""

    url: str = Field(
        "http://127.0.0.1:8100/v1", description="Base URL of the Ray Serve OpenAI ingress, with /v1."
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Sent as x-request-timeout-seconds so a Serve proxy with no schedulable replica "
        "answers 408 instead of hanging.",
    )
    max_in_flight: int | None = Field(
        None, ge=1, description="In-flight requests above which `spillover` models go to providers."
    )
    enabled: bool = Field(True, description="False when no self-hosted cluster exists (providers only).")
    capacity: CapacityConfig = Field(
        default_factory=CapacityConfig, description="Replica counts per model from the cluster's capacity route."
    )
    data_path: DataPath = Field(
        DataPath.DIRECT,
        description="`direct`: one Serve application per model, vLLM's own OpenAI app in each replica behind "
        "Serve's HAProxy, each model at `<url without /v1>/<model slug>/v1` (router/cluster_routes.py); "
        "`classic`: one application, Serve's proxy and Ray Serve LLM's OpenAI ingress, every model at `url`.",
    )

    @model_validator(mode="after")
    def _direct_url(self) -> Self:
        if self.data_path is DataPath.DIRECT:
            try:
                url_prefix(self.url)
            except ValueError as exc:
                raise ValueError(f"url: {exc}") from None
        return self


class ProviderConfig(UpstreamConfig):
    """An external OpenAI-compatible inference provider."""

    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the provider's API key. A provider whose variable "
        "is named but unset is inactive: it is never called.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent to this provider.")
    continuation: Continuation = Field(
        Continuation.NONE,
        description="How this provider continues a stream that broke on another upstream (see Continuation); "
        "`none`: it is never asked to.",
    )
    budget: Budget | None = Field(
        None, description="Most this provider may cost per period; past it the provider is skipped (reason budget)."
    )

    def api_key(self) -> str | None:
        """The key from `api_key_env`, blank ends removed (keys mounted from files end with a newline)."""
        key = os.environ.get(self.api_key_env, "").strip() if self.api_key_env else ""
        return key or None

    @property
    def active(self) -> bool:
        return self.api_key_env is None or bool(self.api_key())


class Fallback(Strict):
    """One provider that serves the same model, under the provider's own model id."""

    provider: str = Field(description="Key of an entry under `providers`.")
    model: str = Field(description="The provider's id for this model.")
    price: Price | None = Field(
        None, description="The provider's price for this model; without it its spend is not counted (USD 0)."
    )


class ModelConfig(Strict):
    """A model clients can ask for by its public name."""

    policy: Policy = Field(Policy.SELF_HOSTED_FIRST, description="Routing policy.")
    fallbacks: list[Fallback] = Field(default_factory=list, description="Providers, in the order tried.")
    cluster_model: str | None = Field(
        None, description="The model id on the cluster; defaults to the public name."
    )
    spillover_in_flight: int | None = Field(
        None, ge=1, description="For `spillover`: in-flight requests of this model above which providers "
        "take new requests (defaults to cluster.max_in_flight).",
    )
    serve: dict[str, Any] | None = Field(
        None, description="How the cluster hosts this model; validated by the cluster side."
    )


class RetryConfig(Strict):
    """Retries of one upstream (tenacity, exponential backoff with jitter).

    Only the last target of a request is retried: while another target remains, moving on to it
    is faster than backing off.
    """

    max_attempts: int = Field(3, ge=1, description="Attempts on the last remaining upstream.")
    backoff_initial_s: float = Field(0.1, ge=0, description="First backoff in seconds.")
    backoff_max_s: float = Field(2.0, ge=0, description="Largest backoff in seconds.")
    max_retry_after_s: float = Field(
        5.0, ge=0, description="Longest upstream Retry-After the router waits out instead of failing."
    )


class RateLimit(Strict):
    """A token bucket: `requests_per_minute` on average, at most `burst` at once."""

    requests_per_minute: float = Field(gt=0, description="Average request rate allowed.")
    burst: int | None = Field(
        None,
        ge=1,
        description="Requests allowed at once after a quiet spell. Default: one second's worth of the rate, "
        "at least 1 (300/minute: 5 at once, then one every 0.2 s), not a whole minute's worth.",
    )

    @property
    def capacity(self) -> int:
        """The bucket's size: `burst`, or one second's worth of the rate (at least 1)."""
        return self.burst or max(1, math.ceil(self.requests_per_minute / 60.0))


class ApiKey(Strict):
    """A client key as stored in the keys file: only its SHA-256 is kept."""

    name: str = Field(description="Who holds the key (logs and error messages use this, never the key).")
    sha256: str | None = Field(None, description="Hex SHA-256 of the key (preferred).")
    key: str | None = Field(None, description="The key in clear; hashed at load and then forgotten.")
    models: list[str] | None = Field(None, description="Public model names allowed; all when absent.")
    rate_limit: RateLimit | None = Field(None, description="Per-key request rate.")
    budget: Budget | None = Field(
        None, description="Most this key may spend on providers per period; past it: 429 insufficient_quota."
    )

    @model_validator(mode="after")
    def _one_secret(self) -> Self:
        if (self.sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of `sha256` or `key`")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())
        ):
            raise ValueError("`sha256` must be 64 hex digits")
        if self.key is not None and not (header_safe(self.key) and self.key.strip()):
            raise ValueError("`key` must be printable ASCII with no blank ends (an HTTP header carries it)")
        return self


class AuthConfig(Strict):
    """Client authentication."""

    keys_file: Path | None = Field(None, description="YAML file with a list of `ApiKey` entries.")
    keys_env: str = Field(
        "OPENWEIGHT_API_KEYS", description="Environment variable with comma-separated client keys."
    )
    insecure_no_auth: bool = Field(
        False, description="Serve without keys on a non-loopback address (never do this in production)."
    )


class RouterConfig(Strict):
    """The router process."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest accepted request head (request line and headers); 431 beyond."
    )
    request_read_timeout_s: float = Field(
        30.0, gt=0,
        description="Time a request (head and body) has to arrive from its first byte; 408 beyond. "
        "The idle time between requests on a kept-alive connection is not counted.",
    )
    deadline_s: float = Field(
        120.0, gt=0, description="Total time for all attempts of one request before its first byte."
    )
    max_resumes: int = Field(
        2, ge=0, description="Most times one stream that broke after its first byte is continued on another "
        "upstream (or the same one again); 0: a broken stream ends with an error event.",
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="Time in-flight requests get on SIGTERM.")
    probe_interval_s: float = Field(5.0, gt=0, description="Seconds between health probes.")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Retries of one upstream.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Client authentication.")
    state: StateConfig = Field(
        default_factory=StateConfig, description="Rate limits, budgets and spend: in-process or shared (Redis)."
    )


class Settings(BaseSettings):
    """The whole file. Load it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="OPENWEIGHT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    router: RouterConfig = Field(default_factory=RouterConfig, description="The router process.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="The self-hosted cluster.")
    providers: dict[str, ProviderConfig] = Field(default_factory=dict, description="Providers by name.")
    models: dict[str, ModelConfig] = Field(description="Models by public name.")

    @model_validator(mode="after")
    def _references(self) -> Self:
        problems = []
        if CLUSTER in self.providers:
            problems.append(f"providers.{CLUSTER}: the name is reserved for the self-hosted cluster")
        if not self.models:
            problems.append("models: at least one model is required")
        hosted = [name for name, model in self.models.items() if model.serve is not None]
        for name, model in self.models.items():
            for i, fallback in enumerate(model.fallbacks):
                if fallback.provider not in self.providers:
                    problems.append(
                        f"models.{name}.fallbacks.{i}.provider: unknown provider {fallback.provider!r}"
                    )
            problems.extend(serve_cost_problems(name, model.serve))
            needs_provider = model.policy in (Policy.PROVIDER_FIRST, Policy.PROVIDER_ONLY, Policy.SPILLOVER)
            if needs_provider and not model.fallbacks:
                problems.append(f"models.{name}.policy: {model.policy.value} needs at least one fallback")
            needs_cluster = model.policy is not Policy.PROVIDER_ONLY
            if needs_cluster and not self.cluster.enabled:
                problems.append(
                    f"models.{name}.policy: {model.policy.value} needs the cluster, which is disabled"
                )
            elif needs_cluster and model.serve is None and hosted:
                # This file deploys the cluster (other models have `serve:`): it would not host this one.
                problems.append(
                    f"models.{name}.serve: {model.policy.value} sends it to the cluster, which this file "
                    f"deploys without it (only {', '.join(hosted)} have serve:); add serve: or use provider_only"
                )
        if self.cluster.enabled and self.cluster.data_path is DataPath.DIRECT:
            routed = [self.cluster_model_id(n) for n, m in self.models.items() if m.policy is not Policy.PROVIDER_ONLY]
            problems.extend(f"models: {line}" for line in slug_conflicts(routed))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init arguments; the environment overrides it.
        return (env_settings, init_settings)

    def cluster_model_id(self, public_name: str) -> str:
        return self.models[public_name].cluster_model or public_name

    def cluster_base_url(self, model_id: str) -> str:
        """The base URL (with /v1) at which the cluster serves ``model_id`` (its route on the direct path)."""
        return model_base_url(self.cluster.url, model_id, self.cluster.data_path)

    def redacted(self) -> dict[str, Any]:
        """The resolved config as plain data, with no secret in it (for `check-config`)."""
        data = self.model_dump(mode="json")
        data["cluster"]["url"] = redact_url(self.cluster.url)
        if self.router.state.redis_url is not None:
            data["router"]["state"]["redis_url"] = redact_url(self.router.state.redis_url, query=True)
        for name, provider in self.providers.items():
            shown = data["providers"][name]
            shown["url"] = redact_url(provider.url)
            if provider.api_key_env:
                state = "set" if provider.api_key() else "unset: provider inactive"
                shown["api_key_env"] = f"{provider.api_key_env} ({state})"
            shown["headers"] = dict.fromkeys(provider.headers, "<redacted>")
        for name in self.models:
            serve = data["models"][name]["serve"]
            for block in ("env", "engine_args"):
                if isinstance(serve, dict) and isinstance(serve.get(block), dict):
                    serve[block] = {k: "<redacted>" if looks_secret(k) else v for k, v in serve[block].items()}
        return data


def header_safe(value: str) -> bool:
    """Whether an HTTP header can carry ``value`` as it is (printable ASCII)."""
    return value.isascii() and value.isprintable()
