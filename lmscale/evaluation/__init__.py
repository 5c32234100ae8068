"""Held-out scores, the lm-evaluation-harness, and loading a trained model for inference."""
