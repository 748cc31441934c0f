"""sloproxy: an SLO-aware scheduling proxy for LLM serving fleets."""

__version__ = "0.1.0"
