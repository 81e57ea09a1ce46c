"""The deploy files: valid for promtool, alerts behave, and dashboards ask only for real metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from auto_glm.observability.gpu import NvmlCollector
from tests.observability.conftest import MODEL

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "autoglm-dashboard.json"
_METRIC = re.compile(r"autoglm:[a-z0-9_:]+")


def _promtool(*args: str) -> str:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules_and_the_scrape_config(prometheus_bin, tmp_path):
    assert "SUCCESS: 5 rules found" in _promtool(
        "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")
    )
    # on a copy, with its rule file beside it, as it would be deployed
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    _promtool("check", "config", str(tmp_path / "prometheus.yml"))


def test_each_alert_fires_on_its_condition_and_not_below_it(prometheus_bin):
    _promtool("test", "rules", str(Path(__file__).with_name("alerts_test.yml")))


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_dashboard_and_alerts_ask_only_for_exported_metrics(start_server):
    server = start_server()
    with server.client() as client:  # one request, so the labelled series exist
        assert (
            client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}
            ).status_code
            == 200
        )
    exported = {name for name, _ in server.metrics()}
    # GPU series exist only where NVML finds a device: take their names from the collector
    exported |= {f.name for f in NvmlCollector(None, 0).collect()}
    queries = dashboard_queries()
    assert len(queries) >= 20
    used = {m for q in queries for m in _METRIC.findall(q)}
    used |= set(_METRIC.findall((PROMETHEUS_DIR / "alerts.yml").read_text()))
    assert used - exported == set()
    for panel_needs in (
        "time_to_first_token",
        "inter_token_latency",
        "e2e_request_latency",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "gpu_utilization_perc",
        'status=~"5.."',
    ):
        assert any(panel_needs in q for q in queries), panel_needs


def test_dashboard_panels_have_unique_ids_and_use_the_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_has_a_row_per_model_version() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Versions")
    end = next(i for i, p in enumerate(panels) if p["type"] == "row" and i > start)
    row = panels[start + 1 : end]
    titles = {p["title"] for p in row}
    assert {"Traffic weight", "Error rate by version", "Automatic rollbacks"} <= titles
    for panel in row:
        for target in panel["targets"]:
            assert 'version=~"$version"' in target["expr"]
            assert (
                target["legendFormat"] == "{{model}}@{{version}}" or "@" in target["legendFormat"]
            )
    variables = [v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]]
    assert variables.index("version") == variables.index("model") + 1


def test_dashboard_has_a_row_per_replica() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and "Replicas" in p["title"])
    end = next(i for i, p in enumerate(panels) if p["type"] == "row" and i > start)
    exprs = [t["expr"] for p in panels[start + 1 : end] for t in p["targets"]]
    assert len(exprs) >= 4 and all("by (replica)" in e or "by (le, replica)" in e for e in exprs)
