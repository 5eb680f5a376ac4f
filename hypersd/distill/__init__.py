"""Distillation: pure schedule math (schedule.py), one denoiser wrapper (denoiser.py), the
method protocol and registry (protocol.py), the methods (methods/), named views of one
network (networks.py), the run config (recipe.py) and the one training loop (loop.py)."""

__all__ = ["distill", "load_run"]


def __getattr__(name: str):
    """``from hypersd.distill import distill, load_run`` without importing the loop eagerly."""
    if name == "distill":
        from hypersd.distill.loop import distill
        return distill
    if name == "load_run":
        from hypersd.distill.recipe import load_run
        return load_run
    raise AttributeError(name)
