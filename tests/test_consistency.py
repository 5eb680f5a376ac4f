"""The consistency loss on a tiny UNet: shapes, gradient isolation and a known answer."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from hypersd.distill.consistency import Batch, ConsistencyConfig, ConsistencyLoss
from hypersd.distill.schedule import ddim_step
from hypersd.distill.denoiser import Denoiser
from hypersd.distill.schedule import sd_alphas_cumprod


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, norm_num_groups=16)


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    return Batch([f"p{i}" for i in range(n)], {"encoder_hidden_states": torch.randn(n, 3, 16, generator=g)},
                 {"encoder_hidden_states": torch.zeros(n, 3, 16)}, latents)


@pytest.mark.parametrize("rule, k, boundary", [("zero", 1, True), ("edge", 4, False),
                                               ("uniform", 8, False), ("uniform", 1, False)])
def test_loss_shapes_and_gradient_isolation(rule, k, boundary):
    alphas = sd_alphas_cumprod()
    student, teacher = _unet(0), _unet(1).requires_grad_(False)
    target = copy.deepcopy(student).requires_grad_(False)
    loss_fn = ConsistencyLoss(ConsistencyConfig(segments=k, t_end=rule, boundary=boundary))
    per, logs = loss_fn(Denoiser(student, alphas), Denoiser(teacher, alphas), Denoiser(target, alphas),
                        _batch(), torch.Generator().manual_seed(0))
    assert per.shape == (4,) and torch.isfinite(per).all() and (per >= 0).all()
    per.mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert set(logs) == {"t_n", "t_end", "omega"}


def test_sampled_times_follow_the_rules():
    g = torch.Generator().manual_seed(0)
    for rule, k in (("zero", 1), ("edge", 4), ("uniform", 4), ("uniform", 1)):
        t_n, t_prev, end = ConsistencyLoss(ConsistencyConfig(segments=k, t_end=rule)).sample_times(2000, g)
        assert (t_n - t_prev == 25).all() and (t_n >= 24).all() and (t_prev >= -1).all()
        assert (t_prev == -1).any()
        if rule == "zero":
            assert (end == -1).all()
            continue
        start = (t_n // (1000 // k)) * (1000 // k) - 1
        assert (end >= start).all() and (end <= t_prev).all()
        if rule == "edge":
            assert (end == start).all()


def test_target_is_the_teacher_step_when_t_end_is_t_prev():
    """Ψ(x, f(x, s), s) = x: when t_end = t_{n-1} the loss's target is the teacher's DDIM step
    x̂_{t_{n-1}}, and a student equal to the teacher has zero loss."""
    alphas = sd_alphas_cumprod()
    den = Denoiser(_unet(0).requires_grad_(False), alphas)
    loss_fn = ConsistencyLoss(ConsistencyConfig(segments=1, t_end="uniform", guidance=None, distance="mse"))
    d = loss_fn.draw(_batch(), torch.Generator().manual_seed(0))
    d.t_end = d.t_prev.clamp(min=0)
    d.t_prev = d.t_prev.clamp(min=0)  # keep every example off the clean-image shortcut
    terms = loss_fn.terms(den, den, den, d)
    a_n = den.alpha(d.t_n).reshape(-1, 1, 1, 1).float()
    x_t = a_n.sqrt() * d.latents + (1 - a_n).sqrt() * d.noise
    with torch.no_grad():
        pred = den(x_t, d.t_n, d.cond)
    teacher_step = ddim_step(pred.x0, pred.eps, den.alpha(d.t_prev).reshape(-1, 1, 1, 1).float())
    torch.testing.assert_close(terms.target, teacher_step, atol=1e-4, rtol=1e-4)
    assert terms.per_sample.max() < 1e-8


def test_psi_to_its_own_timestep_is_the_identity():
    alphas = sd_alphas_cumprod()
    den = Denoiser(_unet(0), alphas)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([979, 499, 19])
    with torch.no_grad():
        pred = den(x, t, {"encoder_hidden_states": torch.randn(3, 3, 16)})
    torch.testing.assert_close(den.step(pred, t), x, atol=1e-5, rtol=1e-5)


def test_student_guidance_guides_prediction_and_target_at_the_teachers_omega():
    """A CFG-preserving student: its prediction is Ψ of the student guided at the teacher's ω
    (redrawn here from the same generator), not of its conditional branch alone."""
    alphas = sd_alphas_cumprod()
    student = Denoiser(_unet(0), alphas)
    frozen = Denoiser(_unet(1).requires_grad_(False), alphas)
    batch = _batch()
    cfg = ConsistencyConfig(segments=4, guidance=(2.0, 4.0), student_guidance=True, distance="mse")
    loss_fn = ConsistencyLoss(cfg)
    terms = loss_fn.terms(student, frozen, frozen, loss_fn.draw(batch, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    t_n, _, end = ConsistencyLoss(cfg).sample_times(4, g)
    torch.randn(batch.latents.shape, generator=g)  # the noise, drawn next
    omega = 2.0 + 2.0 * torch.rand(4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        guided = student(terms.x_t, t_n, batch.cond, batch.uncond, omega)
        plain = student(terms.x_t, t_n, batch.cond)
    torch.testing.assert_close(terms.prediction.detach(), student.step(guided, end))
    assert (terms.prediction.detach() - student.step(plain, end)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance range"):
        ConsistencyLoss(ConsistencyConfig(guidance=None, student_guidance=True))
