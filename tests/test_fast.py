"""The fast path draws the plain path's images: LoRA fused, prompts cached, networks traced."""

import numpy as np
import pytest
import torch
from PIL import Image

from hypersd.demo import BUNDLED_LORA
from hypersd.errors import UserError
from hypersd.generate import Control, load_loras, load_pipeline, resolve_recipe, run_pipeline
from hypersd.generate.controlnet import add_controlnets, check_controls
from hypersd.generate.fast import FastPipeline, fuse_loras
from hypersd.generate.speedup import traced
from hypersd.testing import tiny_controlnet

TOL = 1e-4  # on [0, 1] pixels: W + s·BA fused once vs s·B(Ax) added each call differ by ~1e-6


def _with_lora():
    pipe = load_pipeline()
    load_loras(pipe, [(str(BUNDLED_LORA), 1.0)])
    return pipe


@pytest.fixture(scope="module")
def pair():
    """The mini model with the bundled LoRA: as adapters (plain) and on the fast path."""
    return _with_lora(), FastPipeline(_with_lora(), speedup="trace")


def _images(pipe, prompts, recipe, negative=None, extra=None):
    return run_pipeline(pipe, prompts, recipe, list(range(len(prompts))), negative, "np", extra)


@pytest.mark.parametrize("recipe, steps, prompts, negative", [
    ("hyper-sd-unified", 1, ["rocket"], None),
    ("hyper-sd-unified", 4, ["rocket", "red apple", "rocket"], None),  # a prompt twice: encoded once
    ("dmd2-1step", None, ["ghost"], None),                             # explicit timesteps, LCM
    ("teacher", 3, ["ghost", "rocket"], "blurry"),                     # CFG with a negative prompt
])
def test_fast_path_draws_the_plain_paths_images(pair, recipe, steps, prompts, negative):
    plain, fast = pair
    r = resolve_recipe(recipe, steps=steps)
    want, got = _images(plain, prompts, r, negative), _images(fast, prompts, r, negative)
    assert want.shape == got.shape == (len(prompts), 32, 32, 3)
    assert np.abs(want - got).max() < TOL


def test_fast_path_with_a_controlnet(tmp_path):
    net = tiny_controlnet(load_pipeline().unet, tmp_path / "cn")
    strokes = Image.new("RGB", (32, 32))
    strokes.paste((255, 255, 255), (8, 4, 11, 28))
    controls = check_controls([Control(net, strokes)])
    plain, extra = add_controlnets(_with_lora(), controls)
    fast = FastPipeline(add_controlnets(_with_lora(), controls)[0])
    r = resolve_recipe("hyper-sd-unified", steps=2)
    want, got = _images(plain, ["rocket"], r, extra=extra), _images(fast, ["rocket"], r, extra=extra)
    assert np.abs(want - got).max() < TOL
    without = _images(fast, ["rocket"], r, extra={**extra, "controlnet_conditioning_scale": 0.0})
    assert np.abs(without - got).max() > 0.01  # the strokes reached the image


def test_sdxl_prompt_embeddings_are_cached_whole(tiny_dirs):
    plain, fast = load_pipeline(tiny_dirs["sdxl"]), FastPipeline(load_pipeline(tiny_dirs["sdxl"]))
    r = resolve_recipe("teacher", steps=2)
    want, got = _images(plain, ["a cat", "a dog"], r, "blurry"), _images(fast, ["a cat", "a dog"], r, "blurry")
    assert np.abs(want - got).max() < TOL


def test_each_prompt_is_encoded_once():
    fast = FastPipeline(load_pipeline(), speedup="none", cache_size=2)
    seen = []
    fast.pipe.text_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    r = resolve_recipe("hyper-sd-unified")
    run_pipeline(fast, ["rocket", "rocket", "ghost"], r, [0, 1, 2])
    run_pipeline(fast, ["rocket", "ghost"], r, [0, 1])
    assert seen == [1, 1]  # each distinct prompt alone, then nothing
    run_pipeline(fast, ["red apple"], r, [0])  # the cache holds 2: "rocket", used least recently, goes
    run_pipeline(fast, ["rocket"], r, [0])
    assert seen == [1, 1, 1, 1]


def test_fusing_removes_the_adapters_and_keeps_the_lora():
    pipe = _with_lora()
    before = pipe.unet.state_dict()
    fuse_loras(pipe)
    assert not any(pipe.get_list_adapters().values())
    assert not [n for n, _ in pipe.unet.named_modules() if "lora" in n]
    plain = load_pipeline().unet.state_dict()
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, plain[k])]
    assert changed and len(changed) < len(before)  # the LoRA's layers, merged; the rest untouched


def test_a_traced_twin_shares_weights_and_matches_eager_bitwise():
    unet = load_pipeline().unet
    twin = traced(unet)
    assert twin.conv_in.weight is unet.conv_in.weight and type(unet).forward is unet.forward.__func__
    z, t, text = torch.randn(2, 4, 8, 8), torch.tensor(999), torch.randn(2, 32, 384)
    with torch.no_grad():
        want = unet(z, t, text).sample
        assert torch.equal(twin(z, t, encoder_hidden_states=text, return_dict=False)[0], want)
        assert torch.equal(twin(z, t, text).sample, want)  # return_dict=True runs eagerly
        unet.conv_in.weight.mul_(2)  # a change to the weights reaches the traced graph
        assert torch.equal(twin(z, t, encoder_hidden_states=text, return_dict=False)[0], unet(z, t, text).sample)


def test_unknown_speedup_is_refused():
    with pytest.raises(UserError, match="unknown speedup 'jit'"):
        FastPipeline(load_pipeline(), speedup="jit")


@pytest.mark.slow  # inductor compiles each shape for tens of seconds on a 2-core CPU
def test_a_compiled_fast_path_draws_the_plain_paths_images(tiny_dirs):
    plain = load_pipeline(tiny_dirs["sd15"])
    fast = FastPipeline(load_pipeline(tiny_dirs["sd15"]), speedup="compile")
    r = resolve_recipe("hyper-sd", steps=1)
    assert np.abs(_images(plain, ["a cat"], r) - _images(fast, ["a cat"], r)).max() < TOL
