"""Collect the bench results in DIR into DIR/REPORT.md plus PNG plots.

    python bench/report.py [--out DIR] [--size full|tiny] [--quick] [--started EPOCH]

Reads what the bench scripts left in DIR (superpoint.md, eloftr.md, node_overhead.json,
live*.json, memory.json, steps.tsv); a part that is missing or failed is reported as
such, never silently skipped. Plots: latency vs input rate, drops vs input rate, stage
breakdown, RSS over time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODE_NAMES = {"superpoint": "superpoint_node", "eloftr": "eloftr_node"}
STAGE_COLORS = {"receive": "#8c564b", "decode": "#e377c2", "preprocess": "#1f77b4", "forward": "#ff7f0e",
                "post-process": "#2ca02c", "message fill": "#9467bd", "publish": "#d62728",
                "other": "#7f7f7f"}


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def machine_info() -> dict:
    info = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "host": platform.node(), "python": platform.python_version(),
            "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
            "load average (1/5/15 min) at report time": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    try:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["memory"] = f"{int(open('/proc/meminfo').readline().split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch
        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        info["cuda"] = (f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
                        if torch.cuda.is_available() else "not available")
    except ImportError:
        info["torch"] = "not importable"
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    info["ROS middleware"] = (f"{os.environ.get('RMW_IMPLEMENTATION', 'default')}, FASTDDS_BUILTIN_TRANSPORTS="
                              f"{os.environ.get('FASTDDS_BUILTIN_TRANSPORTS', 'unset')}")
    return info


def parse_stage_table(text: str) -> dict[str, dict[str, float]] | None:
    """{'reference': {stage: ms}, 'kp_ros': {stage: ms}} from the first markdown table whose
    header has a 'stage' column and columns starting with 'reference' and 'kp_ros' (the
    tables of bench_superpoint.py / bench_eloftr.py). A cell's first number is taken (the
    median in 'median / best' cells); totals and bound rows are left out."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            continue
        cells = [c.strip().strip("*").strip().lower() for c in line.strip().strip("|").split("|")]
        columns = {name: next((j for j, c in enumerate(cells) if c.startswith(name)), None)
                   for name in ("reference", "kp_ros")}
        if not cells or cells[0] != "stage" or None in columns.values():
            continue
        out = {name: {} for name in columns}
        for row in lines[i + 2:]:
            if not row.lstrip().startswith("|"):
                break
            values = [c.strip().strip("*").strip() for c in row.strip().strip("|").split("|")]
            stage = values[0].lower()
            if stage.startswith("total") or "bound" in stage or len(values) <= max(columns.values()):
                continue
            for name, col in columns.items():
                number = re.match(r"[-+]?\d+(\.\d+)?", values[col])
                if number:
                    out[name][values[0]] = float(number.group())
        return out if out["reference"] and out["kp_ros"] else None
    return None


# --- plots ----------------------------------------------------------------------------

def log_rate_axis(ax, rates=None) -> None:
    """Log-scale rate axis, labelled at the tested rates when given (one node per plot)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if rates:
        rates = sorted(set(round(r, 2) for r in rates))
        ax.set_xticks(rates, [f"{r:.3g}" for r in rates], fontsize=8)
    else:
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("input rate (Hz, log scale)")


def plot_live(live_sets: dict[str, dict], out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = []  # (label, node result)
    for tag, live in live_sets.items():
        for key, res in live.get("nodes", {}).items():
            if "steps" in res and res["steps"]:
                label = res["node"] + (f" ({res['threads']} torch thread{'s' * (res['threads'] > 1)})"
                                       if res.get("threads") else "")
                series.append((label, res))
    if not series:
        return []
    written = []
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4.2), squeeze=False)
    for ax, (label, res) in zip(axes[0], series):
        steps = [s for s in res["steps"] if s["latency_ms"]["n"]]
        rates = [s["publish_hz"] for s in steps]
        for stat, style in (("median", "o-"), ("p95", "s--"), ("max", "^:")):
            ax.plot(rates, [s["latency_ms"][stat] for s in steps], style, label=stat)
        period = res["calibration"]["period_ms"]
        ax.axvline(res["calibration"]["rate_hz"], color="gray", lw=0.8, ls="-.", label="model rate")
        ax.axhline(2 * period, color="red", lw=0.8, ls="-.", label="2x frame time")
        log_rate_axis(ax, rates)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("publish -> output latency (ms)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_rate.png", dpi=110)
    plt.close(fig)
    written.append("latency_vs_rate.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, res in series:
        ax.plot([s["publish_hz"] for s in res["steps"]], [s["drop_pct"] for s in res["steps"]], "o-", label=label)
    ax.axhline(5.0, color="red", lw=0.8, ls="--", label="5% drops")
    log_rate_axis(ax)
    ax.set_ylabel("frames not processed (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "drops_vs_rate.png", dpi=110)
    plt.close(fig)
    written.append("drops_vs_rate.png")
    return written


def plot_stages(bench_tables: dict, overhead: dict | None, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for key in NODE_NAMES:
        bars = []  # (label, {stage: ms})
        table = bench_tables.get(key)
        if table:
            bars += [("reference pipeline", table["reference"]), ("kp_ros core", table["kp_ros"])]
        node = (overhead or {}).get("nodes", {}).get(key)
        if node and "median_ms" in node:
            bars.append(("kp_ros node", {s: v for s, v in node["median_ms"].items() if s != "total"}))
        if bars:
            panels.append((key, bars))
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 1.1 * max(len(b) for _, b in panels) * len(panels)),
                             squeeze=False)
    extra = iter(plt.cm.tab20b.colors + plt.cm.Set3.colors)  # distinct from STAGE_COLORS
    colors = dict(STAGE_COLORS)
    for ax, (key, bars) in zip(axes[:, 0], panels):
        seen = set()
        for row, (label, stages) in enumerate(bars):
            left = 0.0
            for stage, ms in stages.items():
                if stage not in colors:
                    colors[stage] = next(extra)
                ax.barh(row, ms, left=left, color=colors[stage], label=None if stage in seen else stage)
                seen.add(stage)
                left += ms
            ax.text(left, row, f" {left:.0f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(bars)), [b[0] for b in bars])
        ax.invert_yaxis()
        ax.set_xlabel("median ms per frame" if key == "superpoint" else "median ms per frame pair")
        ax.set_title(NODE_NAMES[key], fontsize=10)
        ax.margins(x=0.15)
        ax.legend(fontsize=7, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "stage_breakdown.png", dpi=110)
    plt.close(fig)
    return ["stage_breakdown.png"]


def plot_memory(memory: dict | None, out: Path) -> list[str]:
    if not memory or not memory.get("nodes"):
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for res in memory["nodes"].values():
        if res.get("series"):
            t, rss = zip(*res["series"])
            line, = ax.plot(t, rss, label=f"{res['node']} (peak {res['rss_peak_mb']:.0f} MiB, "
                                          f"{res['processed']} frames processed)")
            if res.get("warm_s") is not None:
                ax.axvline(res["warm_s"], color=line.get_color(), lw=0.8, ls=":")
    start, end = memory["meta"].get("stream_s", (None, None))
    if start is not None:
        ax.axvspan(start, end, color="gray", alpha=0.12, label=f"stream ({memory['meta']['rate_hz']:g} Hz)")
    ax.set_xlabel("seconds since the nodes were started")
    ax.set_ylabel("RSS (MiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rss_over_time.png", dpi=110)
    plt.close(fig)
    return ["rss_over_time.png"]


# --- the report -----------------------------------------------------------------------

def read_text(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def summary_rows(overhead, live, memory, bench_tables) -> list[str]:
    rows = ["| | superpoint_node | eloftr_node |", "|---|---:|---:|"]

    def cell(fn):
        out = []
        for key in NODE_NAMES:
            try:
                out.append(fn(key))
            except (KeyError, TypeError, ZeroDivisionError, AttributeError, IndexError):
                out.append("-")
        return out

    def add(label, fn):
        rows.append(f"| {label} | " + " | ".join(cell(fn)) + " |")

    def ref_ratio(key):
        table = bench_tables[key]
        return f"{sum(table['reference'].values()) / sum(table['kp_ros'].values()):.2f}x"

    def lat_at_top(key):
        steps = live["nodes"][key]["steps"]
        top = max(steps, key=lambda s: s["publish_hz"])
        return f"{top['latency_ms']['max']:.0f} ms at {top['publish_hz']:.1f} Hz"

    add("speed-up vs reference pipeline (sum of stage medians)", ref_ratio)
    add("node time per frame, median", lambda k: f"{overhead['nodes'][k]['median_ms']['total']:.1f} ms")
    add("of which model forward", lambda k: f"{overhead['nodes'][k]['median_ms']['forward']:.1f} ms")
    add("overhead (total - forward) / forward (target <= 5%)", lambda k: f"{overhead['nodes'][k]['overhead_pct']:.1f}%")
    add("live: processing rate at saturation", lambda k: f"{live['nodes'][k]['calibration']['rate_hz']:.2f} Hz")
    add("live: highest tested rate with < 5% drops",
        lambda k: f"{live['nodes'][k]['max_rate_under_5pct_hz']:.2f} Hz")
    add("live: max latency at the highest input rate", lat_at_top)
    add("peak RSS (VmHWM)", lambda k: f"{memory['nodes'][k]['rss_peak_mb']:.0f} MiB")

    def memory_trend(key):
        res = memory["nodes"][key]
        slope = "" if res["slope_mb_per_min"] is None else f", {res['slope_mb_per_min']:+.2f} MiB/min"
        return f"{res['growth_mb']:+.1f} MiB in {res['window_s']:.0f} s{slope}"
    add("RSS after warm-up: baseline growth, slope", memory_trend)
    return rows


def build(out: Path, size: str, quick: bool, started: float | None, load_start: str = "") -> str:
    overhead = load_json(out / "node_overhead.json")
    memory = load_json(out / "memory.json")
    live_sets = {p.stem[4:]: load_json(p) for p in sorted(out.glob("live*.json"))}
    live_sets = {k: v for k, v in live_sets.items() if v}
    live = live_sets.get("")
    bench_md = {key: read_text(out / f"{key}.md") for key in NODE_NAMES}
    bench_tables = {key: parse_stage_table(text) for key, text in bench_md.items() if text}
    bench_tables = {k: v for k, v in bench_tables.items() if v}

    plots = []
    for plot in (lambda: plot_stages(bench_tables, overhead, out), lambda: plot_live(live_sets, out),
                 lambda: plot_memory(memory, out)):
        try:
            plots += plot()
        except Exception as exc:  # noqa: BLE001 - a broken plot must not cost the report
            print(f"report: plot failed: {exc!r}", file=sys.stderr)

    info = machine_info()
    if load_start:
        info["load average (1/5/15 min) at start"] = " ".join(load_start.split()[:3])
    elapsed = ""
    if started:
        elapsed = f", bench wall time {(datetime.datetime.now().timestamp() - started) / 60:.1f} min"
    lines = [f"# kp_ros performance report ({size} models{', quick' if quick else ''}{elapsed})", "",
             "Random-init weights with the real architecture sizes (`full`) or tiny ones (`tiny`): no "
             "pretrained weights can be downloaded here, so keypoint / match counts are not those of the "
             "trained models, but the work per frame is (except ELoFTR refinement, which scales with "
             "the number of matches: random weights find very few).", "",
             "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    steps = read_text(out / "steps.tsv")
    if steps:
        lines += ["", "| step | seconds | status | load average (1 min) after |", "|---|---:|---|---:|"]
        for row in steps.splitlines():
            name, seconds, status, load = (row.split("\t") + ["", "", ""])[:4]
            state = {"0": "ok", "missing": "script missing"}.get(status, f"FAILED (exit {status})")
            lines.append(f"| {name} | {seconds} | {state} | {load} |")
    lines += ["", "## Summary", ""] + summary_rows(overhead, live, memory, bench_tables)
    lines += ["", "## kp_ros core vs the reference pipeline", ""]
    for key, name in (("superpoint", "bench_superpoint.py"), ("eloftr", "bench_eloftr.py")):
        lines += [bench_md.get(key) or f"_{name}: no result (see logs/{key}.err)_", ""]
    if "stage_breakdown.png" in plots:
        lines += ["![stage breakdown](stage_breakdown.png)", ""]
    lines += ["## Precision: distance to the machine's limit, resolution scaling", "",
              read_text(out / "precision.md") or "_no result (see logs/precision.err)_", ""]
    if (out / "precision_scaling.png").exists():
        lines += ["![time vs resolution](precision_scaling.png)", ""]
    lines += ["## Node overhead (in-process, per stage)", "",
              read_text(out / "node_overhead.md") or "_no result (see logs/node_overhead.err)_", ""]
    lines += ["## Live stream limits (nodes as processes, DDS)", ""]
    for tag in sorted(live_sets, key=len):
        lines += [read_text(out / f"live{tag}.md") or "", ""]
    if not live_sets:
        lines += ["_no result (see logs/live.err)_", ""]
    lines += [f"![{p}]({p})" for p in plots if p in ("latency_vs_rate.png", "drops_vs_rate.png")] + [""]
    lines += ["## Frames from a plain camera (QoS, transports)", "",
              read_text(out / "interop.md") or "_no result (see logs/interop.err)_", ""]
    lines += ["## Memory", "", read_text(out / "memory.md") or "_no result (see logs/memory.err)_", ""]
    if "rss_over_time.png" in plots:
        lines += ["![RSS over time](rss_over_time.png)", ""]
    lines += ["## Notes", "",
              "- Numbers are from a machine whose cores may be shared with other work; the load "
              "averages above say how busy it was (a load above the core count means the benchmark "
              "shared the CPU). Treat differences under ~20% as noise.",
              "- Memory: dotted lines in the RSS plot mark the end of each node's warm-up (3rd processed "
              "frame); growth and slope are taken after it.",
              "- Latency is measured in the publishing process (publish() -> output callback, one clock). "
              "Drops count every published frame that did not produce a processed frame: keep-latest "
              "drops in the node plus DDS losses (best-effort sensor-data QoS).",
              "- eloftr_node runs with max_frame_gap 0 in the live runs: their input rates follow the "
              "model's speed, and on a CPU the lowest space frames seconds apart, beyond the default "
              "1.5 s that a real camera never nears.", ""]
    report = "\n".join(lines)
    (out / "REPORT.md").write_text(report)
    return report


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--size", default="full")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the bench started")
    parser.add_argument("--load-start", default="", help="/proc/loadavg when the bench started")
    args = parser.parse_args(argv)
    report = build(args.out, args.size, args.quick, args.started, args.load_start)
    print(report)
    return report


if __name__ == "__main__":
    main()
