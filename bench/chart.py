"""Charts for docs/performance.md from the benches' JSON: PNGs, drawn with matplotlib (Agg).

    .venv/bin/python bench/chart.py [--latest bench/results/latest.json]
                                    [--prices bench/results/prices.json] [--out-dir docs/img]

- ``performance.png`` from bench/run.py's JSON: tasks/s per system (the median round, with
  whiskers from the slowest to the fastest round), the p50 / p99 of a sequential round trip,
  and the workers' peak RSS (the largest process, and summed over ``--workers`` processes).
- ``prices.png`` from bench/prices.py's JSON, when there is one: each variant's tasks/s and
  p50 against ``all-on`` in the same run (1.0: the same; whiskers: its slowest and fastest
  round against all-on's median).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WAYANG = "#3b6ea8"  # wayang-mq's bars; the others grey
OTHER = "#9a9a9a"


def main(argv: list[str] | None = None) -> int:
    """Draw what there is JSON for; exit 2 with what to run when bench/run.py's is missing."""
    args = _parse(argv)
    latest = _load(args.latest, "bench/run.py", required=True)
    assert latest is not None
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = [performance(latest, args.out_dir / "performance.png")]
    prices = _load(args.prices, "bench/prices.py", required=args.prices_given)
    if prices is not None:
        written.append(price_chart(prices, args.out_dir / "prices.png"))
    for path in written:
        print(f"wrote {path}")
    return 0


def _load(path: Path, script: str, *, required: bool) -> dict[str, Any] | None:
    """The JSON at ``path``; None (and a note) when it is missing and optional."""
    if not path.exists():
        message = f"{path} not found: run `.venv/bin/python {script}` first (it writes it)"
        if required:
            raise SystemExit(f"bench/chart.py: {message}")
        print(f"skipped: {message}", file=sys.stderr)
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bench/chart.py: cannot read {path}: {exc}") from None
    if not isinstance(found, dict):
        raise SystemExit(f"bench/chart.py: {path} is not a {script} result")
    return found


def _rates(entry: dict[str, Any]) -> tuple[float, float, float]:
    """Median, slowest and fastest round, in tasks/s (report.Outcome.as_json's shape; a JSON
    from before ``throughput_min_per_s`` has only the rounds)."""
    rounds = [r["per_s"] for r in entry["throughput_rounds"]]
    low = entry.get("throughput_min_per_s", min(rounds))
    high = entry.get("throughput_max_per_s", max(rounds))
    return float(entry["throughput_per_s"]), float(low), float(high)


def _rss(entry: dict[str, Any]) -> tuple[float, float, int]:
    """The largest worker process's peak RSS, the sum over all of them (MiB), how many."""
    largest = float(entry["worker_peak_rss_mib"])
    summed = entry.get("worker_peak_rss_sum_mib")
    return largest, largest if summed is None else float(summed), entry.get("worker_processes", 1)


def _subtitle(found: dict[str, Any]) -> str:
    machine = found.get("machine", {})
    params = found.get("params", {})
    load = machine.get("load_average_at_start", ["?"])[0]
    return (
        f"{str(found.get('when', '?'))[:10]}, commit {found.get('code', {}).get('commit', '?')}; "
        f"{machine.get('cpus', '?')} CPUs, RabbitMQ {machine.get('rabbitmq', '?')}, "
        f"load {load} at start; {params.get('rounds', '?')} rounds of "
        f"{params.get('tasks_per_round', '?')} tasks, {params.get('window', '?')} outstanding; "
        f"{params.get('workers', 1)} worker process(es) x {params.get('concurrency', '?')} slots"
    )


def performance(latest: dict[str, Any], out: Path) -> Path:
    """tasks/s with min–max whiskers, p50 / p99 latency and peak RSS, one bar per system."""
    systems = latest.get("systems")
    if not systems:
        raise SystemExit("bench/chart.py: the bench/run.py JSON has no systems")
    names = list(systems)
    labels = [systems[n].get("label", n) for n in names]
    colours = [WAYANG if n.startswith("wayang") else OTHER for n in names]
    rates = [_rates(systems[n]) for n in names]
    p50 = [systems[n]["latency_ms"]["p50_ms"] for n in names]
    p99 = [systems[n]["latency_ms"]["p99_ms"] for n in names]
    rss = [_rss(systems[n]) for n in names]

    figure, (left, right, memory) = plt.subplots(1, 3, figsize=(16, 4.4))
    _bars_with_range(left, labels, rates, colours, "{:,.0f}")
    left.set_ylabel("tasks/s (median round; whiskers: slowest–fastest)")
    left.set_title("Throughput, windowed")
    positions = range(len(names))
    width = 0.38
    right.bar([x - width / 2 for x in positions], p50, width, color=colours, label="p50")
    right.bar(
        [x + width / 2 for x in positions], p99, width, color=colours, alpha=0.45, label="p99"
    )
    for x, value in zip(positions, p50, strict=True):
        right.annotate(f"{value:.2f}", (x - width / 2, value), ha="center", va="bottom", size=8)
    right.set_xticks(list(positions), labels, rotation=15)
    right.set_ylabel("ms per round trip, one at a time")
    right.set_title("Latency, sequential (p50 solid, p99 light)")
    _paired_bars(memory, labels, rss, colours)
    figure.suptitle("wayang-mq beside its baselines: bench/run.py", weight="bold")
    figure.text(0.5, 0.005, _subtitle(latest), ha="center", size=8, color="#555555")
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def price_chart(prices: dict[str, Any], out: Path) -> Path:
    """Each variant's tasks/s and p50 against all-on, as horizontal bars around 1.0."""
    found = prices.get("variants")
    if not found:
        raise SystemExit("bench/chart.py: the bench/prices.py JSON has no variants")
    names = list(found)
    labels = names
    ratios = [found[n]["vs_all_on"] for n in names]
    throughput = [(r["throughput"], r["throughput_min"], r["throughput_max"]) for r in ratios]
    p50 = [r["p50"] for r in ratios]
    colours = [OTHER if n == prices.get("baseline", "all-on") else WAYANG for n in names]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 0.55 * len(names) + 1.8), sharey=True)
    rows = list(range(len(names)))[::-1]  # the first variant on top
    medians = [t[0] for t in throughput]
    low = [t[0] - t[1] for t in throughput]
    high = [t[2] - t[0] for t in throughput]
    left.barh(rows, medians, color=colours, xerr=[low, high], capsize=3, ecolor="#333333")
    for row, value in zip(rows, medians, strict=True):
        left.annotate(f"{value:.2f}×", (value, row), xytext=(4, 4), textcoords="offset points")
    left.axvline(1.0, color="#333333", linewidth=0.8)
    left.set_yticks(rows, labels)
    left.set_xlabel("tasks/s against all-on (median; whiskers: slowest–fastest round)")
    left.set_title("Throughput against all-on (> 1: faster)")
    left.set_xlim(0, max(t[2] for t in throughput) * 1.18)
    right.barh(rows, p50, color=colours)
    for row, value in zip(rows, p50, strict=True):
        right.annotate(f"{value:.2f}×", (value, row), xytext=(4, -3), textcoords="offset points")
    right.axvline(1.0, color="#333333", linewidth=0.8)
    right.set_xlabel("p50 round trip against all-on")
    right.set_title("Latency against all-on (< 1: faster)")
    right.set_xlim(0, max(p50) * 1.18)
    figure.suptitle("The price of each guarantee: bench/prices.py", weight="bold")
    figure.text(0.5, 0.005, _subtitle(prices), ha="center", size=8, color="#555555")
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def _paired_bars(
    axes: Axes, labels: list[str], rss: list[tuple[float, float, int]], colours: list[str]
) -> None:
    """Peak RSS: the largest worker process (solid) and the sum over its processes (light;
    an upper bound, a forked child's shared pages count twice), the process count on top."""
    positions = range(len(labels))
    width = 0.38
    largest = [r[0] for r in rss]
    summed = [r[1] for r in rss]
    axes.bar([x - width / 2 for x in positions], largest, width, color=colours)
    axes.bar([x + width / 2 for x in positions], summed, width, color=colours, alpha=0.45)
    for x, (one, total, count) in zip(positions, rss, strict=True):
        axes.annotate(f"{one:.0f}", (x - width / 2, one), ha="center", va="bottom", size=8)
        axes.annotate(
            f"{total:.0f} ({count}p)", (x + width / 2, total), ha="center", va="bottom", size=8
        )
    axes.set_xticks(list(positions), labels, rotation=15)
    axes.set_ylabel("MiB, peak RSS (VmHWM)")
    axes.set_title("Worker memory (largest process solid, sum light)")


def _bars_with_range(
    axes: Axes,
    labels: list[str],
    values: list[tuple[float, float, float]],
    colours: list[str],
    fmt: str,
) -> None:
    """Bars at the median with whiskers to the min and max, each labelled."""
    positions = list(range(len(labels)))
    medians = [v[0] for v in values]
    errors = [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]
    axes.bar(positions, medians, color=colours, yerr=errors, capsize=4, ecolor="#333333")
    for x, value in zip(positions, medians, strict=True):
        axes.annotate(
            fmt.format(value), (x, value), xytext=(8, 2), textcoords="offset points", size=8
        )
    axes.set_xticks(positions, labels, rotation=15)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--latest", type=Path, default=RESULTS / "latest.json", help="bench/run.py's JSON"
    )
    parser.add_argument(
        "--prices",
        type=Path,
        default=None,
        help="bench/prices.py's JSON (default bench/results/prices.json, skipped if missing)",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "img")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.prices_given = args.prices is not None
    args.prices = args.prices or RESULTS / "prices.json"
    return args


if __name__ == "__main__":
    sys.exit(main())
