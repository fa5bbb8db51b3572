"""What ``wayang-mq dev`` adds for watching the stack: a metrics port per daemon, and a private
Prometheus scraping them and the broker with the alert rules of ``deploy/prometheus``.

The Prometheus is started only when its binary is installed (Debian's ``prometheus``
package; ``scripts/setup`` installs it) and not refused with ``--no-prometheus``. Its
configuration is written into the state directory on every start, with the job names of
``deploy/prometheus/prometheus.yml``, so the dashboards of ``deploy/grafana`` and
``scripts/render_dashboard.py`` work against it unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from wayang_mq.core.private_files import private_dir
from wayang_mq.dev.nodes import LOOPBACK, free_port
from wayang_mq.dev.supervise import DaemonSpec

#: deploy/prometheus in a source checkout (absent from an installed wheel: then no rules)
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL = "5s"  # shorter than deploy/'s 15 s: a demo's minutes show on the dashboard
#: the job of each daemon kind, as deploy/prometheus/prometheus.yml names them
JOBS = {
    "worker": "wayang-worker",
    "reaper": "wayang-reaper",
    "control-plane": "wayang-control-plane",
}


@dataclass
class Monitoring:
    """The metrics port of each daemon, and the Prometheus watching them (if any)."""

    ports: dict[str, int] = field(default_factory=dict)  # daemon name -> its --metrics-port
    kinds: dict[str, str] = field(default_factory=dict)  # daemon name -> its kind
    prometheus_port: int | None = None

    def metrics_args(self, name: str, kind: str) -> tuple[str, ...]:
        """``--metrics-port N`` for one daemon, a free port picked once per stack start."""
        if name not in self.ports:
            self.ports[name] = free_port()
            self.kinds[name] = kind
        return ("--metrics-port", str(self.ports[name]))

    @property
    def prometheus_url(self) -> str | None:
        """Where the private Prometheus answers, if one runs."""
        if self.prometheus_port is None:
            return None
        return f"http://{LOOPBACK}:{self.prometheus_port}"

    def metrics_urls(self) -> dict[str, str]:
        """Each daemon's ``/metrics`` URL, by name."""
        return {name: f"http://{LOOPBACK}:{port}/metrics" for name, port in self.ports.items()}

    def prometheus(self, state_dir: Path, broker_prometheus: str | None) -> DaemonSpec | None:
        """The private Prometheus to run, its config written; None if it is not installed."""
        binary = shutil.which("prometheus")
        if binary is None:
            return None
        home = private_dir(state_dir / "prometheus")
        self.prometheus_port = self.prometheus_port or free_port()
        rules = []
        if RULES.is_file():
            shutil.copyfile(RULES, home / "alerts.yml")
            rules = ["alerts.yml"]
        # JSON is YAML: no YAML writer needed, and every value is quoted safely
        (home / "prometheus.yml").write_text(
            json.dumps(self.config(broker_prometheus, rules), indent=2) + "\n"
        )
        command = (
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.prometheus_port}",
        )
        return DaemonSpec("prometheus", "prometheus", command, {}, home / "prometheus.log")

    def config(self, broker_prometheus: str | None, rules: list[str]) -> dict[str, object]:
        """The scrape configuration: one job per daemon kind, and the broker's plugin."""
        jobs: dict[str, list[str]] = {}
        for name, port in self.ports.items():
            jobs.setdefault(JOBS[self.kinds[name]], []).append(f"{LOOPBACK}:{port}")
        scrape: list[dict[str, object]] = [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ]
        if broker_prometheus is not None:
            broker = urlsplit(broker_prometheus).netloc
            scrape.append({"job_name": "rabbitmq", "static_configs": [{"targets": [broker]}]})
            scrape.append(
                {
                    "job_name": "rabbitmq-queues",
                    "metrics_path": "/metrics/detailed",
                    "params": {"family": ["queue_coarse_metrics", "queue_consumer_count"]},
                    "static_configs": [{"targets": [broker]}],
                }
            )
        return {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": rules,
            "scrape_configs": scrape,
        }
