"""Run records and the SLO report, on hand-made runs whose every figure is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sloproxy.cli import main
from sloproxy.evaluation.records import RequestRecord, RunMeta, read_run, slo_met, tpot, write_run
from sloproxy.evaluation.report import (
    METRIC_HELP,
    OUTCOMES,
    figure_png,
    outcome_counts,
    render_html,
    render_text,
    report_figure,
    report_json,
    summarize,
)

CLASSES = {
    "interactive": {"ttft_s": 1.5, "tpot_s": 0.10, "deadline_s": None},
    "batch": {"ttft_s": None, "tpot_s": None, "deadline_s": 60.0},
}


def meta(label: str = "run", duration_s: float = 10.0, classes: dict | None = None) -> RunMeta:
    return RunMeta(
        label=label,
        source="replay",
        workload="w.jsonl",
        target="http://127.0.0.1:1",
        speedup=1.0,
        duration_s=duration_s,
        slo_classes=CLASSES if classes is None else classes,
        started_at="2025-01-01T00:00:00+00:00",
    )


def ok(rid: str, slo_class: str, ttft: float, e2e: float, tokens: int) -> RequestRecord:
    return RequestRecord(
        id=rid,
        model="m",
        slo_class=slo_class,
        arrival_s=0.0,
        status="ok",
        http_status=200,
        ttft_s=ttft,
        tpot_s=tpot(e2e, ttft, tokens),
        e2e_s=e2e,
        prompt_tokens=100,
        output_tokens=tokens,
        expected_output_tokens=tokens,
    )


def failed(rid: str, slo_class: str, status: str, http_status: int | None = None) -> RequestRecord:
    return RequestRecord(id=rid, model="m", slo_class=slo_class, arrival_s=0.0, status=status, http_status=http_status)


# interactive: i1 met, i2 TTFT too late, i3 TPOT too slow (0.2 s), i4 one token (no TPOT) met, i5 rejected
# batch: b1 met, b2 past the 60 s deadline, b3 error, b4 timeout, b5 met (one token)
RECORDS = [
    ok("i1", "interactive", 0.5, 5.5, 51),  # tpot 0.1 exactly: met
    ok("i2", "interactive", 2.0, 3.0, 11),
    ok("i3", "interactive", 1.0, 21.0, 101),
    ok("i4", "interactive", 1.4, 1.4, 1),
    failed("i5", "interactive", "rejected", 429),
    ok("b1", "batch", 10.0, 50.0, 401),
    ok("b2", "batch", 30.0, 61.0, 11),
    failed("b3", "batch", "error", 500),
    failed("b4", "batch", "timeout"),
    ok("b5", "batch", 2.0, 2.0, 1),
]


def test_tpot_definition() -> None:
    assert tpot(5.5, 0.5, 51) == pytest.approx(0.1)
    assert tpot(1.0, 1.0, 1) is None
    assert tpot(None, 1.0, 5) is None


def test_slo_met_each_case() -> None:
    met = {r.id: slo_met(r, CLASSES) for r in RECORDS}
    assert met == {
        "i1": True,
        "i2": False,
        "i3": False,
        "i4": True,
        "i5": False,
        "b1": True,
        "b2": False,
        "b3": False,
        "b4": False,
        "b5": True,
    }
    unbounded = {"free": {"ttft_s": None, "tpot_s": None, "deadline_s": None}}
    assert slo_met(ok("x", "free", 100.0, 900.0, 10), unbounded)
    assert slo_met(ok("x", "unknown-class", 100.0, 900.0, 10), CLASSES)
    assert not slo_met(failed("x", "free", "rejected", 503), unbounded)


def test_summary_arithmetic() -> None:
    summary = summarize(meta(duration_s=10.0), RECORDS)
    assert summary["label"] == "run" and summary["requests"] == 10 and summary["duration_s"] == 10.0
    overall = summary["overall"]
    assert (overall["requests"], overall["ok"], overall["rejected"], overall["errors"], overall["timeouts"]) == (
        10,
        7,
        1,
        1,
        1,
    )
    assert overall["slo_met"] == 4
    assert overall["slo_attainment"] == pytest.approx(0.4)
    assert overall["goodput_rps"] == pytest.approx(0.4)
    assert overall["throughput_rps"] == pytest.approx(0.7)
    assert overall["output_tokens_per_s"] == pytest.approx((51 + 11 + 101 + 1 + 401 + 11 + 1) / 10.0)
    # ok TTFTs sorted: 0.5 1.0 1.4 2.0 2.0 10 30 -> linear interpolation
    assert overall["ttft_s"]["p50"] == pytest.approx(2.0)
    assert overall["ttft_s"]["p90"] == pytest.approx(10.0 + 0.4 * 20.0)
    assert overall["ttft_s"]["p99"] == pytest.approx(10.0 + 0.94 * 20.0)
    # TPOT only for replies of two or more tokens: 0.1, 0.1, 0.2, 0.1, 3.1
    assert overall["tpot_s"]["p50"] == pytest.approx(0.1)
    e2e = [5.5, 3.0, 21.0, 1.4, 50.0, 61.0, 2.0]
    assert overall["e2e_s"]["p50"] == pytest.approx(5.5)
    normalized = [5.5 / 51, 3.0 / 11, 21.0 / 101, 1.4 / 1, 50.0 / 401, 61.0 / 11, 2.0 / 1]
    assert overall["normalized_latency_s"] == pytest.approx(sum(normalized) / 7)
    assert len(e2e) == overall["ok"]

    interactive, batch = summary["classes"]["interactive"], summary["classes"]["batch"]
    assert list(summary["classes"]) == ["interactive", "batch"]
    assert (interactive["requests"], interactive["slo_met"], interactive["rejected"]) == (5, 2, 1)
    assert interactive["slo_attainment"] == pytest.approx(0.4)
    assert interactive["goodput_rps"] == pytest.approx(0.2)
    assert interactive["ttft_s"]["p50"] == pytest.approx((1.0 + 1.4) / 2)
    assert (batch["requests"], batch["slo_met"], batch["errors"], batch["timeouts"]) == (5, 2, 1, 1)
    assert batch["e2e_s"]["p99"] == pytest.approx(50.0 + 0.98 * 11.0)  # sorted 2, 50, 61


def test_empty_blocks_and_default_classes() -> None:
    only_failures = [failed("a", "batch", "rejected", 503), failed("b", "batch", "error")]
    summary = summarize(meta(), only_failures)
    block = summary["overall"]
    assert block["slo_attainment"] == 0.0 and block["ok"] == 0
    assert block["ttft_s"] == {"p50": None, "p90": None, "p99": None}
    assert block["normalized_latency_s"] is None
    assert list(summary["classes"]) == ["batch"]
    # no classes in the run: the defaults (interactive 1.5 s / 0.10 s, batch 60 s) apply
    defaults = summarize(meta(classes={}), RECORDS)
    assert defaults["overall"]["slo_met"] == 4
    assert summarize(meta(duration_s=0.0), RECORDS)["overall"]["goodput_rps"] is None
    assert summarize(meta(), [])["overall"]["slo_attainment"] is None


def test_run_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_run(path, meta(), RECORDS)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["type"] == "meta" and json.loads(lines[1])["type"] == "request"
    read_meta, records = read_run(path)
    assert read_meta == meta() and records == RECORDS
    headless = tmp_path / "headless.jsonl"
    headless.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match="starts with its meta"):
        read_run(headless)
    bad_status = tmp_path / "bad.jsonl"
    bad_status.write_text(lines[0] + "\n" + lines[1].replace('"status":"ok"', '"status":"great"') + "\n")
    with pytest.raises(ValueError, match="unknown status"):
        read_run(bad_status)


def test_multi_run_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_run(first, meta("edf"), RECORDS)
    write_run(second, meta("round-robin", duration_s=20.0), RECORDS[:5])
    assert main(["report", str(first), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["label"] == "edf" and single["overall"]["slo_attainment"] == pytest.approx(0.4)
    assert set(single["classes"]) == {"interactive", "batch"}

    assert main(["report", str(first), str(second), "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert [run["label"] for run in both["runs"]] == ["edf", "round-robin"]
    assert both["overall"] == both["runs"][0]["overall"] and both["classes"] == both["runs"][0]["classes"]
    assert both["runs"][1]["overall"]["goodput_rps"] == pytest.approx(2 / 20.0)
    assert both["runs"][1]["classes"].keys() == {"interactive"}

    assert main(["report", str(first), str(second)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert "edf" in header and "round-robin" in header
    assert any(line.split()[:2] == ["slo_attainment", "40.0%"] for line in text.splitlines())
    assert render_text([summarize(meta("x"), RECORDS)]).count("[") == 3  # overall, interactive, batch
    assert report_json([single]) is single


# Client errors: a 400 (prompt fits no backend), a 404 (unknown model) and a 401. Not judged.
CLIENT_ERRORS = [
    failed("c1", "interactive", "error", 400),
    failed("c2", "batch", "error", 404),
    failed("c3", "interactive", "error", 401),
]


def test_client_errors_are_counted_apart() -> None:
    summary = summarize(meta(duration_s=10.0), RECORDS + CLIENT_ERRORS)
    overall = summary["overall"]
    assert (overall["requests"], overall["client_errors"], overall["slo_judged"], overall["slo_met"]) == (13, 3, 10, 4)
    assert overall["slo_attainment"] == pytest.approx(0.4)  # 4 met of the 10 judged: client errors excluded
    assert overall["errors"] == 1  # only the 500 is a failure
    parts = ("ok", "rejected", "errors", "timeouts", "client_errors")
    assert sum(overall[k] for k in parts) == overall["requests"]
    assert summary["classes"]["interactive"]["client_errors"] == 2
    assert summary["classes"]["batch"]["client_errors"] == 1
    only = summarize(meta(), CLIENT_ERRORS)["overall"]
    assert only["slo_judged"] == 0 and only["slo_attainment"] is None and only["goodput_rps"] == 0.0
    text = render_text([summary])
    assert any(line.split() == ["client_errors", "3"] for line in text.splitlines())
    assert any(line.split() == ["slo_judged", "10"] for line in text.splitlines())
    assert outcome_counts(summary) == {
        "met": 4,
        "late": 3,
        "rejected": 1,
        "errors": 1,
        "timeouts": 1,
        "client_errors": 3,
    }


def described_meta(label: str) -> RunMeta:
    described = meta(label)
    described.trace, described.window_s = "azure_conv_2023.csv", [0.0, 120.0]
    described.fleet = [
        {"name": "v1", "engine": "vllm", "model": "m", "profile": "h100-llama3-8b"},
        {"name": "v2", "engine": "vllm", "model": "m", "profile": "h100-llama3-8b"},
    ]
    described.extra = {"policy": "edf"}
    return described


def test_figure_states_the_setup_and_shows_every_outcome() -> None:
    from matplotlib import pyplot as plt

    records = RECORDS + CLIENT_ERRORS
    runs = [(described_meta("edf"), records), (meta("round-robin"), RECORDS[:5])]
    summaries = [summarize(m, r) for m, r in runs]
    fig = report_figure(runs, summaries)
    try:
        header = "\n".join(t.get_text() for t in fig.texts)
        for expected in ("TTFT ≤ 1.5 s", "TPOT ≤ 100 ms/token", "end to end ≤ 60 s", "azure_conv_2023.csv"):
            assert expected in header
        assert "2 x vllm m (h100-llama3-8b)" in header and "trace seconds 0-120" in header
        assert "requests over 10 s" in header
        titles = [axis.get_title() for axis in fig.axes]
        assert titles == [
            "Time to first token (interactive)",
            "Time per output token (interactive)",
            "End to end (batch)",
            "SLO attainment per class",
            "How requests ended (all classes)",
        ]
        assert all(axis.get_legend() is None for axis in fig.axes)  # the runs' legend is the figure's own
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["edf", "round-robin"]
        ttft, _tpot, _e2e, attainment, outcomes = fig.axes
        fig.canvas.draw()
        labels = [t.get_text() for t in ttft.get_xticklabels() if t.get_text()]
        assert ttft.get_xscale() == "log" and len(labels) >= 3 and "1\u2009s" in labels
        # the attainment axis spreads 97% and 99% apart (about a tenth of its height)
        lo, hi = attainment.transData.transform([(0, 97.0), (0, 99.0)])[:, 1]
        bottom, top = attainment.transData.transform([(0, 0.0), (0, 99.95)])[:, 1]
        assert (hi - lo) / (top - bottom) > 0.09
        # one bar per non-zero outcome per run, every outcome named on the axis
        names = [t.get_text() for t in outcomes.get_xticklabels()]
        assert names == [label for _, label in OUTCOMES]
        heights = sorted(round(p.get_height()) for p in outcomes.patches)
        expected = [c for s in summaries for c in outcome_counts(s).values() if c]
        assert heights == sorted(expected)
        assert "refused\n(429/503)" in names and "client error\n(not judged)" in names
    finally:
        plt.close(fig)


def test_png_metadata_and_html_page() -> None:
    from io import BytesIO

    from PIL import Image

    runs = [(described_meta("edf"), RECORDS + CLIENT_ERRORS)]
    summaries = [summarize(m, r) for m, r in runs]
    png = figure_png(runs, summaries)
    info = Image.open(BytesIO(png)).info
    assert info["Title"] == "SLO report: edf"
    description = info["Description"]
    assert "SLO targets: interactive: TTFT ≤ 1.5 s, TPOT ≤ 100 ms/token; batch: end to end ≤ 60 s" in description
    assert "outcomes: met 4, late 3, rejected 1, errors 1, timeouts 1, client_errors 3" in description
    page = render_html(summaries, png, ["a.jsonl"])
    assert "<th>SLO targets</th><td>interactive: TTFT ≤ 1.5 s, TPOT ≤ 100 ms/token<br>batch: end to end ≤ 60 s" in page
    assert "azure_conv_2023.csv, trace seconds 0-120" in page and "2 x vllm m (h100-llama3-8b)" in page
    assert "How a request is judged." in page
    # every metric row carries its one-line explanation
    for name in ("client_errors", "slo_judged", "slo_attainment", "rejected", "timeouts", "goodput_rps"):
        assert f"<td class='name'>{name}</td>" in page
        assert METRIC_HELP[name].replace("'", "&#x27;") in page
    assert "<td class='name'>client_errors</td><td>3</td><td>2</td><td>1</td>" in page  # overall, interactive, batch
    assert "Median arrival → first content, answered requests." in page


def test_old_run_files_still_read(tmp_path: Path) -> None:
    """Run files written before trace/window/fleet and record.stream existed read with their defaults."""
    path = tmp_path / "old.jsonl"
    path.write_text(
        '{"type":"meta","label":"old","source":"replay","workload":"w.jsonl","target":null,"speedup":1.0,'
        '"duration_s":10.0,"slo_classes":{},"started_at":"2025-01-01T00:00:00+00:00","extra":{}}\n'
        '{"type":"request","id":"a","model":"m","slo_class":"interactive","arrival_s":0.0,"status":"ok",'
        '"http_status":200,"error":null,"ttft_s":0.5,"tpot_s":0.01,"e2e_s":1.0,"prompt_tokens":5,'
        '"output_tokens":51,"expected_output_tokens":51}\n'
    )
    old_meta, records = read_run(path)
    assert old_meta.trace is None and old_meta.window_s is None and old_meta.fleet is None
    assert records[0].stream is True and slo_met(records[0], {})
    summary = summarize(old_meta, records)
    assert summary["setup"]["trace"] is None
    text = "\n".join(t.get_text() for t in report_figure([(old_meta, records)], [summary]).texts)
    assert "trace: not recorded in the run file" in text


def test_png_and_html(tmp_path: Path) -> None:
    run = tmp_path / "a.jsonl"
    write_run(run, meta("edf"), RECORDS)
    png, page = tmp_path / "r.png", tmp_path / "r.html"
    assert main(["report", str(run), str(run), "--png", str(png), "--html", str(page)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert "data:image/png;base64," in html and "edf" in html and "slo_attainment" in html
    assert "<td class='name'>client_errors</td>" in html
