"""How an attempt at an upstream ended, and why a request moved on from one.

:class:`Outcome` values are label values: the ``outcome`` of ``openweight_upstream_attempts_total``
and the ``reason`` of ``openweight_fallbacks_total``. Dashboards and alert rules select on these
strings, so they are a contract: a member may be added, but no value may change.

The bottom layer of the router: this module imports nothing of ours.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """An attempt's outcome (a fallback reason too, when it failed), or a reason to skip a target."""

    # An answer to relay as it is: these two commit, every other outcome is a failure.
    SUCCESS = "success"
    CLIENT_ERROR = "client_error"
    """The client's own 4xx (bad request, context too long): never a fallback trigger."""

    # Failed attempts: the upstream's status, or the error met on the way to it.
    SERVER_ERROR = "server_error"
    """A 5xx, a redirect, or a 404 that is not the API's own (the upstream does not serve it)."""
    AUTH_ERROR = "auth_error"
    """401/403: the router's credentials at that upstream, not the client's; never retried."""
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    """429/503 back-pressure, a Retry-After still pending, or the router's own in-flight limit."""
    CONNECT_ERROR = "connect_error"
    PROTOCOL_ERROR = "protocol_error"
    UNAVAILABLE = "unavailable"
    CIRCUIT_OPEN = "circuit_open"
    """Skipped, or refused at the attempt, while the upstream's circuit is open."""

    # Fallback reasons only: no attempt was made.
    SPILLOVER = "spillover"
    """The spill-over policy sent the request to providers first: the cluster signalled overload."""
    DEADLINE = "deadline"
    """The request's deadline passed before this upstream could be tried."""
    BUDGET = "budget"
    """The provider's budget for the period is spent: skipped."""
    COLD_START = "cold_start"
    """The cluster has no running replica of the model (scaled to zero, starting, restarting):
    providers take the request at once while the cluster is woken."""

