"""What an operator would see: the dashboard's panels drawn from Prometheus query results with matplotlib (Grafana
itself is not installable here). `python grafana/snapshot.py --prometheus URL --minutes 10 --out docs/x.png`
draws the last minutes of a running cluster; tests call `render`."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from harness.prom import DASHBOARDS, dashboard_targets, query_range, substitute  # noqa: E402


def render(prom: str, start: float, end: float, out: Path, dashboard: Path = DASHBOARDS / "prefixroute.json",
           rate_interval: str = "30s") -> int:
    """Draw every panel; returns how many panels had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[str, str]]] = {}
    for title, legend, expr in dashboard_targets(dashboard):
        panels.setdefault(title, []).append((legend, expr))
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    step = max(1.0, (end - start) / 200)
    with_data = 0
    for ax, (title, targets) in zip(axes.flat, panels.items()):
        drawn = 0
        for legend, expr in targets:
            for series in query_range(prom, substitute(expr, rate_interval), start, end, step):
                pts = [(float(t) - start, float(v)) for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
                if not pts:
                    continue
                name = legend
                for k, v in series["metric"].items():
                    name = name.replace("{{" + k + "}}", v)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name[:40])
                drawn += 1
        with_data += drawn > 0
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=7)
        if drawn:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return with_data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    end = time.time()
    n = render(args.prometheus, end - 60 * args.minutes, end, args.out)
    print(f"{args.out}: {n} panels with data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
