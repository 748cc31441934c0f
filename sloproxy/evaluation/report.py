"""The SLO report: attainment, goodput and latency percentiles per class and overall, runs side by side.

:func:`summarize` is the one place the arithmetic lives (the simulator's sweeps call it too);
the rest only formats its output: a terminal table, the ``--json`` object, a figure, an HTML page.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..slo_outcome import CLIENT_ERROR, FAILED, OK, REFUSED, TIMEOUT
from .records import RequestRecord, RunMeta, outcome, run_classes, slo_verdict

PERCENTILES = (50, 90, 99)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    points = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)  # linear interpolation
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, points, strict=True)}


def _rate(count: float, duration_s: float) -> float | None:
    return count / duration_s if duration_s > 0 else None


def summarize_block(records: Sequence[RequestRecord], classes: dict[str, dict], duration_s: float) -> dict[str, Any]:
    """One block of the report (overall, or one class) over ``records``.

    Outcomes partition the requests (``ok + rejected + errors + timeouts + client_errors == requests``).
    Client errors are not judged against the SLO, so attainment is ``slo_met / slo_judged``.
    """
    kinds = Counter(outcome(r) for r in records)
    verdicts = [slo_verdict(r, classes) for r in records]
    met = sum(1 for v in verdicts if v is True)
    judged = sum(1 for v in verdicts if v is not None)
    ok = [r for r in records if r.status == "ok"]
    tokens = sum(r.output_tokens or 0 for r in ok)
    normalized = [r.e2e_s / r.output_tokens for r in ok if r.e2e_s is not None and r.output_tokens]
    return {
        "requests": len(records),
        "ok": kinds[OK],
        "rejected": kinds[REFUSED],
        "errors": kinds[FAILED],
        "timeouts": kinds[TIMEOUT],
        "client_errors": kinds[CLIENT_ERROR],
        "slo_judged": judged,
        "slo_met": met,
        "slo_attainment": met / judged if judged else None,
        "goodput_rps": _rate(met, duration_s),
        "throughput_rps": _rate(len(ok), duration_s),
        "output_tokens_per_s": _rate(tokens, duration_s),
        "ttft_s": _percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": _percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        "normalized_latency_s": float(np.mean(normalized)) if normalized else None,
    }


def run_setup(meta: RunMeta, records: Sequence[RequestRecord]) -> dict[str, Any]:
    """What the run was (its meta, in the report's words): the reader's context for every number."""
    seen = {r.slo_class for r in records}
    classes = run_classes(meta)
    return {
        "source": meta.source,
        "workload": meta.workload,
        "trace": meta.trace,
        "window_s": meta.window_s,
        "requests": len(records),
        "duration_s": meta.duration_s,
        "rate_rps": _rate(len(records), meta.duration_s),
        "rate_scale": meta.extra.get("scale", meta.extra.get("rate_scale")),
        "models": sorted({r.model for r in records}),
        "fleet": meta.fleet,
        "target": meta.target,
        "speedup": meta.speedup,
        "policy": meta.extra.get("policy"),
        "slo_classes": {
            **{name: bounds for name, bounds in classes.items() if name in seen},
            **{name: {} for name in sorted(seen - set(classes))},  # not declared: no targets
        },
    }


def summarize(meta: RunMeta, records: Sequence[RequestRecord]) -> dict[str, Any]:
    """One run's report: ``{"label", "requests", "duration_s", "setup", "overall", "classes"}``.

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
        "setup": run_setup(meta, records),
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
    ("client_errors", "count"),
    ("slo_judged", "count"),
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
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
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


# ----- what a reader needs besides the numbers ------------------------------------------------------
# One line per metric (the HTML page's last column).
METRIC_HELP: dict[str, str] = {
    "duration_s": "Workload span in trace seconds; the rates divide by it.",
    "requests": "Requests sent.",
    "ok": "Answered in full (HTTP 200, the stream reached its end).",
    "rejected": "Refused under load (429 / 503): an SLO miss.",
    "errors": "Failed (5xx, a broken connection or stream): an SLO miss.",
    "timeouts": "No complete reply within the client's timeout: an SLO miss.",
    "client_errors": "The request's own fault (4xx but 408 / 429): not judged.",
    "slo_judged": "All requests but client errors: attainment's denominator.",
    "slo_met": "Answered with every target of its class held.",
    "slo_attainment": "slo_met ÷ slo_judged.",
    "goodput_rps": "Requests that met their SLO, per second.",
    "throughput_rps": "Answered requests per second, on time or not.",
    "output_tokens_per_s": "Output tokens of answered requests, per second.",
    "ttft_s": "arrival → first content",
    "tpot_s": "time per token after the first",
    "e2e_s": "arrival → last byte",
    "normalized_latency_s": "Mean of end to end ÷ output tokens, answered requests.",
}
SLO_RULE = (
    "TTFT (time to first token): arrival to the first content the client gets; TPOT (time per output token): "
    "the mean after the first, per request; end to end: arrival to the reply's last byte. "
    "A request meets its SLO when it is answered in full and every target of its class holds: time to first "
    "token (a non-streamed reply: the whole reply within TTFT + TPOT * (tokens - 1)), mean time per output "
    "token, end to end. Refused (429/503), failed (5xx, broken) and timed-out requests miss. Client errors "
    "(4xx other than 408/429) are not judged: attainment is met ÷ judged."
)


def _seconds(value: float) -> str:
    return f"{value:g} s" if value >= 1 else f"{value * 1e3:g} ms"


def targets_text(bounds: dict[str, Any]) -> str:
    """``TTFT ≤ 1.5 s, TPOT ≤ 100 ms/token`` for one class's bounds."""
    parts = []
    if bounds.get("ttft_s") is not None:
        parts.append(f"TTFT ≤ {_seconds(bounds['ttft_s'])}")
    if bounds.get("tpot_s") is not None:
        parts.append(f"TPOT ≤ {_seconds(bounds['tpot_s'])}/token")
    if bounds.get("deadline_s") is not None:
        parts.append(f"end to end ≤ {_seconds(bounds['deadline_s'])}")
    return ", ".join(parts) or "no target (any answer meets it)"


def _fleet_text(setup: dict[str, Any]) -> str:
    fleet = setup.get("fleet")
    if fleet:
        groups = Counter((i.get("engine"), i.get("model"), i.get("profile")) for i in fleet)
        return ", ".join(f"{n} x {e} {m} ({p})" for (e, m, p), n in groups.items())
    if setup["source"] == "simulate" and setup.get("target"):
        return f"{setup['target']} (instances not recorded)"
    return f"behind {setup['target']} (not recorded)" if setup.get("target") else "not recorded"


def _workload_text(setup: dict[str, Any], shares: dict[str, float]) -> str:
    text = setup["workload"].rsplit("/", 1)[-1] or "-"
    if setup.get("models"):
        text += ", model " + ", ".join(setup["models"])
    if shares:
        text += ", classes " + ", ".join(f"{name} {100 * share:.0f}%" for name, share in shares.items())
    return text


def _arrivals_text(setup: dict[str, Any]) -> str:
    rate = setup.get("rate_rps")
    text = f"{setup['requests']} requests over {setup['duration_s']:.0f} s"
    if rate is not None:
        text += f", {rate:.2f} req/s mean"
    if setup.get("rate_scale") not in (None, 1, 1.0):
        text += f" (the workload's rate x{setup['rate_scale']:g})"
    return text


def _trace_text(setup: dict[str, Any]) -> str:
    if not setup.get("trace"):
        return "not recorded in the run file"
    window = setup.get("window_s")
    return setup["trace"] + (f", trace seconds {window[0]:g}-{window[1]:g}" if window else "")


def _run_text(summary: dict[str, Any]) -> str:
    setup = summary["setup"]
    how = "simulated" if setup["source"] == "simulate" else f"replayed live at speedup {setup['speedup']:g}"
    policy = setup.get("policy")
    return f"{summary['label']}: " + (f"policy {policy}, " if policy and policy != summary["label"] else "") + how


def setup_rows(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(what, texts) describing the runs: one text when every run agrees, else one per run."""

    def merged(texts: list[str]) -> list[str]:
        if len(set(texts)) == 1:
            return texts[:1]
        return [f"{s['label']}: {t}" for s, t in zip(summaries, texts, strict=True)]

    def shares(summary: dict[str, Any]) -> dict[str, float]:
        total = summary["overall"]["requests"] or 1
        return {name: block["requests"] / total for name, block in summary["classes"].items()}

    targets: dict[str, str] = {}
    for summary in summaries:
        for name, bounds in summary["setup"]["slo_classes"].items():
            targets.setdefault(name, targets_text(bounds))
    return [
        ("SLO targets", [f"{name}: {text}" for name, text in targets.items()] or ["none"]),
        ("workload", merged([_workload_text(s["setup"], shares(s)) for s in summaries])),
        ("arrivals", merged([_arrivals_text(s["setup"]) for s in summaries])),
        ("trace", merged([_trace_text(s["setup"]) for s in summaries])),
        ("fleet", merged([_fleet_text(s["setup"]) for s in summaries])),
        ("runs", [_run_text(s) for s in summaries]),
    ]


# ----- figure -----------------------------------------------------------------------------------
# Attainment and CDF shares on a "nines" axis: linear up to 90%, then -log10(1 - share) above it, so
# 90 -> 99 -> 99.9% are equal steps and 97% sits visibly below 99% while 0-90% keeps half the height.
# Shares at or above NINES_CAP are drawn at the top (labelled 100%).
NINES_CAP = 99.95
NINES_LINEAR = 2.5  # the height of 0-90%, in units of one nine
NINES_TICKS = (0.0, 25.0, 50.0, 75.0, 90.0, 97.0, 99.0, 99.9)
OUTCOMES = (  # (summary fields -> count, label) for the outcome bars
    ("met", "met SLO"),
    ("late", "answered, late"),
    ("rejected", "refused\n(429/503)"),
    ("errors", "failed\n(5xx, broken)"),
    ("timeouts", "timed out"),
    ("client_errors", "client error\n(not judged)"),
)


def _nines(values: Any) -> Any:
    share = np.clip(np.asarray(values, dtype=np.float64), 0.0, NINES_CAP)
    tail = NINES_LINEAR - 1.0 - np.log10(1.0 - np.maximum(share, 90.0) / 100.0)
    return np.where(share <= 90.0, share * NINES_LINEAR / 90.0, tail)


def _from_nines(values: Any) -> Any:
    height = np.asarray(values, dtype=np.float64)
    tail = 100.0 * (1.0 - 10.0 ** -(np.maximum(height, NINES_LINEAR) - NINES_LINEAR + 1.0))
    return np.where(height <= NINES_LINEAR, height * 90.0 / NINES_LINEAR, tail)


def _nines_axis(axis: Any) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter

    axis.set_yscale("function", functions=(_nines, _from_nines))
    axis.set_ylim(0.0, NINES_CAP)
    axis.yaxis.set_major_locator(FixedLocator([*NINES_TICKS, NINES_CAP]))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: "100%" if v >= NINES_CAP else f"{v:g}%"))
    axis.yaxis.set_minor_locator(FixedLocator([]))


def _log_seconds_axis(axis: Any, low: float, high: float) -> None:
    """A log axis labelled in plain seconds (ms below one second): 1-2-5 steps, or 1-3, or decades,
    whichever gives at most six labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    axis.set_xscale("log")
    axis.set_xlim(low, high)
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for steps in ((1, 2, 5), (1, 3), (1,)):
        major = [m * 10.0**d for d in decades for m in steps if low <= m * 10.0**d <= high]
        if len(major) <= 6:
            break
    axis.xaxis.set_major_locator(FixedLocator(major))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _seconds(float(f"{v:.3g}")).replace(" ", "\u2009")))
    axis.xaxis.set_minor_locator(FixedLocator([m * 10.0**d for d in decades for m in range(2, 10)]))
    axis.xaxis.set_minor_formatter(NullFormatter())


def _cdf_panel(
    axis: Any,
    runs: Sequence[tuple[RunMeta, Sequence[RequestRecord]]],
    summaries: Sequence[dict[str, Any]],
    field: str,
    bound: str,
    title: str,
) -> None:
    """CDF of ``field`` over the judged requests of the classes that set ``bound`` (all classes if none
    does), with their targets as dashed lines and the unanswered share as the final jump at the right."""
    targets: dict[float, list[str]] = {}
    for summary in summaries:
        for name, bounds in summary["setup"]["slo_classes"].items():
            if bounds.get(bound) is not None and name not in targets.get(bounds[bound], []):
                targets.setdefault(bounds[bound], []).append(name)
    chosen = {name for names in targets.values() for name in names}
    curves = []
    for (_meta, records), summary in zip(runs, summaries, strict=True):
        judged = [r for r in records if outcome(r) != CLIENT_ERROR and (not chosen or r.slo_class in chosen)]
        answered = [r for r in judged if r.status == "ok"]
        values = np.sort([max(getattr(r, field), 1e-4) for r in answered if getattr(r, field) is not None])
        unanswered = len(judged) - len(answered)
        total = len(values) + unanswered  # answered without this measure (one-token TPOT) are left out
        curves.append((summary["label"], values, total, unanswered))
    everything = np.concatenate([c[1] for c in curves] + [np.asarray(list(targets), dtype=np.float64)])
    if not len(everything):
        axis.set_axis_off()
        axis.set_title(f"{title}: no data")
        return
    low = 10.0 ** math.floor(math.log10(max(float(everything.min()), 1e-3)))
    top = float(everything.max()) * 1.3
    edge = top * 2.0  # the "not answered" column, right of every measured value
    high = edge * 1.6
    _log_seconds_axis(axis, low, high)
    axis.axvspan(top * 1.35, high, color="#000000", alpha=0.06, lw=0)
    axis.text(edge, 1.0, "not\nanswered", ha="center", va="bottom", fontsize=8, color="#444444")
    for index, (label, values, total, unanswered) in enumerate(curves):
        if not total:
            continue
        shares = 100.0 * np.arange(1, len(values) + 1) / total
        xs = np.concatenate([[low], values, [edge, edge]])
        ys = np.concatenate([[0.0], shares, [shares[-1] if len(shares) else 0.0, 100.0]])
        axis.step(xs, ys, where="post", color=f"C{index}", lw=1.8, label=label)
        if unanswered:
            answered_share = 100.0 * len(values) / total
            axis.plot([edge], [answered_share], marker="_", ms=14, mew=2, color=f"C{index}")
    _nines_axis(axis)
    for value, names in targets.items():
        axis.axvline(value, color="#b00000", ls="--", lw=1.2)
        axis.annotate(
            f"{', '.join(names)} target {_seconds(value)}",
            (value, 0.03),
            xycoords=("data", "axes fraction"),
            xytext=(3, 0),
            textcoords="offset points",
            rotation=90,
            va="bottom",
            ha="left",
            fontsize=8,
            color="#b00000",
            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    classes = ", ".join(sorted(chosen)) if chosen else "all classes"
    axis.set_title(f"{title} ({classes})", fontsize=11)
    axis.set_xlabel("seconds (trace time, log scale)")
    axis.set_ylabel("share of judged requests at or below x")
    axis.grid(True, which="major", alpha=0.3)


def _attainment_panel(axis: Any, summaries: Sequence[dict[str, Any]]) -> None:
    groups = ["overall"]
    for summary in summaries:
        groups += [c for c in summary["classes"] if c not in groups]
    width = 0.8 / max(len(summaries), 1)
    for i, summary in enumerate(summaries):
        positions = np.arange(len(groups)) + (i - (len(summaries) - 1) / 2) * width
        for position, group in zip(positions, groups, strict=True):
            block = summary["overall"] if group == "overall" else summary["classes"].get(group)
            share = None if block is None else block["slo_attainment"]
            if share is None:
                axis.text(position, 0.5, "-", ha="center", va="bottom", fontsize=8)
                continue
            axis.bar(position, 100.0 * share, width * 0.92, color=f"C{i}")
            axis.text(position, 100.0 * share, f"{100 * share:.1f}%", ha="center", va="bottom", fontsize=8)
    labels = []
    for group in groups:
        targets = next(
            (s["setup"]["slo_classes"][group] for s in summaries if group in s["setup"]["slo_classes"]), None
        )
        labels.append(group if targets is None else f"{group}\n{targets_text(targets)}")
    axis.set_xticks(np.arange(len(groups)), labels, fontsize=8)
    axis.set_xlim(-0.5, len(groups) - 0.5)
    _nines_axis(axis)
    axis.set_ylabel("SLO attainment (met ÷ judged)")
    axis.set_title("SLO attainment per class", fontsize=11, pad=14)
    axis.grid(True, axis="y", alpha=0.3)


def _outcomes_panel(axis: Any, summaries: Sequence[dict[str, Any]]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    width = 0.8 / max(len(summaries), 1)
    peak = 1
    for i, summary in enumerate(summaries):
        counts = outcome_counts(summary)
        positions = np.arange(len(OUTCOMES)) + (i - (len(summaries) - 1) / 2) * width
        for position, (name, _label) in zip(positions, OUTCOMES, strict=True):
            count = counts[name]
            peak = max(peak, count)
            if count:
                axis.bar(position, count, width * 0.92, color=f"C{i}")
            axis.text(position, max(count, 0.8), str(count), ha="center", va="bottom", fontsize=8)
    axis.set_yscale("log")
    axis.set_ylim(0.8, peak * 4)
    ticks = [10.0**d for d in range(0, math.ceil(math.log10(peak * 4)) + 1)]
    axis.yaxis.set_major_locator(FixedLocator(ticks))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    axis.yaxis.set_minor_locator(NullLocator())
    axis.set_xticks(np.arange(len(OUTCOMES)), [label for _, label in OUTCOMES], fontsize=8)
    axis.set_xlim(-0.5, len(OUTCOMES) - 0.5)  # zero counts draw no bar: keep their groups in view
    axis.set_ylabel("requests (log scale)")
    axis.set_title("How requests ended (all classes)", fontsize=11, pad=14)
    axis.grid(True, axis="y", alpha=0.3)


def outcome_counts(summary: dict[str, Any]) -> dict[str, int]:
    """How a run's requests ended, one count per bar of the outcomes panel (they sum to its requests)."""
    block = summary["overall"]
    counts = {**block, "met": block["slo_met"], "late": block["ok"] - block["slo_met"]}
    return {name: counts[name] for name, _ in OUTCOMES}


def report_figure(runs: Sequence[tuple[RunMeta, Sequence[RequestRecord]]], summaries: Sequence[dict[str, Any]]) -> Any:
    """The report's matplotlib figure: what was run and its SLO targets on top; TTFT, TPOT and end-to-end
    CDFs against the targets (unanswered requests as the last step); attainment per class; how requests
    ended. The caller closes it (``matplotlib.pyplot.close``)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    rows = setup_rows(summaries)
    lines = []
    for name, texts in rows:
        wrapped = textwrap.wrap(f"{name}: {'; '.join(texts)}", 175, subsequent_indent="    ")
        lines += wrapped
    header_in = 0.55 + 0.2 * len(lines) + 0.45
    height = 9.6 + header_in
    fig = plt.figure(figsize=(16, height))
    title = "SLO report: " + " vs ".join(str(s["label"]) for s in summaries)
    fig.text(0.012, 1 - 0.18 / height, title, fontsize=15, weight="bold", va="top")
    fig.text(0.012, 1 - 0.55 / height, "\n".join(lines), fontsize=9.5, va="top", linespacing=1.45)
    handles = [Line2D([], [], color=f"C{i}", lw=6) for i in range(len(summaries))]
    fig.legend(
        handles,
        [str(s["label"]) for s in summaries],
        loc="upper right",
        bbox_to_anchor=(0.99, 1 - 0.08 / height),
        ncol=min(len(summaries), 6),
        fontsize=10,
        frameon=False,
        title="runs",
    )
    grid = fig.add_gridspec(
        2, 6, top=1 - header_in / height, bottom=0.9 / height, left=0.055, right=0.975, hspace=0.42, wspace=0.9
    )
    ttft, tpot_axis, e2e = fig.add_subplot(grid[0, 0:2]), fig.add_subplot(grid[0, 2:4]), fig.add_subplot(grid[0, 4:6])
    _cdf_panel(ttft, runs, summaries, "ttft_s", "ttft_s", "Time to first token")
    _cdf_panel(tpot_axis, runs, summaries, "tpot_s", "tpot_s", "Time per output token")
    _cdf_panel(e2e, runs, summaries, "e2e_s", "deadline_s", "End to end")
    _attainment_panel(fig.add_subplot(grid[1, 0:3]), summaries)
    _outcomes_panel(fig.add_subplot(grid[1, 3:6]), summaries)
    return fig


def figure_png(runs: Sequence[tuple[RunMeta, Sequence[RequestRecord]]], summaries: Sequence[dict[str, Any]]) -> bytes:
    """:func:`report_figure` as PNG bytes. Its metadata carries ``Title`` and ``Description``: the setup
    lines as text, then each run's attainment and outcome counts (what the bars show)."""
    from matplotlib import pyplot as plt

    fig = report_figure(runs, summaries)
    lines = [f"{name}: {'; '.join(texts)}" for name, texts in setup_rows(summaries)]
    for summary in summaries:
        share = summary["overall"]["slo_attainment"]
        counts = ", ".join(f"{name} {count}" for name, count in outcome_counts(summary).items())
        attained = "-" if share is None else f"{100 * share:.1f}%"
        lines.append(f"{summary['label']}: attainment {attained}; outcomes: {counts}")
    buffer = io.BytesIO()
    fig.savefig(
        buffer, format="png", dpi=100, metadata={"Title": fig.texts[0].get_text(), "Description": "\n".join(lines)}
    )
    plt.close(fig)
    return buffer.getvalue()


# ----- HTML -------------------------------------------------------------------------------------
def render_html(summaries: Sequence[dict[str, Any]], png: bytes, sources: Sequence[str]) -> str:
    """One self-contained page: what was run and its targets, the figure, then every metric side by side
    (one column group per class, one column per run) with a one-line explanation each."""
    esc = html.escape
    sections = ["overall"]
    for summary in summaries:
        sections += [c for c in summary["classes"] if c not in sections]
    runs = len(summaries)
    head = "<tr><th rowspan='2' class='first'>metric</th>" + "".join(
        f"<th colspan='{runs}' class='group'>{esc(section)}</th>" for section in sections
    )
    head += "<th rowspan='2' class='help'>what it means</th></tr><tr>"
    head += "".join(f"<th class='run'>{esc(str(s['label']))}</th>" for _ in sections for s in summaries) + "</tr>"

    def row(name: str, cells: list[str], help_text: str, strong: bool = False) -> str:
        tag = " class='key'" if strong else ""
        return (
            f"<tr{tag}><td class='name'>{esc(name)}</td>"
            + "".join(f"<td>{esc(c)}</td>" for c in cells)
            + f"<td class='help'>{esc(help_text)}</td></tr>"
        )

    body = [
        row("duration_s", [f"{s['duration_s']:.1f}" for _ in sections for s in summaries], METRIC_HELP["duration_s"])
    ]
    for name, kind in _ROWS:
        blocks = [s["overall"] if sec == "overall" else s["classes"].get(sec) for sec in sections for s in summaries]
        if kind == "pct":
            for p in PERCENTILES:
                help_text = f"Median {METRIC_HELP[name]}, answered requests." if p == 50 else f"{p}th percentile of it."
                cells = [_format(b[name][f"p{p}"], "time") if b else "-" for b in blocks]
                body.append(row(f"{name[:-2]} p{p} (s)", cells, help_text))
        else:
            cells = [_format(b[name], kind) if b else "-" for b in blocks]
            body.append(row(name, cells, METRIC_HELP[name], strong=name == "slo_attainment"))
    setup = "".join(
        f"<tr><th>{esc(name)}</th><td>{'<br>'.join(esc(t) for t in texts)}</td></tr>"
        for name, texts in setup_rows(summaries)
    )
    files = "".join(f"<li><code>{esc(s)}</code></li>" for s in sources)
    image = base64.b64encode(png).decode("ascii")
    title = "SLO report: " + " vs ".join(str(s["label"]) for s in summaries)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:1600px}"
        "h1{font-size:1.5em;margin-bottom:.3em}h2{font-size:1.15em;margin:1.4em 0 .4em}"
        "table{border-collapse:collapse;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}"
        "table.setup th{text-align:left;background:#f3f3f3;white-space:nowrap}table.setup td{text-align:left}"
        "td.name{text-align:left;font-family:monospace;white-space:nowrap}"
        "th.group{background:#e8e8e8}th.run{background:#f6f6f6;font-weight:normal;white-space:nowrap}"
        "th.first{text-align:left}"
        "td.help,th.help{text-align:left;color:#555;font-size:13px}tr.key td{font-weight:bold;background:#fff8dc}"
        "p.rule{max-width:70em}img{max-width:100%;border:1px solid #ddd}"
        "</style></head><body>"
        f"<h1>{esc(title)}</h1>"
        f"<table class='setup'>{setup}</table>"
        f"<p class='rule'><b>How a request is judged.</b> {esc(SLO_RULE)}</p>"
        f"<p><img alt='latency CDFs against the SLO targets, attainment per class, how requests ended' "
        f"src='data:image/png;base64,{image}'></p>"
        "<h2>Every metric, side by side</h2>"
        f"<table class='metrics'>{head}{''.join(body)}</table>"
        f"<h2>Run files</h2><ul>{files}</ul></body></html>\n"
    )
