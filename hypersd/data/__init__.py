"""Datasets: the emoji32 mini world."""

from hypersd.data.emoji32 import Emoji32, build_emoji32, load_emoji32

__all__ = ["Emoji32", "build_emoji32", "load_emoji32"]
