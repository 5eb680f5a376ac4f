"""ControlNet in generate on tiny SD1.5/SDXL-shaped models: our images equal stock diffusers'
ControlNet pipelines' pixel for pixel (recipes, a LoRA, two ControlNets at once), the metadata
records them, and bad input is one line on stderr with exit code 2 and no files."""

import json

import numpy as np
import pytest
import torch
from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
                       UNet2DConditionModel)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from hypersd.cli import main
from hypersd.errors import UserError
from hypersd.generate import Control, generate, get_recipe
from hypersd.generate.loading import SCHEDULERS

STOCK = {"sd15": StableDiffusionControlNetPipeline, "sdxl": StableDiffusionXLControlNetPipeline}
SIZE = 16  # the tiny models' resolution: UNet sample size 8 x VAE scale factor 2


def _array(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def _controlnet(unet_dir: str, seed: int, down=(8, 16)) -> ControlNetModel:
    """A ControlNet shaped like the UNet (``down``: its conditioning embedding, 2x downsampling
    per block after the first, as the tiny VAE), its zero convolutions made non-zero so that
    it changes the image."""
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(unet_dir, subfolder="unet"),
                                    conditioning_embedding_out_channels=down)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine two threads that wait on
    each other make a forward pass hundreds of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tiny_dirs, tmp_path_factory):
    """ControlNets (two per family, one of the wrong downsampling), control images, bad files."""
    root = tmp_path_factory.mktemp("controlnet")
    for family in ("sd15", "sdxl"):
        for seed in (0, 1):
            _controlnet(tiny_dirs[family], seed).save_pretrained(root / f"{family}-{seed}")
    _controlnet(tiny_dirs["sd15"], 0, down=(8, 16, 32, 64)).save_pretrained(root / "sd15-down8")
    UNet2DConditionModel.from_pretrained(tiny_dirs["sd15"], subfolder="unet").save_pretrained(root / "a-unet")
    (root / "no-config").mkdir()
    (root / "pickled").mkdir()  # weights only as a pickle: never read
    (root / "pickled" / "config.json").write_text((root / "sd15-0" / "config.json").read_text())
    (root / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02unread")
    rng = np.random.default_rng(0)
    for name, (w, h) in (("edges.png", (SIZE, SIZE)), ("depth.png", (SIZE, SIZE)), ("wide.png", (40, 24))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(root / "gray.png")
    (root / "notes.txt").write_text("not an image\n")
    png = (root / "edges.png").read_bytes()
    (root / "cut.png").write_bytes(png[:len(png) // 2])
    return root


def _stock(family, tiny_dirs, nets, recipe_name, prompts, seeds, images, scales, lora=None, steps=None):
    """Stock diffusers' ControlNet pipeline on the same model, settings from the recipe's fields."""
    recipe = get_recipe(recipe_name)
    pipe = STOCK[family].from_pretrained(tiny_dirs[family], controlnet=nets[0] if len(nets) == 1 else nets)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(str(lora), adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[recipe.lora_scale])
        pipe.fuse_lora()  # as generate runs it (hypersd.generate.fast)
    spacing = {"timestep_spacing": recipe.timestep_spacing} if recipe.timestep_spacing else {}
    pipe.scheduler = SCHEDULERS[recipe.sampler].from_config(pipe.scheduler.config, **spacing)
    extra = {"eta": recipe.eta} if recipe.eta is not None else {}
    return pipe(prompts, image=images[0] if len(nets) == 1 else images,
                controlnet_conditioning_scale=scales[0] if len(nets) == 1 else scales,
                num_inference_steps=steps or recipe.steps, guidance_scale=recipe.guidance,
                generator=[torch.Generator().manual_seed(s) for s in seeds], **extra).images


def _rgb(path):
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("recipe, steps", [("teacher", None), ("hyper-sd-unified", 2)])  # DDIM + CFG; TCD
def test_matches_stock_controlnet_pipeline(tiny_dirs, inputs, family, recipe, steps):
    net = inputs / f"{family}-0"
    ours = generate(["a cat"], model=tiny_dirs[family], recipe=recipe, steps=steps, seed=5, batch=2,
                    controlnets=[(str(net), str(inputs / "edges.png"), 0.7)])
    stock = _stock(family, tiny_dirs, [ControlNetModel.from_pretrained(net)], recipe, ["a cat", "a cat"],
                   [5, 6], [_rgb(inputs / "edges.png")], [0.7], steps=steps)
    np.testing.assert_array_equal(_array(ours.images), _array(stock))
    assert ours.seeds == [5, 6] and ours.controlnets == [{"model": str(net), "image": str(inputs / "edges.png"),
                                                         "scale": 0.7}]
    plain = generate(["a cat"], model=tiny_dirs[family], recipe=recipe, steps=steps, seed=5, batch=2)
    assert np.abs(_array(plain.images) - _array(ours.images)).max() > 5, "the ControlNet changed nothing"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_two_controlnets_at_once_match_stock(tiny_dirs, inputs, family):
    nets, images = [inputs / f"{family}-0", inputs / f"{family}-1"], [inputs / "edges.png", inputs / "depth.png"]
    ours = generate(["a cat"], model=tiny_dirs[family], recipe="tcd", seed=2,
                    controlnets=[Control(str(nets[0]), str(images[0]), 0.5), (str(nets[1]), str(images[1]), 1.5)])
    stock = _stock(family, tiny_dirs, [ControlNetModel.from_pretrained(n) for n in nets], "tcd", ["a cat"], [2],
                   [_rgb(i) for i in images], [0.5, 1.5])
    np.testing.assert_array_equal(_array(ours.images), _array(stock))
    one = generate(["a cat"], model=tiny_dirs[family], recipe="tcd", seed=2,
                   controlnets=[(str(nets[0]), str(images[0]), 0.5)])
    assert np.abs(_array(one.images) - _array(ours.images)).max() > 0, "the second ControlNet changed nothing"


def test_a_lora_on_the_base_works_under_controlnet(tiny_dirs, inputs, tmp_path):
    from diffusers import StableDiffusionPipeline
    base = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd15"])
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"])
    base.unet.add_adapter(config)
    state = {k: v * 5 for k, v in get_peft_model_state_dict(base.unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict())
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    net = inputs / "sd15-0"
    ours = generate(["a cat"], model=tiny_dirs["sd15"], recipe="hyper-sd", seed=1, loras=[str(lora)],
                    controlnets=[(str(net), str(inputs / "edges.png"), 1.0)])
    stock = _stock("sd15", tiny_dirs, [ControlNetModel.from_pretrained(net)], "hyper-sd", ["a cat"], [1],
                   [_rgb(inputs / "edges.png")], [1.0], lora=lora)
    np.testing.assert_array_equal(_array(ours.images), _array(stock))
    no_lora = generate(["a cat"], model=tiny_dirs["sd15"], recipe="hyper-sd", seed=1,
                       controlnets=[(str(net), str(inputs / "edges.png"), 1.0)])
    assert np.abs(_array(no_lora.images) - _array(ours.images)).max() > 5, "the LoRA changed nothing"


def test_cli_resizes_the_control_image_and_records_it(tiny_dirs, inputs, tmp_path):
    out = tmp_path / "out"
    net = str(inputs / "sd15-0")
    rc = main(["generate", "a cat", "--model", tiny_dirs["sd15"], "--recipe", "tcd", "--controlnet", net,
               "--control-image", str(inputs / "wide.png"), "--control-scale", "0.8", "--out", str(out)])
    assert rc == 0
    image = Image.open(out / "0000-seed0.png")
    assert image.size == (SIZE, SIZE)
    assert json.loads(image.text["controlnets"]) == [{"model": net, "image": str(inputs / "wide.png"),
                                                      "scale": 0.8}]
    plain = generate(["a cat"], model=tiny_dirs["sd15"], recipe="tcd")
    assert "controlnets" not in plain.metadata(0)  # without ControlNet the metadata is as before


def test_a_control_image_is_read_as_rgb_from_a_file_or_an_image(tiny_dirs, inputs):
    net, gray = str(inputs / "sd15-0"), inputs / "gray.png"
    from_file = generate(["a cat"], model=tiny_dirs["sd15"], recipe="tcd", controlnets=[(net, str(gray))])
    from_image = generate(["a cat"], model=tiny_dirs["sd15"], recipe="tcd",
                          controlnets=[Control(net, Image.open(gray).convert("RGB"), 1.0)])
    np.testing.assert_array_equal(_array(from_file.images), _array(from_image.images))
    assert from_file.controlnets[0]["scale"] == 1.0 and from_image.controlnets[0]["image"] == "<image>"
    with pytest.raises(UserError, match="not a .model, image. or"):
        generate(["a cat"], model=tiny_dirs["sd15"], controlnets=[(net,)])


SD15, SDXL = "SD15", "SDXL"
CASES = [  # (model, arguments after the prompt, what the one line says)
    (SDXL, ["--controlnet", "IN/sd15-0", "--control-image", "IN/edges.png"],
     "a ControlNet for SD1.5-shaped models on an SDXL-shaped model"),
    (SD15, ["--controlnet", "IN/sdxl-0", "--control-image", "IN/edges.png"], "does not fit this base model"),
    (SD15, ["--controlnet", "IN/sd15-down8", "--control-image", "IN/edges.png"], "its image-to-latent downsampling is 8, the model's 2"),
    (SD15, ["--controlnet", "IN/none", "--control-image", "IN/edges.png"], "not found"),
    (SD15, ["--controlnet", "IN/no-config", "--control-image", "IN/edges.png"], "has no config.json"),
    (SD15, ["--controlnet", "IN/a-unet", "--control-image", "IN/edges.png"], "not a ControlNetModel"),
    (SD15, ["--controlnet", "IN/edges.png", "--control-image", "IN/edges.png"], "is a file"),
    (SD15, ["--controlnet", "IN/cn.bin", "--control-image", "IN/edges.png"], "is a pickle"),
    (SD15, ["--controlnet", "IN/pickled", "--control-image", "IN/edges.png"], "with .safetensors weights"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/none.png"], "does not exist"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/notes.txt"], "not an image"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/cut.png"], "not an image"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN"], "is a folder"),
    (SD15, ["--controlnet", "IN/sd15-0"], "one --control-image per --controlnet"),
    (SD15, ["--control-image", "IN/edges.png"], "one --control-image per --controlnet"),
    (SD15, ["--controlnet", "IN/sd15-0", "--controlnet", "IN/sd15-1", "--control-image", "IN/edges.png"],
     "2 --controlnet, 1 --control-image"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/edges.png", "--control-scale", "1",
            "--control-scale", "1"], "one --control-scale per --controlnet or none"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/edges.png", "--control-scale", "nan"],
     "not a number"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/edges.png", "--control-scale", "inf"], "infinite"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/edges.png", "--control-scale", "2.5"], "above 2"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/edges.png", "--control-scale", "-0.1"],
     "negative"),
    (SD15, ["--controlnet", "IN/sd15-0", "--control-image", "IN/edges.png", "--control-scale", "x"],
     "invalid float value"),
]


@pytest.mark.parametrize("model, args, message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_controlnet_input_exits_2_without_files(tiny_dirs, inputs, tmp_path, capsys, model, args, message):
    (inputs / "cn.bin").write_bytes(b"\x80\x02unread")  # a pickle: refused by name, never opened
    out = tmp_path / "out"
    args = [a.replace("IN", str(inputs)) for a in args]
    rc = main(["generate", "a cat", "--recipe", "tcd", "--model", tiny_dirs[model.lower()], *args,
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("hypersd: error: ")
    assert not out.exists()
