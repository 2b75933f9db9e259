"""Route policy: pure and synchronous. Model + health snapshot -> the ordered upstreams to try."""

from __future__ import annotations

from dataclasses import dataclass

from router.health import CircuitState, HealthSnapshot
from router.outcomes import Outcome
from router.settings import CLUSTER, Policy, Settings


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream to try, and the id it knows the model by."""

    upstream: str
    model_id: str


@dataclass(frozen=True, slots=True)
class Skip:
    """A target passed over without an attempt, and why (a fallback reason)."""

    target: Target
    reason: Outcome


@dataclass(frozen=True, slots=True)
class Plan:
    """Targets in order, interleaved with the ones skipped, so fallbacks can be counted in order."""

    steps: tuple[Target | Skip, ...]
    cold: bool = False
    """The cluster is among the model's upstreams and has no running replica of it (capacity known)."""

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(step for step in self.steps if isinstance(step, Target))

    @property
    def waits_for_replica(self) -> bool:
        """Cold, and the cluster is the only upstream left to try: wait for a replica before sending."""
        return self.cold and all(t.upstream == CLUSTER for t in self.targets) and bool(self.targets)


def candidates(settings: Settings, model: str, snapshot: HealthSnapshot) -> list[Target]:
    """The model's upstreams in policy order, before health is considered."""
    config = settings.models[model]
    cluster = [Target(CLUSTER, settings.cluster_model_id(model))] if settings.cluster.enabled else []
    providers = [
        Target(f.provider, f.model) for f in config.fallbacks if settings.providers[f.provider].active
    ]
    match config.policy:
        case Policy.SELF_HOSTED_ONLY:
            return cluster
        case Policy.PROVIDER_ONLY:
            return providers
        case Policy.PROVIDER_FIRST:
            return providers + cluster
        case Policy.SPILLOVER if cluster_overloaded(settings, model, snapshot):
            return providers + cluster
        case _ if cluster and providers and cluster_cold(model, snapshot):
            return providers + cluster
        case _:
            return cluster + providers


def cluster_cold(model: str, snapshot: HealthSnapshot) -> bool:
    """The capacity route says no replica of `model` runs (False while capacity is unknown)."""
    capacity = snapshot.capacity.get(model)
    return capacity is not None and capacity.cold


def cluster_overloaded(settings: Settings, model: str, snapshot: HealthSnapshot) -> bool:
    """The cluster signalled back-pressure (Retry-After pending) or is past its in-flight limit."""
    health = snapshot.upstreams.get(CLUSTER)
    if health is not None and health.deferred:
        return True
    model_limit = settings.models[model].spillover_in_flight
    if model_limit is not None and snapshot.cluster_in_flight_by_model.get(model, 0) >= model_limit:
        return True
    capacity = snapshot.capacity.get(model)
    running_limit = capacity.in_flight_limit if capacity is not None else None
    if running_limit is not None and snapshot.cluster_in_flight_by_model.get(model, 0) >= running_limit:
        return True  # the running replicas are full (or none runs): Serve would queue or answer 429 next
    limit = settings.cluster.max_in_flight
    return limit is not None and snapshot.cluster_in_flight >= limit


_CLUSTER_FIRST = (Policy.SELF_HOSTED_FIRST, Policy.SPILLOVER)
"""Policies that put the cluster first unless it is cold or (spillover) overloaded."""


def plan(settings: Settings, model: str, snapshot: HealthSnapshot, exhausted: frozenset[str] = frozenset()) -> Plan:
    """The plan for one request: open circuits, upstreams in Retry-After and providers in
    `exhausted` (past their budget) are skipped.

    An upstream that asked for time (Retry-After) is still tried last when nothing else is left,
    because a short wait for it beats failing the request; an open circuit never is.
    """
    steps: list[Target | Skip] = []
    deferred: list[Target] = []
    ordered = candidates(settings, model, snapshot)
    cold = any(t.upstream == CLUSTER for t in ordered) and cluster_cold(model, snapshot)
    policy = settings.models[model].policy
    moved = policy in _CLUSTER_FIRST and len(ordered) > 1 and ordered[-1].upstream == CLUSTER
    if moved:  # the cluster went from first to last: counted as a fallback when a provider takes it
        steps.append(Skip(ordered[-1], Outcome.COLD_START if cold else Outcome.SPILLOVER))
    for target in ordered:
        health = snapshot.upstreams[target.upstream]
        if target.upstream in exhausted:
            steps.append(Skip(target, Outcome.BUDGET))
        elif health.state is CircuitState.OPEN:
            steps.append(Skip(target, Outcome.CIRCUIT_OPEN))
        elif health.deferred:
            steps.append(Skip(target, Outcome.OVERLOADED))
            deferred.append(target)
        else:
            steps.append(target)
    if deferred and not any(isinstance(step, Target) for step in steps):
        steps = [s for s in steps if not (isinstance(s, Skip) and s.target in deferred)]
        steps.extend(deferred)
    return Plan(tuple(steps), cold)
