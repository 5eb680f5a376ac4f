"""``hypersd serve``: the live web demo (Gradio) over an ``Engine``.

Two tabs, each redrawn as its inputs change (the latest change wins; stale ones are dropped):
  text to image  the prompt at one step with the accelerator; steps, seed, recipe, images and
                 size controls; the teacher beside it on request;
  scribble       a canvas whose strokes steer the image through the scribble ControlNet.
Each is a named API endpoint, ``/generate`` and ``/scribble``, prompt first and the rest with
defaults, for ``gradio_client``. Requests wait in one queue (``queue_size`` at most) and run one
at a time; a request over a cap is refused with the cap named, in the page and to API clients.
The server binds 127.0.0.1 unless told otherwise, makes no share link and sends no analytics.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

from hypersd.errors import UserError
from hypersd.serve.canvas import editor_drawing
from hypersd.serve.config import ServeConfig
from hypersd.serve.engine import Drawn, Engine

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio reads it: no calls home
import gradio as gr  # noqa: E402

CANVAS = 256        # the sketchpad's side in pixels: 8 canvas pixels to one of the mini model's
BRUSH = 6           # brush radius on it: strokes about 1.5 model pixels wide
CONCURRENCY = "model"  # both tabs share one worker: a request has the CPU to itself
CSS = """
.pixelated img { image-rendering: pixelated; }
#scribble-result img, #scribble-control img { width: 100%; height: 100%; object-fit: contain; }
#text-latency, #scribble-latency { min-height: 1.5em; }
"""
# The sketchpad starts with no tool chosen; opening the tab picks the brush, so a visitor just draws.
PICK_BRUSH = """() => { const pick = (tries) => {
  const brush = document.querySelector("#scribble-canvas button[aria-label='Brush']");
  if (brush && !brush.classList.contains("highlight")) brush.click();
  else if (!brush && tries > 0) setTimeout(() => pick(tries - 1), 100);
}; pick(50); }"""
EXAMPLES = ["grinning face", "red apple", "rocket", "ghost", "soccer ball", "japan flag"]


@contextmanager
def _shown():
    """A bad request's one-line message, shown in the page (and sent to API clients)."""
    try:
        yield
    except UserError as e:
        raise gr.Error(str(e), print_exception=False) from None


def _gallery(drawn: Drawn | None) -> list:
    return [] if drawn is None else [(image, f"seed {seed}") for image, seed in zip(drawn.images, drawn.seeds)]


def _latency(drawn: Drawn, who: str) -> str:
    """'**21 ms** for 1 image (21 ms each), 1 step, hyper-sd-unified, seed 0'."""
    n, ms = len(drawn.images), 1000 * drawn.seconds
    seeds = f"seed {drawn.seeds[0]}" + (f"-{drawn.seeds[-1]}" if n > 1 else "")
    return (f"{who}: **{ms:.0f} ms** for {n} image{'s' * (n > 1)} ({ms / n:.0f} ms each), "
            f"{drawn.steps} step{'s' * (drawn.steps > 1)}, {drawn.recipe.name}, {seeds}")


def _caps_line(engine: Engine) -> str:
    c = engine.cfg
    return (f"Caps per request: {c.max_steps} steps, {c.max_batch} images, {engine.max_size} px a side, "
            f"{c.max_prompt} characters of prompt, one queue of {c.queue_size}.")


def build_app(engine: Engine) -> gr.Blocks:
    """The two-tab page, its events and its API endpoints."""
    lora = f"with **{os.path.basename(engine.lora[0])}** fused in" if engine.lora else "without an accelerator"
    # generated files are dropped after 10 minutes: a page that redraws on every keystroke makes many
    with gr.Blocks(title="hypersd live demo", analytics_enabled=False, delete_cache=(600, 600)) as app:
        gr.Markdown(f"## hypersd live demo\nModel **{engine.cfg.model or 'mini'}** {lora}, "
                    f"recipe **{engine.recipe.name}**. {_caps_line(engine)}")
        with gr.Tabs():
            with gr.Tab("Text to image", id="text"):
                _text_tab(engine)
            with gr.Tab("Scribble", id="scribble") as scribble:
                _scribble_tab(engine)
        scribble.select(None, None, None, js=PICK_BRUSH)
    return app


def _text_tab(engine: Engine) -> None:
    cfg, recipes = engine.cfg, _recipe_names()
    prompt = gr.Textbox(label="prompt", placeholder="type what to draw: " + ", ".join(EXAMPLES[:3]),
                        elem_id="text-prompt", autofocus=True)
    with gr.Row():
        steps = gr.Slider(1, cfg.max_steps, value=engine.recipe.steps, step=1, label="steps")
        seed = gr.Number(0, precision=0, minimum=0, label="seed")
        recipe = gr.Dropdown(recipes, value=engine.recipe.name, label="recipe")
        images = gr.Slider(1, cfg.max_batch, value=1, step=1, label="images")
        size = gr.Slider(0, engine.max_size, value=0, step=engine.size_step, label="size (0: the model's own)")
        compare = gr.Checkbox(False, label=f"beside the teacher ({cfg.teacher_steps} steps, CFG)",
                              elem_id="text-compare")
    with gr.Row():
        student = gr.Gallery(label="accelerated", columns=4, fit_columns=False, height=240,
                             format="png", object_fit="contain", allow_preview=False,
                             elem_id="text-student", elem_classes="pixelated")
        teacher = gr.Gallery(label="teacher", columns=4, fit_columns=False, height=240,
                             format="png", object_fit="contain", allow_preview=False,
                             elem_id="text-teacher", elem_classes="pixelated")
    latency = gr.Markdown(label="latency", elem_id="text-latency")
    gr.Examples([[e] for e in EXAMPLES], inputs=[prompt])

    def generate(prompt, steps=engine.recipe.steps, seed=0, recipe=engine.recipe.name, images=1, size=0,
                 compare=False):
        """Text to image: the prompt's images by the accelerated model (and the teacher's)."""
        if not (prompt or "").strip():
            return [], [], "Type a prompt to draw."
        with _shown():
            drawn = engine.text_to_image(prompt, steps, seed, recipe, images, size)
            lines = [_latency(drawn, "accelerated")]
            beside = engine.teacher(prompt, seed, images, size) if compare else None
        if beside is not None:
            lines.append(_latency(beside, "teacher"))
        return _gallery(drawn), _gallery(beside), "  \n".join(lines)

    inputs = [prompt, steps, seed, recipe, images, size, compare]
    gr.on([prompt.change, prompt.submit, steps.change, seed.change, recipe.change, images.change, size.change,
           compare.change], generate, inputs, [student, teacher, latency], api_name="generate",
          trigger_mode="always_last", show_progress="minimal", concurrency_id=CONCURRENCY)


def _scribble_tab(engine: Engine) -> None:
    if engine.scribble_problem:
        gr.Markdown(f"**The scribble tab is off:** {engine.scribble_problem}.", elem_id="scribble-problem")
    with gr.Row():
        sketch = gr.Sketchpad(type="pil", image_mode="RGB", canvas_size=(CANVAS, CANVAS), fixed_canvas=True,
                              brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=BRUSH),
                              layers=False, label="draw here", elem_id="scribble-canvas")
        result = gr.Image(label="image", type="pil", format="png", height=300, elem_id="scribble-result",
                          elem_classes="pixelated", interactive=False)
        control = gr.Image(label="what the ControlNet sees", type="pil", format="png", height=150,
                           elem_id="scribble-control", elem_classes="pixelated", interactive=False)
    prompt = gr.Textbox(label="prompt", placeholder="what the strokes are: rocket, ghost, red apple",
                        elem_id="scribble-prompt")
    with gr.Row():
        steps = gr.Slider(1, engine.cfg.max_steps, value=engine.recipe.steps, step=1, label="steps")
        seed = gr.Number(0, precision=0, minimum=0, label="seed")
        scale = gr.Slider(0, 2, value=1, step=0.05, label="control scale")
    latency = gr.Markdown(label="latency", elem_id="scribble-latency")

    def scribble(prompt, drawing=None, steps=engine.recipe.steps, seed=0, scale=1.0):
        """Scribble: the drawing (dark strokes on white, or white on black) as an image of the prompt."""
        if engine.scribbler is None:
            raise gr.Error(engine.scribble_problem, print_exception=False)
        drawing = editor_drawing(drawing)
        with _shown():
            drawn = engine.scribble(prompt or "", drawing, steps, seed, scale)
        return drawn.images[0], drawn.control, _latency(drawn, "scribble")

    gr.on([sketch.change, prompt.change, prompt.submit, steps.change, seed.change, scale.change], scribble,
          [prompt, sketch, steps, seed, scale], [result, control, latency], api_name="scribble",
          trigger_mode="always_last", show_progress="minimal", concurrency_id=CONCURRENCY)


def _recipe_names() -> list[str]:
    from hypersd.generate.recipes import load_recipes
    return list(load_recipes())


def launch(app: gr.Blocks, cfg: ServeConfig, block: bool = True) -> str:
    """Start serving ``app`` (in this thread if ``block``) and return its address."""
    port = cfg.port or _free_port(cfg.host)
    app.queue(max_size=cfg.queue_size, default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=cfg.host, server_port=port, share=False, prevent_thread_lock=True,
                           quiet=True, show_error=True, footer_links=["api"], run_history=False,
                           enable_monitoring=False, ssr_mode=False, max_file_size="10mb", css=CSS)
    if block:
        print(f"hypersd: serving on {url} (API: /generate, /scribble); Ctrl+C stops", flush=True)
        app.block_thread()
    return url


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(cfg: ServeConfig, block: bool = True) -> tuple[gr.Blocks, str]:
    """Load the models, warm them up and serve the demo; return the app and its address."""
    engine = Engine(cfg)
    engine.warm_up()
    app = build_app(engine)
    return app, launch(app, cfg, block)
