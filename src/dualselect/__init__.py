"""dualselect: safety-preserving fine-tuning of aligned chat models (DualSelect and baselines)."""

__version__ = "0.1.0"
