"""The roofline against the H200 measurements (±15%) and public A100 / H100 figures (±25%)."""

from __future__ import annotations

from sloproxy.emulator.calibration import a100_checks, h100_checks, h200_checks


def _failures(checks):
    return [f"{c.name}: {c.emulated:.2f} vs {c.reference:.2f} ({c.error:+.1%})" for c in checks if not c.ok]


def test_h200_step_times_within_15_percent(shared_data):
    checks = h200_checks(shared_data / "calibration" / "h200_llama3_8b_measured.json")
    assert len(checks) == 22  # 16 decode grid points + 6 prefill sizes
    assert _failures(checks) == []


def test_a100_public_figures_within_25_percent():
    checks = a100_checks()
    assert _failures(checks) == []


def test_h100_public_figures_within_25_percent():
    checks = h100_checks()
    assert _failures(checks) == []
