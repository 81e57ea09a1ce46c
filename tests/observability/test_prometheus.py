"""A real Prometheus server scrapes a live server; PromQL sees exactly the requests it served."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.observability.conftest import MODEL
from tests.observability.test_deploy import PROMETHEUS_DIR, dashboard_queries

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scrape_config(target: str, directory: Path) -> Path:
    """The deployed config, pointed at ``target`` and scraping every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    [job] = config["scrape_configs"]
    job.update(scrape_interval="1s", static_configs=[{"targets": [target]}])
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Prometheus:
    def __init__(self, binary: str, config: Path, directory: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited; see prometheus.log"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus did not become ready")

    def query(self, promql: str) -> list:
        body = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10).json()
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def wait_value(self, promql: str, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        values: list = []
        while time.monotonic() < deadline:
            values = [float(r["value"][1]) for r in self.query(promql)]
            if values == [expected]:
                return
            time.sleep(0.5)
        raise AssertionError(f"{promql} = {values}, expected {expected}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def test_prometheus_scrapes_the_server_and_counts_its_requests(
    start_server, prometheus_bin, tmp_path
):
    server = start_server()
    prometheus = _Prometheus(
        prometheus_bin, _scrape_config(server.url.removeprefix("http://"), tmp_path), tmp_path
    )
    try:
        prometheus.wait_ready()
        served = 3
        with server.client() as client:
            for i in range(served):
                response = client.post(
                    "/v1/completions",
                    json={"model": MODEL, "prompt": f"count me {i}", "max_tokens": 3},
                )
                assert response.status_code == 200
        prometheus.wait_value('up{job="autoglm"}', 1)
        prometheus.wait_value('sum(autoglm:request_success_total{job="autoglm"})', served)
        prometheus.wait_value(
            f'autoglm:time_to_first_token_seconds_count{{model="{MODEL}"}}', served
        )
        prometheus.wait_value(
            'autoglm:http_requests_total{route="/v1/completions",status="200"}', served
        )
        prometheus.wait_value("autoglm:ready", 1)
        # every dashboard panel is valid PromQL for this Prometheus, with Grafana's variables
        for expr in dashboard_queries():
            prometheus.query(
                expr.replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$model", ".*")
                .replace("$version", ".*")
                .replace("$instance", ".*")
            )
        rules = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        alerts = [r for group in rules for r in group["rules"]]
        assert len(alerts) == 5
        assert all(r["health"] != "err" for r in alerts), alerts
        assert not any(r["state"] == "firing" for r in alerts)
    finally:
        prometheus.stop()
