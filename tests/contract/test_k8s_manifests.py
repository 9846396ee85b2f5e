"""deploy/k8s: every manifest validates against the Kubernetes JSON schemas (offline, strict: no
unknown fields) and has the shape the roles need: one coordinator with a state volume, parameter
servers as a StatefulSet behind a headless Service whose pod ordinal is the server id, scalable
workers, native gRPC probes, a grace period above the servers' own, resources, and arguments that the
real `lepton` command line accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lepton.config import load_job_file
from lepton.errors import ConfigError
from lepton.ops.cli import build_parser, service_options

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the `test` extra) validates the manifests"
)

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest version the manifests need (the pod-index label is set from 1.28; native gRPC probes
# are GA from 1.27) and the newest schema set the package ships.
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
SERVER_GRACE_S = 2.0  # coordinator/main.py and ps_server/main.py drain for this long on SIGTERM
IMAGE = "lepton:latest"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def load_resources() -> list[dict]:
    docs = []
    for path in manifest_files():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


RESOURCES = load_resources()


def by_kind(kind: str) -> list[dict]:
    return [r for r in RESOURCES if r["kind"] == kind]


def named(kind: str, name: str) -> dict:
    (found,) = [r for r in by_kind(kind) if r["metadata"]["name"] == name]
    return found


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def arg(c: dict, flag: str) -> str:
    values = [a.split("=", 1)[1] for a in c["args"] if a.startswith(flag + "=")]
    assert len(values) == 1, f"{c['name']}: expected one {flag}=..., got {c['args']}"
    return values[0]


def parse_cli(c: dict, env: dict[str, str]):
    """The container's args as `lepton` (the image's entrypoint) parses them, $(VAR) expanded as
    the kubelet would."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    return build_parser().parse_args(argv)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    assert (K8S_DIR / "README.md").is_file()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "resource", RESOURCES, ids=[f"{r['kind']}/{r['metadata']['name']}" for r in RESOURCES]
)
def test_resource_validates_against_the_kubernetes_schema(resource, version):
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(
            f"{resource['kind']}/{resource['metadata']['name']} invalid for {version}: {e.message} at {list(e.path)}"
        )


def test_the_schema_check_rejects_a_broken_manifest():
    broken = yaml.safe_load(yaml.safe_dump(named("StatefulSet", "lepton-ps")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(named("StatefulSet", "lepton-ps")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # typo: unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_coordinator_is_one_replica_with_a_state_volume_and_a_service():
    deployment = named("Deployment", "lepton-coordinator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two coordinators at once
    c = container(deployment)
    parse_cli(c, {})
    assert c["args"][0] == "coordinator"
    state_dir = arg(c, "--state-dir")
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == state_dir]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]

    port = int(arg(c, "--listen").rsplit(":", 1)[1])
    assert arg(c, "--listen").startswith("0.0.0.0:")
    service = named("Service", "lepton-coordinator")
    assert service["spec"].get("clusterIP") != "None"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["port"] == port
    assert {"name": "grpc", "containerPort": port} in c["ports"]

    # The job file the coordinator reads is a valid JobSpec (and leaves the server count to the flag).
    (job_mount,) = [m for m in c["volumeMounts"] if arg(c, "--job").startswith(m["mountPath"] + "/")]
    (job_volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == job_mount["name"]]
    config_map = named("ConfigMap", job_volume["configMap"]["name"])
    key = arg(c, "--job")[len(job_mount["mountPath"]) + 1 :]
    assert "parameter_servers" not in config_map["data"][key]


def test_job_file_in_the_config_map_loads(tmp_path):
    config_map = named("ConfigMap", "lepton-job")
    path = tmp_path / "job.toml"
    path.write_text(config_map["data"]["job.toml"])
    spec = load_job_file(path)
    assert spec.heartbeat_timeout_s > 2 * spec.heartbeat_interval_s


def test_parameter_servers_are_a_statefulset_behind_a_headless_service():
    statefulset = named("StatefulSet", "lepton-ps")
    service = named("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == statefulset["spec"]["template"]["metadata"]["labels"]
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"

    c = container(statefulset)
    assert c["args"][0] == "ps"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "fieldRef" in e.get("valueFrom", {})}
    assert env["POD_NAME"] == "metadata.name"
    assert env["POD_ORDINAL"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert arg(c, "--id") == "ps-$(POD_ORDINAL)"
    port = int(arg(c, "--listen").rsplit(":", 1)[1])
    assert arg(c, "--advertise") == f"$(POD_NAME).{service['metadata']['name']}:{port}"
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["port"] == port

    # The coordinator waits for exactly as many servers as the StatefulSet runs, and every server
    # dials the coordinator's Service.
    coordinator = container(named("Deployment", "lepton-coordinator"))
    assert int(arg(coordinator, "--parameter-servers")) == statefulset["spec"]["replicas"]
    coordinator_port = int(arg(coordinator, "--listen").rsplit(":", 1)[1])
    assert arg(c, "--coordinator") == f"lepton-coordinator:{coordinator_port}"

    args = parse_cli(c, {"POD_NAME": "lepton-ps-1", "POD_ORDINAL": "1"})
    assert args.id == "ps-1" and args.advertise == f"lepton-ps-1.lepton-ps:{port}"

    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert [m["name"] for m in c["volumeMounts"] if m["mountPath"] == arg(c, "--state-dir")] == [
        claims[0]["metadata"]["name"]
    ]


def test_workers_are_a_scalable_deployment():
    deployment = named("Deployment", "lepton-worker")
    assert deployment["spec"]["replicas"] >= 1
    c = container(deployment)
    assert c["args"][0] == "worker"
    coordinator = container(named("Deployment", "lepton-coordinator"))
    coordinator_port = int(arg(coordinator, "--listen").rsplit(":", 1)[1])
    assert arg(c, "--coordinator") == f"lepton-coordinator:{coordinator_port}"
    assert "--id" not in " ".join(c["args"])  # ids come from the coordinator, so replicas are interchangeable
    parse_cli(c, {})


WORKLOADS = [("Deployment", "lepton-coordinator"), ("StatefulSet", "lepton-ps"), ("Deployment", "lepton-worker")]


@pytest.mark.parametrize("kind,name", WORKLOADS)
def test_every_role_runs_the_image_with_resources_and_a_grace_period(kind, name):
    workload = named(kind, name)
    pod = workload["spec"]["template"]["spec"]
    c = container(workload)
    assert c["image"] == IMAGE
    assert "command" not in c  # the image's entrypoint, `lepton`, with the role as the first arg
    assert c["args"][0] in {"coordinator", "ps", "worker"}
    parse_cli(c, {"POD_NAME": "lepton-ps-0", "POD_ORDINAL": "0"})
    assert pod["terminationGracePeriodSeconds"] > SERVER_GRACE_S
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][part]), f"{name}: {part}"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert (
        workload["spec"]["selector"]["matchLabels"].items()
        <= workload["spec"]["template"]["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("kind,name,service", [
    ("Deployment", "lepton-coordinator", "lepton.v1.Coordinator"),
    ("StatefulSet", "lepton-ps", "lepton.v1.ParameterServer"),
])
def test_servers_have_native_grpc_probes_on_their_port(kind, name, service):
    c = container(named(kind, name))
    port = int(arg(c, "--listen").rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    assert c["readinessProbe"]["grpc"]["service"] == service
    assert "service" not in c["livenessProbe"]["grpc"]  # overall health ("")


@pytest.mark.parametrize("kind, name", [("Deployment", "lepton-coordinator"), ("StatefulSet", "lepton-ps")])
def test_serving_roles_on_the_pod_network_say_insecure_or_the_cli_refuses_them(kind, name):
    c = container(named(kind, name))
    assert not arg(c, "--listen").startswith("127.")
    assert "--insecure" in c["args"] and not any(a.startswith("--tls-cert") for a in c["args"])
    env = {"POD_NAME": "lepton-ps-0", "POD_ORDINAL": "0"}
    service_options(parse_cli(c, env))  # accepted as written
    without = {**c, "args": [a for a in c["args"] if a != "--insecure"]}
    with pytest.raises(ConfigError, match="refusing to serve plaintext on 0.0.0.0"):
        service_options(parse_cli(without, env))


def test_servers_and_workers_take_their_threads_from_their_cpu_limit():
    for kind, name in (("StatefulSet", "lepton-ps"), ("Deployment", "lepton-worker")):
        c = container(named(kind, name))
        (threads,) = [e for e in c["env"] if e["name"] == "LEPTON_THREADS"]
        assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu", name
        assert "cpu" in c["resources"]["limits"], name
