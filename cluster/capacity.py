"""The capacity application: replicas per model from Serve's own state, on the Serve HTTP port.

:func:`cluster.builder.serve_config` deploys it beside the models' applications as application
:data:`APP_NAME` at route prefix ``cluster.capacity.path`` (default ``/openweight/capacity``), one
replica that takes no CPU. The router reads it through the port it already uses for inference
(:mod:`router.capacity` documents the route); nothing reaches Ray's dashboard.

- ``GET``: for each model id in ``args.models``, replicas ``running``, ``starting`` (starting,
  recovering or updating) and ``target`` (what Serve's autoscaler aims for), and
  ``max_ongoing_requests``, read from the Serve controller (``get_serve_instance_details``, the same
  call ``serve.status()`` makes).
- ``POST wake`` ``{"model": id, "hold_s": s}``: one call to the model's ``LLMServer`` deployment
  (``check_health``) through a Serve deployment handle, held up to ``s`` seconds. Serve's autoscaler
  adds the requests queued in every handle to a deployment's load
  (``AutoscalingState.get_total_num_requests``), and a deployment at zero replicas with any queued
  request is scaled up at once (``_get_cold_start_scale_up_replicas`` in
  ``ray/serve/autoscaling_policy.py``; the handle pushes its metrics to the controller as soon as a
  request queues for a deployment with no replica, ``Router.should_send_scaled_to_zero_optimized_push``).
  A handle's ``num_queued_requests`` drops when the call is assigned or cancelled, so the hold ends
  as soon as a replica runs, and nothing wakes a model unless a call is held.

A model's deployment is found by name in every application: Ray Serve LLM names it
``<class>:<model id with / as -- and . as _>`` (``LLMServer:org--model``), on the classic data path
(one application of every model) and on the direct one (one application per model) alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from router.capacity import RUNNING, STARTING, TARGET, WAKE
from router.settings import Settings

APP_NAME = "openweight-capacity"
IMPORT_PATH = "cluster.capacity:app_from_args"
STARTING_STATES = frozenset({"STARTING", "RECOVERING", "UPDATING"})
"""Serve replica states counted as `starting`: on their way to RUNNING."""
MAX_HOLD_S = 300.0
"""Longest wake-up call the application holds."""


def deployment_suffix(model_id: str) -> str:
    """How Ray Serve LLM names a model's deployment after its id (``ray.llm ... _get_deployment_name``)."""
    return model_id.replace("/", "--").replace(".", "_")


def capacity_application(settings: Settings, model_ids: Iterable[str]) -> dict[str, Any]:
    """The capacity application's entry in the Serve config (``serve deploy`` format)."""
    return {
        "name": APP_NAME,
        "route_prefix": settings.cluster.capacity.path,
        "import_path": IMPORT_PATH,
        "args": {"models": sorted(model_ids)},
    }


class Deployed(NamedTuple):
    """Where a model is deployed: its application, its deployment, and the application's ingress."""

    app: str
    deployment: str
    ingress: str | None
    """The application's ingress when it is another deployment (the classic path's OpenAI ingress)."""


def find_deployments(details: Mapping[str, Any], model_ids: Iterable[str]) -> dict[str, Deployed]:
    """Each deployed model of `model_ids`, found in the controller's ``get_serve_instance_details``."""
    wanted = {deployment_suffix(model_id): model_id for model_id in model_ids}
    found: dict[str, Deployed] = {}
    for app_name, app in (details.get("applications") or {}).items():
        ingress = (app.get("deployment_topology") or {}).get("ingress_deployment")
        for name in (app.get("deployments") or {}):
            model_id = wanted.get(name.rpartition(":")[2])
            if model_id is not None and ":" in name:
                found[model_id] = Deployed(app_name, name, ingress if ingress != name else None)
    return found


def _replica_states(deployment: Mapping[str, Any]) -> list[str]:
    """Each replica's state name (the controller sends ``ReplicaState`` members, a str enum)."""
    states = (replica.get("state") for replica in deployment.get("replicas") or [])
    return [str(getattr(state, "value", state)) for state in states]


def capacity_of(details: Mapping[str, Any], model_ids: Iterable[str]) -> dict[str, dict[str, int | None]]:
    """The route's ``models`` answer from the Serve controller's instance details.

    A model counts as running only while its application's ingress runs too: Serve scales the
    classic path's OpenAI ingress to zero with the models when every model may scale to zero, and a
    request would wait for the ingress as it waits for a model replica.
    """
    models: dict[str, dict[str, int | None]] = {}
    for model_id, where in find_deployments(details, model_ids).items():
        deployments = details["applications"][where.app]["deployments"]
        deployment = deployments[where.deployment]
        states = _replica_states(deployment)
        running = states.count("RUNNING")
        if where.ingress is not None and "RUNNING" not in _replica_states(deployments.get(where.ingress) or {}):
            running = 0
        config = deployment.get("deployment_config") or {}
        models[model_id] = {
            RUNNING: running,
            STARTING: sum(state in STARTING_STATES for state in states),
            TARGET: int(deployment.get("target_num_replicas") or 0),
            "max_ongoing_requests": config.get("max_ongoing_requests"),
        }
    return models


def wake_call(call: Any) -> tuple[str, float]:
    """(model id, seconds to hold) of a wake-up call's body, the hold capped at :data:`MAX_HOLD_S`;
    ValueError unless it is ``{"model": str, "hold_s": a finite number > 0}``."""
    if not isinstance(call, dict) or not isinstance(call.get("model"), str):
        raise ValueError("not a wake-up call")
    hold_s = call.get("hold_s")
    if isinstance(hold_s, bool) or not isinstance(hold_s, int | float) or not 0 < hold_s < math.inf:
        raise ValueError("hold_s: a finite number of seconds > 0 is required")
    return call["model"], min(float(hold_s), MAX_HOLD_S)


class Capacity:
    """The deployment's class (Serve wraps it in :func:`app_from_args`); ``models``: cluster model ids."""

    def __init__(self, models: list[str]) -> None:
        self._models = list(models)
        self._handles: dict[str, Any] = {}

    async def _details(self) -> dict[str, Any]:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        details: dict[str, Any] = await controller.get_serve_instance_details.remote()
        return details

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/")
        if request.method == "GET" and not path.endswith(f"/{WAKE}"):
            return JSONResponse({"models": capacity_of(await self._details(), self._models)})
        if request.method == "POST" and path.endswith(f"/{WAKE}"):
            try:
                model, hold_s = wake_call(await request.json())
            except ValueError:
                return JSONResponse({"error": "expected {\"model\": id, \"hold_s\": seconds}"}, status_code=400)
            if model not in self._models:
                return JSONResponse({"error": f"unknown model {model!r}"}, status_code=404)
            return JSONResponse({"model": model, RUNNING: await self.wake(model, hold_s)})
        return JSONResponse({"error": "not found"}, status_code=404)

    async def wake(self, model: str, hold_s: float) -> bool:
        """Hold one call to the model's deployment (and its application's ingress, when that is another
        deployment) up to `hold_s`; whether replicas took them."""
        handles = await self._handles_of(model)
        if not handles:
            return False
        calls = [handle.check_health.remote() for handle in handles]
        try:
            await asyncio.wait_for(asyncio.gather(*(_taken(call) for call in calls)), timeout=hold_s)
        except TimeoutError:
            for call in calls:
                call.cancel()  # leaves the handle's queue: the load Serve counts drops with it
            return False
        return True

    async def _handles_of(self, model: str) -> list[Any]:
        if model not in self._handles:
            from ray import serve

            where = find_deployments(await self._details(), [model]).get(model)
            if where is None:
                return []
            names = [where.deployment] + ([where.ingress] if where.ingress else [])
            self._handles[model] = [serve.get_deployment_handle(name, where.app) for name in names]
        handles: list[Any] = self._handles[model]
        return handles


async def _taken(call: Any) -> None:
    """Wait until a replica took and answered `call`; a replica that failed it took it all the same."""
    with contextlib.suppress(Exception):
        await call


def app_from_args(args: dict[str, Any]) -> Any:
    """Serve application builder named by :data:`IMPORT_PATH`: ``args`` is ``{"models": [model id, ...]}``."""
    from ray import serve

    models = args.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ValueError("args.models: a list of model ids is required")
    deployment: Any = serve.deployment(
        Capacity, name="Capacity", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256
    )
    return deployment.bind(models)
