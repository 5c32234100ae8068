"""lmscale: train and fine-tune transformer language models on DeepSpeed."""

__version__ = "0.1.0"
