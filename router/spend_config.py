"""The config of spend and shared limits: prices, budgets and where their state lives.

Read through :mod:`router.settings` (``Fallback.price``, ``ProviderConfig.budget``, ``ApiKey.budget``,
``RouterConfig.state``); kept apart so that the file of the router's own settings stays one concept.
Amounts are USD and must be finite: a negative, NaN or infinite price or budget is refused at load.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pydantic import Field, field_validator

from router.config_model import Strict


class Price(Strict):
    """What a provider charges for a model, in USD per million tokens."""

    input_per_mtok: float = Field(
        ge=0, le=1_000_000, allow_inf_nan=False, description="USD per million prompt (input) tokens."
    )
    output_per_mtok: float = Field(
        ge=0, le=1_000_000, allow_inf_nan=False, description="USD per million completion (output) tokens."
    )


class Period(StrEnum):
    """How long a budget lasts before it starts again (UTC calendar days and months)."""

    DAY = "day"
    MONTH = "month"


class Budget(Strict):
    """Most USD that may be spent per period (provider spend: `usage` x `price`)."""

    usd: float = Field(gt=0, le=1_000_000_000, allow_inf_nan=False, description="USD allowed per period.")
    period: Period = Field(description="`day` or `month` (UTC); the spend starts again at 0 each period.")


class OnStateError(StrEnum):
    """What a request meets when the shared state cannot be reached in time."""

    OPEN = "open"
    CLOSED = "closed"


class StateConfig(Strict):
    """Where rate limits, budgets and spend counters live: this process, or Redis shared by every replica."""

    redis_url: str | None = Field(
        None,
        description="redis:// or rediss:// URL (may hold a password: a secret, never logged). Absent: "
        "in-process state, each router replica on its own.",
    )
    on_error: OnStateError = Field(
        OnStateError.OPEN,
        description="Redis slow or down: `open` serves the request (per-replica rate limits, budgets not "
        "enforced) and counts openweight_state_errors_total; `closed` refuses it with 503.",
    )
    timeout_s: float = Field(
        0.05, gt=0, le=5, allow_inf_nan=False,
        description="Longest wait for one Redis operation before it counts as an error.",
    )
    retry_after_error_s: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="After a Redis error, requests skip Redis (treated as errors at once) for this long.",
    )
    max_connections: int = Field(64, ge=1, description="Connections in the Redis pool of one router.")
    key_prefix: str = Field(
        "openweight", min_length=1, description="Prefix of every Redis key (a hash tag: one cluster slot)."
    )
    reservation_ttl_s: float = Field(
        900.0, gt=0, allow_inf_nan=False,
        description="A reservation a router never settled (it died) expires after this long.",
    )
    default_completion_tokens: int = Field(
        1024, ge=1, description="Completion tokens reserved for a request that sets no max_tokens.",
    )
    max_reserved_tokens: int = Field(
        32768, ge=1, description="Cap on the completion tokens one request reserves, whatever its max_tokens.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")  # never echo the URL
        return url


def serve_cost_problems(name: str, serve: dict[str, Any] | None) -> list[str]:
    """`serve.cost_per_replica_hour` as the router reads it (the cluster side validates the rest)."""
    cost = (serve or {}).get("cost_per_replica_hour")
    if cost is None:
        return []
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
        return [f"models.{name}.serve.cost_per_replica_hour: must be a finite number >= 0 (USD per replica-hour)"]
    return []
