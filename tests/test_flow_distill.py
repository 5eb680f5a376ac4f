"""Flow models through the one loop: tiny FLUX-, SD3- and Qwen-Image-shaped pipelines are
sampled by our denoiser exactly as by stock diffusers, train a stage of each method, export a
LoRA that stock diffusers loads with identical images, and resume."""

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffusers import FlowMatchEulerDiscreteScheduler

from hypersd.distill.denoiser import Denoiser
from hypersd.distill.family import family_of, prompt_cond
from hypersd.distill.flow import trailing_sigmas
from hypersd.distill.latents import decode
from hypersd.distill.loop import distill
from hypersd.distill.recipe import StageConfig
from hypersd.distill.schedule import trailing_timesteps
from hypersd.generate import get_recipe
from hypersd.testing import (assert_same_weights, full_and_resumed, random_examples, tiny_flux, tiny_qwen_image,
                             tiny_run, tiny_sd3)

BUILD = {"flux": tiny_flux, "sd3": tiny_sd3, "qwen-image": tiny_qwen_image}
FAMILIES = list(BUILD)
PROMPT = "emoji 3"
# The Flow process's shift: the schedulers' static 3; Qwen-Image's e^μ at its 16 tokens (4x4
# patches), μ linear from 0.5 at 256 tokens to 0.9 at 8192 (its scheduler config)
SHIFT = {"flux": 3.0, "sd3": 3.0, "qwen-image": math.exp(0.5 + 0.4 * (16 - 256) / (8192 - 256))}
HEADER_BASE = {"flux": "flux1", "sd3": "sd3", "qwen-image": "qwen_image"}


_examples, _run = random_examples, tiny_run


def _stock_latents(pipe, steps: int, family: str, seed: int = 0) -> torch.Tensor:
    """Stock diffusers' final latents (unpacked), no CFG, on the trailing σ grid."""
    return _unpacked(pipe, _stock(pipe, steps, family, "latent", seed), family)


def _stock(pipe, steps: int, family: str, output_type: str, seed: int = 0) -> torch.Tensor:
    """Stock diffusers' output; Qwen-Image's scheduler as the flow-student recipe serves it."""
    kw = dict(height=16, width=16, num_inference_steps=steps, output_type=output_type,
              generator=torch.Generator().manual_seed(seed))
    if family == "flux":
        return pipe(PROMPT, guidance_scale=1.0, **kw).images
    if family == "qwen-image":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, **get_recipe("flow-student").scheduler_config())
        return pipe(PROMPT, true_cfg_scale=1.0, **kw).images
    return pipe(PROMPT, guidance_scale=1.0, sigmas=list(np.linspace(1, 1 / steps, steps)), **kw).images


def _unpacked(pipe, latents: torch.Tensor, family: str) -> torch.Tensor:
    """(B, C, H, W) latents from a pipeline's output_type="latent" (FLUX and Qwen-Image: packed;
    Qwen-Image's also of one frame)."""
    if family == "sd3":
        return latents
    out = pipe._unpack_latents(latents, 16, 16, pipe.vae_scale_factor)
    return out[:, :, 0] if family == "qwen-image" else out


def _our_latents(pipe, steps: int, family: str, role_net=None, seed: int = 0) -> torch.Tensor:
    fam = family_of(pipe)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, *fam.latent_shape, generator=g)  # both pipelines draw it unpacked
    den = Denoiser(role_net or fam.net, fam.process, "flow", fam.call)
    path = np.append(trailing_timesteps(steps), -1)
    return den.solve(noise, path, prompt_cond(pipe, fam, [PROMPT]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("steps", [1, 4])
def test_our_sampler_is_stock_diffusers(family, steps):
    """The Flow process on the trailing grid with the network's call convention reproduces the
    pipeline's Euler sampling at the scheduler's shift (3 here; Qwen-Image's: e^μ at the
    model's token count, its exponential time shift)."""
    pipe = BUILD[family]()
    assert family_of(pipe).process.shift == pytest.approx(SHIFT[family], rel=1e-12)
    torch.testing.assert_close(_our_latents(pipe, steps, family), _stock_latents(pipe, steps, family),
                               atol=1e-5, rtol=1e-4)


def test_trailing_grid_is_what_the_pipeline_samples_at():
    pipe = tiny_flux()
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4))
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), trailing_sigmas(4, 3.0), rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, extra", [
    ("tscd", {"segments": 2}), ("lcm", {}), ("pcm", {"segments": 2}), ("dmd", {"regression_weight": 0.0}),
    ("tscd", {"segments": 2, "distance_weight": 0.5, "adversarial": {"weight": 0.5, "lr": 1e-3}}),
    ("dmd2", {"update_ratio": 1, "gan_weight": 0.5})])
def test_each_method_trains_a_flow_model_and_exports_a_lora_stock_diffusers_loads(tmp_path, family, method, extra):
    pipe = BUILD[family]()
    run = _run(tmp_path, [StageConfig.make(method=method, steps=2, batch_size=2, lr=1e-3, **extra)])
    lora, = distill(run, examples=_examples(pipe), pipe=pipe)
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        assert all(k.startswith("transformer.") for k in keys)
        assert any(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k), "the LoRA did not train"
    assert meta["ss_base_model_version"] == HEADER_BASE[family]
    if family == "qwen-image":  # Qwen-Image-Lightning's modules: both streams' attention and MLPs, but
        # the last block's text stream, which reaches no output
        modules = {k.split(".lora_")[0].removeprefix("transformer.transformer_blocks.") for k in keys}
        assert {"0.attn.to_q", "0.attn.add_q_proj", "0.attn.to_add_out", "0.img_mlp.net.0.proj",
                "0.txt_mlp.net.2", "1.attn.add_k_proj", "1.img_mlp.net.2"} <= modules
        assert not {"1.attn.add_q_proj", "1.attn.to_add_out", "1.txt_mlp.net.0.proj", "1.txt_mlp.net.2"} & modules
    assert not lora.with_suffix(".kohya.safetensors").exists()
    stock = BUILD[family]()
    stock.load_lora_weights(str(lora), adapter_name="x")
    assert "x" in stock.get_list_adapters()["transformer"]


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_lora_gives_stock_diffusers_the_same_images(tmp_path, family):
    """Our student (the adapter in training) and stock diffusers with the exported file, 2 steps."""
    pipe = BUILD[family]()
    run = _run(tmp_path, [StageConfig.make(method="tscd", segments=2, steps=3, batch_size=2, lr=1e-2)])
    lora, = distill(run, examples=_examples(pipe), pipe=pipe)
    ours = _our_latents(pipe, 2, family)  # the student adapter is still active on pipe's network
    stock = BUILD[family]()
    base = _stock_latents(stock, 2, family)
    stock.load_lora_weights(str(lora))
    theirs = _stock_latents(stock, 2, family)
    assert (theirs - base).abs().max() > 1e-3, "the LoRA changed nothing"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_flow_stage_resumes_to_the_same_weights(tmp_path):
    full, resumed = full_and_resumed(tiny_flux, tmp_path, segments=2)  # stopped after step 2
    assert_same_weights(full, resumed)


def test_family_reads_the_pipeline():
    fam = family_of(tiny_flux())
    assert (fam.name, fam.flow, fam.resolution, fam.latent_shape, fam.lora_prefix) == \
        ("flux", True, 16, (4, 8, 8), "transformer")
    assert family_of(tiny_sd3()).name == "sd3"
    fam = family_of(tiny_qwen_image())  # its pipeline's default size: default_sample_size 8 x the VAE's 2
    assert (fam.name, fam.flow, fam.resolution, fam.latent_shape, fam.lora_prefix, fam.max_sequence_length) == \
        ("qwen-image", True, 16, (4, 8, 8), "transformer", 512)
    assert "img_mlp.net.0.proj" in fam.lora_targets and "ff.net.0.proj" not in fam.lora_targets


def test_qwen_image_prompts_share_one_padded_window_that_denoises_as_unpadded():
    """Qwen-Image's prompts are padded to the pipeline's 512-token window with mask 0 (so batches,
    dropped captions and CFG share a shape); the transformer's output is the unpadded prompt's,
    called as QwenImagePipeline calls it (no mask when nothing is padding)."""
    pipe = tiny_qwen_image()
    fam = family_of(pipe)
    cond = prompt_cond(pipe, fam, [PROMPT, "a much longer prompt than the first", ""])
    assert cond["encoder_hidden_states"].shape[:2] == cond["encoder_hidden_states_mask"].shape == (3, 512)
    embeds, mask = pipe.encode_prompt([PROMPT], device="cpu")
    n = embeds.shape[1]
    assert mask is None and cond["encoder_hidden_states_mask"][0].tolist() == [1] * n + [0] * (512 - n)
    x, t = torch.randn(1, *fam.latent_shape), torch.tensor([700.0])
    ours = fam.call(fam.net, x, t, {k: v[:1] for k, v in cond.items()})
    stock = fam.net(hidden_states=pipe._pack_latents(x, 1, 4, 8, 8), timestep=t / 1000, encoder_hidden_states=embeds,
                    encoder_hidden_states_mask=None, img_shapes=[[(1, 4, 4)]]).sample
    torch.testing.assert_close(ours, _unpacked(pipe, stock, "qwen-image"), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_decode_as_the_pipeline_decodes_them(family):
    """``latents.decode`` (reward feedback's) gives the pipeline's images for its final latents,
    and the examples' latents are normalised as that decode undoes (Qwen-Image: per channel,
    (z - latents_mean) / latents_std, one frame of its video VAE)."""
    pipe = BUILD[family]()
    latents = _unpacked(pipe, _stock(pipe, 2, family, "latent"), family)
    images = _stock(pipe, 2, family, "pt")
    torch.testing.assert_close((decode(pipe.vae, latents) / 2 + 0.5).clamp(0, 1), images, atol=1e-5, rtol=1e-4)
    examples = random_examples(pipe, 2)
    raw = examples.mean[:, :, None] if family == "qwen-image" else examples.mean
    decoded = pipe.vae.decode(raw).sample
    torch.testing.assert_close(decode(pipe.vae, examples.normalise(examples.mean)),
                               decoded[:, :, 0] if family == "qwen-image" else decoded, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family, count, side", [("flux", 2, 4), ("sd3", 2, 4), ("qwen-image", 2, 4)])
def test_token_features_are_grids_after_each_block_with_gradient(family, count, side):
    """FLUX: after its double block and its last single block (2x2-packed, 4x4 tokens); SD3: after
    each of its 2 joint blocks (patch 2: 4x4 tokens); Qwen-Image: after each of its 2
    double-stream blocks (2x2-packed). The features reach back to x."""
    pipe = BUILD[family]()
    fam = family_of(pipe)
    x = torch.randn(2, *fam.latent_shape, requires_grad=True)
    feats = fam.features(fam.net, x, torch.tensor([999, 10]), prompt_cond(pipe, fam, ["a", "b"]))
    assert len(feats) == count and all(f.shape[0] == 2 and f.shape[-2:] == (side, side) for f in feats)
    feats[0].sum().backward()
    assert x.grad.abs().sum() > 0


def test_a_resolution_shift_is_the_one_the_pipeline_applies_at_the_models_size():
    """FLUX.1-dev's scheduler shifts by the image's token count (e^μ): the family's process takes
    that shift at the model's own size, so our sampler still matches the pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = tiny_flux()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    assert family_of(pipe).process.shift == pytest.approx(np.exp(0.5 + 0.65 * (16 - 256) / 3840))
    torch.testing.assert_close(_our_latents(pipe, 4, "flux"), _stock_latents(pipe, 4, "flux"), atol=1e-5, rtol=1e-4)
