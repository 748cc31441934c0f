"""Workloads, trace replay, the trace-driven simulator and the SLO report."""
