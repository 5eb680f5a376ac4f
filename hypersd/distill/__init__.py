"""Distillation: pure schedule math (schedule.py), one denoiser wrapper (denoiser.py), the
method protocol and registry (protocol.py), the methods (methods/), named views of one
network (networks.py), the run config (recipe.py) and the one training loop (loop.py)."""
