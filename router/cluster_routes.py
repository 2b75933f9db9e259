"""Where each model lives on the cluster: one ``cluster.url``, one route per model on the direct path.

On the direct data path (``cluster.data_path: direct``, the default) the cluster runs one Ray Serve
application per model, each serving vLLM's own OpenAI app under a route prefix of its own, behind
Serve's HAProxy. The user still writes one ``cluster.url`` (``http://HOST:PORT[/PREFIX]/v1``); the
router and the cluster builder both derive every model's route from it with the functions here, so
they cannot disagree:

    cluster.url  http://ray:8000/v1,  model id  Qwen/Qwen2.5-7B-Instruct
    application  qwen-qwen2-5-7b-instruct,  route prefix  /qwen-qwen2-5-7b-instruct
    model base   http://ray:8000/qwen-qwen2-5-7b-instruct/v1

The route is a *slug* of the model id: lower-case letters, digits and single dashes only. Model ids
hold characters that mean something in a URL path (``/``, ``.``, ``%``, ``?``, ``#``) or in the
HAProxy config Ray Serve writes from route prefixes (spaces, quotes); a slug holds none of them, so
no model id can reach another model's route, climb out of the prefix (``..``) or break the proxy's
config. Two ids with the same slug are refused by :func:`slug_conflicts`' callers.

On the classic path (one application with Ray Serve LLM's OpenAI ingress) every model is served at
``cluster.url`` itself. This module imports nothing of ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit

API_SUFFIX = "/v1"
"""The OpenAI API's path under a base URL (vLLM's app and Ray Serve LLM's ingress both serve it)."""

_NOT_SLUG = re.compile(r"[^a-z0-9]+")


class DataPath(StrEnum):
    """How a request reaches the engine inside the cluster."""

    DIRECT = "direct"
    """One Serve application per model; its replica serves vLLM's own OpenAI app (Ray Serve LLM's
    direct streaming), reached through Serve's HAProxy."""
    CLASSIC = "classic"
    """One Serve application: Serve's proxy -> the OpenAI ingress replica -> each model's LLM replica."""


def slug(model_id: str) -> str:
    """The route name of a model id: lower-case ASCII letters and digits, runs of anything else as one ``-``.

    Raises ValueError when nothing is left (an id of only punctuation or non-ASCII letters).
    """
    name = _NOT_SLUG.sub("-", model_id.lower()).strip("-")
    if not name:
        raise ValueError(f"model id {model_id!r} has no letter or digit to name its route with")
    return name


def slug_conflicts(model_ids: Iterable[str]) -> list[str]:
    """One line per slug shared by different model ids (each would shadow the other's route)."""
    seen: dict[str, list[str]] = {}
    for model_id in dict.fromkeys(model_ids):
        try:
            seen.setdefault(slug(model_id), []).append(model_id)
        except ValueError as exc:
            return [str(exc)]
    return [
        f"model ids {', '.join(map(repr, ids))} share the route /{name}: rename one (cluster_model)"
        for name, ids in seen.items() if len(ids) > 1
    ]


def url_prefix(cluster_url: str) -> str:
    """The path of ``cluster_url`` before its ``/v1`` (``""`` for ``http://host:port/v1``).

    Raises ValueError when the URL does not end with ``/v1``, or carries a query or fragment.
    """
    parts = urlsplit(cluster_url.rstrip("/"))
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment on the direct data path")
    if not parts.path.endswith(API_SUFFIX):
        raise ValueError(f"must end with {API_SUFFIX} on the direct data path (each model is served at "
                         f"<prefix>/<model>{API_SUFFIX})")
    return parts.path[: -len(API_SUFFIX)]


def route_prefix(cluster_url: str, model_id: str) -> str:
    """The Serve route prefix of a model's application on the direct path: ``<prefix>/<slug>``."""
    return f"{url_prefix(cluster_url)}/{slug(model_id)}"


def model_base_url(cluster_url: str, model_id: str, data_path: DataPath) -> str:
    """The OpenAI base URL (with ``/v1``) at which the cluster serves ``model_id``."""
    if data_path is DataPath.CLASSIC:
        return cluster_url.rstrip("/")
    parts = urlsplit(cluster_url.rstrip("/"))
    path = route_prefix(cluster_url, model_id) + API_SUFFIX
    return urlunsplit(parts._replace(path=path))
