"""What a run found: each system's numbers, the ratios, the printed table and the JSON."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import Drain, Latency, Throughput

LABELS = {
    "raw": "raw aio-pika",
    "wayang": "wayang-mq",
    "celery": "celery",
    "dramatiq": "dramatiq",
    "dramatiq-confirmed": "dramatiq confirmed",
    "wayang-metrics": "wayang +metrics",
}
#: wayang-mq against each baseline, in this order (the pairs of the ratios)
BASELINES = ("raw", "celery", "dramatiq", "dramatiq-confirmed")
TARGET_THROUGHPUT_VS_RAW = 1.0  # issue 16: at least raw aio-pika's throughput
TARGET_P50_VS_RAW = 1.2  # and a median round trip within 1.2x raw aio-pika's
TARGET_METRICS_ON_VS_OFF = 0.95  # issue 12: metrics on cost at most 5% of throughput
#: issue 16's targets, per pair: (pair, measure, "at_least" or "at_most", bound). Against
#: Dramatiq unconfirmed the throughput ratio is reported (the issue: "reach for" it), not a
#: target.
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("wayang/raw", "throughput", "at_least", TARGET_THROUGHPUT_VS_RAW),
    ("wayang/celery", "throughput", "at_least", 3.0),
    ("wayang/dramatiq-confirmed", "throughput", "at_least", 2.0),
    ("wayang/raw", "p50", "at_most", TARGET_P50_VS_RAW),
    ("wayang/dramatiq", "p50", "at_most", 1.0),
    ("wayang/dramatiq-confirmed", "p50", "at_most", 1.0),
)


@dataclass(frozen=True)
class Outcome:
    """One system's numbers over all rounds."""

    system: str
    drain: Drain | None  # the worker alone, emptying a queue filled before it started
    throughputs: tuple[Throughput, ...]  # one per round
    latency: Latency  # every round's samples together
    worker_peak_rss_mib: float
    worker_cpu_s: float  # summed over the throughput runs
    dispatcher_cpu_s: float  # this process, summed over the throughput runs
    broker_cpu_s: float | None  # the private node, summed over the throughput runs
    #: every worker process's peak RSS added up (worker_peak_rss_mib is the largest one)
    worker_peak_rss_sum_mib: float | None = None
    worker_processes: int = 1  # how many processes the RSS figures cover

    @property
    def per_s(self) -> float:
        """The median round's throughput, in tasks per second."""
        return statistics.median(t.per_s for t in self.throughputs)

    def per_task_us(self, cpu_s: float | None) -> float | None:
        """CPU microseconds per task of the throughput runs."""
        tasks = sum(t.tasks for t in self.throughputs)
        return None if cpu_s is None else cpu_s / tasks * 1e6

    @property
    def total_cpu_us(self) -> float | None:
        """Worker + dispatcher + broker CPU per task: what a task costs the whole machine."""
        if self.broker_cpu_s is None:
            return None
        return self.per_task_us(self.worker_cpu_s + self.dispatcher_cpu_s + self.broker_cpu_s)

    def as_json(self) -> dict[str, Any]:
        """The JSON form, with derived per-task figures."""
        return {
            "label": LABELS[self.system],
            "worker_drain": None
            if self.drain is None
            else {**asdict(self.drain), "per_s": round(self.drain.per_s, 1)},
            "throughput_per_s": round(self.per_s, 1),
            "throughput_rounds": [
                {**asdict(t), "per_s": round(t.per_s, 1)} for t in self.throughputs
            ],
            "latency_ms": {k: round(v, 3) for k, v in asdict(self.latency).items()},
            # the largest single worker process's peak (VmHWM); the sum over all of them
            "worker_peak_rss_mib": round(self.worker_peak_rss_mib, 1),
            "worker_peak_rss_sum_mib": _round(self.worker_peak_rss_sum_mib),
            "worker_processes": self.worker_processes,
            "cpu_us_per_task": {
                "worker": _round(self.per_task_us(self.worker_cpu_s)),
                "dispatcher": _round(self.per_task_us(self.dispatcher_cpu_s)),
                "broker": _round(self.per_task_us(self.broker_cpu_s)),
                "total": _round(self.total_cpu_us),
            },
            "best_round_per_s": round(self.max_per_s, 1),  # = throughput_max_per_s
            "throughput_min_per_s": round(self.min_per_s, 1),
            "throughput_max_per_s": round(self.max_per_s, 1),
        }

    @property
    def min_per_s(self) -> float:
        """The slowest round's throughput."""
        return min(t.per_s for t in self.throughputs)

    @property
    def max_per_s(self) -> float:
        """The fastest round's throughput."""
        return max(t.per_s for t in self.throughputs)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def ratios(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    """wayang-mq against each baseline in the same run: throughput (median rounds; higher is
    better), latency and RSS; and wayang-mq with metrics on against off
    (``wayang-metrics/wayang``)."""
    by = {o.system: o for o in outcomes}
    found = {}
    wayang = by.get("wayang")
    for other in BASELINES:
        if wayang is not None and other in by:
            found[f"wayang/{other}"] = _ratio(wayang, by[other])
    metered = by.get("wayang-metrics")
    if metered is not None and wayang is not None:
        found["wayang-metrics/wayang"] = _ratio(metered, wayang)
    return found


def _ratio(one: Outcome, base: Outcome) -> dict[str, float]:
    return {
        "drain": round(one.drain.per_s / base.drain.per_s, 3)
        if one.drain and base.drain
        else float("nan"),
        "throughput": round(one.per_s / base.per_s, 3),
        "p50": round(one.latency.p50_ms / base.latency.p50_ms, 3),
        "p99": round(one.latency.p99_ms / base.latency.p99_ms, 3),
        "peak_rss": round(one.worker_peak_rss_mib / base.worker_peak_rss_mib, 3),
        "peak_rss_sum": round(one.worker_peak_rss_sum_mib / base.worker_peak_rss_sum_mib, 3)
        if one.worker_peak_rss_sum_mib and base.worker_peak_rss_sum_mib
        else float("nan"),
        "total_cpu": round(one.total_cpu_us / base.total_cpu_us, 3)
        if base.total_cpu_us and one.total_cpu_us
        else float("nan"),
    }


def targets(found: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """The issue's targets, and whether they were met: the keys against raw aio-pika as
    before, and ``checks``, one per pair and measure of ``TARGETS`` that this run has."""
    met: dict[str, Any] = {}
    vs_raw = found.get("wayang/raw")
    if vs_raw is not None:
        met |= {
            "throughput_vs_raw_at_least": TARGET_THROUGHPUT_VS_RAW,
            "p50_vs_raw_at_most": TARGET_P50_VS_RAW,
            "throughput_met": vs_raw["throughput"] >= TARGET_THROUGHPUT_VS_RAW,
            "p50_met": vs_raw["p50"] <= TARGET_P50_VS_RAW,
        }
    checks = []
    for pair, measure, bound_kind, bound in TARGETS:
        if pair in found:
            value = found[pair][measure]
            ok = value >= bound if bound_kind == "at_least" else value <= bound
            checks.append(
                {"pair": pair, "measure": measure, bound_kind: bound, "value": value, "met": ok}
            )
    if checks:
        met["checks"] = checks
    metrics = found.get("wayang-metrics/wayang")
    if metrics is not None:
        met |= {
            "metrics_on_vs_off_throughput_at_least": TARGET_METRICS_ON_VS_OFF,
            "metrics_cost_met": metrics["throughput"] >= TARGET_METRICS_ON_VS_OFF,
        }
    return met or None


def header(
    script: str, version: dict[str, str], rabbitmq_version: str, load: tuple[float, ...]
) -> dict[str, Any]:
    """What every bench JSON starts with: when, the command, the code, the machine (with the
    load average when the run started, ``load``, and now)."""
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", script, *sys.argv[1:]]),
        "code": version,
        "machine": {
            **machine(rabbitmq_version),
            "load_average_at_start": [round(x, 2) for x in load],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }


def machine(rabbitmq_version: str) -> dict[str, Any]:
    """The machine, the broker and the client libraries the numbers came from."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    packages = ("aio-pika", "aiormq", "pamqp", "celery", "kombu", "amqp", "dramatiq", "pika")
    for package in (*packages, "cryptography"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version,
        "packages": versions,
    }


def code_version(root: Path) -> dict[str, Any]:
    """Which code was measured: the commit, and a digest of the package as it was on disk
    (uncommitted edits included), so two runs can be told apart."""
    digest = hashlib.sha256()
    for path in sorted([*root.glob("wayang_mq/*.py"), *root.glob("workers/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = done.stdout.strip()
    return {"commit": commit, "package_sha256": digest.hexdigest()[:16]}


def table(outcomes: list[Outcome], found: dict[str, dict[str, float]]) -> str:
    """The summary people read: absolute numbers, then the ratios and the targets."""
    head = (
        f"{'system':<27}{'tasks/s':>9}{'min–max':>14}{'p50 ms':>8}{'p99 ms':>8}{'drain/s':>9}"
        f"{'RSS MiB: proc':>14}{'sum':>7}{'CPU µs/task: worker':>21}{'dispatcher':>12}"
        f"{'broker':>8}{'total':>8}"
    )
    lines = [head, "-" * len(head)]
    for o in outcomes:
        cpu = [o.per_task_us(s) for s in (o.worker_cpu_s, o.dispatcher_cpu_s, o.broker_cpu_s)]
        spread = f"{o.min_per_s:,.0f}–{o.max_per_s:,.0f}"
        lines.append(
            f"{LABELS[o.system]:<27}{o.per_s:>9,.0f}{spread:>14}{o.latency.p50_ms:>8.2f}"
            f"{o.latency.p99_ms:>8.2f}{_cell(o.drain.per_s if o.drain else None, 9)}"
            f"{o.worker_peak_rss_mib:>14.1f}"
            f"{'-' if o.worker_peak_rss_sum_mib is None else f'{o.worker_peak_rss_sum_mib:.1f}':>7}"
            f"{_cell(cpu[0], 21)}{_cell(cpu[1], 12)}{_cell(cpu[2], 8)}"
            f"{_cell(o.total_cpu_us, 8)}"
        )
    for name, ratio in found.items():
        lines.append(
            f"{name:<27}{ratio['throughput']:>8.2f}×{'':>14}{ratio['p50']:>7.2f}×"
            f"{ratio['p99']:>7.2f}×{ratio['drain']:>8.2f}×{ratio['peak_rss']:>13.2f}×"
            f"{ratio['peak_rss_sum']:>6.2f}×{'':>41}{ratio['total_cpu']:>7.2f}×"
        )
    met = targets(found) or {}
    if met.get("checks"):
        lines.append("\ntargets (issue 16), ratios of this run:")
    for check in met.get("checks", []):
        bound = check.get("at_least", check.get("at_most"))
        sign = "≥" if "at_least" in check else "≤"
        lines.append(
            f"  {check['pair']:<27}{check['measure']:<11}{check['value']:>6.2f}× "
            f"(target {sign} {bound:g}×): {'met' if check['met'] else 'NOT met'}"
        )
    if "wayang/dramatiq" in found:
        lines.append(
            f"  {'wayang/dramatiq':<27}{'throughput':<11}"
            f"{found['wayang/dramatiq']['throughput']:>6.2f}× "
            "(reported: Dramatiq's unconfirmed sends, no target)"
        )
    if "metrics_cost_met" in met:
        on_off = found["wayang-metrics/wayang"]["throughput"]
        lines.append(
            f"metrics on / off: throughput {on_off:.3f}× "
            f"(target ≥ {TARGET_METRICS_ON_VS_OFF:g}: "
            f"{'met' if met['metrics_cost_met'] else 'NOT met'})"
        )
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width},.0f}"
