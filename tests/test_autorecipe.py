"""The recipe picked when none is named: from our exports' headers, from the published
accelerators' file names, said in one line on stderr; an explicit --recipe wins silently."""

import json

import pytest
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from hypersd.cli import main
from hypersd.distill.export import save_lora
from hypersd.generate.autorecipe import PUBLISHED, choose_recipe, from_name
from hypersd.generate.recipes import load_recipes
from hypersd.testing import tiny_sd15

HUB = "models--{}/snapshots/0123abc/pytorch_lora_weights.safetensors"
NAMES = [  # file (or path) -> recipe, steps (None: the recipe's default)
    ("Hyper-SD15-1step-lora.safetensors", "hyper-sd-unified", None),
    ("Hyper-SDXL-1step-lora.safetensors", "hyper-sd-unified", None),
    ("Hyper-SD15-2steps-lora.safetensors", "hyper-sd", 2),
    ("Hyper-SDXL-4steps-lora.safetensors", "hyper-sd", 4),
    ("Hyper-SD15-8steps-lora.safetensors", "hyper-sd", 8),
    ("Hyper-SD15-12steps-lora.safetensors", "hyper-sd", 8),   # the recipe serves 1-8: kept within
    ("Hyper-SD15-8steps-CFG-lora.safetensors", "hyper-sd-cfg", 8),
    ("Hyper-SDXL-12steps-CFG-lora.safetensors", "hyper-sd-cfg", 12),
    ("Hyper-SDXL-1step-Unet.safetensors", "hyper-sdxl-1step-unet", None),
    ("Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors", "hyper-sdxl-1step-unet", None),
    ("sdxl_lightning_2step_lora.safetensors", "lightning", 2),
    ("sdxl_lightning_4step_lora.safetensors", "lightning", 4),
    ("sdxl_lightning_8step_lora.safetensors", "lightning", 8),
    ("sdxl_lightning_4step_unet.safetensors", "lightning", 4),
    ("sdxl_lightning_1step_unet_x0.safetensors", "lightning-1step", None),
    ("lcm-lora-sdv1-5/pytorch_lora_weights.safetensors", "lcm-lora", None),
    ("lcm-lora-sdxl/pytorch_lora_weights.safetensors", "lcm-lora", None),
    (HUB.format("latent-consistency--lcm-lora-sdxl"), "lcm-lora", None),
    ("lcm_lora_sd15.safetensors", "lcm-lora", None),
    ("TCD-SD15-LoRA.safetensors", "tcd", None),
    ("TCD-SDXL-LoRA/pytorch_lora_weights.safetensors", "tcd", None),
    (HUB.format("h1t--TCD-SDXL-LoRA"), "tcd", None),
    ("dmd2_sdxl_4step_lora_fp16.safetensors", "dmd2", 4),
    ("dmd2_sdxl_4step_unet_fp16.safetensors", "dmd2", 4),
    ("dmd2_sdxl_1step_unet_fp16.safetensors", "dmd2-1step", None),
    ("my-style.safetensors", None, None),
    ("loras/pytorch_lora_weights.safetensors", None, None),
]


@pytest.mark.parametrize("file, recipe, steps", NAMES, ids=[n[0] for n in NAMES])
def test_published_file_names_pick_their_recipe(file, recipe, steps):
    found = from_name(file)
    assert ((found.recipe, found.steps) if found else (None, None)) == (recipe, steps)
    choice = choose_recipe(None, None, [file])
    assert choice.recipe == (recipe or "teacher") and choice.why


def test_the_table_names_only_shipped_recipes():
    assert {recipe for _, recipe, _ in PUBLISHED} <= set(load_recipes())


def test_the_steps_in_a_name_stay_within_the_recipe():
    """A name's step count becomes the default steps, unless it is the recipe's own default
    (which keeps explicit timesteps, as DMD2's 999, 749, 499, 249)."""
    assert choose_recipe(None, None, ["Hyper-SD15-2steps-lora.safetensors"]).steps == 2
    assert choose_recipe(None, None, ["dmd2_sdxl_4step_lora_fp16.safetensors"]).steps is None
    assert choose_recipe(None, 6, ["Hyper-SD15-2steps-lora.safetensors"]).steps == 6  # --steps wins


def test_an_explicit_recipe_wins_silently():
    choice = choose_recipe("tcd", None, ["Hyper-SDXL-4steps-lora.safetensors"])
    assert (choice.recipe, choice.steps, choice.why) == ("tcd", None, None)
    assert choose_recipe(None, None, []).why is None  # no LoRA: the teacher, as ever, silently


def test_disagreeing_files_keep_the_first_opinion_and_say_so():
    choice = choose_recipe(None, None, ["my-style.safetensors", "Hyper-SDXL-4steps-lora.safetensors",
                                        "TCD-SDXL-LoRA.safetensors", "sdxl_lightning_4step_lora.safetensors"])
    assert choice.recipe == "hyper-sd"  # a style LoRA has no opinion: passed over
    assert "TCD-SDXL-LoRA.safetensors suggests tcd, ignored" in choice.why
    assert "sdxl_lightning_4step_lora.safetensors suggests lightning" in choice.why


def _export(path, info):
    """A tiny LoRA written by our exporter, with its "hypersd" header."""
    unet = tiny_sd15().unet
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
    unet.add_adapter(config)
    save_lora(get_peft_model_state_dict(unet), config, path, info, kohya=False)
    return str(path)


@pytest.mark.parametrize("info, recipe, steps", [
    ({"recipe": "lightning", "steps_served": "2"}, "lightning", 2),
    ({"recipe": "hyper-sd-unified", "steps_served": "1-8"}, "hyper-sd-unified", None),
    ({"recipe": "tscd-cfg", "steps_served": "4-8"}, "tscd-cfg", None),     # its default, 8, is served
    ({"recipe": "hyper-sd", "steps_served": "2-8"}, "hyper-sd", None),
    ({"recipe": "lcm", "steps_served": "1-8"}, "lcm", None),
    ({"recipe": "lightning", "steps_served": "32"}, "lightning", 8),       # beyond the recipe: its most
    ({"recipe": "hyper-sdxl-1step-unet", "steps_served": "1"}, "hyper-sdxl-1step-unet", None),
    ({"recipe": "no-such-recipe", "steps_served": "4"}, "hyper-sd", 2),   # unknown: the name decides
])
def test_our_exports_say_their_recipe_in_their_header(tmp_path, info, recipe, steps):
    # named like a published file: the header, where it names a known recipe, wins
    path = _export(tmp_path / "Hyper-SD15-2steps-lora.safetensors", {"method": "tscd", **info})
    choice = choose_recipe(None, None, [path])
    assert (choice.recipe, choice.steps) == (recipe, steps)
    if recipe == info["recipe"]:
        assert choice.why.startswith("Hyper-SD15-2steps-lora.safetensors was made by hypersd for it")


def _generate(tmp_path, *args):
    return main(["generate", "a cat", *args, "--out", str(tmp_path / "out")])


def test_the_cli_says_the_recipe_it_picked_in_one_line(tiny_dirs, tmp_path, capsys):
    lora = _export(tmp_path / "Hyper-SD15-2steps-lora.safetensors", {"note": "no recipe in this header"})
    assert _generate(tmp_path, "--model", tiny_dirs["sd15"], "--lora", lora) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["hypersd: recipe hyper-sd (2 steps): file name Hyper-SD15-2steps-lora.safetensors "
                   "matches Hyper-SD's 2-step LoRA"]
    recipe = json.loads(Image.open(tmp_path / "out" / "0000-seed0.png").text["recipe"])
    assert (recipe["name"], recipe["steps"], recipe["sampler"], recipe["timestep_spacing"]) == \
        ("hyper-sd", 2, "ddim", "trailing")
    # an explicit --recipe: nothing said
    assert _generate(tmp_path, "--model", tiny_dirs["sd15"], "--lora", lora, "--recipe", "tcd") == 0
    assert capsys.readouterr().err == ""
    # a recipe picked for the user that refuses their settings says why it was picked
    assert _generate(tmp_path, "--model", tiny_dirs["sd15"], "--lora", lora, "--steps", "20") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside the 1-8 that recipe 'hyper-sd' serves" in err
    assert "(recipe hyper-sd was picked because file name Hyper-SD15-2steps-lora.safetensors" in err


def test_a_lora_that_says_nothing_keeps_the_teacher_and_says_so(tiny_dirs, tmp_path, capsys):
    lora = _export(tmp_path / "style.safetensors", {})
    assert _generate(tmp_path, "--model", tiny_dirs["sd15"], "--lora", f"{lora}:0.5", "--steps", "1") == 0
    assert capsys.readouterr().err.splitlines() == [
        "hypersd: recipe teacher (1 step): no file says which recipe it was made for (style.safetensors)"]


def test_a_tag_in_a_prompt_picks_the_recipe_too(tiny_dirs, tmp_path, capsys):
    lora = _export(tmp_path / "loras" / "sdxl_lightning_2step_lora.safetensors", {})
    rc = main(["generate", "a cat <lora:sdxl_lightning_2step_lora>", "--model", tiny_dirs["sd15"],
               "--lora-dir", str(tmp_path / "loras"), "--out", str(tmp_path / "out")])
    assert rc == 0 and capsys.readouterr().err.startswith("hypersd: recipe lightning (2 steps): file name")
    meta = Image.open(tmp_path / "out" / "0000-seed0.png").text
    assert json.loads(meta["loras"]) == [[lora, 1.0]] and json.loads(meta["recipe"])["sampler"] == "euler"
