"""Scheduler state behind one interface: embedded in-process now, Redis for many replicas later."""

from .base import SchedulerState
from .local import LocalState
from .shared import SharedState

__all__ = ["LocalState", "SchedulerState", "SharedState"]
