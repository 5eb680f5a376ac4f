"""``hypersd serve``: the API endpoints through gradio_client, the caps, the canvas conversion,
and a missing ControlNet. One server (the bundled model and LoRA, a tiny ControlNet) per module."""

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hypersd.cli import main
from hypersd.errors import UserError
from hypersd.generate import load_pipeline
from hypersd.serve import ServeConfig
from hypersd.serve.canvas import control_image, stroke_map
from hypersd.testing import tiny_controlnet

gradio_client = pytest.importorskip("gradio_client", reason="pip install -e '.[serve]'")
LATENCY = re.compile(r"\*\*(\d+) ms\*\*")
CAPS = dict(max_steps=4, max_batch=2, max_prompt=40, teacher_steps=3)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, app, address) of a demo server on a free loopback port."""
    from hypersd.serve.app import build_app, launch
    from hypersd.serve.engine import Engine
    folder = tmp_path_factory.mktemp("controlnet")
    cfg = ServeConfig(controlnet=tiny_controlnet(load_pipeline().unet, folder), port=0, **CAPS)
    engine = Engine(cfg)
    app = build_app(engine)
    url = launch(app, cfg, block=False)
    yield engine, app, url
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[2], verbose=False)


def _drawing(path, size=256, dark_on_light=True):
    """A V drawn with a wide brush: dark on white, like the sketchpad's, or white on black."""
    ink, paper = ((0, 0, 0), (255, 255, 255)) if dark_on_light else ((255, 255, 255), (0, 0, 0))
    image = Image.new("RGB", (size, size), paper)
    ImageDraw.Draw(image).line([(64, 48), (128, 200), (192, 48)], fill=ink, width=size // 20)
    image.save(path)
    return image


def test_generate_takes_the_prompt_first_and_the_rest_by_default(served, client):
    images, teacher, latency = client.predict("rocket", api_name="/generate")
    assert len(images) == 1 and teacher == [] and images[0]["caption"] == "seed 0"
    with Image.open(images[0]["image"]) as image:
        assert image.size == (32, 32)
    assert LATENCY.search(latency) and "1 step" in latency and "hyper-sd-unified" in latency
    assert served[2].startswith("http://127.0.0.1:")


def test_a_seed_redraws_its_image_and_another_seed_another(client):
    def pixels(seed):
        images, _, _ = client.predict("ghost", seed=seed, api_name="/generate")
        return np.asarray(Image.open(images[0]["image"]))
    assert np.array_equal(pixels(3), pixels(3))
    assert not np.array_equal(pixels(3), pixels(4))


def test_settings_and_the_teacher_beside(client):
    images, teacher, latency = client.predict("red apple", steps=2, seed=7, images=2, compare=True,
                                              api_name="/generate")
    assert [i["caption"] for i in images] == ["seed 7", "seed 8"] and len(teacher) == 2
    assert "2 steps" in latency and "teacher" in latency and len(LATENCY.findall(latency)) == 2


@pytest.mark.parametrize("args, message", [
    (dict(prompt="x" * 41), "41 characters, above this server's cap of 40"),
    (dict(prompt="rocket", steps=5), "maximum value 4"),
    (dict(prompt="rocket", images=3), "maximum value 2"),
    (dict(prompt="rocket", size=40), "multiples of 16"),
    (dict(prompt="rocket", size=96), "maximum value 64"),
    (dict(prompt="rocket", recipe="hyper-sd-cfg"), "outside the 8-12"),
])
def test_a_request_over_a_cap_is_refused_with_the_cap_named(client, args, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        client.predict(**args, api_name="/generate")


def test_an_empty_prompt_asks_for_one(client):
    assert client.predict("  ", api_name="/generate") == ([], [], "Type a prompt to draw.")


def test_scribble_follows_the_drawing(client, tmp_path):
    _drawing(tmp_path / "v.png")
    sketch = {"background": None, "layers": [], "composite": gradio_client.handle_file(str(tmp_path / "v.png"))}
    image, control, latency = client.predict("rocket", sketch, api_name="/scribble")
    seen = np.asarray(Image.open(control).convert("L")) > 127
    want = stroke_map(Image.open(tmp_path / "v.png"), (32, 32))[0, 0].numpy() > 0
    assert np.array_equal(seen, want) and 20 < want.sum() < 200  # white strokes on black, thin
    assert Image.open(image).size == (32, 32) and LATENCY.search(latency)
    blank, _, _ = client.predict("rocket", api_name="/scribble")  # no drawing: no strokes
    assert not np.array_equal(np.asarray(Image.open(blank)), np.asarray(Image.open(image)))


def test_concurrent_clients_all_get_images(served):
    def one(seed):
        return gradio_client.Client(served[2], verbose=False).predict("rocket", seed=seed, api_name="/generate")
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert [r[0][0]["caption"] for r in results] == [f"seed {s}" for s in range(6)]


def test_the_page_has_two_tabs_and_sends_no_analytics(served):
    _, app, _ = served
    labels = {b.label for b in app.blocks.values() if type(b).__name__ == "Tab"}
    assert labels == {"Text to image", "Scribble"} and app.analytics_enabled is False
    assert {d.api_name for d in app.fns.values() if d.api_visibility == "public"} == {"generate", "scribble"}


@pytest.mark.parametrize("dark_on_light", [True, False])
def test_a_drawing_becomes_white_strokes_on_black(tmp_path, dark_on_light):
    drawing = _drawing(tmp_path / "d.png", dark_on_light=dark_on_light)
    maps = stroke_map(drawing, (32, 32))
    assert maps.shape == (1, 1, 32, 32) and set(maps.unique().tolist()) == {0.0, 1.0}
    assert maps[0, 0, 14, 12] == 1 and maps[0, 0, 0, 0] == 0  # on the V's left arm; a corner
    rgba = Image.new("RGBA", (256, 256), (0, 0, 0, 0))  # a canvas exported with a transparent ground
    ImageDraw.Draw(rgba).line([(64, 48), (128, 200), (192, 48)], fill=(0, 0, 0, 255), width=256 // 20)
    assert torch.equal(stroke_map(rgba, (32, 32)), stroke_map(_drawing(tmp_path / "e.png"), (32, 32)))
    assert np.asarray(control_image(None, (32, 32))).max() == 0


def test_without_a_controlnet_the_demo_starts_and_the_scribble_tab_says_what_is_missing(tmp_path, capsys):
    from hypersd.serve.app import build_app
    from hypersd.serve.engine import Engine
    engine = Engine(ServeConfig(controlnet=str(tmp_path / "missing"), speedup="none"))
    assert "no scribble ControlNet at" in engine.scribble_problem and str(tmp_path) in engine.scribble_problem
    assert "the scribble tab is off" in capsys.readouterr().err
    assert engine.text_to_image("rocket").images[0].size == (32, 32)
    with pytest.raises(UserError, match="no scribble ControlNet at"):
        engine.scribble("rocket")
    texts = [str(getattr(b, "value", "")) for b in build_app(engine).blocks.values()]
    assert any("The scribble tab is off" in t and "missing" in t for t in texts)


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port 70000"),
    (["--speedup", "jit"], "invalid choice"),
    (["--max-steps", "0"], "--max-steps 0: give 1 or more"),
    (["--lora", "/nonexistent.safetensors"], "does not exist"),
])
def test_bad_serve_flags_exit_2_in_one_line(capsys, args, message):
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
