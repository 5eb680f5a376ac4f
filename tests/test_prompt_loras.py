"""LoRAs named in prompts, ``<lora:NAME:WEIGHT>``: parsing, lookup, bad tags, and prompts of one
call with different LoRAs drawn in one pass per set, each image as a call with its LoRAs alone."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from hypersd.cli import main
from hypersd.errors import UserError
from hypersd.generate import generate
from hypersd.generate.prompt_loras import ENV, split_prompt
from hypersd.testing import tiny_sd15


def _save_lora(path, seed):
    """A random LoRA that fits the tiny SD1.5 UNet, strong enough to change its images."""
    torch.manual_seed(seed)
    unet = tiny_sd15().unet
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"unet.{k}": v * 5 for k, v in get_peft_model_state_dict(unet).items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    _save_lora(root / "a.safetensors", 1)
    _save_lora(root / "styles" / "b.safetensors", 2)
    return root


def _array(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat", "a cat", []),
    ("a cat <lora:a:0.8>", "a cat", [("a.safetensors", 0.8)]),
    ("<lora:a>, a cat", "a cat", [("a.safetensors", 1.0)]),                  # no weight: 1, as in A1111
    ("a cat, <LORA:a.safetensors:-0.5>, red", "a cat, red", [("a.safetensors", -0.5)]),
    ("a dog <lora:b:0.3> <lora:a:2>", "a dog", [("styles/b.safetensors", 0.3), ("a.safetensors", 2.0)]),
    ("a dog <lora:styles/b>", "a dog", [("styles/b.safetensors", 1.0)]),
])
def test_tags_are_read_and_removed_from_the_text(lora_dir, prompt, text, tags):
    got_text, got = split_prompt(prompt, lora_dir)
    assert got_text == text
    assert got == [(str(lora_dir / name), weight) for name, weight in tags]


def test_a_tag_may_be_a_path(lora_dir):
    assert split_prompt(f"a cat <lora:{lora_dir}/styles/b:0.5>") == ("a cat", [(str(lora_dir / "styles/b.safetensors"), 0.5)])


@pytest.mark.parametrize("prompt, fragment", [
    ("a cat <lora:a:0.8", "has a LoRA tag that is not whole: write <lora:NAME> or <lora:NAME:WEIGHT>"),
    ("a cat <lora::0.8>", "names no LoRA"),
    ("a cat <lora:a:strong>", "weight 'strong' is not a number"),
    ("a cat <lora:a:inf>", "LoRA scale inf is infinite: use a number from -10 to 10"),
    ("a cat <lora:a:nan>", "LoRA scale nan is not a number"),
    ("a cat <lora:a:1e6>", "LoRA scale 1e+06 is above 10"),
    ("a cat <lora:a:0.5:0.8>", "hypersd takes one weight"),
    ("a cat <lora:a:unet=0.5>", "hypersd takes one weight"),
    ("a cat <lora:nowhere>", "no LoRA 'nowhere' in the LoRA folder"),
    ("a cat <lora:a> <lora:a.safetensors:0.5>", "that LoRA is named twice"),
    ("<lora:a:0.5>", "is only LoRA tags: add the text to draw"),
])
def test_a_bad_tag_is_one_user_error(lora_dir, prompt, fragment):
    with pytest.raises(UserError) as e:
        split_prompt(prompt, lora_dir)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_name_without_a_folder_says_how_to_give_one():
    with pytest.raises(UserError, match=f"pass --lora-dir DIR \\(or set {ENV}\\)"):
        split_prompt("a cat <lora:nowhere:0.5>")


def test_prompts_with_different_loras_draw_as_separate_calls(tiny_dirs, lora_dir, tmp_path):
    """One pass per LoRA set; every image equals a call with that set given by --lora."""
    model, a, b = tiny_dirs["sd15"], str(lora_dir / "a.safetensors"), str(lora_dir / "styles/b.safetensors")
    kwargs = dict(model=model, recipe="hyper-sd", seed=3, batch=2)
    mixed = generate(["a cat <lora:a:0.7>", "a cat", "a dog, <lora:b>", "a bird <lora:a:0.7>"],
                     lora_dir=str(lora_dir), **kwargs)
    alone = [generate(["a cat"], loras=[f"{a}:0.7"], **kwargs), generate(["a cat"], **kwargs),
             generate(["a dog"], loras=[b], **kwargs), generate(["a bird"], loras=[f"{a}:0.7"], **kwargs)]
    for k, want in enumerate(alone):  # a pass of 4 images against one of 2: batched sums may round apart
        assert np.abs(_array(mixed.images[2 * k:2 * k + 2]) - _array(want.images)).max() <= 1, k
    assert np.abs(_array(alone[0].images) - _array(alone[1].images)).max() > 5, "the LoRA changed nothing"
    paths = mixed.save(tmp_path)
    meta = [Image.open(p).text for p in paths[:-1]]
    assert [json.loads(m["loras"]) for m in meta[::2]] == [[[a, 0.7]], [], [[b, 1.0]], [[a, 0.7]]]
    assert meta[0]["prompt"] == "a cat <lora:a:0.7>"  # as written: the same call draws it again


def test_a_tag_and_a_lora_flag_combine(tiny_dirs, lora_dir):
    """--lora applies to every prompt; a tag naming the same file sets its weight for its prompt."""
    model, a, b = tiny_dirs["sd15"], str(lora_dir / "a.safetensors"), str(lora_dir / "styles/b.safetensors")
    kwargs = dict(model=model, recipe="hyper-sd", seed=1)
    mixed = generate(["a cat <lora:b:0.5>", "a cat <lora:a:0.2>"], loras=[f"{a}:0.7"], lora_dir=str(lora_dir),
                     **kwargs)
    assert [mixed.metadata(i)["loras"] for i in range(2)] == [[(a, 0.7), (b, 0.5)], [(a, 0.2)]]
    both = generate(["a cat"], loras=[f"{a}:0.7", f"{b}:0.5"], **kwargs)
    assert np.abs(_array(mixed.images[:1]) - _array(both.images)).max() <= 1  # adapters summed in another order
    np.testing.assert_array_equal(_array(mixed.images[1:]),
                                  _array(generate(["a cat"], loras=[f"{a}:0.2"], **kwargs).images))


def test_the_cli_finds_names_in_the_folder_of_the_environment(tiny_dirs, lora_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV, str(lora_dir))
    out = tmp_path / "out"
    argv = ["generate", "a cat <lora:a:0.7>", "--model", tiny_dirs["sd15"], "--recipe", "hyper-sd", "--out"]
    assert main(argv + [str(out)]) == 0
    assert json.loads(Image.open(out / "0000-seed0.png").text["loras"]) == [[str(lora_dir / "a.safetensors"), 0.7]]
    rc = main(["generate", "a cat <lora:a:much>", "--model", tiny_dirs["sd15"], "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "weight 'much' is not a number" in err
    assert not (tmp_path / "o2").exists()
