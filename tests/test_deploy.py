"""Static checks of the deployment files (no Docker engine needed).

Covers Dockerfile, .dockerignore, docker-compose.yml, docker/prometheus/prometheus.yml and the
Grafana provisioning + dashboard under docker/grafana. The metric names the server exports are
listed once, in docker/prometheus/exported-metrics.txt; every PromQL expression of the dashboard
may use only those. Run: .venv/bin/python -m pytest -q tests/test_deploy.py
"""
from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
EXPORTED_METRICS_FILE = REPO / "docker" / "prometheus" / "exported-metrics.txt"
GRAFANA_DIR = REPO / "docker" / "grafana"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME_RE = re.compile(r"amusd:[A-Za-z0-9_:]+")
SERVER_SERVICES = ("server", "server-cpu")


def load_exported_metrics() -> dict[str, str]:
    """{metric name: type} from exported-metrics.txt."""
    metric_types: dict[str, str] = {}
    for line in EXPORTED_METRICS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        metric_type, name = line.split()[:2]
        metric_types[name] = metric_type
    return metric_types


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((GRAFANA_DIR / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [target["expr"] for target in panel.get("targets", [])]
    return exprs


def series_names(metric_types: dict[str, str]) -> set[str]:
    """Every series name a scrape can contain: counters/gauges as is, histograms with suffixes."""
    names = set()
    for name, metric_type in metric_types.items():
        if metric_type == "histogram":
            names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(name)
    return names


def base_metric(series: str, metric_types: dict[str, str]) -> str:
    """'amusd:x_seconds_bucket' -> 'amusd:x_seconds' for histograms; other names unchanged."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and metric_types.get(base) == "histogram":
            return base
    return series


def host_path(volume: str) -> str | None:
    """'./x:/y:ro' -> './x'; named volumes ('models:/models') -> None."""
    source = volume.split(":", 1)[0]
    return source if source.startswith((".", "/")) else None


# --- exported metric list ------------------------------------------------------------------------

def test_exported_metric_list_is_well_formed():
    metric_types = load_exported_metrics()
    assert len(metric_types) == 26
    assert set(metric_types.values()) == {"histogram", "gauge", "counter"}
    for name, metric_type in metric_types.items():
        assert re.fullmatch(r"amusd:[a-z0-9_]+", name), name
        assert name.endswith("_total") == (metric_type == "counter"), name


# --- Dockerfile ----------------------------------------------------------------------------------

def test_dockerfile_healthcheck_user_setup_and_cmd():
    text = DOCKERFILE.read_text()
    healthcheck = re.search(r"^HEALTHCHECK .*?(?<!\\)\n", text, re.M | re.S)
    assert healthcheck and "http://localhost:8000/health" in healthcheck.group(0)
    assert "urllib" in healthcheck.group(0), "curl is not in the slim image: check with python"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server must not run as root"
    assert "./setup.sh" in text and "pip install" not in text, "install only through setup.sh"
    assert re.search(r"^ENV .*AMUSD_CACHE_DIR=/models", text, re.M | re.S)
    assert re.search(r"^VOLUME /models", text, re.M)
    assert 'CMD ["amusd", "serve", "--config", "configs/default.yaml", "--host", "0.0.0.0"]' in text


def test_dockerfile_variants_choose_base_image_and_torch():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert "python:3.11-slim" in text and "nvidia/cuda:" in text
    assert re.search(r"^FROM base-\$\{VARIANT\}", text, re.M)
    assert 'AMUSD_DEFAULT_TORCH_SPEC="torch==2.13.0"' in text
    assert 'AMUSD_DEFAULT_TORCH_SPEC="torch"' in text


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns
    for needed in ("setup.sh", "pyproject.toml", "engine", "server", "loadtest", "configs"):
        assert not any(fnmatch.fnmatch(needed, p) for p in patterns), needed


def test_serve_config_of_cmd_exists():
    if not (REPO / "configs" / "default.yaml").exists():
        pytest.skip("configs/default.yaml (the image's CMD config) is not written yet")
    yaml.safe_load((REPO / "configs" / "default.yaml").read_text())


# --- docker-compose.yml --------------------------------------------------------------------------

def test_compose_references_existing_files():
    compose = load_compose()
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = REPO / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = host_path(volume)
            if source:
                assert (REPO / source).exists(), f"{name}: {source}"
            else:
                assert volume.split(":")[0] in compose["volumes"], f"{name}: undeclared volume {volume}"


def test_compose_gpu_server_reserves_gpus_0_and_1():
    server = load_compose()["services"]["server"]
    assert server["build"]["args"]["VARIANT"] == "cuda"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and set(d.get("device_ids", [])) == {"0", "1"}
               and "gpu" in d.get("capabilities", []) for d in devices)
    assert {server["environment"]["AMUSD_DRAFT_DEVICE"], server["environment"]["AMUSD_VERIFY_DEVICE"]} \
        == {"cuda:0", "cuda:1"}


def test_compose_environment_names_real_server_settings():
    """Every AMUSD_* variable the compose file sets is a setting `amusd serve` reads."""
    settings = pytest.importorskip("server.settings")
    fields = set(settings.Settings.model_fields)
    for name in SERVER_SERVICES:
        for variable in load_compose()["services"][name]["environment"]:
            assert variable.startswith("AMUSD_") and variable[len("AMUSD_"):].lower() in fields, variable


def test_compose_cpu_variant_is_profiled_and_has_no_gpu():
    services = load_compose()["services"]
    cpu = services["server-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in cpu
    assert services["server"]["profiles"] == ["gpu"]
    for name in SERVER_SERVICES:
        assert "8000:8000" in services[name]["ports"]
        assert "server" in services[name]["networks"]["default"]["aliases"]
        assert "models:/models" in services[name]["volumes"]


def test_prometheus_scrapes_server_metrics_on_port_8000():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = config["scrape_configs"]
    targets = [t for job in jobs if job.get("metrics_path", "/metrics") == "/metrics"
               for static in job.get("static_configs", []) for t in static["targets"]]
    assert "server:8000" in targets
    prometheus = load_compose()["services"]["prometheus"]
    assert "./docker/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]


def test_prometheus_names_ray_replica_metrics_back_to_the_exported_names():
    """Ray exports a replica's `amusd:x` as `ray_amusd_x` (server/ray_serve.ray_metric_name); the
    amusd-ray job's relabeling must give every exported series its name back, so the dashboard
    serves `amusd serve` and `amusd serve-ray` alike."""
    jobs = {job["job_name"]: job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]}
    [rule] = jobs["amusd-ray"]["metric_relabel_configs"]
    assert rule["source_labels"] == ["__name__"] and rule["target_label"] == "__name__"
    replacement = rule["replacement"].replace("${1}", r"\1")
    for name in series_names(load_exported_metrics()):
        ray_name = "ray_" + name.replace(":", "_")
        assert re.fullmatch(rule["regex"], ray_name), ray_name       # Prometheus anchors its regexes
        assert re.sub(rule["regex"], replacement, ray_name) == name
    assert not re.fullmatch(rule["regex"], "ray_serve_num_ongoing_requests_at_replicas")


def test_grafana_datasource_points_at_prometheus():
    compose = load_compose()
    paths = list((GRAFANA_DIR / "provisioning" / "datasources").glob("*.yml"))
    assert paths
    datasources = [d for p in paths for d in yaml.safe_load(p.read_text())["datasources"]]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus and prometheus[0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
    uids = {d["uid"] for d in prometheus}
    for path in (GRAFANA_DIR / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] in uids, panel["title"]


def test_grafana_dashboard_provider_path_is_mounted():
    grafana = load_compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if host_path(v))
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = [p for f in (GRAFANA_DIR / "provisioning" / "dashboards").glob("*.yml")
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert providers
    for provider in providers:
        assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]


# --- dashboard -----------------------------------------------------------------------------------

def test_dashboard_uses_only_exported_metrics_and_covers_them_all():
    metric_types = load_exported_metrics()
    allowed = series_names(metric_types)
    used = {name for expr in dashboard_exprs() for name in METRIC_NAME_RE.findall(expr)}
    assert used, "no PromQL in the dashboard"
    assert used <= allowed, f"not exported: {sorted(used - allowed)}"
    used_bases = {base_metric(name, metric_types) for name in used}
    assert used_bases == set(metric_types), f"not on the dashboard: {sorted(set(metric_types) - used_bases)}"


def test_dashboard_has_the_required_panels():
    exprs = dashboard_exprs()
    joined = "\n".join(exprs)
    assert "histogram_quantile(0.99, sum by (le) (rate(amusd:time_to_first_token_seconds_bucket" in joined
    assert "amusd:inter_token_latency_seconds_bucket" in joined
    assert "rate(amusd:generation_tokens_total" in joined
    assert "amusd:num_requests_waiting" in joined
    assert any("spec_decode_num_accepted_tokens_total" in e and "spec_decode_num_draft_tokens_total" in e
               and "/" in e for e in exprs), "acceptance rate = accepted / drafted"
    assert "rate(amusd:spec_decode_num_rollbacks_total" in joined
    assert "rate(amusd:worker_busy_seconds_total" in joined
    assert "amusd:worker_restarts_total" in joined
    assert "amusd:request_success_total" in joined and "amusd:request_failure_total" in joined
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr


def test_dashboard_json_is_a_grafana_dashboard():
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "amusd.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


# --- docker compose config (only where a compose CLI exists; needs no daemon) ---------------------

def compose_command() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_config_is_valid(profile):
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose CLI on this machine")
    result = subprocess.run([*command, "-f", str(COMPOSE_FILE), "--profile", profile, "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
