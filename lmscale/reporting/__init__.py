"""What a run reports: the metrics sink (console, metrics.jsonl, W&B), FLOPs and MFU, the dashboard."""
