"""`hypersd lora`: conversions, rescaling and merging keep ΔW exact; stock diffusers agrees."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from hypersd.cli import main
from hypersd.errors import UserError
from hypersd.generate import generate
from hypersd.lora.tools import merge, read_lora, rescale, to_format, unet_module_names, write_lora
from hypersd.testing import tiny_sd15


def _delta(lf):
    return {n: lf.scale_of(n) * b.flatten(1) @ a.flatten(1) for n, (a, b, _) in lf.modules.items()}


@pytest.fixture()
def lora_file(tmp_path):
    pipe = tiny_sd15()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_v", "conv1"]))
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    path = tmp_path / "l.safetensors"
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers={k[5:]: v for k, v in state.items()},
                                              unet_lora_adapter_metadata=LoraConfig(
                                                  r=4, lora_alpha=2, target_modules=["to_q", "to_v", "conv1"]).to_dict(),
                                              weight_name="l.safetensors")
    return path


def test_round_trip_through_kohya_keeps_delta(lora_file, tmp_path):
    lf = read_lora(lora_file)
    assert lf.format == "diffusers" and lf.scale_of(next(iter(lf.modules))) == 0.5
    kohya = write_lora(to_format(lf, "kohya"), tmp_path / "k.safetensors")
    back = to_format(read_lora(kohya), "diffusers", unet_module_names(tiny_sd15()))
    for n, d in _delta(lf).items():
        torch.testing.assert_close(_delta(back)[n], d)


def test_half_precision_copy_keeps_delta_to_fp16_rounding(lora_file, tmp_path):
    from safetensors.torch import load_file
    half = write_lora(read_lora(lora_file), tmp_path / "h.safetensors", dtype="fp16")
    assert all(v.dtype == torch.float16 for v in load_file(half).values())
    back = read_lora(half)
    for n, d in _delta(read_lora(lora_file)).items():
        torch.testing.assert_close(_delta(back)[n].float(), d, atol=2e-3, rtol=2e-3)
    with pytest.raises(UserError, match="unknown dtype"):
        write_lora(read_lora(lora_file), tmp_path / "x.safetensors", dtype="fp8")


def test_merge_adds_deltas_and_rescale_scales(lora_file):
    lf = read_lora(lora_file)
    merged = merge([(lf, 0.3), (rescale(lf, 2.0), 0.2)])
    for n, d in _delta(lf).items():
        torch.testing.assert_close(_delta(merged)[n], 0.7 * d, atol=1e-6, rtol=1e-5)


def test_cli_rescale_matches_generation_at_that_scale(lora_file, tmp_path, tiny_dirs):
    out = tmp_path / "half.safetensors"
    assert main(["lora", "rescale", str(lora_file), str(out), "--scale", "0.5"]) == 0
    a = generate(["a cat"], model=tiny_dirs["sd15"], recipe="hyper-sd", seed=0, loras=[f"{lora_file}:0.5"])
    b = generate(["a cat"], model=tiny_dirs["sd15"], recipe="hyper-sd", seed=0, loras=[f"{out}:1.0"])
    diff = np.abs(np.asarray(a.images[0], np.float32) - np.asarray(b.images[0], np.float32)).max()
    assert diff <= 1.0


def test_bad_lora_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable"):
        read_lora(bad)
    empty = tmp_path / "empty.safetensors"
    save_file({"x": torch.zeros(1)}, empty)
    with pytest.raises(UserError, match="no LoRA matrices"):
        read_lora(empty)
    assert main(["lora", "convert", str(empty), str(tmp_path / "o.safetensors"), "--to", "kohya"]) == 2
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("module, base, version", [
    ("transformer.single_transformer_blocks.0.proj_out", "flux", "flux1"),
    ("transformer.transformer_blocks.0.attn.to_q", "sd3", "sd3"),
    ("transformer.transformer_blocks.0.img_mlp.net.2", "qwen-image", "qwen_image")])
def test_a_flow_transformers_lora_keeps_its_base_through_a_rewrite(tmp_path, module, base, version):
    from safetensors import safe_open
    path = tmp_path / "plain.safetensors"  # no header: the base is read off the module names
    save_file({f"{module}.lora_A.weight": torch.randn(4, 8), f"{module}.lora_B.weight": torch.randn(8, 4)}, path)
    assert read_lora(path).base == base
    half = write_lora(read_lora(path), tmp_path / "half.safetensors", dtype="fp16")
    with safe_open(str(half), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == version
    assert read_lora(half).base == base  # and from the header written
    with pytest.raises(UserError, match="kohya names"):
        to_format(read_lora(half), "kohya")
