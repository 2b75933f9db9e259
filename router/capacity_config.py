"""The config of the cluster's capacity route (``cluster.capacity``): where the router reads replica
counts per model and how it wakes a model at zero (see :mod:`router.capacity`).

Read through :mod:`router.settings` (``ClusterConfig.capacity``); kept apart so that the file of the
router's own settings stays one concept.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from router.config_model import Strict


class CapacityConfig(Strict):
    """The cluster's capacity route: replicas per model from Serve's own state (see router.capacity)."""

    enabled: bool = Field(
        True,
        description="Read the capacity route with every probe; a cluster that does not answer it is "
        "routed as if capacity were unknown (no cold-start cover, no wake-up).",
    )
    path: str = Field(
        "/openweight/capacity",
        description="Route prefix of the capacity application on the Serve HTTP port (the host and port "
        "of `cluster.url`).",
    )
    wake_hold_s: float = Field(
        60.0, gt=0,
        description="After the last request for a model with no running replica, how long the router "
        "keeps asking Serve to start one (a held wake-up call that Serve's autoscaler counts).",
    )
    waiting_comment_interval_s: float = Field(
        5.0, gt=0,
        description="A stream waiting for a replica (no provider) gets the SSE comment "
        "`: waiting for a replica` this often, so proxies do not time the connection out.",
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/") or path == "/":
            raise ValueError("must start with / and name a route prefix other than /")
        return path.rstrip("/")
