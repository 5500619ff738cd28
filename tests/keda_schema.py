"""JSON Schemas for KEDA's ScaledObject and TriggerAuthentication (``keda.sh/v1alpha1``).

Written for this project from the field list of KEDA's own CRDs (config/crd/bases in
kedacore/keda, v2.20: names, types, required fields, minimums, enums), because CI has no offline
copy of KEDA's CRDs. One difference on purpose: unknown fields are errors here. The API server
prunes a field its structural schema does not know, silently, so a misspelt ``minReplicaCount``
would apply without complaint and mean nothing; this schema fails on it.

The ``redis`` and ``redis-sentinel`` scalers' metadata keys are from KEDA's scaler documentation.
"""

from __future__ import annotations

from typing import Any

__all__ = ["REDIS_METADATA", "SCALED_OBJECT", "TRIGGER_AUTHENTICATION"]


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_STR = {"type": "string"}


def _at_least(n: int) -> dict[str, Any]:
    return {**_INT32, "minimum": n}


_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                                                                     r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+"
                                                                     r"(\.[0-9]*)?)|(\.[0-9]+))))?$"}]}  # fmt: skip
_RULES = _obj({
    "policies": {"type": "array", "items": _obj({"type": _STR, "value": _INT32, "periodSeconds": _INT32},
                                                 ("periodSeconds", "type", "value"))},
    "selectPolicy": _STR,
    "stabilizationWindowSeconds": _INT32,
    "tolerance": _QUANTITY,
})  # fmt: skip
_METADATA = {"type": "object", "additionalProperties": _STR}

SCALED_OBJECT_SPEC = _obj({
    "scaleTargetRef": _obj({"name": {"type": "string", "minLength": 1}, "kind": _STR, "apiVersion": _STR,
                            "envSourceContainerName": _STR}, ("name",)),
    "pollingInterval": _at_least(1),
    "cooldownPeriod": _at_least(0),
    "initialCooldownPeriod": _at_least(0),
    "idleReplicaCount": _at_least(0),
    "minReplicaCount": _at_least(0),
    "maxReplicaCount": _at_least(1),
    "fallback": _obj({"failureThreshold": _at_least(0), "replicas": _at_least(0),
                      "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                            "currentReplicasIfLower", "scalingModifiers"]}},
                     ("failureThreshold", "replicas")),
    "advanced": _obj({
        "restoreToOriginalReplicaCount": {"type": "boolean"},
        "horizontalPodAutoscalerConfig": _obj({"name": _STR,
                                               "behavior": _obj({"scaleUp": _RULES, "scaleDown": _RULES})}),
        "scalingModifiers": _obj({"formula": _STR, "target": _STR, "activationTarget": _STR,
                                  "metricType": {"enum": ["AverageValue", "Value"]}}),
    }),
    "triggers": {"type": "array", "minItems": 1, "items": _obj({
        "type": {"type": "string", "minLength": 1},
        "name": _STR,
        "metadata": _METADATA,
        "authenticationRef": _obj({"name": _STR, "kind": {"enum": ["TriggerAuthentication",
                                                                   "ClusterTriggerAuthentication"]}}, ("name",)),
        "metricType": _STR,
        "useCachedMetrics": {"type": "boolean"},
    }, ("metadata", "type"))},
}, ("scaleTargetRef", "triggers"))  # fmt: skip

_METADATA_OBJECT = {"type": "object", "properties": {"name": {"type": "string", "minLength": 1},
                                                     "namespace": _STR, "labels": _METADATA,
                                                     "annotations": _METADATA}, "required": ["name"]}  # fmt: skip


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj({"apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": kind}, "metadata": _METADATA_OBJECT,
                 "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))  # fmt: skip


SCALED_OBJECT = _resource("ScaledObject", SCALED_OBJECT_SPEC)

_PROVIDER = {"enum": ["azure-workload", "gcp", "aws", "aws-eks", "none"]}
TRIGGER_AUTHENTICATION = _resource("TriggerAuthentication", _obj({
    "secretTargetRef": {"type": "array", "items": _obj({"parameter": _STR, "name": _STR, "key": _STR},
                                                       ("key", "name", "parameter"))},
    "configMapTargetRef": {"type": "array", "items": _obj({"parameter": _STR, "name": _STR, "key": _STR},
                                                          ("key", "name", "parameter"))},
    "env": {"type": "array", "items": _obj({"parameter": _STR, "name": _STR, "containerName": _STR},
                                           ("name", "parameter"))},
    "podIdentity": {"type": "object", "properties": {"provider": _PROVIDER}, "required": ["provider"]},
    # KEDA's other sources (vaults, secret managers, OAuth2, files): objects this project does not use.
    "hashiCorpVault": {"type": "object"}, "azureKeyVault": {"type": "object"}, "awsSecretManager": {"type": "object"},
    "gcpSecretManager": {"type": "object"}, "boundServiceAccountToken": {"type": "array"},
    "oauth2": {"type": "object"}, "filePath": _STR,
}))  # fmt: skip

# The metadata keys KEDA's redis scalers read (keda.sh/docs: Redis Lists, Redis Lists with Sentinel).
REDIS_METADATA = {
    "redis": {"address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv", "usernameFromEnv",
              "passwordFromEnv", "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS",
              "unsafeSsl"},
    "redis-sentinel": {"addresses", "hosts", "ports", "addressesFromEnv", "hostsFromEnv", "portsFromEnv",
                       "sentinelMaster", "sentinelMasterFromEnv", "usernameFromEnv", "passwordFromEnv",
                       "sentinelUsernameFromEnv", "sentinelPasswordFromEnv", "listName", "listLength",
                       "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl"},
}  # fmt: skip
