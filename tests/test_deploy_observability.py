"""deploy/prometheus and deploy/grafana: Prometheus loads them, the alerts fire on what they are
written for, and every metric a dashboard or an alert asks for is one that is exported.

Given the files as shipped, when promtool checks them and their rule unit tests run, then both
pass; and when a real broker is scraped, every ``rabbitmq_*`` name they use is among the
broker plugin's families (the ``wayang_*`` names are checked against the daemons themselves in
test_metrics_exported).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"

# the per-queue families deploy/prometheus/prometheus.yml asks the broker's detailed endpoint for
DETAILED_FAMILIES = ("queue_coarse_metrics", "queue_consumer_count")
_NAME = re.compile(r"(?<![\w\\.])((?:wayang|rabbitmq)_[a-z0-9_]+)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def promtool() -> str:
    """The promtool binary (Debian's prometheus package; scripts/setup installs it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: run ./scripts/setup (it installs prometheus)")
    return path


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of every panel and template variable of every dashboard."""
    exprs = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            exprs += [target["expr"] for target in panel.get("targets", [])]
        exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def alert_exprs() -> list[str]:
    """Every alert's expression in deploy/prometheus/alerts.yml (a flat YAML read: the file
    keeps each ``expr:`` on one line, which promtool's check keeps honest)."""
    lines = (PROMETHEUS_DIR / "alerts.yml").read_text().splitlines()
    return [line.split("expr:", 1)[1].strip() for line in lines if line.strip().startswith("expr:")]


def metric_names(exprs: list[str]) -> set[str]:
    """The metric names the expressions select (label values in quotes are not names)."""
    names: set[str] = set()
    for expr in exprs:
        names |= set(_NAME.findall(_QUOTED.sub('""', expr)))
    return names


def exported_series(exposition: str) -> set[str]:
    """The series names an exposition can hold, from its ``# TYPE`` lines: a histogram's
    family gives _bucket, _sum and _count; a counter's is written with its _total."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        names.add(name)
        if kind in ("histogram", "summary"):
            names |= {name + suffix for suffix in _HISTOGRAM_SERIES}
    return names


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


def test_prometheus_loads_the_config_and_rules() -> None:
    # Given the shipped scrape config and rules; when promtool checks them; then both load
    # (the config check also loads every rule file it names).
    tool = promtool()
    checked = subprocess.run(
        [tool, "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "10 rules found" in checked.stdout + checked.stderr


def test_every_alert_fires_on_its_series() -> None:
    # Given synthetic series per alert (alerts.test.yml); when promtool evaluates the rules
    # over them; then each alert fires when and with the labels and text it should, and stays
    # quiet on healthy series.
    tested = subprocess.run(
        [promtool(), "test", "rules", "alerts.test.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules_text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    alerts = set(re.findall(r"- alert: (\w+)", rules_text))
    tests_text = (PROMETHEUS_DIR / "alerts.test.yml").read_text()
    assert alerts == set(re.findall(r"alertname: (\w+)", tests_text)), "an alert has no test"


def test_dashboards_are_wellformed() -> None:
    # Given every dashboard; then each panel queries the provisioned data source, every
    # template variable it uses is defined, and no two panels overlap on the grid.
    uid = re.search(r"uid: (\S+)", DATASOURCES.read_text())
    assert uid is not None
    assert DASHBOARDS, "deploy/grafana/dashboards holds no dashboard"
    for path in DASHBOARDS:
        dashboard: dict[str, Any] = json.loads(path.read_text())
        variables = {v["name"] for v in dashboard["templating"]["list"]} | {"__rate_interval"}
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{path.name}: {panel['title']} overlaps"
                    cells.add((x, y))
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid.group(1), panel["title"]
            assert panel["targets"], f"{panel['title']} has no query"
            for target in panel["targets"]:
                used = set(re.findall(r"\$(\w+)", target["expr"]))
                assert used <= variables, f"{panel['title']}: undefined {used - variables}"


def test_broker_metrics_used_are_exported(rabbitmq: Any) -> None:
    # Given a real broker with the rabbitmq_prometheus plugin; when its aggregated and
    # detailed endpoints are scraped as prometheus.yml scrapes them; then every rabbitmq_*
    # name a dashboard or alert uses is there.
    base = rabbitmq.prometheus_url
    families = "&".join(f"family={family}" for family in DETAILED_FAMILIES)
    exported = exported_series(scrape(f"{base}/metrics"))
    exported |= exported_series(scrape(f"{base}/metrics/detailed?{families}"))
    used = {name for name in metric_names(dashboard_exprs() + alert_exprs())}
    broker_names = {name for name in used if name.startswith("rabbitmq_")}
    assert broker_names, "the dashboards use none of the broker's metrics"
    assert broker_names <= exported, f"not exported by the broker: {broker_names - exported}"
