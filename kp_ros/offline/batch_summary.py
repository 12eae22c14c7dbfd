"""process_bags' record of a run: DIR/summary.json and summary.csv (every bag of DIR, this
run's results over earlier runs'), and the table it prints."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

CSV_FIELDS = ("bag", "status", "frames", "processed", "keypoints_per_frame", "matches_per_frame",
              "resets", "rejected", "seconds", "host", "error")


def write_summary(out_dir: Path, records: dict, skipped) -> dict:
    """DIR/summary.json (+ .csv): every bag of DIR, this run's records over the previous
    runs' (a skipped bag keeps its last record, marked skipped), and this run's counts.
    Written under a temporary name and renamed, like the bags. Returns this run's part."""
    path = out_dir / "summary.json"
    try:
        known = {r["bag"]: r for r in json.loads(path.read_text()).get("bags", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        known = {}
    this_run = {name: {**known.get(name, {"bag": name}), "status": "skipped"} for name in skipped}
    this_run.update(records)
    known.update(this_run)
    counts = {status: sum(r["status"] == status for r in this_run.values())
              for status in ("done", "skipped", "failed")}
    summary = {"bags": [known[name] for name in sorted(known)], "last_run": counts}
    tmp = out_dir / ".summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)
    tmp = out_dir / ".summary.csv.partial"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in summary["bags"]:
            writer.writerow({k: record.get(k, "") for k in CSV_FIELDS})
    os.replace(tmp, out_dir / "summary.csv")
    return {"bags": [this_run[name] for name in sorted(this_run)], **counts}


def summary_table(summary: dict) -> str:
    lines = [f"process_bags: {summary['done']} done, {summary['skipped']} skipped, "
             f"{summary['failed']} failed",
             f"  {'bag':<28} {'status':<8} {'frames':>6} {'kp/frame':>9} {'m/frame':>8} "
             f"{'resets':>6} {'rejected':>8} {'seconds':>8}  host"]
    for r in summary["bags"]:
        lines.append(f"  {r['bag'][:28]:<28} {r['status']:<8} {r.get('frames', ''):>6} "
                     f"{r.get('keypoints_per_frame', ''):>9} {r.get('matches_per_frame', ''):>8} "
                     f"{r.get('resets', ''):>6} {r.get('rejected', ''):>8} "
                     f"{r.get('seconds', ''):>8}  {r.get('host', '')}")
    return "\n".join(lines)
