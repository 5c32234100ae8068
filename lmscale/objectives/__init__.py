"""What a step minimises: cross-entropy (plain, blockwise, fused with the output layer) and DPO."""
