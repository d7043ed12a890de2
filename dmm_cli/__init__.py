"""dmm: merge fine-tuned Stable Diffusion checkpoints into one style-promptable model by distillation."""

__version__ = "0.1.0"
