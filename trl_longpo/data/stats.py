"""Counts per stage and token-length histograms, written as stats.json and a readable stats.md."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import atomic_write_text


def histogram(values: list[int]) -> dict[str, Any]:
    """Power-of-two bins (token lengths span orders of magnitude) plus summary statistics."""
    if not values:
        return {"count": 0, "bins": []}
    bins: Counter[int] = Counter()
    for v in values:
        low = 1
        while low * 2 <= v:
            low *= 2
        bins[low if v > 0 else 0] += 1
    return {
        "count": len(values),
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
        "bins": [{"from": low, "to": max(low * 2 - 1, 0), "count": bins[low]} for low in sorted(bins)],
    }


@dataclass
class RunStats:
    """Every count the pipeline keeps; `stages` maps a stage name to an ordered dict of counts."""

    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)

    def count(self, stage: str, key: str, n: int = 1) -> None:
        self.stages.setdefault(stage, {})
        self.stages[stage][key] = self.stages[stage].get(key, 0) + n

    def set(self, stage: str, key: str, value: int) -> None:
        self.stages.setdefault(stage, {})[key] = value

    def add_length(self, name: str, value: int) -> None:
        self.lengths.setdefault(name, []).append(value)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "token_lengths": {k: histogram(v) for k, v in self.lengths.items()}}


def _bar(count: int, total: int, width: int = 40) -> str:
    return "#" * max(1 if count else 0, round(width * count / total)) if total else ""


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# LongPO data generation report", ""]
    meta = report.get("run", {})
    for key, value in meta.items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "## Counts per stage", ""]
    for stage, counts in report["stages"].items():
        lines += [f"### {stage}", "", "| count | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in counts.items()]
        lines.append("")
    lines += ["## Token lengths", ""]
    for name, hist in report["token_lengths"].items():
        lines.append(f"### {name}")
        lines.append("")
        if not hist["count"]:
            lines += ["(none)", ""]
            continue
        lines.append(
            f"count {hist['count']}, min {hist['min']}, median {hist['median']}, mean {hist['mean']}, max {hist['max']}"
        )
        lines += ["", "```"]
        for b in hist["bins"]:
            lines.append(f"{b['from']:>8}-{b['to']:<8} {b['count']:>7}  {_bar(b['count'], hist['count'])}")
        lines += ["```", ""]
    return "\n".join(lines)


def write_report(output_dir: Path, report: dict[str, Any]) -> None:
    atomic_write_text(output_dir / "stats.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(output_dir / "stats.md", render_markdown(report) + "\n")


def summary_table(report: dict[str, Any]) -> str:
    """A compact plain-text table for the terminal: one line per stage, counts inline."""
    rows = [(stage, ", ".join(f"{k}={v}" for k, v in counts.items())) for stage, counts in report["stages"].items()]
    width = max(len(s) for s, _ in rows) if rows else 5
    out = [f"{'stage':<{width}}  counts", f"{'-' * width}  {'-' * 60}"]
    out += [f"{stage:<{width}}  {counts}" for stage, counts in rows]
    return "\n".join(out)
