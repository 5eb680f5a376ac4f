"""Datasets: the emoji32 mini world."""

from hypersd.data.emoji32 import Emoji32, build_emoji32, load_emoji32, load_style

__all__ = ["Emoji32", "build_emoji32", "load_emoji32", "load_style"]
