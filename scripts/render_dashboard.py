"""Render a Grafana dashboard of deploy/grafana/ to a PNG from a real Prometheus.

Grafana is not in Debian's archive (nor on PyPI or npm), so a machine with only those
registries cannot run it; this draws the dashboard's own panels instead: each panel's PromQL
targets, exactly as written in the dashboard JSON, are asked of Prometheus' HTTP API over the
given range and plotted in the dashboard's grid (24 columns, its rows and titles). The
screenshot in docs/observability.md was made this way from a real run (see that doc).

    .venv/bin/python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 \
        --minutes 15 --out docs/img/dashboard.png

Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DASHBOARD = ROOT / "deploy/grafana/dashboards/wayang-fabric.json"
ROW_HEIGHT_IN = 0.34  # one Grafana grid unit (30 px), in inches at the figure's scale


def _query_range(base: str, expr: str, start: float, end: float, step: float) -> list[Any]:
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{query}", timeout=30) as answer:
        body = json.load(answer)
    if body.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {body.get('error')}")
    return list(body["data"]["result"])


def _legend(template: str, labels: dict[str, str]) -> str:
    text = template or "{}"
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text.replace("{{", "").replace("}}", "") or json.dumps(labels)


def _finite(value: str) -> float:
    number = float(value)
    return number if math.isfinite(number) else math.nan


def _expand(expr: str, rate_interval: str, capability: str) -> str:
    return expr.replace("$__rate_interval", rate_interval).replace("$capability", capability)


def render(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = json.loads(Path(args.dashboard).read_text())
    panels = dashboard["panels"]
    end = args.end or time.time()
    start = end - args.minutes * 60
    step = max(5.0, args.minutes * 60 / 240)
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    plt.style.use("dark_background")
    fig = plt.figure(figsize=(24 * 0.8, bottom * ROW_HEIGHT_IN + 0.8), facecolor="#111217")
    fig.suptitle(
        f"{dashboard['title']}  ·  {datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M}"
        f" – {datetime.fromtimestamp(end, UTC):%H:%M} UTC",
        x=0.01,
        ha="left",
        fontsize=14,
        color="#d8d9da",
    )
    top_margin = 0.6 / (bottom * ROW_HEIGHT_IN + 0.8)
    for panel in panels:
        grid = panel["gridPos"]
        left = grid["x"] / 24 + 0.004
        width = grid["w"] / 24 - 0.008
        y0 = (grid["y"] * ROW_HEIGHT_IN) / (bottom * ROW_HEIGHT_IN + 0.8) + top_margin
        height = grid["h"] * ROW_HEIGHT_IN / (bottom * ROW_HEIGHT_IN + 0.8)
        if panel["type"] == "row":
            fig.text(left, 1 - y0 - height * 0.7, panel["title"], fontsize=12, color="#d8d9da")
            continue
        ax = fig.add_axes((left, 1 - y0 - height + 0.012, width, height - 0.03))
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], loc="left", fontsize=10, color="#d8d9da")
        drawn = 0
        for target in panel.get("targets", []):
            expr = _expand(target["expr"], args.rate_interval, args.capability)
            for series in _query_range(args.prometheus, expr, start, end, step)[:8]:
                times = [datetime.fromtimestamp(float(t), UTC) for t, _ in series["values"]]
                values = [_finite(v) for _, v in series["values"]]
                if all(math.isnan(v) for v in values):
                    continue  # nothing to draw (NaN: a quantile of no observations)
                label = _legend(target.get("legendFormat", ""), series["metric"])
                ax.plot(times, values, linewidth=1.4, label=label)
                drawn += 1
        if drawn:
            ax.legend(fontsize=7, loc="upper left", framealpha=0.3)
        else:
            ax.text(
                0.5,
                0.5,
                "No data",
                ha="center",
                va="center",
                color="#8e8e8e",
                transform=ax.transAxes,
            )
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.tick_params(labelsize=7, colors="#9fa7b3")
        ax.set_xlim(datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC))
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_ylabel({"s": "seconds", "ops": "per second"}.get(unit, ""), fontsize=7)
        ax.grid(alpha=0.15)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi, facecolor=fig.get_facecolor())
    print(f"wrote {args.out} ({len(panels)} panels, {args.minutes:g} minutes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default=str(DEFAULT_DASHBOARD))
    parser.add_argument("--minutes", type=float, default=15.0, help="the range drawn")
    parser.add_argument("--end", type=float, help="end of the range (epoch s; default now)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--capability", default=".*", help="what $capability becomes")
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--out", required=True)
    render(parser.parse_args())


if __name__ == "__main__":
    main()
