"""Generation on tiny SD3-, FLUX- and Qwen-Image-shaped models: every flow recipe against stock
diffusers called as its model card says, the scheduler and guidance each card sets, LoRAs fused
at the card's scale, and bad input.

The Qwen-Image pipeline reads its chat template with MiniLM's tokenizer (hypersd.testing's
tokenizer in every slot): Qwen2.5-VL's own cannot be built offline, and the pipeline calls any
tokenizer the same way, so prompts go in as text like the others'.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline,
                       StableDiffusion3Pipeline)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from hypersd.cli import main
from hypersd.errors import UserError
from hypersd.generate import generate, get_recipe, load_loras, load_pipeline, resolve_recipe, run_pipeline
from hypersd.generate.fast import FastPipeline, fuse_loras
from hypersd.generate.loading import recipe_settings
from hypersd.generate.recipes import load_recipes
from hypersd.testing import QWEN_IMAGE_SCHEDULER, tiny_flux, tiny_qwen_image, tiny_sd3

SIZE = 16  # pixels a side: FLUX and Qwen-Image draw 128x128 latents unless told
# The published models' scheduler configs (their repositories' scheduler_config.json)
SCHEDULERS = {
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0},
    "flux-dev": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "flux-schnell": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                     "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
    "qwen-image": QWEN_IMAGE_SCHEDULER,
}
# Qwen-Image-Lightning's card builds its scheduler from this config, not the model's
LIGHTNING_SCHEDULER = {"base_image_seq_len": 256, "base_shift": math.log(3), "invert_sigmas": False,
                       "max_image_seq_len": 8192, "max_shift": math.log(3), "num_train_timesteps": 1000,
                       "shift": 1.0, "shift_terminal": None, "stochastic_sampling": False,
                       "time_shift_type": "exponential", "use_beta_sigmas": False, "use_dynamic_shifting": True,
                       "use_exponential_sigmas": False, "use_karras_sigmas": False}
STOCK = {"sd3": StableDiffusion3Pipeline, "flux-dev": FluxPipeline, "flux-schnell": FluxPipeline,
         "qwen-image": QwenImagePipeline}
# Each recipe as its card runs it: model, LoRA scale (None: no LoRA; the LoRA fused at it),
# scheduler config (None: the model's own) and the pipeline call's settings
CARDS = {
    "sd3": ("sd3", None, None, dict(num_inference_steps=28, guidance_scale=7.0, negative_prompt="")),
    "hyper-sd3-4step": ("sd3", 0.125, None, dict(num_inference_steps=4, guidance_scale=3.0)),
    "hyper-sd3-8step": ("sd3", 0.125, None, dict(num_inference_steps=8, guidance_scale=5.0)),
    "hyper-sd3-16step": ("sd3", 0.125, None, dict(num_inference_steps=16, guidance_scale=7.0)),
    "sd35-large-turbo": ("sd3", None, None, dict(num_inference_steps=4, guidance_scale=0.0)),
    "flux-dev": ("flux-dev", None, None, dict(num_inference_steps=50, guidance_scale=3.5, max_sequence_length=512)),
    "hyper-flux-8step": ("flux-dev", 0.125, None, dict(num_inference_steps=8, guidance_scale=3.5)),
    "hyper-flux-16step": ("flux-dev", 0.125, None, dict(num_inference_steps=16, guidance_scale=3.5)),
    "flux-schnell": ("flux-schnell", None, None, dict(num_inference_steps=4, guidance_scale=0.0,
                                                      max_sequence_length=256)),
    "qwen-image": ("qwen-image", None, None, dict(num_inference_steps=50, true_cfg_scale=4.0, negative_prompt=" ")),
    "qwen-image-lightning-4step": ("qwen-image", 1.0, LIGHTNING_SCHEDULER,
                                   dict(num_inference_steps=4, true_cfg_scale=1.0, negative_prompt=" ")),
    "qwen-image-lightning-8step": ("qwen-image", 1.0, LIGHTNING_SCHEDULER,
                                   dict(num_inference_steps=8, true_cfg_scale=1.0, negative_prompt=" ")),
}


def _build(model: str):
    pipe = {"sd3": tiny_sd3, "flux-dev": lambda: tiny_flux(guidance_embeds=True), "flux-schnell": tiny_flux,
            "qwen-image": tiny_qwen_image}[model]()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[model])
    return pipe


def _make_lora(pipe, folder) -> str:
    """A random LoRA on the pipeline's transformer, saved by its own save_lora_weights."""
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe.transformer.add_adapter(config)
    state = {k: 4 * v for k, v in get_peft_model_state_dict(pipe.transformer).items()}
    type(pipe).save_lora_weights(folder, transformer_lora_layers=state,
                                 transformer_lora_adapter_metadata=config.to_dict())  # its α, read back on load
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Each tiny model saved as a diffusers folder, with a LoRA for its transformer: {model: (folder, lora)}."""
    root = tmp_path_factory.mktemp("flow")
    out = {}
    for model in STOCK:
        pipe = _build(model)
        pipe.save_pretrained(root / model)
        out[model] = (str(root / model), _make_lora(pipe, root / f"{model}-lora"))
    return out


def _stock(flow, recipe: str, prompts, seeds, steps=None, **changes):
    """Stock diffusers as the recipe's card runs it (float images)."""
    model, lora_scale, scheduler, call = CARDS[recipe]
    folder, lora = flow[model]
    pipe = STOCK[model].from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler)
    if lora_scale is not None:
        pipe.load_lora_weights(lora)
        pipe.fuse_lora(lora_scale=lora_scale)
    call = {**call, **changes, **({"num_inference_steps": steps} if steps else {})}
    if isinstance(call.get("negative_prompt"), str):
        call["negative_prompt"] = [call["negative_prompt"]] * len(prompts)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    size = {} if model == "sd3" else {"width": SIZE, "height": SIZE}
    return pipe(prompts, generator=gens, output_type="np", **size, **call).images


def _ours(flow, recipe: str, prompts, seeds, **overrides):
    """``generate``'s path, float images: the model loaded, its LoRA loaded at the recipe's scale and
    fused (hypersd.generate.fast), the recipe's settings."""
    model, lora_scale = CARDS[recipe][:2]
    folder, lora = flow[model]
    r = resolve_recipe(recipe, **{k: v for k, v in overrides.items() if k != "negative"})
    pipe = load_pipeline(folder, device="cpu")
    if lora_scale is not None:
        load_loras(pipe, [(lora, r.lora_scale)])
    size = {} if model == "sd3" else {"extra": {"width": SIZE, "height": SIZE}}
    return run_pipeline(FastPipeline(pipe, speedup="none"), prompts, r, seeds, overrides.get("negative"),
                        output_type="np", **size)


def _pixels(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


# A long recipe at fewer steps keeps the file fast; the card's step count is checked in test_card_settings
STEPS = {"sd3": 4, "flux-dev": 4, "qwen-image": 4, "hyper-sd3-16step": 12}


@pytest.mark.parametrize("recipe", sorted(CARDS))
def test_matches_stock_diffusers_run_as_the_card_says(flow, recipe):
    steps = STEPS.get(recipe)
    ours = _ours(flow, recipe, ["a cat", "a dog"], [3, 4], steps=steps)
    stock = _stock(flow, recipe, ["a cat", "a dog"], [3, 4], steps=steps)
    np.testing.assert_allclose(ours, stock, atol=1e-4, rtol=0)
    # and generate() itself: the same pictures, as 8-bit images
    model, lora_scale = CARDS[recipe][:2]
    folder, lora = flow[model]
    size = {} if model == "sd3" else {"width": SIZE, "height": SIZE}
    made = generate(["a cat", "a dog"], model=folder, recipe=recipe, steps=steps, seed=3, batch=1,
                    loras=[lora] if lora_scale is not None else [], **size)
    assert made.seeds == [3, 3]
    first = _pixels(made.images[:1])[0]
    assert np.abs(first - np.round(stock[0] * 255)).max() <= 1


def test_flux_true_cfg_with_a_negative_prompt_matches_stock(flow):
    """FLUX.1-dev with true CFG on top of its distilled guidance: --guidance is true_cfg_scale."""
    ours = _ours(flow, "flux-dev", ["a cat"], [5], steps=3, guidance=3.0, negative="blurry")
    stock = _stock(flow, "flux-dev", ["a cat"], [5], steps=3, true_cfg_scale=3.0, negative_prompt=["blurry"])
    plain = _stock(flow, "flux-dev", ["a cat"], [5], steps=3)
    np.testing.assert_allclose(ours, stock, atol=1e-4, rtol=0)
    assert np.abs(stock - plain).max() > 1e-3, "true CFG changed nothing"


@pytest.mark.parametrize("recipe, scheduler, guidance", [
    ("hyper-sd3-4step", dict(shift=3.0, use_dynamic_shifting=False), dict(guidance_scale=3.0)),
    ("hyper-sd3-8step", dict(shift=3.0, use_dynamic_shifting=False), dict(guidance_scale=5.0)),
    ("hyper-sd3-16step", dict(shift=3.0, use_dynamic_shifting=False), dict(guidance_scale=7.0)),
    ("sd35-large-turbo", dict(shift=3.0, use_dynamic_shifting=False), dict(guidance_scale=0.0)),
    ("hyper-flux-8step", SCHEDULERS["flux-dev"], dict(guidance_scale=3.5, true_cfg_scale=1.0)),
    ("hyper-flux-16step", SCHEDULERS["flux-dev"], dict(guidance_scale=3.5, true_cfg_scale=1.0)),
    ("flux-schnell", dict(shift=1.0, use_dynamic_shifting=False), dict(true_cfg_scale=0.0, max_sequence_length=256)),
    ("qwen-image-lightning-4step", LIGHTNING_SCHEDULER, dict(true_cfg_scale=1.0)),
    ("qwen-image-lightning-8step", LIGHTNING_SCHEDULER, dict(true_cfg_scale=1.0)),
])
def test_card_settings_reach_diffusers(flow, recipe, scheduler, guidance):
    """The scheduler class and config, the guidance kind and the step count each card sets."""
    model, lora_scale, _, call = CARDS[recipe]
    pipe = load_pipeline(flow[model][0], device="cpu")
    r = get_recipe(recipe)
    kwargs = recipe_settings(pipe, r, [0])
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert {k: pipe.scheduler.config[k] for k in scheduler} == scheduler
    assert {k: kwargs[k] for k in guidance} == guidance
    assert not {"guidance_scale", "true_cfg_scale", "max_sequence_length"} - set(guidance) & set(kwargs)
    assert kwargs["num_inference_steps"] == call["num_inference_steps"]
    assert r.lora_scale == (lora_scale or 1.0)


@pytest.mark.parametrize("recipe, steps", [("hyper-sd3-8step", 6), ("hyper-sd3-8step", 8),
                                           ("hyper-sd3-16step", 12), ("hyper-sd3-16step", 16)])
def test_steps_keep_the_card_guidance_of_their_lora(recipe, steps):
    """The 8- and 16-step Hyper-SD3 LoRAs also run at 6 and 12 steps, at their own guidance."""
    assert resolve_recipe(recipe, steps=steps).guidance == {"hyper-sd3-8step": 5.0, "hyper-sd3-16step": 7.0}[recipe]


@pytest.mark.parametrize("steps", [4, 8])
def test_lightning_shift_is_three_at_every_resolution(flow, steps):
    """ln 3 as base and max shift: σ ← 3σ / (1 + 2σ) whatever the token count [the card's config]."""
    pipe = load_pipeline(flow["qwen-image"][0], device="cpu")
    recipe_settings(pipe, get_recipe(f"qwen-image-lightning-{steps}step"), [0])
    c = pipe.scheduler.config
    sigmas = np.linspace(1.0, 1 / steps, steps)
    for tokens in (16, 4096, 8192):
        mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(), 3 * sigmas / (1 + 2 * sigmas), rtol=1e-6)


@pytest.mark.parametrize("model, recipe", [("sd3", "hyper-sd3-8step"), ("flux-dev", "hyper-flux-8step"),
                                           ("qwen-image", "qwen-image-lightning-4step")])
def test_a_lora_loads_and_fuses_at_the_recipe_scale(flow, model, recipe):
    """W' = W + s·(α/r)·BA for the recipe's s [LoRA, Hu et al. 2021 §4.1], adapters then removed."""
    from safetensors.torch import load_file
    folder, lora = flow[model]
    pipe = load_pipeline(folder, device="cpu")
    scale = get_recipe(recipe).lora_scale
    name = "transformer_blocks.0.attn.to_q"
    before = dict(pipe.transformer.named_modules())[name].weight.detach().clone()
    assert load_loras(pipe, [(lora, scale)]) == ["lora0"]
    fuse_loras(pipe)
    state = load_file(lora)
    a, b = state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"]
    after = dict(pipe.transformer.named_modules())[name].weight
    torch.testing.assert_close(after, before + scale * (8 / 4) * b @ a, atol=1e-6, rtol=1e-5)
    assert not any(pipe.get_list_adapters().values())


def test_loading_picks_the_pipeline_class(flow):
    for model, cls in STOCK.items():
        assert type(load_pipeline(flow[model][0], device="cpu")) is cls


def test_qwen_image_true_cfg_runs_with_its_empty_negative_prompt(flow):
    """Guidance above 1 on Qwen-Image runs true CFG without a --negative (the card's " "), and a
    negative prompt then changes the image."""
    plain = _ours(flow, "qwen-image", ["a cat"], [2], steps=2)
    unguided = _ours(flow, "qwen-image", ["a cat"], [2], steps=2, guidance=1.0)
    negative = _ours(flow, "qwen-image", ["a cat"], [2], steps=2, negative="a dog")
    assert np.abs(plain - unguided).max() > 1e-4 and np.abs(plain - negative).max() > 1e-4


@pytest.mark.parametrize("model, kwargs, message", [
    ("flux-dev", dict(recipe="hyper-sd"), "recipe 'hyper-sd' is for SD1.5/SDXL models, and this model is FLUX: "
                                          "pass --recipe with one for FLUX: flux-dev, hyper-flux-8step"),
    ("flux-dev", dict(), "recipe 'teacher' is for SD1.5/SDXL models"),
    ("qwen-image", dict(recipe="hyper-flux-8step"), "one for Qwen-Image: qwen-image, qwen-image-lightning-4step"),
    ("flux-schnell", dict(recipe="hyper-flux-8step"), "has no guidance embedding"),
    ("flux-dev", dict(recipe="flux-schnell"), "pass --distilled-guidance, e.g. 3.5"),
    ("flux-dev", dict(recipe="flux-schnell", distilled_guidance=3.5, steps=1), None),  # fixed so
    ("flux-dev", dict(recipe="hyper-flux-8step", eta=0.3), "eta set SD1.5/SDXL samplers, not flow_euler"),
    ("flux-dev", dict(recipe="hyper-flux-8step", sampler="euler"), "sampler euler does not run FLUX models"),
    ("flux-dev", dict(recipe="hyper-flux-8step", steps=4), "outside the 8-8"),
    ("flux-dev", dict(recipe="hyper-flux-8step", width=20, height=16), "a multiple of 16"),
    ("flux-dev", dict(recipe="hyper-flux-8step", width=16), "give both --width and --height"),
    ("qwen-image", dict(recipe="qwen-image-lightning-4step", negative="blurry"), "needs classifier-free guidance"),
    ("sd3", dict(recipe="hyper-sd3-4step", unet="unet.safetensors"), "--unet replaces an SD1.5 or SDXL UNet"),
])
def test_bad_input_on_flow_models_says_what_fits(flow, model, kwargs, message):
    size = {} if model == "sd3" or "width" in kwargs else {"width": SIZE, "height": SIZE}
    if message is None:
        assert generate(["a cat"], model=flow[model][0], **size, **kwargs).images
        return
    with pytest.raises(UserError) as e:
        generate(["a cat"], model=flow[model][0], **size, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_flow_recipe_on_an_sd15_model_names_the_recipes_that_fit(tiny_dirs, tmp_path, capsys):
    rc = main(["generate", "a cat", "--model", tiny_dirs["sd15"], "--recipe", "hyper-flux-8step",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert ("recipe 'hyper-flux-8step' is for FLUX models, and this model is SD1.5: pass --recipe with one for "
            "SD1.5: teacher, hyper-sd,") in err


def test_a_picked_recipe_that_does_not_fit_says_why_it_was_picked(tiny_dirs, flow, tmp_path):
    lora = tmp_path / "Hyper-FLUX.1-dev-8steps-lora.safetensors"
    lora.write_bytes(open(flow["flux-dev"][1], "rb").read())
    with pytest.raises(UserError, match="picked because file name Hyper-FLUX.1-dev-8steps-lora.safetensors"):
        generate(["a cat"], model=tiny_dirs["sd15"], loras=[str(lora)])


@pytest.mark.parametrize("field, value, message", [
    ("shift", 0, "shift 0 is below 0.01"),
    ("shift", float("nan"), "shift nan is not a number"),
    ("base_shift", 20, "base_shift 20 is above 10"),
    ("max_image_seq_len", 100, "base_image_seq_len 256 must be below max_image_seq_len 100"),
    ("max_image_seq_len", 4096.5, "a whole number of tokens"),
    ("time_shift_type", "cubic", "must be one of exponential, linear"),
    ("use_dynamic_shifting", "yes", "must be one of True, False"),
    ("shift_terminal", 1.0, "shift_terminal 1 is above 0.999"),
    ("distilled_guidance", -1, "distilled_guidance -1 is negative"),
    ("max_sequence_length", 0, "max_sequence_length 0 must be a whole number of tokens from 1 to 1024"),
    ("models", ["sd15"], "sampler flow_euler does not run SD1.5 models"),
    ("models", ["sd4"], "must name model families from sd15, sdxl, sd3, flux, qwen-image"),
    ("models", "sd4", r"models \['sd4'\] must name model families"),  # one name, not its letters
    ("timestep_spacing", "trailing", "timestep_spacing set SD1.5/SDXL samplers, not flow_euler"),
])
def test_a_bad_flow_recipe_file_is_refused_at_load(tmp_path, field, value, message):
    import yaml
    spec = {**{k: v for k, v in vars(get_recipe("hyper-flux-8step")).items() if v is not None and k != "name"},
            field: value}
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump({"bad": spec}))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_recipes(path)


def test_an_sd_recipe_may_not_set_flow_fields():
    with pytest.raises(UserError, match="shift set the flow_euler sampler"):
        get_recipe("hyper-sd").with_overrides(shift=3.0)


def test_max_sequence_length_beyond_the_models_window_is_refused(flow):
    pipe = load_pipeline(flow["flux-schnell"][0], device="cpu")
    with pytest.raises(UserError, match="above the 512 text tokens this model takes"):
        recipe_settings(pipe, get_recipe("flux-schnell").with_overrides(max_sequence_length=1024), [0])


def test_the_cli_takes_a_size_and_distilled_guidance_and_records_them(flow, tmp_path):
    import json

    from PIL import Image
    out = tmp_path / "out"
    rc = main(["generate", "a cat", "--model", flow["flux-dev"][0], "--recipe", "flux-dev", "--steps", "2",
               "--distilled-guidance", "2.5", "--width", "32", "--height", "16", "--out", str(out)])
    assert rc == 0
    image = Image.open(out / "0000-seed0.png")
    assert image.size == (32, 16) and json.loads(image.text["size"]) == [32, 16]
    assert json.loads(image.text["recipe"])["distilled_guidance"] == 2.5


def test_a_prompt_past_t5s_window_is_cut_there_not_at_clips(flow, capsys):
    """FLUX reads the whole prompt through T5 (max_sequence_length tokens); CLIP's cut loses nothing."""
    from hypersd.generate.api import warn_truncated
    pipe = load_pipeline(flow["flux-schnell"][0], device="cpu")
    warn_truncated(pipe, ["a red apple " * 20], get_recipe("flux-schnell"))  # 60 tokens: past CLIP's 16
    assert capsys.readouterr().err == ""
    warn_truncated(pipe, ["a red apple " * 90 + "and a pear"], get_recipe("flux-schnell"))
    err = capsys.readouterr().err
    assert "longer than the text encoder's 256 tokens" in err and "pear" in err and err.count("\n") == 1


@pytest.mark.parametrize("file, recipe", [
    ("Hyper-SD3-4steps-CFG-lora.safetensors", "hyper-sd3-4step"),
    ("Hyper-SD3-8steps-CFG-lora.safetensors", "hyper-sd3-8step"),
    ("Hyper-SD3-16steps-CFG-lora.safetensors", "hyper-sd3-16step"),
    ("Hyper-FLUX.1-dev-8steps-lora.safetensors", "hyper-flux-8step"),
    ("Hyper-FLUX.1-dev-16steps-lora.safetensors", "hyper-flux-16step"),
    ("Qwen-Image-Lightning-4steps-V1.0.safetensors", "qwen-image-lightning-4step"),
    ("Qwen-Image-Lightning-8steps-V1.1-bf16.safetensors", "qwen-image-lightning-8step"),
    ("Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors", None),  # an editing model's: no recipe here
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", "hyper-sd-cfg"),    # SDXL's rows still win theirs
])
def test_published_flow_lora_names_pick_their_recipe(file, recipe):
    from hypersd.generate.autorecipe import from_name
    found = from_name(file)
    assert (found.recipe if found else None) == recipe


def test_a_recipe_after_another_gets_the_models_own_scheduler(flow):
    """What a flow recipe leaves out is the model's, not what the previous recipe on the pipeline set."""
    pipe = load_pipeline(flow["qwen-image"][0], device="cpu")
    recipe_settings(pipe, get_recipe("qwen-image-lightning-4step"), [0])
    assert pipe.scheduler.config.shift_terminal is None and pipe.scheduler.config.max_shift == math.log(3)
    recipe_settings(pipe, get_recipe("qwen-image"), [0])
    assert {k: pipe.scheduler.config[k] for k in SCHEDULERS["qwen-image"]} == SCHEDULERS["qwen-image"]
