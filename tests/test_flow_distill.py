"""Flow models through the one loop: tiny FLUX- and SD3-shaped pipelines are sampled by our
denoiser exactly as by stock diffusers, train a stage of each method, export a LoRA that stock
diffusers loads with identical images, and resume."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hypersd.distill.denoiser import Denoiser
from hypersd.distill.family import family_of, prompt_cond
from hypersd.distill.flow import trailing_sigmas
from hypersd.distill.loop import distill
from hypersd.distill.process import process_of
from hypersd.distill.recipe import StageConfig
from hypersd.distill.schedule import trailing_timesteps
from hypersd.testing import assert_same_weights, full_and_resumed, random_examples, tiny_flux, tiny_run, tiny_sd3

BUILD = {"flux": tiny_flux, "sd3": tiny_sd3}
PROMPT = "emoji 3"


_examples, _run = random_examples, tiny_run


def _stock_latents(pipe, steps: int, family: str, seed: int = 0) -> torch.Tensor:
    """Stock diffusers' final latents (unpacked), no CFG, on the trailing σ grid."""
    kw = dict(height=16, width=16, num_inference_steps=steps, output_type="latent",
              generator=torch.Generator().manual_seed(seed))
    if family == "flux":
        out = pipe(PROMPT, guidance_scale=1.0, **kw).images
        return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
    return pipe(PROMPT, guidance_scale=1.0, sigmas=list(np.linspace(1, 1 / steps, steps)), **kw).images


def _our_latents(pipe, steps: int, family: str, role_net=None, seed: int = 0) -> torch.Tensor:
    fam = family_of(pipe)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, *fam.latent_shape, generator=g)  # both pipelines draw it unpacked
    den = Denoiser(role_net or fam.net, fam.process, "flow", fam.call)
    path = np.append(trailing_timesteps(steps), -1)
    return den.solve(noise, path, prompt_cond(pipe, fam, [PROMPT]))


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("steps", [1, 4])
def test_our_sampler_is_stock_diffusers(family, steps):
    """The Flow process on the trailing grid with the network's call convention reproduces the
    pipeline's Euler sampling at the scheduler's shift (3 here)."""
    pipe = BUILD[family]()
    assert process_of(pipe.scheduler).shift == 3.0
    torch.testing.assert_close(_our_latents(pipe, steps, family), _stock_latents(pipe, steps, family),
                               atol=1e-5, rtol=1e-4)


def test_trailing_grid_is_what_the_pipeline_samples_at():
    pipe = tiny_flux()
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4))
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), trailing_sigmas(4, 3.0), rtol=1e-6)


@pytest.mark.parametrize("family", ["flux", "sd3"])
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
    assert meta["ss_base_model_version"] == ("flux1" if family == "flux" else "sd3")
    assert not lora.with_suffix(".kohya.safetensors").exists()
    stock = BUILD[family]()
    stock.load_lora_weights(str(lora), adapter_name="x")
    assert "x" in stock.get_list_adapters()["transformer"]


@pytest.mark.parametrize("family", ["flux", "sd3"])
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


@pytest.mark.parametrize("family, count, side", [("flux", 2, 4), ("sd3", 2, 4)])
def test_token_features_are_grids_after_each_block_with_gradient(family, count, side):
    """FLUX: after its double block and its last single block (2x2-packed, 4x4 tokens); SD3: after
    each of its 2 joint blocks (patch 2: 4x4 tokens). The features reach back to x."""
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
