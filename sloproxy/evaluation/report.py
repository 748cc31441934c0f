"""The SLO report: attainment, goodput and latency percentiles per class and overall, runs side by side.

:func:`summarize` is the one place the arithmetic lives (the simulator's sweeps call it too);
the rest only formats its output: a terminal table, the ``--json`` object, a figure, an HTML page.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .records import RequestRecord, RunMeta, run_classes, slo_met

PERCENTILES = (50, 90, 99)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    points = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)  # linear interpolation
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}


def _rate(count: float, duration_s: float) -> float | None:
    return count / duration_s if duration_s > 0 else None


def summarize_block(records: Sequence[RequestRecord], classes: dict[str, dict], duration_s: float) -> dict[str, Any]:
    """One block of the report (overall, or one class) over ``records``."""
    ok = [r for r in records if r.status == "ok"]
    met = sum(1 for r in records if slo_met(r, classes))
    tokens = sum(r.output_tokens or 0 for r in ok)
    normalized = [r.e2e_s / r.output_tokens for r in ok if r.e2e_s is not None and r.output_tokens]
    return {
        "requests": len(records),
        "ok": len(ok),
        "rejected": sum(1 for r in records if r.status == "rejected"),
        "errors": sum(1 for r in records if r.status == "error"),
        "timeouts": sum(1 for r in records if r.status == "timeout"),
        "slo_met": met,
        "slo_attainment": met / len(records) if records else None,
        "goodput_rps": _rate(met, duration_s),
        "throughput_rps": _rate(len(ok), duration_s),
        "output_tokens_per_s": _rate(tokens, duration_s),
        "ttft_s": _percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": _percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        "normalized_latency_s": float(np.mean(normalized)) if normalized else None,
    }


def summarize(meta: RunMeta, records: Sequence[RequestRecord]) -> dict[str, Any]:
    """One run's report: ``{"label", "requests", "duration_s", "overall", "classes"}``.

    Classes appear in the order the run declares them, then any others its records use; a class
    with no requests is left out. Rates divide by ``meta.duration_s`` (None when it is zero).
    """
    classes = run_classes(meta)
    seen = {r.slo_class for r in records}
    order = [c for c in classes if c in seen] + sorted(seen - set(classes))
    return {
        "label": meta.label,
        "requests": len(records),
        "duration_s": meta.duration_s,
        "overall": summarize_block(records, classes, meta.duration_s),
        "classes": {
            name: summarize_block([r for r in records if r.slo_class == name], classes, meta.duration_s)
            for name in order
        },
    }


def report_json(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One run: its summary. Several: ``{"runs": [...]}`` plus the first run's label, overall and classes."""
    if len(summaries) == 1:
        return summaries[0]
    first = summaries[0]
    return {"runs": list(summaries), "label": first["label"], "overall": first["overall"], "classes": first["classes"]}


# ----- text -------------------------------------------------------------------------------------
_ROWS: tuple[tuple[str, str], ...] = (
    ("requests", "count"),
    ("ok", "count"),
    ("rejected", "count"),
    ("errors", "count"),
    ("timeouts", "count"),
    ("slo_met", "count"),
    ("slo_attainment", "share"),
    ("goodput_rps", "rate"),
    ("throughput_rps", "rate"),
    ("output_tokens_per_s", "rate"),
    ("ttft_s", "pct"),
    ("tpot_s", "pct"),
    ("e2e_s", "pct"),
    ("normalized_latency_s", "time"),
)


def _format(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "count":
        return str(value)
    if kind == "share":
        return f"{100.0 * value:.1f}%"
    if kind == "rate":
        return f"{value:.3g}"
    return f"{value:.3f}"


def table_rows(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per run) for overall then every class any run has."""
    sections = ["overall"]
    for summary in summaries:
        sections += [c for c in summary["classes"] if c not in sections]
    rows: list[tuple[str, list[str]]] = [("duration_s", [f"{s['duration_s']:.1f}" for s in summaries])]
    for section in sections:
        blocks = [s["overall"] if section == "overall" else s["classes"].get(section) for s in summaries]
        rows.append((f"[{section}]", ["" for _ in summaries]))
        for name, kind in _ROWS:
            if kind == "pct":
                for p in PERCENTILES:
                    cells = [_format(b[name][f"p{p}"], "time") if b else "-" for b in blocks]
                    rows.append((f"  {name[:-2]} p{p} (s)", cells))
            else:
                rows.append((f"  {name}", [_format(b[name], kind) if b else "-" for b in blocks]))
    return rows


def render_text(summaries: Sequence[dict[str, Any]]) -> str:
    """A terminal table: one row per metric, one column per run."""
    rows = table_rows(summaries)
    labels = [str(s["label"]) for s in summaries]
    first = max(len(name) for name, _ in rows)
    widths = [max(len(label), *(len(cells[i]) for _, cells in rows)) for i, label in enumerate(labels)]
    lines = [" " * first + "  " + "  ".join(label.rjust(w) for label, w in zip(labels, widths, strict=True))]
    for name, cells in rows:
        lines.append(name.ljust(first) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


# ----- figure and HTML --------------------------------------------------------------------------
def figure_png(runs: Sequence[tuple[RunMeta, Sequence[RequestRecord]]], summaries: Sequence[dict[str, Any]]) -> bytes:
    """TTFT and E2E CDFs per run (ok requests) and SLO attainment per class per run, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (ax_ttft, ax_e2e, ax_bar) = plt.subplots(1, 3, figsize=(16, 4.8))
    for (_meta, records), summary in zip(runs, summaries, strict=True):
        ok = [r for r in records if r.status == "ok"]
        for axis, field in ((ax_ttft, "ttft_s"), (ax_e2e, "e2e_s")):
            values = np.sort([getattr(r, field) for r in ok if getattr(r, field) is not None])
            if len(values):
                axis.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=summary["label"])
    for axis, title in ((ax_ttft, "TTFT"), (ax_e2e, "End to end")):
        axis.set_xscale("symlog", linthresh=0.01)
        axis.set_ylim(0.0, 1.02)
        axis.set_xlabel("seconds (trace time)")
        axis.set_ylabel("share of ok requests")
        axis.set_title(f"{title} CDF")
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    groups = ["overall"]
    for summary in summaries:
        groups += [c for c in summary["classes"] if c not in groups]
    width = 0.8 / max(len(summaries), 1)
    for i, summary in enumerate(summaries):
        values = []
        for group in groups:
            block = summary["overall"] if group == "overall" else summary["classes"].get(group)
            values.append(100.0 * (block["slo_attainment"] or 0.0) if block else 0.0)
        ax_bar.bar(np.arange(len(groups)) + i * width, values, width, label=summary["label"])
    ax_bar.set_xticks(np.arange(len(groups)) + width * (len(summaries) - 1) / 2, groups)
    ax_bar.set_ylim(0, 100)
    ax_bar.set_ylabel("SLO attainment (%)")
    ax_bar.set_title("SLO attainment per class")
    ax_bar.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def render_html(summaries: Sequence[dict[str, Any]], png: bytes, sources: Sequence[str]) -> str:
    """One self-contained page: the side-by-side table and the figure inlined as base64."""
    head = "".join(f"<th>{html.escape(str(s['label']))}</th>" for s in summaries)
    body = []
    for name, cells in table_rows(summaries):
        tag = ' class="section"' if name.startswith("[") else ""
        body.append(
            f"<tr{tag}><td>{html.escape(name.strip())}</td>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            + "</tr>"
        )
    files = "".join(f"<li><code>{html.escape(s)}</code></li>" for s in sources)
    image = base64.b64encode(png).decode("ascii")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>sloproxy SLO report</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        "tr.section td{background:#eee;font-weight:bold}img{max-width:100%}"
        "</style></head><body><h1>SLO report</h1>"
        f"<ul>{files}</ul><table><tr><th></th>{head}</tr>{''.join(body)}</table>"
        f"<p><img alt='latency CDFs and SLO attainment' src='data:image/png;base64,{image}'></p></body></html>\n"
    )
