"""The live web demo: one-step text to image and real-time scribble (``hypersd serve``)."""

from hypersd.serve.config import ServeConfig


def serve(cfg: ServeConfig, block: bool = True):
    """Load the models and serve the demo (see hypersd.serve.app); return the app and its address."""
    from hypersd.serve.app import serve as run  # gradio loads only when a demo is served
    return run(cfg, block)


__all__ = ["ServeConfig", "serve"]
