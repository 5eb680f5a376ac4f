"""hypersd: distil diffusion models into few-step students and run them."""

__version__ = "0.1.0"
