"""Generation on tiny SD1.5/SDXL-shaped models: every sampler and recipe, stock parity, LoRAs, errors."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from hypersd.cli import main
from hypersd.generate import generate, load_pipeline, load_recipes
from hypersd.generate.recipes import SAMPLERS
from hypersd.lora import to_kohya

STOCK = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def _array(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("recipe", sorted(n for n, r in load_recipes().items() if "sd15" in r.models))
def test_every_recipe_runs(tiny_dirs, family, recipe):
    out = generate(["a red apple"], model=tiny_dirs[family], recipe=recipe, steps=None)
    assert out.images[0].size == (16, 16)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_matches_stock_diffusers(tiny_dirs, family, sampler):
    ours = generate(["a cat", "a dog"], model=tiny_dirs[family], sampler=sampler, steps=3,
                    guidance=2.0, seed=7, batch=2)
    pipe = STOCK[family].from_pretrained(tiny_dirs[family])
    pipe.set_progress_bar_config(disable=True)
    from hypersd.generate.loading import SCHEDULERS
    pipe.scheduler = SCHEDULERS[sampler].from_config(pipe.scheduler.config, timestep_spacing="leading")
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 7, 8)]
    kwargs = {"eta": 0.0} if sampler in ("ddim",) else {}
    stock = pipe(["a cat", "a cat", "a dog", "a dog"], num_inference_steps=3, guidance_scale=2.0,
                 generator=gens, **kwargs).images
    assert ours.prompts == ["a cat", "a cat", "a dog", "a dog"] and ours.seeds == [7, 8, 7, 8]
    np.testing.assert_array_equal(_array(ours.images), _array(stock))


def test_image_is_reproducible_from_its_metadata(tiny_dirs, tmp_path):
    out = generate(["a cat"], model=tiny_dirs["sd15"], recipe="tcd", seed=3, batch=2)
    paths = out.save(tmp_path)
    meta = Image.open(paths[1]).text
    recipe = json.loads(meta["recipe"])
    again = generate([meta["prompt"]], model=meta["model"], sampler=recipe["sampler"],
                     steps=recipe["steps"], eta=recipe["eta"], guidance=recipe["guidance"],
                     recipe="tcd", seed=int(meta["seed"]))
    np.testing.assert_array_equal(_array(again.images), _array(out.images[1:]))
    assert (tmp_path / "grid.png").exists()


def _make_lora(family, tiny_dirs, tmp_path, rank=4, alpha=8):
    """A random LoRA on the tiny UNet, saved in diffusers format and in kohya format."""
    pipe = STOCK[family].from_pretrained(tiny_dirs[family])
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    pipe.unet.add_adapter(config)
    state = {f"unet.{k}": v * 5 for k, v in get_peft_model_state_dict(pipe.unet).items()}
    meta = {"unet_lora_adapter_metadata": config.to_dict()}
    diffusers_dir = tmp_path / "diffusers"
    STOCK[family].save_lora_weights(diffusers_dir, unet_lora_layers={k[5:]: v for k, v in state.items()},
                                    **meta)
    kohya = tmp_path / "kohya.safetensors"
    save_file(to_kohya(state, alpha, sdxl=family == "sdxl"), kohya)
    return diffusers_dir / "pytorch_lora_weights.safetensors", kohya


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_formats_agree_with_stock_loading(tiny_dirs, tmp_path, family):
    diffusers_file, kohya_file = _make_lora(family, tiny_dirs, tmp_path)
    plain = generate(["a cat"], model=tiny_dirs[family], recipe="hyper-sd", seed=1)
    ours = generate(["a cat"], model=tiny_dirs[family], recipe="hyper-sd", seed=1,
                    loras=[f"{diffusers_file}:0.7"])
    ours_kohya = generate(["a cat"], model=tiny_dirs[family], recipe="hyper-sd", seed=1,
                          loras=[f"{kohya_file}:0.7"])
    pipe = STOCK[family].from_pretrained(tiny_dirs[family])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(diffusers_file), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    pipe.fuse_lora()  # generate fuses a LoRA into the weights (its fast path, hypersd.generate.fast)
    from hypersd.generate.loading import SCHEDULERS
    pipe.scheduler = SCHEDULERS["ddim"].from_config(pipe.scheduler.config, timestep_spacing="trailing")
    stock = pipe("a cat", num_inference_steps=4, guidance_scale=0.0,
                 generator=[torch.Generator().manual_seed(1)]).images
    np.testing.assert_array_equal(_array(ours.images), _array(stock))
    assert np.abs(_array(ours_kohya.images) - _array(ours.images)).max() <= 1.0
    assert np.abs(_array(plain.images) - _array(ours.images)).max() > 5, "the LoRA changed nothing"


def _cli(tmp_path, *args):
    out = tmp_path / "out"
    rc = main(["generate", *args, "--out", str(out)])
    return rc, out


@pytest.mark.parametrize("args, message", [
    (["a cat", "--model", "/nonexistent/model"], "not found"),
    (["a cat", "--steps", "0"], "outside"),
    (["a cat", "--recipe", "hyper-sd", "--steps", "20"], "outside the 1-8"),
    (["  "], "empty prompt"),
    (["a cat", "--sampler", "plms"], "unknown sampler"),
    (["a cat", "--recipe", "turbo"], "unknown recipe"),
    (["a cat", "--lora", "/nonexistent.safetensors"], "does not exist"),
    (["a cat", "--recipe", "lightning", "--negative", "blurry"], "needs classifier-free guidance"),
])
def test_bad_input_exits_2_without_files(tiny_dirs, tmp_path, capsys, args, message):
    args = [a.replace("SD15", tiny_dirs["sd15"]) for a in args]
    if "--model" not in args:
        args += ["--model", tiny_dirs["sd15"]]
    rc, out = _cli(tmp_path, *args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_corrupt_and_mismatched_lora(tiny_dirs, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    rc, out = _cli(tmp_path, "a cat", "--model", tiny_dirs["sd15"], "--lora", str(corrupt))
    assert rc == 2 and "cannot load LoRA" in capsys.readouterr().err and not out.exists()
    sdxl_lora, _ = _make_lora("sdxl", tiny_dirs, tmp_path / "x")
    rc, out = _cli(tmp_path, "a cat", "--model", tiny_dirs["sd15"], "--lora", str(sdxl_lora))
    assert rc == 2 and "LoRA" in capsys.readouterr().err and not out.exists()


def test_cli_writes_images_and_grid(tiny_dirs, tmp_path):
    rc, out = _cli(tmp_path, "a cat", "a dog", "--model", tiny_dirs["sdxl"], "--recipe", "lightning",
                   "--batch", "2")
    assert rc == 0
    assert len(list(out.glob("0*.png"))) == 4 and (out / "grid.png").exists()


def test_negative_prompt_changes_the_image_under_cfg(tiny_dirs):
    plain = generate(["a cat"], model=tiny_dirs["sd15"], recipe="hyper-sd-cfg", seed=2)
    negative = generate(["a cat"], model=tiny_dirs["sd15"], recipe="hyper-sd-cfg", seed=2, negative="a dog")
    assert np.abs(_array(plain.images) - _array(negative.images)).max() > 0


def test_loading_picks_the_pipeline_class(tiny_dirs):
    assert isinstance(load_pipeline(tiny_dirs["sdxl"]), StableDiffusionXLPipeline)
    assert type(load_pipeline(tiny_dirs["sd15"])) is StableDiffusionPipeline


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_checkpoint_matches_its_folder(kind, tiny_dirs, tmp_path, capsys):
    from hypersd.models.single_file import save_single_file
    pipe = load_pipeline(tiny_dirs[kind], device="cpu")
    path = tmp_path / f"tiny-{kind}.safetensors"
    save_single_file(pipe, str(path))
    loaded = load_pipeline(str(path), device="cpu", config=tiny_dirs[kind])
    assert type(loaded) is type(pipe)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # every weight comes back
        if getattr(pipe, name, None) is not None:
            ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
            assert ours.keys() == theirs.keys()
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    folder = generate(["a cat"], model=tiny_dirs[kind], recipe="tcd", seed=4)
    single = generate(["a cat"], model=str(path), config=tiny_dirs[kind], recipe="tcd", seed=4)
    np.testing.assert_array_equal(_array(single.images), _array(folder.images))
    # offline without --config: a clear error, exit code 2
    rc, out = _cli(tmp_path, "a cat", "--model", str(path))
    assert rc == 2 and "--config" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_replacement_unet_loads_from_a_folder_or_either_single_file_layout(kind, tiny_dirs, tmp_path):
    """--unet takes a diffusers folder, a diffusers-key file or an original-layout file, and
    stock diffusers' from_single_file reads our original-layout file to the same weights."""
    from diffusers import UNet2DConditionModel

    from hypersd.models.single_file import save_unet_single_file
    unet = load_pipeline(tiny_dirs[kind], device="cpu").unet
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(tmp_path / "folder")
    save_file(unet.state_dict(), tmp_path / "diffusers.safetensors")
    save_unet_single_file(unet, str(tmp_path / "ldm.safetensors"))
    stock = UNet2DConditionModel.from_single_file(str(tmp_path / "ldm.safetensors"), config=tiny_dirs[kind],
                                                  subfolder="unet")
    want = unet.state_dict()
    assert all(torch.equal(stock.state_dict()[k], v) for k, v in want.items())
    base = generate(["a cat"], model=tiny_dirs[kind], recipe="hyper-sdxl-1step-unet", seed=3)
    outs = [generate(["a cat"], model=tiny_dirs[kind], unet=str(tmp_path / name),
                     recipe="hyper-sdxl-1step-unet", seed=3)
            for name in ("folder", "diffusers.safetensors", "ldm.safetensors")]
    for out in outs[1:]:
        np.testing.assert_array_equal(_array(out.images), _array(outs[0].images))
    assert np.abs(_array(outs[0].images) - _array(base.images)).max() > 0  # the UNet was replaced
    assert outs[0].metadata(0)["unet"] == str(tmp_path / "folder")


def test_a_unet_of_another_model_is_refused_in_one_line(tiny_dirs, tmp_path, capsys):
    other = load_pipeline(tiny_dirs["sdxl"], device="cpu").unet
    save_file(other.state_dict(), tmp_path / "sdxl-unet.safetensors")
    other.save_pretrained(tmp_path / "sdxl-unet")
    cases = ((tmp_path / "sdxl-unet.safetensors", "does not fit"), (tmp_path / "sdxl-unet", "does not fit"),
             (tmp_path / "none", "not found"))
    for unet, message in cases:
        rc, out = _cli(tmp_path, "a cat", "--model", tiny_dirs["sd15"], "--unet", str(unet))
        err = capsys.readouterr().err
        assert rc == 2 and message in err.strip().splitlines()[-1] and not out.exists()
