"""The chart's values.schema.json, built from the chart's own keys and the code's config models.

The config sections (`router.config`, `cluster.config`, `providers`, `models`) take their schema
from the pydantic models in router/settings.py, so the chart rejects exactly what the router would
reject. `tests/deploy/test_chart.py` fails when the committed file differs from this output;
regenerate it with::

    .venv/bin/python -m tests.deploy.values_schema --write
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

from router.settings import Settings
from tests.deploy.support import CHART

SCHEMA_PATH = CHART / "values.schema.json"

Schema = dict[str, Any]


def obj(properties: dict[str, Schema], required: list[str] | None = None, description: str = "") -> Schema:
    schema: Schema = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    return schema


STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
MAP: Schema = {"type": "object"}
LIST: Schema = {"type": "array"}
STR_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
PORT: Schema = {"type": "integer", "minimum": 1, "maximum": 65535}
COUNT: Schema = {"type": "integer", "minimum": 0}
QUANTITY: Schema = {"type": ["string", "integer"]}
IMAGE = obj({"repository": STR, "tag": STR, "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}},
            ["repository"])
SECRET_REF = obj({"existingSecret": STR, "secretKey": STR})
PROBE: Schema = {"type": ["object", "null"]}
# ray start parameters are strings in the RayCluster API (map[string]string); numbers are quoted.
RAY_START_PARAMS: Schema = {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}
NODE_COMMON = {
    "resources": MAP, "nodeSelector": STR_MAP, "tolerations": LIST, "affinity": MAP, "env": LIST,
    "podAnnotations": STR_MAP, "podLabels": STR_MAP, "rayStartParams": RAY_START_PARAMS,
}


def config_defs() -> dict[str, Schema]:
    """`$defs` of the config file's models, plus ClusterSettings (the cluster section without the
    `url` and `enabled` keys, which the chart sets)."""
    defs: dict[str, Schema] = copy.deepcopy(Settings.model_json_schema()["$defs"])
    cluster = copy.deepcopy(defs["ClusterConfig"])
    for key in ("url", "enabled"):
        cluster["properties"].pop(key)
    cluster["description"] = "ClusterConfig without `url` and `enabled` (set by cluster.url / cluster.enabled)."
    defs["ClusterSettings"] = cluster
    return defs


def chart_schema() -> Schema:
    router = obj({
        "image": IMAGE,
        "imagePullSecrets": LIST,
        "replicas": COUNT,
        "config": {"$ref": "#/$defs/RouterConfig"},
        "apiKeys": obj({"existingSecret": STR, "secretKey": STR, "keysFile": SECRET_REF}),
        "state": obj({"redisUrl": SECRET_REF, "keysHaveLimits": {"type": ["boolean", "null"]}}),
        "providerKeys": obj({
            "existingSecret": STR,
            "secrets": {"type": "object", "additionalProperties": obj({"name": STR, "key": STR}, ["name"])},
        }),
        "extraEnv": {"type": "array", "items": {
            "type": "object", "required": ["name"], "not": {"required": ["value"], "properties": {
                "name": {"pattern": "(?i)(key|token|secret|password)"}}},
        }},
        "resources": MAP,
        "podSecurityContext": MAP,
        "securityContext": MAP,
        "livenessProbe": PROBE,
        "readinessProbe": PROBE,
        "startupProbe": PROBE,
        "preStopSleepSeconds": COUNT,
        "terminationGracePeriodSeconds": COUNT,
        "topologySpreadConstraints": LIST,
        "nodeSelector": STR_MAP,
        "tolerations": LIST,
        "affinity": MAP,
        "podAnnotations": STR_MAP,
        "podLabels": STR_MAP,
        "priorityClassName": STR,
        "serviceAccount": obj({"create": BOOL, "name": STR, "annotations": STR_MAP}),
        "service": obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": PORT,
                        "annotations": STR_MAP}),
        "podDisruptionBudget": obj({"enabled": BOOL, "maxUnavailable": {"type": ["integer", "string"]}}),
        "autoscaling": obj({
            "enabled": BOOL, "minReplicas": {"type": "integer", "minimum": 1},
            "maxReplicas": {"type": "integer", "minimum": 1},
            "targetCPUUtilizationPercentage": {"type": ["integer", "null"], "minimum": 1},
            "targetMemoryUtilizationPercentage": {"type": ["integer", "null"], "minimum": 1},
            "behavior": MAP,
        }),
        "ingress": obj({
            "enabled": BOOL, "className": STR, "annotations": STR_MAP, "tls": LIST,
            "hosts": {"type": "array", "items": obj({
                "host": STR,
                "paths": {"type": "array", "items": obj({
                    "path": STR, "pathType": {"enum": ["Prefix", "Exact", "ImplementationSpecific"]}},
                    ["path", "pathType"])},
            }, ["host", "paths"])},
        }),
        "httpRoute": obj({"enabled": BOOL, "annotations": STR_MAP, "parentRefs": LIST, "hostnames": LIST,
                          "matches": LIST, "timeouts": MAP}),
    })
    worker_group = obj({
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "gpus": COUNT,
        "replicas": COUNT,
        "minReplicas": COUNT,
        "maxReplicas": COUNT,
        "idleTimeoutSeconds": COUNT,
        **NODE_COMMON,
    }, ["name", "gpus", "minReplicas", "maxReplicas"])
    cluster = obj({
        "enabled": BOOL,
        "url": {"type": "string", "pattern": "^(https?://.+)?$"},
        "config": {"$ref": "#/$defs/ClusterSettings"},
        "rayVersion": STR,
        "image": IMAGE,
        "imagePullSecrets": LIST,
        # Ray Serve refuses a route prefix with a trailing slash (other than "/") or a wildcard.
        "serve": obj({"applicationName": STR, "routePrefix": {"type": "string", "pattern": "^/([^{}]*[^/{}])?$"},
                      "importPath": {"type": "string", "pattern": "^[\\w.]+:\\w+$"}, "port": PORT}),
        "upgradeStrategy": {"enum": ["NewCluster", "None"]},
        "rayClusterDeletionDelaySeconds": COUNT,
        "authOptions": MAP,
        "autoscaler": obj({"enabled": BOOL, "upscalingMode": {"enum": ["Default", "Conservative", "Aggressive"]},
                           "idleTimeoutSeconds": COUNT, "resources": MAP}),
        "head": obj(NODE_COMMON),
        "workerGroups": {"type": "array", "items": worker_group, "minItems": 1},
        "env": LIST,
        "modelCache": obj({"enabled": BOOL, "existingClaim": STR, "size": QUANTITY, "storageClassName": STR,
                           "accessModes": LIST, "mountPath": {"type": "string", "pattern": "^/"}}),
        "hfToken": SECRET_REF,
        "sharedMemorySize": QUANTITY,
        "podSecurityContext": MAP,
        "securityContext": MAP,
    })
    selector_pair = obj({"namespaceSelector": MAP, "podSelector": MAP})
    namespace: Schema = {"type": "string", "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"}
    operator = obj({"namespace": namespace, "namespaceSelector": MAP, "podSelector": MAP})
    monitor = obj({"enabled": BOOL, "interval": STR, "scrapeTimeout": STR, "labels": STR_MAP})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "openweight chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "global": MAP,
            "nameOverride": STR,
            "fullnameOverride": STR,
            "commonLabels": STR_MAP,
            "router": router,
            "cluster": cluster,
            "providers": {"type": "object", "additionalProperties": {"$ref": "#/$defs/ProviderConfig"},
                          "propertyNames": {"not": {"const": "cluster"}}},
            "models": {"type": "object", "additionalProperties": {"$ref": "#/$defs/ModelConfig"}},
            "defaultModels": {"type": "object", "additionalProperties": {"$ref": "#/$defs/ModelConfig"}},
            "networkPolicy": obj({"enabled": BOOL, "router": obj({"from": LIST}),
                                  "prometheus": selector_pair, "kuberayOperator": operator}),
            "monitoring": obj({
                "serviceMonitor": monitor,
                "podMonitor": monitor,
                "prometheusRule": obj({"enabled": BOOL, "labels": STR_MAP}),
                "dashboards": obj({"enabled": BOOL, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP}),
            }),
        },
        "$defs": config_defs(),
    }


def rendered() -> str:
    return json.dumps(chart_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {SCHEMA_PATH}")
    args = parser.parse_args(argv)
    if args.write:
        SCHEMA_PATH.write_text(rendered())
    else:
        sys.stdout.write(rendered())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
