"""Distillation: schedule math, the denoiser wrapper, and (to come) methods and the training loop."""
