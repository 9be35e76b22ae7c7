"""Evaluation of fine-tuned models: judges of model outputs (refusal, harm) and the metrics built on them."""
