"""deploy/: the kustomize base renders, and every object it renders (and secret.example.yaml) is
valid against its schema, strictly, with no kind left unchecked: Kubernetes' own kinds against
kubernetes-validate's schemas of one Kubernetes version, KEDA's against its CRDs' OpenAPI
schemas vendored in tests/schemas/keda/. Then what the schemas cannot say: the numbers that must
agree with sluice's settings and broker (grace periods, time limits, visibility timeout), what
KEDA and the Deployments must agree on, commands in exec form, the secret's keys, Flower's
privacy, the probes, the resources and the spool's NFS mount options.

There is no kustomize binary here: `render` below does what the base uses of kustomize (the
namespace on every namespaced object, the resources in order) and refuses any other field.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from sluice.core.schema import QUEUED_TTL_SECONDS
from sluice.core.settings import Settings
from sluice.ops.health import HEARTBEAT_SECONDS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
KEDA_CRDS = ROOT / "tests" / "schemas" / "keda"

# The Kubernetes version the built-in kinds are validated against (one kubernetes-validate bundles).
K8S_VERSION = "1.30.0"

NAMESPACE = "sluice"
IMAGE = "sluice:latest"
SECRET = "sluice-secrets"
CONFIGMAP = "sluice-settings"
# What the base may use of a Kustomization: `render` implements exactly these.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources"}
# Kinds kustomize leaves without a namespace (those a sluice base could plausibly hold).
CLUSTER_SCOPED = {
    "Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
    "CustomResourceDefinition", "PriorityClass", "ClusterTriggerAuthentication",
}
WORKERS = ("io-worker", "cpu-worker")
SHELLS = {"sh", "bash", "ash", "dash", "zsh", "busybox"}
# The trigger metadata KEDA's scalers read (pkg/scalers/redis_scaler.go and prometheus_scaler.go
# at the vendored tag): a misspelt key would be ignored by KEDA, not refused.
TRIGGER_METADATA = {
    "redis": {"address", "addresses", "host", "hosts", "port", "ports", "username", "password",
              "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS",
              "unsafeSsl", "sentinelUsername", "sentinelPassword", "sentinelMaster"},
    "prometheus": {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                   "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
                   "identityOwner", "authModes"},
}
# The bridge's memory request must hold a batch and a fetch of SLUICE_BATCH_MAX_BYTES for this
# many partitions, plus the interpreter (bridge.yaml's comment).
BRIDGE_PARTITIONS_SIZED_FOR = 8
BRIDGE_BASE_MEMORY = 128 * 2**20


# --- rendering ---------------------------------------------------------------------------------

def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file, each a mapping."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping: {doc!r}"
    return docs


def render(directory: Path) -> list[dict[str, Any]]:
    """What `kustomize build directory` gives for a Kustomization of namespace and resources."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise ValueError(f"kustomization.yaml uses {sorted(unknown)}, which this renderer does not implement")
    if (kustomization.get("apiVersion"), kustomization.get("kind")) != (
            "kustomize.config.k8s.io/v1beta1", "Kustomization"):
        raise ValueError("kustomization.yaml is not a kustomize.config.k8s.io/v1beta1 Kustomization")
    namespace = kustomization.get("namespace")
    rendered = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        if path.parent != directory.resolve() or not path.is_file():
            raise ValueError(f"resource {resource!r} is not a file of {directory}")
        for doc in load_documents(path):
            doc = copy.deepcopy(doc)
            if namespace and doc.get("kind") not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = namespace
            rendered.append(doc)
    return rendered


@functools.cache
def rendered() -> tuple[dict[str, Any], ...]:
    return tuple(render(DEPLOY))


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in rendered() if doc["kind"] == kind}


def the(kind: str, name: str) -> dict[str, Any]:
    found = objects(kind)
    assert name in found, f"no {kind} {name} rendered"
    return found[name]


def secret_example() -> dict[str, Any]:
    (secret,) = load_documents(SECRET_EXAMPLE)
    return secret


def settings_data() -> dict[str, str]:
    return the("ConfigMap", CONFIGMAP)["data"]


def workloads() -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets by name."""
    return {**objects("Deployment"), **objects("StatefulSet")}


def containers() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, container) for every container and init container."""
    return [(name, container) for name, workload in workloads().items()
            for key in ("initContainers", "containers")
            for container in workload["spec"]["template"]["spec"].get(key, [])]


def sluice_containers() -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, c in containers() if c["image"].split(":")[0] == IMAGE.split(":")[0]]


def container(workload: str) -> dict[str, Any]:
    (found,) = workloads()[workload]["spec"]["template"]["spec"]["containers"]
    return found


def doc_id(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- validation --------------------------------------------------------------------------------

class SchemaMissing(Exception):
    """A document whose kind has neither a built-in nor a vendored schema: it cannot be checked."""


def strict(schema: Any) -> Any:
    """An OpenAPI v3 schema in which every object schema with `properties` that neither sets
    `additionalProperties` nor preserves unknown fields refuses fields it does not name, as the
    API server prunes (and `kubectl apply --validate=strict` refuses) them."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [strict(sub) for sub in out[key]]
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of the served versions of each vendored CRD."""
    validators = {}
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        (crd,) = load_documents(path)
        assert crd["kind"] == "CustomResourceDefinition", path
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                schema = strict(version["schema"]["openAPIV3Schema"])
                # OpenAPI 3.0's schema object is JSON Schema draft 4/5 with extensions.
                jsonschema.Draft4Validator.check_schema(schema)
                validators[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = (
                    jsonschema.Draft4Validator(schema))
    return validators


@functools.cache
def object_meta_validator() -> jsonschema.protocols.Validator:
    """Kubernetes' ObjectMeta from kubernetes-validate's strict schemas: a CRD's schema says only
    `metadata: {type: object}`, the API server checks it as ObjectMeta."""
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads((schemas / f"v{K8S_VERSION}-local-strict" / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    ref = f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)


def validate(doc: dict[str, Any]) -> str:
    """Validate one object strictly; returns what it was validated against. Raises
    jsonschema.ValidationError if it is invalid, SchemaMissing if nothing can validate it."""
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise SchemaMissing(f"{doc_id(doc)} has no apiVersion or kind")
    crd = crd_validators().get((api_version, kind))
    if crd is not None:
        crd.validate(doc)
        object_meta_validator().validate(doc.get("metadata"))
        return f"CRD {api_version} {kind}"
    try:
        version = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise SchemaMissing(exc.message) from None
    return f"Kubernetes {version}"


def test_kubernetes_version_is_bundled():
    assert K8S_VERSION.rsplit(".", 1)[0] in {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert set(crd_validators()) == {("keda.sh/v1alpha1", "ScaledObject"),
                                     ("keda.sh/v1alpha1", "TriggerAuthentication")}


@pytest.mark.parametrize("doc", [*rendered(), secret_example()], ids=doc_id)
def test_every_document_is_valid(doc):
    validate(doc)


def test_validation_refuses_an_unknown_field():
    bridge = copy.deepcopy(the("Deployment", "bridge"))
    bridge["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="livenessprobe"):
        validate(bridge)
    bridge = copy.deepcopy(the("Deployment", "bridge"))
    bridge["spec"]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate(bridge)


def test_validation_refuses_a_wrong_type():
    bridge = copy.deepcopy(the("Deployment", "bridge"))
    bridge["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9464"
    with pytest.raises(jsonschema.ValidationError):
        validate(bridge)


@pytest.mark.parametrize("where", ["spec", "trigger", "advanced", "metadata"])
def test_validation_refuses_an_unknown_field_in_a_keda_object(where):
    scaled = copy.deepcopy(the("ScaledObject", "cpu-worker"))
    target = {"spec": scaled["spec"], "trigger": scaled["spec"]["triggers"][0],
              "advanced": scaled["spec"]["advanced"]["scalingModifiers"], "metadata": scaled["metadata"]}[where]
    target["bogusField"] = "1"
    with pytest.raises(jsonschema.ValidationError, match="bogusField"):
        validate(scaled)


def test_validation_refuses_unquoted_trigger_metadata():
    scaled = copy.deepcopy(the("ScaledObject", "cpu-worker"))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    auth = copy.deepcopy(the("TriggerAuthentication", "sluice-redis"))
    auth["spec"]["secretTargetRef"][0]["keyName"] = "redis-password"
    with pytest.raises(jsonschema.ValidationError, match="keyName"):
        validate(auth)


@pytest.mark.parametrize("doc", [
    {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
    {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob", "metadata": {"name": "j"}, "spec": {}},
    {"apiVersion": "apps/v1beta1", "kind": "Deployment", "metadata": {"name": "d"}},
    {"kind": "ConfigMap", "metadata": {"name": "c"}},
], ids=["unknown-kind", "unvendored-crd", "removed-api-version", "no-api-version"])
def test_validation_fails_a_kind_it_has_no_schema_for(doc):
    with pytest.raises(SchemaMissing):
        validate(doc)


# --- the kustomization -------------------------------------------------------------------------

def test_render_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [], "patches": [{"path": "p.yaml"}]}))
    with pytest.raises(ValueError, match="patches"):
        render(tmp_path)


def test_the_base_renders_namespaced_unique_objects_and_no_secret():
    docs = rendered()
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "StatefulSet", "Service", "Deployment",
            "PodDisruptionBudget", "NetworkPolicy", "TriggerAuthentication", "ScaledObject"} <= kinds
    assert "Secret" not in kinds, "secrets are created by hand, never applied from the repository"
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert SECRET_EXAMPLE.name not in listed
    assert sorted(listed + [SECRET_EXAMPLE.name, "kustomization.yaml"]) == sorted(
        p.name for p in DEPLOY.iterdir() if p.suffix == ".yaml"), "a manifest in deploy/ is not listed"
    ids = [(doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(ids) == len(set(ids)), "an object is defined twice"
    assert the("Namespace", NAMESPACE)
    for doc in docs:
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], doc_id(doc)
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc_id(doc)
    assert secret_example()["metadata"]["namespace"] == NAMESPACE


def test_every_object_is_labelled_and_selects_its_own_pods():
    for doc in [*rendered(), secret_example()]:
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "sluice", doc_id(doc)
    pod_labels = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in workloads().items()}
    for name, workload in workloads().items():
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector == {"app.kubernetes.io/name": "sluice", "app.kubernetes.io/component": name}, name
        assert workload["metadata"]["labels"] == pod_labels[name] == selector, name

    def selected(selector: dict[str, str]) -> list[str]:
        return [name for name, labels in pod_labels.items() if selector.items() <= labels.items()]

    for kind, path in (("Service", ("spec", "selector")), ("PodDisruptionBudget", ("spec", "selector", "matchLabels")),
                       ("NetworkPolicy", ("spec", "podSelector", "matchLabels"))):
        for name, doc in objects(kind).items():
            selector = functools.reduce(lambda d, k: d[k], path, doc)
            assert selector and len(selected(selector)) == 1, f"{kind}/{name} selects {selected(selector)}"
    assert selected(the("Service", "bridge-metrics")["spec"]["selector"]) == ["bridge"]
    assert selected(the("Service", "redis")["spec"]["selector"]) == ["redis"]


# --- settings, grace periods, the broker -------------------------------------------------------

def test_the_settings_are_sluice_settings_and_parse(monkeypatch):
    data = settings_data()
    assert all(isinstance(value, str) for value in data.values())
    known = {f"SLUICE_{field.upper()}" for field in Settings.__struct_fields__}
    assert set(data) <= known, f"not sluice settings: {sorted(set(data) - known)}"
    secret_env = {"SLUICE_REDIS_URL", "SLUICE_OSS_ACCESS_KEY_ID", "SLUICE_OSS_ACCESS_KEY_SECRET"}
    assert not set(data) & secret_env, "secrets belong in the Secret, not the ConfigMap"
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    for name in secret_env:
        monkeypatch.setenv(name, "redis://:x@redis:6379/0" if name == "SLUICE_REDIS_URL" else "x")
    settings = Settings.load()
    assert str(settings.spool_dir) == data["SLUICE_SPOOL_DIR"]
    assert settings.metrics_port == int(data["SLUICE_METRICS_PORT"])
    assert str(settings.health_dir) == data["SLUICE_HEALTH_DIR"]


def test_workers_outlast_their_tasks_and_the_broker_outlasts_both():
    time_limit = float(settings_data()["SLUICE_COMPRESS_TIME_LIMIT"])
    assert float(settings_data()["SLUICE_LOCK_LEASE_SECONDS"]) > time_limit
    for name in WORKERS:
        grace = workloads()[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > time_limit, f"{name}: a SIGTERMed worker must be able to finish its task"
        assert QUEUED_TTL_SECONDS > grace, f"{name}: a task would be redelivered while its worker still stops"
    assert QUEUED_TTL_SECONDS > time_limit
    # ... because QUEUED_TTL_SECONDS is the broker's visibility timeout.
    from tasks.app import app

    assert app.conf.broker_transport_options["visibility_timeout"] == QUEUED_TTL_SECONDS


def test_beat_runs_alone():
    beat = the("Deployment", "beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    assert "beat" in container("beat")["command"]


def test_bridge_and_flower_replicas():
    assert the("Deployment", "bridge")["spec"]["replicas"] == 1
    assert the("Deployment", "flower")["spec"]["replicas"] == 1
    assert the("StatefulSet", "redis")["spec"]["replicas"] == 1


# --- containers --------------------------------------------------------------------------------

def test_commands_are_exec_form_without_a_shell():
    assert {name for name, _ in sluice_containers()} == {"bridge", "io-worker", "cpu-worker", "beat", "flower"}
    for name, c in sluice_containers():
        command = c.get("command")
        assert isinstance(command, list) and all(isinstance(arg, str) for arg in command), name
        assert command[0] in ("celery", "python"), f"{name}: {command[0]} would not be PID 1's program"
        assert "args" not in c, name
    for name, c in containers():
        argv = [*c.get("command", []), *c.get("args", [])]
        assert argv and Path(argv[0]).name not in SHELLS, f"{name} runs a shell: SIGTERM would not reach it"


def test_worker_commands():
    expected = {
        "io-worker": ["celery", "-A", "tasks", "worker", "-Q", "io", "-P", "threads", "-c", "16", "-n", "io@%h",
                      "--without-mingle", "--without-gossip"],
        "cpu-worker": ["celery", "-A", "tasks", "worker", "-Q", "cpu", "-P", "prefork", "-c", "2", "-n", "cpu@%h",
                       "--without-mingle", "--without-gossip"],
        "bridge": ["python", "-m", "bridge"],
        "beat": ["celery", "-A", "tasks", "beat", "-s", "/tmp/celerybeat-schedule"],
        "flower": ["celery", "-A", "tasks", "flower", "--port=5555"],
    }
    for name, command in expected.items():
        assert container(name)["command"] == command, name


def test_sluice_containers_get_the_settings_and_the_secrets():
    for name, c in sluice_containers():
        assert c["image"] == IMAGE
        assert c["envFrom"] == [{"configMapRef": {"name": CONFIGMAP}}], name
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
        expected = {"SLUICE_REDIS_URL": "redis-url", "SLUICE_OSS_ACCESS_KEY_ID": "oss-access-key-id",
                    "SLUICE_OSS_ACCESS_KEY_SECRET": "oss-access-key-secret"}
        if name == "flower":
            expected["FLOWER_BASIC_AUTH"] = "flower-basic-auth"
        assert {k: v["key"] for k, v in env.items()} == expected, name
        assert {v["name"] for v in env.values()} == {SECRET}, name


def secret_key_refs() -> list[tuple[str, str, str]]:
    """(where, secret name, key) of every secretKeyRef, secret volume and KEDA secretTargetRef."""
    refs = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                refs.append((where, ref["name"], ref["key"]))
            for value in node.values():
                walk(value, where)
            if "secret" in node and isinstance(node["secret"], dict):  # a secret volume
                for item in node["secret"].get("items", []):
                    refs.append((where, node["secret"]["secretName"], item["key"]))
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for doc in rendered():
        walk(doc, doc_id(doc))
        for ref in doc.get("spec", {}).get("secretTargetRef", []) if doc["kind"] == "TriggerAuthentication" else []:
            refs.append((doc_id(doc), ref["name"], ref["key"]))
        for c in (doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])):
            for source in c.get("envFrom", []):
                assert "secretRef" not in source, f"{doc_id(doc)}: name the secret's keys, not the whole secret"
    return refs


def test_every_secret_reference_is_in_the_example_secret():
    secret = secret_example()
    assert secret["metadata"]["name"] == SECRET
    keys = set(secret["stringData"])
    refs = secret_key_refs()
    assert {key for _, _, key in refs} == keys, "the example lists a key nothing reads, or misses one"
    for where, name, key in refs:
        assert name == SECRET, where
        assert key in keys, f"{where} reads {key!r}, which secret.example.yaml does not have"


def test_the_example_secret_holds_only_placeholders():
    values = secret_example()["stringData"]
    assert "data" not in secret_example()
    assert all("CHANGE-ME" in value for value in values.values()), values
    url = urlsplit(values["redis-url"])
    assert url.scheme == "redis" and url.password == values["redis-password"]
    redis = the("Service", "redis")
    assert (url.hostname, url.port) == (redis["metadata"]["name"], redis["spec"]["ports"][0]["port"])
    assert values["flower-basic-auth"].count(":") == 1


def test_health_files_and_probes():
    health_dir = settings_data()["SLUICE_HEALTH_DIR"]
    assert health_dir == "/run/sluice"
    stale_after = 60
    liveness = ["sh", "-c", f"test $(( $(date +%s) - $(stat -c %Y {health_dir}/alive) )) -lt {stale_after}"]
    assert stale_after >= 3 * HEARTBEAT_SECONDS, "a live process must not miss the probe by one late touch"
    for name in ("bridge", "io-worker", "cpu-worker"):
        spec = workloads()[name]["spec"]["template"]["spec"]
        c = container(name)
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == health_dir]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert "emptyDir" in volume, name
        assert c["livenessProbe"] == {"exec": {"command": liveness}, "periodSeconds": 15, "failureThreshold": 4,
                                      "initialDelaySeconds": 30}, name
        assert c["readinessProbe"] == {"exec": {"command": ["test", "-f", f"{health_dir}/ready"]},
                                       "periodSeconds": 5}, name
        assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] >= stale_after


def nfs_mount_problems(mount_options: list[str]) -> list[str]:
    """What is wrong for the spool with NFS mount options (an entry may hold several, comma-
    separated): sluice fences slot files with flock, which must reach the server (no nolock or
    local_lock), on a hard NFSv4 mount (docs/operating.md, "Several hosts")."""
    options = [option.strip() for entry in mount_options for option in entry.split(",") if option.strip()]
    names = {option.split("=", 1)[0] for option in options}
    versions = [option.split("=", 1)[1] for option in options
                if option.split("=", 1)[0] in ("vers", "nfsvers") and "=" in option]
    problems = [f"{name}: flock would lock on one node only" for name in sorted(names & {"nolock", "local_lock"})]
    if "soft" in names:
        problems.append("soft: a timed-out write fails as an I/O error")
    if "hard" not in names:
        problems.append("no hard")
    if not versions or not all(version.split(".")[0] == "4" for version in versions):
        problems.append(f"not NFSv4: vers={versions}")
    return problems


def test_nfs_mount_problems():
    assert nfs_mount_problems(["vers=4,minorversion=0,hard,noresvport"]) == []
    assert nfs_mount_problems(["hard", "nfsvers=4.1"]) == []
    assert nfs_mount_problems(["nolock,tcp,noresvport", "vers=3"]) == [
        "nolock: flock would lock on one node only", "no hard", "not NFSv4: vers=['3']"]
    assert nfs_mount_problems(["vers=4", "local_lock=all", "soft"]) == [
        "local_lock: flock would lock on one node only", "soft: a timed-out write fails as an I/O error", "no hard"]


def test_the_spool_is_shared_nas():
    spool = the("PersistentVolumeClaim", "sluice-spool")
    assert spool["spec"]["accessModes"] == ["ReadWriteMany"]
    storage_class = the("StorageClass", spool["spec"]["storageClassName"])
    assert storage_class["provisioner"] == "nasplugin.csi.alibabacloud.com"
    assert storage_class["reclaimPolicy"] == "Retain", "a deleted claim must not take unarchived slot files"
    assert not nfs_mount_problems(storage_class["mountOptions"]), nfs_mount_problems(storage_class["mountOptions"])
    spool_dir = settings_data()["SLUICE_SPOOL_DIR"]
    for name in ("bridge", "io-worker", "cpu-worker", "beat"):
        spec = workloads()[name]["spec"]["template"]["spec"]
        (mount,) = [m for m in container(name)["volumeMounts"] if m["mountPath"] == spool_dir]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"] == {"claimName": "sluice-spool"}, name


def test_bridge_metrics_port():
    port = int(settings_data()["SLUICE_METRICS_PORT"])
    assert container("bridge")["ports"] == [{"name": "metrics", "containerPort": port}]
    service = the("Service", "bridge-metrics")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["port"] == port
    policy = the("NetworkPolicy", "bridge-metrics")
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity in cores or bytes."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in {"", *units}, value
    return float(match.group(1)) * units.get(match.group(2), 1)


def test_every_container_has_requests_within_limits():
    for name, c in containers():
        resources = c["resources"]
        for resource in ("cpu", "memory"):
            request = quantity(resources["requests"][resource])
            assert 0 < request <= quantity(resources["limits"][resource]), f"{name} {resource}"
    batch = int(settings_data()["SLUICE_BATCH_MAX_BYTES"])
    bridge_memory = quantity(container("bridge")["resources"]["requests"]["memory"])
    assert bridge_memory >= BRIDGE_PARTITIONS_SIZED_FOR * 2 * batch + BRIDGE_BASE_MEMORY


# --- Flower ------------------------------------------------------------------------------------

def test_flower_is_private():
    service = the("Service", "flower")
    assert service["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p.get("nodePort")) for p in service["spec"]["ports"]] == [(5555, None)]
    flower_pods = the("Deployment", "flower")["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in objects("NetworkPolicy").values()
                if p["spec"]["podSelector"]["matchLabels"].items() <= flower_pods.items()]
    assert len(policies) == 1
    (policy,) = policies
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"sluice.io/flower-client": "true"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5555}]
    assert not objects("Ingress"), "Flower is reached by port-forward or from labelled pods only"


# --- KEDA --------------------------------------------------------------------------------------

def test_scaled_objects_scale_the_workers():
    scaled = objects("ScaledObject")
    assert set(scaled) == set(WORKERS)
    for name, so in scaled.items():
        spec = so["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        assert "replicas" not in the("Deployment", name)["spec"], f"{name}: KEDA owns its replica count"
    assert {name: so["spec"]["maxReplicaCount"] for name, so in scaled.items()} == {"io-worker": 10, "cpu-worker": 8}


def test_scaled_objects_read_the_workers_queue():
    redis = the("Service", "redis")
    address = f"{redis['metadata']['name']}.{NAMESPACE}.svc:{redis['spec']['ports'][0]['port']}"
    auths = objects("TriggerAuthentication")
    for name, so in objects("ScaledObject").items():
        command = container(name)["command"]
        queue = command[command.index("-Q") + 1]
        triggers = {t["name"]: t for t in so["spec"]["triggers"]}
        assert set(triggers) == {"waiting", "unacked"}, name
        waiting, unacked = triggers["waiting"], triggers["unacked"]
        assert waiting["type"] == "redis" and unacked["type"] == "prometheus"
        assert waiting["metadata"]["listName"] == queue
        assert waiting["metadata"]["address"] == address
        assert waiting["authenticationRef"]["name"] in auths
        assert f'sluice_queue_unacked_tasks{{queue="{queue}"}}' in unacked["metadata"]["query"]
        target = so["spec"]["advanced"]["scalingModifiers"]["target"]
        assert waiting["metadata"]["listLength"] == unacked["metadata"]["threshold"] == target, name


def test_trigger_metadata_are_known_strings():
    for name, so in objects("ScaledObject").items():
        for trigger in so["spec"]["triggers"]:
            metadata = trigger["metadata"]
            assert all(isinstance(v, str) for v in metadata.values()), f"{name}/{trigger['name']}: {metadata}"
            unknown = set(metadata) - TRIGGER_METADATA[trigger["type"]]
            assert not unknown, f"{name}/{trigger['name']}: KEDA would ignore {sorted(unknown)}"
        modifiers = so["spec"]["advanced"]["scalingModifiers"]
        assert all(isinstance(v, str) for v in modifiers.values()), modifiers


def test_formula_references_only_trigger_names():
    for name, so in objects("ScaledObject").items():
        formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
        names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", formula))
        triggers = {t.get("name") for t in so["spec"]["triggers"]}
        assert names and names <= triggers, f"{name}: {formula!r} names {sorted(names - triggers)}"
        assert names == triggers, f"{name}: a trigger the formula leaves out still counts for nothing"


def test_keda_authenticates_to_the_redis_password():
    (auth,) = objects("TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": SECRET, "key": "redis-password"}]


def test_worker_disruption_budgets():
    budgets = objects("PodDisruptionBudget")
    assert set(budgets) == set(WORKERS)
    for budget in budgets.values():
        assert budget["spec"]["maxUnavailable"] == 1
