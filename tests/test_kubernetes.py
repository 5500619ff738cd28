"""Kubernetes (issue 16): deploy/kubernetes validates offline and says what the worker needs.

Core resources are validated strictly (unknown fields are errors) by kubernetes-validate against
the Kubernetes API schemas it bundles, for an older and the newest supported release. KEDA's
ScaledObject and TriggerAuthentication are validated against tests/keda_schema.py, written from
KEDA's CRDs. Then what no schema knows: the probes parse with the probe's own command line, every
variable is a setting and the secret ones come from the Secret, the volumes sit where the image
expects them, and KEDA's triggers name every priority list of the render queue, checked against a
real Redis holding requests sent at every priority.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from celery import Celery

from tasks.worker.healthcheck import build_parser
from tests.keda_schema import REDIS_METADATA, SCALED_OBJECT, TRIGGER_AUTHENTICATION
from tests.support import ROOT
from tests.test_deploy import HAND_BACK_GRACE_S, LIBRARY_VARIABLES, dockerfile_instructions
from worker_config.celery_config import app_config, priority_lists
from worker_config.routing import worker_queues
from worker_config.settings import BrokerSettings, Settings

K8S = ROOT / "deploy" / "kubernetes"
VERSIONS = ("1.31.0", kubernetes_validate.latest_version())
KEDA = {"ScaledObject": SCALED_OBJECT, "TriggerAuthentication": TRIGGER_AUTHENTICATION}
SECRET_KEYS = {"REDIS_URL", "REDIS_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "FLOWER_BASIC_AUTH"}


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resources() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [doc for doc in resources() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def container(deployment: str) -> dict[str, Any]:
    return one("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def test_the_kustomization_lists_every_manifest():
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = sorted(doc["kind"] for doc in resources())
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Namespace", "PersistentVolumeClaim",
                     "PersistentVolumeClaim", "ScaledObject", "Service", "TriggerAuthentication"]  # fmt: skip


@pytest.mark.parametrize("version", VERSIONS)
def test_core_resources_validate_strictly(version: str):
    for doc in resources():
        if doc["kind"] not in KEDA:
            kubernetes_validate.validate(doc, version, strict=True)
    # The validator fails on what the API server would drop in silence.
    broken = copy.deepcopy(one("Deployment", "renderfarm-worker"))
    broken["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="startupprobe"):
        kubernetes_validate.validate(broken, version, strict=True)


def test_keda_resources_match_kedas_schema():
    for doc in resources():
        if doc["kind"] in KEDA:
            jsonschema.validate(doc, KEDA[doc["kind"]])
    scaled = one("ScaledObject", "renderfarm-worker")
    spec = scaled["spec"]  # KEDA's CEL rule on the spec (maxReplicaCount defaults to 100)
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    for trigger in scaled["spec"]["triggers"]:
        assert set(trigger["metadata"]) <= REDIS_METADATA[trigger["type"]], trigger
    # What the schema catches: a misspelt field, a number where KEDA wants a string, an unknown enum value.
    for path, value in ((("spec", "minReplicas"), 0), (("spec", "triggers", 0, "metadata", "databaseIndex"), 0),
                        (("spec", "advanced", "scalingModifiers", "metricType"), "Sum")):  # fmt: skip
        broken = copy.deepcopy(scaled)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SCALED_OBJECT)


def test_the_worker_pod_has_what_a_gpu_worker_needs():
    deployment = one("Deployment", "renderfarm-worker")
    pod = deployment["spec"]["template"]["spec"]
    worker = container("renderfarm-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in worker.get("env", [])}  # the device plugin's job
    assert worker["args"] == ["--without-gossip", "--without-mingle"]  # for a fleet (docs/scaling.md)

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"] == "8Gi"  # FastVideo's mp executor; k8s gives 64 MB
    image_env = dict(part.split("=", 1) for kind, args in dockerfile_instructions() if kind == "ENV"
                     for part in args.split())  # fmt: skip
    for variable in ("MODEL_CACHE_DIR", "HF_HOME", "SPOOL_DIR"):  # where the image looks, each on a volume
        assert image_env[variable] in mounts, variable
    cache = volumes[mounts[image_env["MODEL_CACHE_DIR"]]["name"]]
    assert (
        cache["persistentVolumeClaim"]["claimName"]
        == one("PersistentVolumeClaim", "renderfarm-models")["metadata"]["name"]
    )
    assert "emptyDir" in volumes[mounts[image_env["SPOOL_DIR"]]["name"]]  # per pod

    # Probes: the probe's own command line accepts each; startup and liveness need no Redis.
    probes = {kind: worker[kind]["exec"]["command"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, command in probes.items():
        assert command[:3] == ["python", "-m", "tasks.worker.healthcheck"], kind
        build_parser().parse_args(command[3:])
    assert [build_parser().parse_args(c[3:]).probe for c in probes.values()] == ["startup", "live", "ready"]
    startup_window = worker["startupProbe"]["periodSeconds"] * worker["startupProbe"]["failureThreshold"]
    assert startup_window >= 30 * 60
    # A Ray executor that cannot start says so (and falls back or exits) well inside that window.
    assert 4 * Settings.model_fields["FASTVIDEO_RAY_START_TIMEOUT_S"].default <= startup_window

    # Evicted, drained or scaled away mid-render, a pod gives its render back at the next step with a
    # checkpoint (docs/deploy.md#stopping-a-worker): the grace period covers a step, the save and the exit.
    assert pod["terminationGracePeriodSeconds"] >= HAND_BACK_GRACE_S
    user = next(args for kind, args in dockerfile_instructions() if kind == "USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0]) and pod["securityContext"]["runAsNonRoot"]


def test_settings_are_settings_and_secrets_come_from_the_secret():
    config = one("ConfigMap", "renderfarm-settings")["data"]
    assert not SECRET_KEYS & set(config)
    Settings(**config, REDIS_URL="redis://:x@redis:6379/0")  # every value is one the worker accepts
    for deployment in ("renderfarm-worker", "renderfarm-flower"):
        spec = container(deployment)
        for env in spec.get("env", []):
            assert env["name"] in set(Settings.model_fields) | LIBRARY_VARIABLES | {"FLOWER_BASIC_AUTH"}, env
            if env["name"] in SECRET_KEYS:
                assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "renderfarm", env
        for source in spec.get("envFrom", []):
            assert set(source) == {"configMapRef"} and source["configMapRef"]["name"] == "renderfarm-settings"
    worker = container("renderfarm-worker")
    assert [p["containerPort"] for p in worker["ports"] if p["name"] == "metrics"] == [int(config["METRICS_PORT"])]


def test_flower_runs_the_projects_flower_behind_its_password():
    flower = container("renderfarm-flower")
    assert flower["command"][-2:] == ["renderfarm", "flower"]
    assert {e["name"] for e in flower["env"]} == {"REDIS_URL", "FLOWER_BASIC_AUTH"}
    for probe in ("readinessProbe", "livenessProbe"):  # the path Flower leaves open without the password
        assert flower[probe]["httpGet"]["path"] == "/healthcheck"
    service = one("Service", "renderfarm-flower")
    assert service["spec"]["selector"] == one("Deployment", "renderfarm-flower")["spec"]["selector"]["matchLabels"]


def test_keda_reads_every_priority_list_of_the_workers_queues(redis_server):
    """Scale from zero: with no worker, KEDA's triggers must count every request the workers would take:
    on each queue they consume (``render`` and their model's), at any priority, from producers that
    route by the farm's DEFAULT_MODEL and from ones that do not know it and name the model."""
    scaled = one("ScaledObject", "renderfarm-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "renderfarm-worker" and scaled["minReplicaCount"] == 0
    triggers = scaled["triggers"]
    assert scaled["advanced"]["scalingModifiers"]["formula"] == " + ".join(t["name"] for t in triggers)
    config = one("ConfigMap", "renderfarm-settings")["data"]
    queues = worker_queues(config["MODEL_ID"], config.get("DEFAULT_MODEL"))
    expected = [name for q in queues for name in priority_lists(q)]
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(expected)
    auth = one("TriggerAuthentication", triggers[0]["authenticationRef"]["name"])["spec"]["secretTargetRef"]
    assert {(a["parameter"], a["name"], a["key"]) for a in auth} == {("password", "renderfarm", "REDIS_PASSWORD")}
    assert all(int(t["metadata"]["databaseIndex"]) == 0 for t in triggers)

    redis_server.client.flushall()
    routed, unaware = Celery("routed"), Celery("unaware")
    routed.conf.update(
        app_config(BrokerSettings(REDIS_URL=redis_server.url, DEFAULT_MODEL=config.get("DEFAULT_MODEL")))
    )
    unaware.conf.update(app_config(BrokerSettings(REDIS_URL=redis_server.url)))
    sent = 0
    try:
        for priority in (0, 3, 5, 6, 9):  # 5 lands on the 3 list
            for app in (routed, unaware):
                app.send_task(
                    "tasks.render", kwargs={"prompt": "queued", "model": config["MODEL_ID"]}, priority=priority
                )
                sent += 1
            routed.send_task("tasks.render", kwargs={"prompt": "no model"}, priority=priority)
            sent += 1
    finally:
        routed.close()
        unaware.close()
    depth = {t["name"]: int(redis_server.client.llen(t["metadata"]["listName"])) for t in triggers}
    assert sum(depth.values()) == sent and all(depth.values()), depth


def test_deploy_docs_point_at_the_manifests():
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "deploy/kubernetes" in text and "kubectl apply -k deploy/kubernetes" in text
    assert Path(K8S / "kustomization.yaml").exists()
