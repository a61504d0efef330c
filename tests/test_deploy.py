"""The Kubernetes manifests in deploy/kubernetes, validated offline.

Three layers, none of which touches the network:

- every built-in object against the Kubernetes OpenAPI schema of pinned versions, strict
  (unknown fields rejected), with kubernetes-validate's bundled schemas;
- the KEDA ScaledObjects, a CRD kubernetes-validate does not know, against
  tests/schemas/keda-scaledobject.json, a hand-written subset of KEDA's CRD schema;
- the references between objects that no schema sees, where a user would trip: a
  ScaledObject aimed at a Deployment that does not exist, a PDB or Service selecting
  nothing, a probe on a port the container does not open, a Secret nobody creates.

Each cross-reference check returns its problems as strings, so the bad-path tests break
a copy of the real manifests and assert the check names the problem.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

Doc = dict[str, Any]

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
SCALEDOBJECT_SCHEMA = Path(__file__).resolve().parent / "schemas" / "keda-scaledobject.json"

# The oldest Kubernetes the manifests support (PDB unhealthyPodEvictionPolicy is GA from
# 1.31) and the newest whose schema the pinned kubernetes-validate 1.37.0 bundles.
K8S_VERSIONS = ("1.31.0", "1.37.0")
NAMESPACE = "corral"
# Referenced by the manifests, created by the user (deploy/kubernetes/README.md says how).
USER_CREATED_SECRETS = frozenset({"corral-config"})
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
CLUSTER_SCOPED_KINDS = {"Namespace"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")

# Trigger metadata keys of the KEDA scalers used here, from KEDA's scaler sources
# (pkg/scalers/temporal_scaler.go, prometheus_scaler.go: the `keda:"name=..."` tags; a
# resolvedEnv key also has a ...FromEnv form) and their documentation pages. KEDA ignores
# an unknown key, so a misspelled one would silently leave the default in force.
SCALER_KEYS: dict[str, dict[str, frozenset[str]]] = {
    "temporal": {
        "known": frozenset({
            "endpoint", "endpointFromEnv", "namespace", "namespaceFromEnv", "taskQueue",
            "taskQueueFromEnv", "targetQueueSize", "activationTargetQueueSize", "queueTypes",
            "buildId", "buildIdFromEnv", "workerDeploymentName", "workerDeploymentBuildId",
            "selectAllActive", "selectUnversioned", "apiKeyFromEnv", "minConnectTimeout",
            "unsafeSsl", "tlsServerName",
        }),
        "required": frozenset({"taskQueue"}),
        "one_of": frozenset({"endpoint", "endpointFromEnv"}),
        "integers": frozenset({"targetQueueSize", "activationTargetQueueSize",
                               "minConnectTimeout"}),
        "numbers": frozenset(),
        "booleans": frozenset({"selectAllActive", "selectUnversioned", "unsafeSsl"}),
    },
    "prometheus": {
        "known": frozenset({
            "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
            "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion",
            "timeout", "identityOwner", "authModes",
        }),
        "required": frozenset({"serverAddress", "query", "threshold"}),
        "one_of": frozenset(),
        "integers": frozenset(),
        "numbers": frozenset({"threshold", "activationThreshold"}),
        "booleans": frozenset({"ignoreNullValues", "unsafeSsl"}),
    },
}


# ---------------------------------------------------------------- loading


def kustomization() -> Doc:
    loaded: Doc = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return loaded


def load_manifests() -> list[Doc]:
    """Every object of every file the kustomization lists, in order."""
    docs: list[Doc] = []
    for name in kustomization()["resources"]:
        text = (MANIFESTS / name).read_text()
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc is not None)
    return docs


@pytest.fixture(scope="module")
def manifests() -> list[Doc]:
    return load_manifests()


@pytest.fixture
def broken() -> list[Doc]:
    """A private copy of the real manifests, for a test to break."""
    return copy.deepcopy(load_manifests())


def scaledobject_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCALEDOBJECT_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def ident(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def pod_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"].get("metadata", {}).get("labels", {})
    return labels


def workloads(docs: list[Doc]) -> Iterator[Doc]:
    yield from (d for d in docs if d.get("kind") in POD_TEMPLATE_KINDS)


def containers(spec: Doc) -> Iterator[Doc]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector over one label set. A null selector selects nothing."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def flag_value(command: list[str], flag: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def container_ports(container: Doc) -> tuple[set[int], set[str]]:
    ports = container.get("ports", [])
    return {p["containerPort"] for p in ports}, {p["name"] for p in ports if "name" in p}


# ---------------------------------------------------------------- cross-reference checks


def check_namespaces(docs: list[Doc]) -> list[str]:
    problems = []
    if not any(d["kind"] == "Namespace" and d["metadata"]["name"] == NAMESPACE for d in docs):
        problems.append(f"no Namespace {NAMESPACE}")
    for doc in docs:
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            continue
        if doc["metadata"].get("namespace") != NAMESPACE:
            problems.append(f"{ident(doc)} is not in namespace {NAMESPACE}")
    return problems


def check_unique_names(docs: list[Doc]) -> list[str]:
    seen: set[tuple[str, str]] = set()
    problems = []
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in seen:
            problems.append(f"{ident(doc)} is defined twice")
        seen.add(key)
    return problems


def check_workload_selectors(docs: list[Doc]) -> list[str]:
    """A Deployment whose selector misses its own pods is refused by the API server; a
    spread constraint that selects other pods (or none) spreads nothing."""
    problems = []
    for doc in of_kind(docs, "Deployment"):
        labels = pod_labels(doc)
        if not doc["spec"].get("selector", {}).get("matchLabels") or not selects(
            doc["spec"]["selector"], labels
        ):
            problems.append(f"{ident(doc)}: selector does not match its pod template labels")
        for tsc in pod_spec(doc).get("topologySpreadConstraints", []):
            if not selects(tsc.get("labelSelector"), labels):
                problems.append(f"{ident(doc)}: topology spread selector misses its own pods")
    return problems


def check_scaledobject_targets(docs: list[Doc]) -> list[str]:
    problems = []
    targeted: dict[str, str] = {}
    for so in of_kind(docs, "ScaledObject"):
        spec = so["spec"]
        ref = spec["scaleTargetRef"]
        kind = ref.get("kind", "Deployment")
        api = ref.get("apiVersion", "apps/v1")
        target = [d for d in docs if d["kind"] == kind and d["apiVersion"] == api
                  and d["metadata"]["name"] == ref["name"]]
        if not target:
            problems.append(f"{ident(so)}: scaleTargetRef {api} {kind}/{ref['name']} "
                            "does not exist")
        elif "replicas" in target[0]["spec"]:
            problems.append(f"{ident(so)}: its target {ident(target[0])} sets spec.replicas, "
                            "which every apply would reset under the autoscaler")
        if ref["name"] in targeted:
            problems.append(f"{ident(so)}: {ref['name']} is already scaled by "
                            f"{targeted[ref['name']]}")
        targeted[ref["name"]] = ident(so)
        # the CRD's CEL rule, which a JSON schema cannot express
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if lo > hi:
            problems.append(f"{ident(so)}: minReplicaCount {lo} > maxReplicaCount {hi}")
        idle = spec.get("idleReplicaCount")
        if idle is not None and idle >= lo:
            problems.append(f"{ident(so)}: idleReplicaCount must be below minReplicaCount")
    return problems


def check_scaler_metadata(docs: list[Doc]) -> list[str]:
    problems = []
    for so in of_kind(docs, "ScaledObject"):
        for trigger in so["spec"]["triggers"]:
            where = f"{ident(so)} trigger {trigger['type']}"
            keys = SCALER_KEYS.get(trigger["type"])
            if keys is None:
                problems.append(f"{where}: scaler not known to this test")
                continue
            meta = trigger["metadata"]
            for key in sorted(set(meta) - keys["known"]):
                problems.append(f"{where}: unknown metadata key {key!r} (KEDA ignores it)")
            for key in sorted(keys["required"] - set(meta)):
                problems.append(f"{where}: missing required metadata {key!r}")
            if keys["one_of"] and not keys["one_of"] & set(meta):
                problems.append(f"{where}: needs one of {sorted(keys['one_of'])}")
            for key in keys["integers"] & set(meta):
                if not re.fullmatch(r"\d+", str(meta[key])):
                    problems.append(f"{where}: {key} {meta[key]!r} is not an integer")
            for key in keys["numbers"] & set(meta):
                try:
                    float(meta[key])
                except (TypeError, ValueError):
                    problems.append(f"{where}: {key} {meta[key]!r} is not a number")
            for key in keys["booleans"] & set(meta):
                if str(meta[key]).lower() not in {"true", "false"}:
                    problems.append(f"{where}: {key} {meta[key]!r} is not true or false")
    return problems


def check_pdbs(docs: list[Doc]) -> list[str]:
    problems = []
    deployments = of_kind(docs, "Deployment")
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        spec = pdb["spec"]
        if ("minAvailable" in spec) == ("maxUnavailable" in spec):
            problems.append(f"{ident(pdb)}: set exactly one of minAvailable, maxUnavailable")
        if not any(selects(spec.get("selector"), pod_labels(d)) for d in deployments):
            problems.append(f"{ident(pdb)}: selector matches no Deployment's pods")
    # the eviction API refuses to evict a pod that more than one PDB covers
    for dep in deployments:
        covering = [p for p in of_kind(docs, "PodDisruptionBudget")
                    if selects(p["spec"].get("selector"), pod_labels(dep))]
        if len(covering) != 1:
            problems.append(f"{ident(dep)}: covered by {len(covering)} PodDisruptionBudgets, "
                            "want exactly 1")
    return problems


def check_services(docs: list[Doc]) -> list[str]:
    problems = []
    deployments = of_kind(docs, "Deployment")
    for svc in of_kind(docs, "Service"):
        selector = svc["spec"].get("selector")
        matched = [d for d in deployments if selector and selects(
            {"matchLabels": selector}, pod_labels(d))]
        if not matched:
            problems.append(f"{ident(svc)}: selector {selector} matches no Deployment's pods")
            continue
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for dep in matched:
                opened = [container_ports(c) for c in containers(pod_spec(dep))]
                if not any(target in (names if isinstance(target, str) else numbers)
                           for numbers, names in opened):
                    problems.append(f"{ident(svc)}: targetPort {target!r} is not a container "
                                    f"port of {ident(dep)}")
    return problems


def check_ports(docs: list[Doc]) -> list[str]:
    """Every probe, and every --port/--health-port a command listens on, is a port the
    container opens."""
    problems = []
    for doc in workloads(docs):
        for c in containers(pod_spec(doc)):
            numbers, names = container_ports(c)
            where = f"{ident(doc)} container {c['name']}"
            for probe in PROBES:
                handler = c.get(probe, {})
                for kind in ("httpGet", "tcpSocket", "grpc"):
                    if kind not in handler:
                        continue
                    port = handler[kind]["port"]
                    if port not in (names if isinstance(port, str) else numbers):
                        problems.append(f"{where}: {probe} port {port!r} is not a container "
                                        "port")
            for flag in ("--port", "--health-port"):
                value = flag_value(c.get("command", []) + c.get("args", []), flag)
                if value is not None and int(value) not in numbers:
                    problems.append(f"{where}: listens on {flag} {value}, not a container port")
    return problems


def check_references(docs: list[Doc]) -> list[str]:
    """Secrets, ConfigMaps, volumes and the ServiceAccount a pod refers to all exist; the
    one Secret the user creates is the only exception."""
    problems = []
    defined = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in workloads(docs):
        spec = pod_spec(doc)
        secrets: set[str] = set()
        configmaps: set[str] = set()
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                secrets.add(v["secret"]["secretName"])
            if "configMap" in v:
                configmaps.add(v["configMap"]["name"])
            for source in v.get("projected", {}).get("sources", []):
                if "secret" in source:
                    secrets.add(source["secret"]["name"])
                if "configMap" in source:
                    configmaps.add(source["configMap"]["name"])
        secrets.update(s["name"] for s in spec.get("imagePullSecrets", []))
        for c in containers(spec):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    secrets.add(ref["secretKeyRef"]["name"])
                if "configMapKeyRef" in ref:
                    configmaps.add(ref["configMapKeyRef"]["name"])
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    secrets.add(source["secretRef"]["name"])
                if "configMapRef" in source:
                    configmaps.add(source["configMapRef"]["name"])
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{ident(doc)}: volumeMount {mount['name']!r} has no volume")
        for name in sorted(secrets):
            if ("Secret", name) not in defined and name not in USER_CREATED_SECRETS:
                problems.append(f"{ident(doc)}: Secret {name} is neither in the manifests "
                                "nor documented as created by the user")
        for name in sorted(configmaps):
            if ("ConfigMap", name) not in defined:
                problems.append(f"{ident(doc)}: ConfigMap {name} is not in the manifests")
        account = spec.get("serviceAccountName")
        if account and ("ServiceAccount", account) not in defined:
            problems.append(f"{ident(doc)}: ServiceAccount {account} is not in the manifests")
    return problems


def check_config_files(docs: list[Doc]) -> list[str]:
    """A --config path resolves, through a volumeMount, to a key of a ConfigMap in the
    manifests, and that key holds valid TOML."""
    problems = []
    configmaps = {d["metadata"]["name"]: d for d in of_kind(docs, "ConfigMap")}
    for doc in workloads(docs):
        spec = pod_spec(doc)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            path = flag_value(c.get("command", []) + c.get("args", []), "--config")
            if path is None:
                continue
            where = f"{ident(doc)} container {c['name']}: --config {path}"
            mounts = [m for m in c.get("volumeMounts", [])
                      if PurePosixPath(path).is_relative_to(m["mountPath"])]
            volume = volumes.get(mounts[0]["name"], {}) if mounts else {}
            if "configMap" not in volume:
                problems.append(f"{where} is not on a ConfigMap volume")
                continue
            relative = str(PurePosixPath(path).relative_to(mounts[0]["mountPath"]))
            source = volume["configMap"]
            if "items" in source:
                keys = [i["key"] for i in source["items"] if i["path"] == relative]
                key = keys[0] if keys else None
            else:
                key = relative
            data = configmaps.get(source["name"], {}).get("data", {})
            if key not in data:
                problems.append(f"{where}: ConfigMap {source['name']} has no such key")
                continue
            try:
                tomllib.loads(data[key])
            except tomllib.TOMLDecodeError as e:
                problems.append(f"{where}: not valid TOML: {e}")
    return problems


IMAGE = re.compile(r"^(?P<repo>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:"
                   r"[0-9a-f]{64}))?$")


def check_images(docs: list[Doc]) -> list[str]:
    problems = []
    images: set[str] = set()
    for doc in workloads(docs):
        for c in containers(pod_spec(doc)):
            image = c["image"]
            images.add(image)
            m = IMAGE.match(image)
            tag = m and m["tag"]
            if not m or not (m["digest"] or (tag and tag != "latest")):
                problems.append(f"{ident(doc)} container {c['name']}: image {image} is not "
                                "pinned to a version tag")
    if len(images) > 1:
        # the migration Job and the code that relies on its schema must be one release
        problems.append(f"pods run different images: {sorted(images)}")
    return problems


def check_hardening(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in workloads(docs):
        spec = pod_spec(doc)
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{ident(doc)}: pod securityContext.runAsNonRoot is not true")
        for c in containers(spec):
            where = f"{ident(doc)} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities are not drop [ALL]")
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(part, {})):
                    problems.append(f"{where}: resources.{part} lacks cpu or memory")
            if doc["kind"] == "Deployment":
                for probe in ("livenessProbe", "readinessProbe"):
                    if c.get(probe, {}).get("httpGet", {}).get("path") != "/health":
                        problems.append(f"{where}: {probe} is not an HTTP GET of /health")
    return problems


CHECKS: list[Callable[[list[Doc]], list[str]]] = [
    check_namespaces, check_unique_names, check_workload_selectors, check_scaledobject_targets,
    check_scaler_metadata, check_pdbs, check_services, check_ports, check_references,
    check_config_files, check_images, check_hardening,
]


def cross_reference_problems(docs: list[Doc]) -> list[str]:
    return [problem for check in CHECKS for problem in check(docs)]


# ---------------------------------------------------------------- the real manifests


def test_the_kustomization_lists_every_manifest_and_only_those() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    assert k["namespace"] == NAMESPACE
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(on_disk)
    assert len(set(k["resources"])) == len(k["resources"])


def test_every_document_is_an_object_of_a_known_kind(manifests: list[Doc]) -> None:
    for doc in manifests:
        assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= set(doc), doc


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_match_the_kubernetes_schema_strictly(
    manifests: list[Doc], version: str
) -> None:
    checked = 0
    for doc in manifests:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        # SchemaNotFoundError (a kind or apiVersion this Kubernetes lacks) fails the test too
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{ident(doc)} invalid for Kubernetes {version} at {path}: {e.message}")
        checked += 1
    assert checked >= 12  # namespace, account, 3 deployments, 3 PDBs, 2 services, cm, job


def test_scaledobjects_match_the_keda_crd_schema(manifests: list[Doc]) -> None:
    validator = scaledobject_validator()
    scaled = of_kind(manifests, "ScaledObject")
    assert len(scaled) == 2
    for doc in scaled:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                  for e in validator.iter_errors(doc)]
        assert errors == [], f"{ident(doc)}: {errors}"


def test_the_cross_references_hold(manifests: list[Doc]) -> None:
    assert cross_reference_problems(manifests) == []


def test_the_user_created_secret_is_documented_with_every_key_used(
    manifests: list[Doc],
) -> None:
    readme = (MANIFESTS / "README.md").read_text()
    used: dict[str, set[str]] = {}
    for doc in workloads(manifests):
        for c in containers(pod_spec(doc)):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
    assert set(used) == USER_CREATED_SECRETS  # the allowance is used, and is all there is
    for name, keys in used.items():
        assert f"secret generic {name}" in readme, f"README does not show creating {name}"
        for key in keys:
            assert f"--from-literal={key}=" in readme, f"README does not show {name}/{key}"


def test_the_topology(manifests: list[Doc]) -> None:
    """What the manifests are for: the commands, ports and scaling bounds asked of them."""
    commands = {
        "corral-worker": ["corral", "worker", "--engine",
                          "temporal://temporal-frontend.temporal:7233", "--health-port", "8080"],
        "corral-gateway": ["corral", "gateway", "--config", "/etc/corral/corral.toml",
                           "--host", "0.0.0.0", "--port", "8000"],
        "corral-server": ["corral", "serve", "--port", "8000"],
    }
    for name, command in commands.items():
        (c,) = pod_spec(find(manifests, "Deployment", name))["containers"]
        assert c["command"] == command
        assert c["image"] == "ghcr.io/corral-dev/corral:0.1.0"
    (job,) = pod_spec(find(manifests, "Job", "corral-db-upgrade"))["containers"]
    assert job["command"] == ["corral", "db", "upgrade"]

    worker = pod_spec(find(manifests, "Deployment", "corral-worker"))
    assert worker["terminationGracePeriodSeconds"] == 60
    assert worker["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    env = {e["name"] for e in worker["containers"][0]["env"]}
    assert {"CORRAL_DATABASE_URL", "CORRAL_REDIS_URL", "CORRAL_ENGINE"} <= env
    for name in ("corral-gateway", "corral-server"):
        (port,) = find(manifests, "Service", name)["spec"]["ports"]
        assert port["port"] == 8000

    so = find(manifests, "ScaledObject", "corral-worker")["spec"]
    assert (so["minReplicaCount"], so["maxReplicaCount"]) == (1, 20)
    (trigger,) = so["triggers"]
    assert trigger["type"] == "temporal"
    assert trigger["metadata"]["endpoint"] == "temporal-frontend.temporal:7233"
    assert trigger["metadata"]["namespace"] == "default"
    assert trigger["metadata"]["taskQueue"] == "corral"
    assert "targetQueueSize" in trigger["metadata"]

    so = find(manifests, "ScaledObject", "corral-gateway")["spec"]
    assert (so["minReplicaCount"], so["maxReplicaCount"]) == (2, 10)
    (trigger,) = so["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["serverAddress"] == "http://prometheus.monitoring:9090"
    assert "corral_gateway_requests_in_flight" in trigger["metadata"]["query"]


# ---------------------------------------------------------------- broken copies are refused


def container0(docs: list[Doc], deployment: str) -> Doc:
    c: Doc = pod_spec(find(docs, "Deployment", deployment))["containers"][0]
    return c


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("spec", "replica"),  # a typo at the top of the spec
        ("pod", "terminationGracePeriod"),  # in the pod spec
        ("container", "livenessprobe"),  # in a container: the case is wrong
        ("probe", "path "),  # deep in a probe: a stray space
    ],
)
def test_an_unknown_field_in_a_deployment_is_rejected(
    broken: list[Doc], where: str, field: str
) -> None:
    deployment = find(broken, "Deployment", "corral-worker")
    container = pod_spec(deployment)["containers"][0]
    target = {
        "spec": deployment["spec"],
        "pod": pod_spec(deployment),
        "container": container,
        "probe": container["livenessProbe"]["httpGet"],
    }[where]
    target[field] = target.get(field.strip(), 1)
    for version in K8S_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(repr(field))):
            kubernetes_validate.validate(deployment, version, strict=True)


def test_a_wrongly_typed_field_is_rejected(broken: list[Doc]) -> None:
    deployment = find(broken, "Deployment", "corral-worker")
    pod_spec(deployment)["terminationGracePeriodSeconds"] = "60"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_a_kind_kubernetes_does_not_have_is_rejected(broken: list[Doc]) -> None:
    pdb = find(broken, "PodDisruptionBudget", "corral-worker")
    pdb["apiVersion"] = "policy/v1beta1"  # removed in Kubernetes 1.25
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(pdb, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (lambda so: so["spec"].__setitem__("maxReplicas", 20), "maxReplicas"),
        (lambda so: so["spec"]["scaleTargetRef"].__setitem__("nmae", "x"), "nmae"),
        (lambda so: so["spec"]["triggers"][0].__setitem__("metdata", {}), "metdata"),
        (lambda so: so["spec"]["advanced"]["horizontalPodAutoscalerConfig"].__setitem__(
            "behaviour", {}), "behaviour"),
        # unquoted in YAML, a number: the CRD's metadata is a map of strings
        (lambda so: so["spec"]["triggers"][0]["metadata"].__setitem__("targetQueueSize", 5),
         "is not of type 'string'"),
        (lambda so: so["spec"].__setitem__("minReplicaCount", "1"), "is not of type 'integer'"),
        (lambda so: so["spec"]["triggers"][0].pop("type"), "'type' is a required property"),
        (lambda so: so["spec"].pop("scaleTargetRef"), "'scaleTargetRef' is a required"),
    ],
)
def test_a_broken_scaledobject_is_rejected(
    broken: list[Doc], breakage: Callable[[Doc], object], complaint: str
) -> None:
    so = find(broken, "ScaledObject", "corral-worker")
    breakage(so)
    messages = [e.message for e in scaledobject_validator().iter_errors(so)]
    assert any(complaint in m for m in messages), messages


def assert_problem(docs: list[Doc], *fragments: str) -> None:
    problems = cross_reference_problems(docs)
    assert any(all(f in p for f in fragments) for p in problems), problems


def test_a_pdb_selecting_nothing_is_caught(broken: list[Doc]) -> None:
    pdb = find(broken, "PodDisruptionBudget", "corral-gateway")
    pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "gatewy"
    assert_problem(broken, "PodDisruptionBudget/corral-gateway", "matches no Deployment")
    assert_problem(broken, "Deployment/corral-gateway", "covered by 0")


def test_two_pdbs_on_one_deployment_are_caught(broken: list[Doc]) -> None:
    extra = copy.deepcopy(find(broken, "PodDisruptionBudget", "corral-server"))
    extra["metadata"]["name"] = "corral-server-extra"
    broken.append(extra)
    assert_problem(broken, "Deployment/corral-server", "covered by 2")


def test_a_scaledobject_aimed_at_a_missing_deployment_is_caught(broken: list[Doc]) -> None:
    find(broken, "ScaledObject", "corral-worker")["spec"]["scaleTargetRef"]["name"] = "worker"
    assert_problem(broken, "ScaledObject/corral-worker", "Deployment/worker does not exist")


def test_a_scaledobject_whose_target_sets_replicas_is_caught(broken: list[Doc]) -> None:
    find(broken, "Deployment", "corral-gateway")["spec"]["replicas"] = 2
    assert_problem(broken, "ScaledObject/corral-gateway", "sets spec.replicas")


def test_min_above_max_replicas_is_caught(broken: list[Doc]) -> None:
    find(broken, "ScaledObject", "corral-gateway")["spec"]["minReplicaCount"] = 11
    assert_problem(broken, "minReplicaCount 11 > maxReplicaCount 10")


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("taskQueu", "corral", "unknown metadata key 'taskQueu'"),
        ("targetQueueSize", "five", "is not an integer"),
    ],
)
def test_a_misspelled_or_malformed_scaler_parameter_is_caught(
    broken: list[Doc], key: str, value: str, complaint: str
) -> None:
    meta = find(broken, "ScaledObject", "corral-worker")["spec"]["triggers"][0]["metadata"]
    if key == "taskQueu":
        del meta["taskQueue"]
    meta[key] = value
    assert_problem(broken, "ScaledObject/corral-worker", complaint)


def test_a_service_selecting_nothing_is_caught(broken: list[Doc]) -> None:
    find(broken, "Service", "corral-server")["spec"]["selector"]["app.kubernetes.io/name"] = "x"
    assert_problem(broken, "Service/corral-server", "matches no Deployment")


def test_a_service_on_a_port_nobody_opens_is_caught(broken: list[Doc]) -> None:
    find(broken, "Service", "corral-gateway")["spec"]["ports"][0]["targetPort"] = "https"
    assert_problem(broken, "Service/corral-gateway", "targetPort 'https'")


@pytest.mark.parametrize("port", ["healthz", 8081])
def test_a_probe_on_a_port_the_container_does_not_open_is_caught(
    broken: list[Doc], port: str | int
) -> None:
    container0(broken, "corral-worker")["readinessProbe"]["httpGet"]["port"] = port
    assert_problem(broken, "corral-worker", f"readinessProbe port {port!r}")


def test_a_listen_port_the_container_does_not_open_is_caught(broken: list[Doc]) -> None:
    command = container0(broken, "corral-worker")["command"]
    command[command.index("--health-port") + 1] = "9090"
    assert_problem(broken, "corral-worker", "--health-port 9090")


def test_a_secret_nobody_creates_is_caught(broken: list[Doc]) -> None:
    env = container0(broken, "corral-server")["env"]
    env[0]["valueFrom"]["secretKeyRef"]["name"] = "corral-secrets"
    assert_problem(broken, "Deployment/corral-server", "Secret corral-secrets")


def test_an_envfrom_secret_nobody_creates_is_caught(broken: list[Doc]) -> None:
    container0(broken, "corral-worker")["envFrom"] = [{"secretRef": {"name": "provider-keys"}}]
    assert_problem(broken, "Deployment/corral-worker", "Secret provider-keys")


def test_a_missing_configmap_is_caught(broken: list[Doc]) -> None:
    broken.remove(find(broken, "ConfigMap", "corral-gateway-config"))
    assert_problem(broken, "ConfigMap corral-gateway-config is not in the manifests")
    assert_problem(broken, "--config /etc/corral/corral.toml", "has no such key")


def test_a_config_path_outside_the_mount_is_caught(broken: list[Doc]) -> None:
    command = container0(broken, "corral-gateway")["command"]
    command[command.index("--config") + 1] = "/etc/corral.toml"
    assert_problem(broken, "--config /etc/corral.toml", "not on a ConfigMap volume")


def test_invalid_toml_in_the_gateway_config_is_caught(broken: list[Doc]) -> None:
    data = find(broken, "ConfigMap", "corral-gateway-config")["data"]
    data["corral.toml"] += "[providers\n"
    assert_problem(broken, "not valid TOML")


@pytest.mark.parametrize(
    "image",
    ["ghcr.io/corral-dev/corral:latest", "ghcr.io/corral-dev/corral", "localhost:5000/corral"],
)
def test_an_unpinned_image_is_caught(broken: list[Doc], image: str) -> None:
    container0(broken, "corral-gateway")["image"] = image
    assert_problem(broken, "corral-gateway", f"image {image} is not pinned")


def test_pinned_by_digest_is_pinned() -> None:
    image = "ghcr.io/corral-dev/corral@sha256:" + "0" * 64
    docs = copy.deepcopy(load_manifests())
    for doc in workloads(docs):
        for c in containers(pod_spec(doc)):
            c["image"] = image
    assert check_images(docs) == []


def test_mixed_image_versions_are_caught(broken: list[Doc]) -> None:
    container0(broken, "corral-worker")["image"] = "ghcr.io/corral-dev/corral:0.2.0"
    assert_problem(broken, "pods run different images")


def test_a_writable_root_filesystem_is_caught(broken: list[Doc]) -> None:
    container0(broken, "corral-server")["securityContext"]["readOnlyRootFilesystem"] = False
    assert_problem(broken, "corral-server", "root filesystem is writable")


def test_an_object_outside_the_namespace_is_caught(broken: list[Doc]) -> None:
    find(broken, "Service", "corral-server")["metadata"]["namespace"] = "default"
    assert_problem(broken, "Service/corral-server is not in namespace corral")


def test_a_deployment_selector_missing_its_pods_is_caught(broken: list[Doc]) -> None:
    labels = find(broken, "Deployment", "corral-worker")["spec"]["template"]["metadata"]
    labels["labels"]["app.kubernetes.io/component"] = "workers"
    assert_problem(broken, "Deployment/corral-worker", "does not match its pod template")


def test_the_gateway_configmap_is_a_gateway_config_corral_accepts(manifests: list[Doc]) -> None:
    from corral.gateway import parse_gateway

    [config_map] = [d for d in manifests if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"] == "corral-gateway-config"]
    settings = parse_gateway(tomllib.loads(config_map["data"]["corral.toml"]).get("gateway"))
    assert settings.master_key_env == "CORRAL_GATEWAY_KEY"
