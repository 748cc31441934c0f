"""``make demo``'s trace replay: a real trace through the proxy per policy, reported side by side."""

from __future__ import annotations

from pathlib import Path

from sloproxy.demo import DEMO_FLEET
from sloproxy.demo_replay import find_data_dir, replay_policies
from sloproxy.emulator.fleet import InstanceSpec
from sloproxy.evaluation.records import read_run


def test_shared_data_is_found_beside_the_checkout(shared_data: Path):
    assert find_data_dir() == shared_data.resolve() or (find_data_dir() / "traces").samefile(shared_data / "traces")


async def test_replay_two_policies_and_report(shared_data: Path, tmp_path: Path):
    specs = [InstanceSpec(name=n, engine=e, model=m, profile=p, port=0) for n, e, m, p in DEMO_FLEET]
    summaries = await replay_policies(
        specs, shared_data, tmp_path, policies=("round-robin", "edf"), seconds=30, speedup=10.0
    )
    assert [s["label"] for s in summaries] == ["round-robin", "edf"]
    for summary in summaries:
        overall = summary["overall"]
        assert overall["requests"] >= 20 and overall["ok"] + overall["rejected"] == overall["requests"]
        assert 0.0 <= overall["slo_attainment"] <= 1.0
        assert set(summary["classes"]) == {"interactive", "batch"}
    meta, records = read_run(tmp_path / "demo-run-edf.jsonl")
    assert meta.label == "edf" and meta.speedup == 10.0 and len(records) == summaries[1]["overall"]["requests"]
    assert (tmp_path / "demo-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "demo-report.html").read_text()
    assert "round-robin" in html and "data:image/png;base64," in html
