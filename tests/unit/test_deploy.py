"""deploy/ against the code: settings, ports, commands, metric names and object references agree.

Images cannot be built here (no Docker engine) and there is no cluster, so these checks are what
keeps the Dockerfiles, the compose file and the Kubernetes manifests honest: every LOGSTREAM_*
variable is a real setting and its value validates, every port is the metrics port, every
container command parses with logstream's own CLI parser, every metric an alert or the autoscaler
uses is one logstream exports, and the objects point at each other by the right names.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from logstream.cli import build_parser
from logstream.metrics import Metrics
from logstream.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.cuda"]
ENV_NAME = re.compile(r"\bLOGSTREAM_[A-Z0-9_]+\b")
NOT_SETTINGS = {"LOGSTREAM_TEST_LOG_LEVEL"}  # read by the test suite, never by deployments


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def k8s_objects(*dirs: str) -> list[dict[str, Any]]:
    """The objects a kustomization directory contributes (patches are not objects of their own)."""
    paths = [path for d in dirs for path in sorted((K8S / d).glob("*.yaml"))
             if not path.stem.endswith("-patch")]
    return [doc for path in paths for doc in load_all(path) if doc.get("kind") not in (None, "Kustomization")]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV assignments of a Dockerfile (line continuations joined)."""
    text = path.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_json(path: Path, instruction: str) -> list[str]:
    match = re.search(rf"^{instruction} (\[.*\])$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} has no exec-form {instruction}"
    return yaml.safe_load(match.group(1))


def statefulsets() -> dict[str, dict[str, Any]]:
    return {variant: one(k8s_objects(variant), "StatefulSet") for variant in ("cpu", "gpu")}


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """Settings exactly as a container with this environment would build them."""
    for name in [n for n in os.environ if n.startswith("LOGSTREAM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def k8s_env(variant: str) -> dict[str, str]:
    """The environment of a replica: the ConfigMap (with the variant's patch) and the per-pod values."""
    env = dict(one(k8s_objects("common"), "ConfigMap")["data"])
    patch = K8S / variant / "configmap-patch.yaml"
    if patch.exists():
        env.update(load_all(patch)[0]["data"])
    container = statefulsets()[variant]["spec"]["template"]["spec"]["containers"][0]
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "logstream-0")  # valueFrom metadata.name: the pod's name
    return env


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [])
        names.update(family.name + suffix for suffix in suffixes)
    return names


# --- files parse --------------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = yaml_files()
    assert len(files) >= 10
    for path in files:
        assert load_all(path), f"{path} is empty"


def test_kubernetes_objects_have_the_basics() -> None:
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in load_all(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without a name"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_kustomize_renders_each_variant(variant: str) -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S / variant)], capture_output=True, text=True,
                              timeout=60, check=True).stdout
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(rendered) if doc)
    assert kinds == ["ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "StatefulSet"]
    config = next(doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "ConfigMap")
    assert config["data"]["LOGSTREAM_DETECTOR"] == ("logllm" if variant == "gpu" else "novelty")


# --- settings -----------------------------------------------------------------------------------


def test_every_logstream_variable_in_deploy_is_a_setting() -> None:
    used: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            for name in ENV_NAME.findall(path.read_text()):
                used.setdefault(name, set()).add(str(path.relative_to(REPO)))
    assert len(used) >= 20
    fields = Settings.model_fields
    unknown = {name: sorted(where) for name, where in used.items()
               if name not in NOT_SETTINGS and name.removeprefix("LOGSTREAM_").lower() not in fields}
    assert not unknown, f"not settings: {unknown}"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_kubernetes_settings_validate(monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    settings = settings_from_env(monkeypatch, k8s_env(variant))
    assert settings.input_topic == ["logs.raw"]
    assert settings.group_instance_id == "logstream-0"
    assert settings.metrics_port is not None
    if variant == "gpu":
        assert (settings.detector, settings.device) == ("logllm", "cuda")


def test_compose_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: str(v) for k, v in compose()["services"]["logstream"]["environment"].items()}
    settings = settings_from_env(monkeypatch, env)
    assert settings.input_topic == ["logs.raw"] and settings.group_instance_id
    # the files the container reads exist where the compose file mounts them from
    assert settings.model is not None
    assert (REPO / "logstream" / "samples" / settings.model.name).is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_settings_validate(monkeypatch: pytest.MonkeyPatch, dockerfile: Path) -> None:
    env = {k: v for k, v in dockerfile_env(dockerfile).items() if k.startswith("LOGSTREAM_")}
    assert "LOGSTREAM_METRICS_PORT" in env and "LOGSTREAM_CACHE_DIR" in env
    settings_from_env(monkeypatch, env)


# --- ports --------------------------------------------------------------------------------------


def test_the_metrics_port_is_the_same_everywhere() -> None:
    port = int(one(k8s_objects("common"), "ConfigMap")["data"]["LOGSTREAM_METRICS_PORT"])
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert int(dockerfile_env(dockerfile)["LOGSTREAM_METRICS_PORT"]) == port
        assert re.search(rf"^EXPOSE {port}$", text, re.MULTILINE), dockerfile.name
        assert f"'LOGSTREAM_METRICS_PORT', '{port}'" in text and "/healthz" in text, dockerfile.name
    service = compose()["services"]["logstream"]
    assert int(service["environment"]["LOGSTREAM_METRICS_PORT"]) == port
    assert any(str(mapping).endswith(f":{port}") for mapping in service["ports"])
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    assert [t for job in scrape for c in job["static_configs"] for t in c["targets"]] == [f"logstream:{port}"]
    svc = one(k8s_objects("common"), "Service")
    ports = [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]]
    assert ports == [("metrics", port, "metrics")]
    for variant, sts in statefulsets().items():
        pod = sts["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port), variant
        container = pod["spec"]["containers"][0]
        assert container["ports"] == [{"name": "metrics", "containerPort": port}], variant
        probes = {kind: container[kind]["httpGet"]
                  for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert {p["port"] for p in probes.values()} == {"metrics"}, variant
        assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"


# --- commands -----------------------------------------------------------------------------------


def parses(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`logstream {' '.join(argv)}` does not parse") from exc


def test_container_commands_are_real_logstream_commands() -> None:
    for dockerfile in DOCKERFILES:
        assert dockerfile_json(dockerfile, "ENTRYPOINT") == ["logstream"]
        parses(dockerfile_json(dockerfile, "CMD"))
    services = compose()["services"]
    ours = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("logstream:")}
    assert set(ours) == {"producer", "logstream", "alerts"}
    for service in ours.values():
        parses(service["command"])
    producer = build_parser().parse_args(services["producer"]["command"])
    assert (REPO / "logstream" / "samples" / producer.file.name).is_file()
    for sts in statefulsets().values():
        pod = sts["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            parses(container["args"])


# --- images -------------------------------------------------------------------------------------


def test_images_pin_torch_first_run_as_non_root_and_check_health() -> None:
    pinned = re.search(r'"torch==([^"]+)"', (REPO / "scripts" / "setup.sh").read_text())
    assert pinned
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert f"ARG TORCH_VERSION={pinned.group(1)}" in text, dockerfile.name
        assert text.index('"torch==${TORCH_VERSION}"') < text.index("pip install ."), dockerfile.name
        assert re.search(r"^USER 10001", text, re.MULTILINE) and "HEALTHCHECK" in text, dockerfile.name
        assert "ARG BAKE_MODELS=0" in text and "logstream models prepare" in text, dockerfile.name
    assert "bitsandbytes==" in (DEPLOY / "Dockerfile.cuda").read_text()


# --- kubernetes wiring --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_kubernetes_objects_point_at_each_other(variant: str) -> None:
    objects = k8s_objects("common", variant)
    sts, service = one(objects, "StatefulSet"), one(objects, "Service")
    pdb, hpa = one(objects, "PodDisruptionBudget"), one(objects, "HorizontalPodAutoscaler")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", sts["metadata"]["name"])
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"][0]["configMapRef"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    assert {"name": "LOGSTREAM_GROUP_INSTANCE_ID",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    shutdown = float(k8s_env(variant)["LOGSTREAM_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > shutdown
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/var/lib/logstream", "/tmp"} <= mounts  # read-only root filesystem
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (1 if variant == "gpu" else None)


def test_autoscaler_and_alerts_use_metrics_logstream_exports() -> None:
    exported = exported_metric_names()
    hpa = one(k8s_objects("common"), "HorizontalPodAutoscaler")
    external = [m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    assert external == ["logstream_consumer_lag"] and set(external) <= exported
    adapter = load_all(K8S / "monitoring.yaml")[0]["data"]["config.yaml"]
    rule = yaml.safe_load(adapter)["externalRules"][0]
    assert rule["name"]["as"] in external
    assert set(re.findall(r"logstream_\w+", rule["seriesQuery"])) <= exported
    rules = yaml.safe_load((DEPLOY / "prometheus-rules.yml").read_text())
    used = {name for group in rules["groups"] for rule in group["rules"]
            for name in re.findall(r"logstream_\w+", rule["expr"])}
    assert used and used <= exported, f"unknown metrics in alert rules: {used - exported}"


def test_compose_gives_shutdown_time_and_kafka_kraft() -> None:
    services = compose()["services"]
    shutdown = float(services["logstream"]["environment"]["LOGSTREAM_SHUTDOWN_TIMEOUT_S"])
    assert float(services["logstream"]["stop_grace_period"].rstrip("s")) > shutdown
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    bootstrap = services["logstream"]["environment"]["LOGSTREAM_BOOTSTRAP_SERVERS"]
    assert f"INTERNAL://{bootstrap}" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
