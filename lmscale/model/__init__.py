"""Building the model: presets, pretrained weights, LoRA and unfreezing, fused kernels, compiling."""
