"""`wsss report`: one self-contained ``report.html`` of a run.

Per-stage mIoU chart, per-class IoU table, the adversarial-erasing rounds, the provenance of every
artifact and sample sheets, with images embedded so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.artifacts import read_provenance
from stages.common.context import RunOptions
from stages.common.errors import ArtifactError
from stages.common.summary import Summary

# Artifacts a report describes, in pipeline order, with the name a reader knows them by.
PIPELINE_ARTIFACTS: tuple[tuple[str, str], ...] = (
    ("cls.h5", "classifier"),
    ("cams.h5", "CAM (mine-ae)"),
    ("seeds.h5", "AE seeds"),
    ("aff.h5", "affinity net"),
    ("refined.h5", "refined"),
    ("pseudo.h5", "pseudo labels"),
    ("seg.h5", "segmenter"),
    ("pred_val.h5", "segmenter"),
    ("seg_gt.h5", "supervised bound net"),
    ("pred_val_gt.h5", "supervised bound"),
)


@dataclass
class ReportConfig:
    """Options of `wsss report`."""

    out: Path | None = None  # None = RUN/report.html
    images: int = 4  # images per sample sheet


def bar_chart(rows: list[tuple[str, float]], width: int = 640) -> str:
    """A horizontal bar chart of (name, percent) rows as inline SVG."""
    bar_h, gap, label_w = 22, 6, 200
    height = len(rows) * (bar_h + gap) + gap
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    scale = (width - label_w - 60) / 100.0
    for i, (name, value) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="13">{html.escape(name)}</text>'
        )
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{max(value, 0) * scale:.1f}" height="{bar_h}" fill="#3b7dd8"/>'
        )
        parts.append(
            f'<text x="{label_w + max(value, 0) * scale + 4:.1f}" y="{y + 15}" font-size="13">{value:.1f}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def embedded_png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
code { background: #f4f4f4; padding: 1px 4px; }
.note { color: #666; font-size: 13px; }
"""


ROUND_COLUMNS = (
    "round",
    "classifier",
    "loss",
    "F1",
    "mined %",
    "erased %",
    "seed precision",
    "seed recall",
    "seed mIoU",
    "coverage %",
    "train s",
    "CAM s",
    "kept",
)


def _round_first(row: dict[str, Any]) -> dict[str, Any]:
    """A round's record in reading order (stored JSON sorts its keys)."""
    ordered = {k: row[k] for k in ROUND_COLUMNS if k in row}
    return {**ordered, **{k: v for k, v in row.items() if k not in ordered}}


def collect(opts: RunOptions) -> dict[str, Any]:
    """Everything the report shows, as plain data (also what tests check)."""
    from stages.evaluate import evaluate_artifact

    dataset = opts.dataset
    provenance_rows, results, rounds = [], [], []
    for name, title in PIPELINE_ARTIFACTS:
        path = opts.path(name)
        if not path.exists():
            continue
        try:
            prov, complete = read_provenance(path)
        except ArtifactError as exc:
            provenance_rows.append({"artifact": name, "what": title, "status": str(exc)})
            continue
        provenance_rows.append(
            {
                "artifact": name,
                "what": title,
                "stage": prov.stage,
                "kind": prov.kind,
                "split": prov.dataset.get("split"),
                "complete": "yes" if complete else "no",
                "fingerprint": prov.fingerprint,
                "size MB": round(path.stat().st_size / 1e6, 2),
                "config": json.dumps(prov.config, sort_keys=True)[:160],
            }
        )
        if prov.kind in ("scores", "labels") and complete:
            split = str(prov.dataset.get("split"))
            if dataset.has_masks(split):
                results.append({"title": title, **evaluate_artifact(path, dataset)})
        if name == "cams.h5" and complete:
            from stages.common.artifacts import open_artifact

            with open_artifact(path) as art:
                rounds = [_round_first(row) for row in art.meta("rounds", []) or []]
    return {
        "provenance": provenance_rows,
        "results": results,
        "rounds": rounds,
        "class_names": list(dataset.class_names),
        "dataset": dataset.name,
    }


def render_html(data: dict[str, Any], sheets: list[Path], run_dir: Path) -> str:
    results = data["results"]
    chart = bar_chart([(f"{r['title']} ({r.get('split')})", float(r["miou"])) for r in results])
    per_class = [
        {"class": name, **{r["title"]: r["per_class_iou"].get(name, float("nan")) for r in results}}
        for name in data["class_names"]
    ]
    summary_rows = [
        {
            "stage": r["title"],
            "split": r.get("split"),
            "mIoU": r["miou"],
            "precision": r.get("precision"),
            "recall": r.get("recall"),
            "coverage": r.get("coverage"),
            "images": r.get("images"),
        }
        for r in results
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>wsss report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>wsss report: {html.escape(str(run_dir))}</h1>",
        f"<p class='note'>dataset {html.escape(data['dataset'])}; mIoU in percent over pixels whose ground "
        "truth is not void. Ground truth is used here only to measure, never to choose.</p>",
        "<h2>mIoU per stage</h2>",
        chart if results else "<p><em>no evaluated artifacts</em></p>",
        table(summary_rows),
        "<h2>Per-class IoU</h2>",
        table(per_class),
        "<h2>Adversarial erasing rounds</h2>",
        table(data["rounds"]),
        "<h2>Sample sheets</h2>",
        *(f"<h3>{html.escape(s.stem)}</h3>{embedded_png(s)}" for s in sheets),
        "<h2>Provenance</h2>",
        table(data["provenance"]),
        "</body></html>",
    ]
    return "\n".join(parts)


def run(opts: RunOptions, cfg: ReportConfig) -> Summary:
    """Write ``report.html`` (atomically) from whatever the run directory holds."""
    from stages.show import ShowConfig
    from stages.show import run as show_run

    data = collect(opts)
    sheets: list[Path] = []
    try:
        sheets = show_run(opts, ShowConfig(images=cfg.images)).artifacts
    except ArtifactError:
        sheets = []
    out = cfg.out or opts.path("report.html")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_html(data, sheets, opts.run_dir), encoding="utf-8")
    tmp.replace(out)
    figures = {r["title"]: r["miou"] for r in data["results"]}
    return Summary("report", artifacts=[out], figures=figures)
