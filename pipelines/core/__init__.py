"""What every model family shares: the runtime seam, errors, image/mask helpers, the sampling core, LoRA."""
