"""Schedule and segment math against hand-computed values and diffusers' schedulers."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler, UNet2DConditionModel

from hypersd.distill.denoiser import Denoiser, to_x0_eps
from hypersd.distill.schedule import (check_grid, ddim_step, lcm_boundary_scalings, sd_alphas_cumprod,
                                      multistep_path, segment_start, solver_grid, t_end, tcd_timesteps)
from hypersd.models.mini import SD15_SCHEDULE


def test_alphas_match_diffusers():
    ours = sd_alphas_cumprod()
    theirs = DDIMScheduler(**SD15_SCHEDULE).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_solver_grid_is_ddim_trailing():
    assert solver_grid(4).tolist() == [249, 499, 749, 999]
    for n in (1, 2, 4, 8, 50):
        sched = DDIMScheduler(**{**SD15_SCHEDULE, "timestep_spacing": "trailing"})
        sched.set_timesteps(n)
        assert solver_grid(n)[::-1].tolist() == sched.timesteps.tolist()
    with pytest.raises(ValueError):
        solver_grid(3)


@pytest.mark.parametrize("t, k, start", [(999, 4, 749), (750, 4, 749), (749, 4, 499), (249, 4, -1),
                                         (130, 8, 124), (124, 8, -1), (999, 1, -1), (999, 2, 499),
                                         (499, 2, -1), (0, 8, -1)])
def test_segment_start(t, k, start):
    assert segment_start(t, k) == start


def test_segment_edges_are_the_trailing_sampler_steps():
    for k in (1, 2, 4, 8):
        top = solver_grid(k)  # the k-step trailing DDIM timesteps
        assert [int(segment_start(t, k)) for t in top[::-1]] == top[::-1][1:].tolist() + [-1]


def test_grid_must_hold_the_edges():
    check_grid(40, 8)
    check_grid(200, 4)
    with pytest.raises(ValueError, match="solver grid"):
        check_grid(50, 4)


def test_t_end_rules():
    t_n, t_prev = np.array([999, 749, 300]), np.array([979, 729, 280])
    assert t_end("zero", t_n, t_prev, 4).tolist() == [-1, -1, -1]
    assert t_end("edge", t_n, t_prev, 4).tolist() == [749, 499, 249]
    assert t_end("uniform", t_n, t_prev, 4, u=np.zeros(3)).tolist() == [749, 499, 249]
    assert t_end("uniform", t_n, t_prev, 4, u=np.full(3, 0.999999)).tolist() == [979, 729, 280]
    u = np.random.default_rng(0).random((10000, 1)) * np.ones((1, 3))
    draws = t_end("uniform", np.tile(t_n, (10000, 1)), np.tile(t_prev, (10000, 1)), 4, u=u)
    assert (draws >= [749, 499, 249]).all() and (draws <= t_prev).all()
    # uniform over the integers of [t_b, t_prev]: mean at the middle
    np.testing.assert_allclose(draws.mean(0), ([749, 499, 249] + t_prev) / 2, atol=1.5)
    # k = 1 is CTM/TCD: anywhere from the clean image to t_prev
    assert t_end("uniform", 999, 979, 1, u=0.0) == -1
    with pytest.raises(ValueError):
        t_end("middle", t_n, t_prev, 4)


def test_ddim_step_matches_diffusers():
    sched = DDIMScheduler(**SD15_SCHEDULE)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = int(sched.timesteps[3])
    s = t - 1000 // 20
    alphas = torch.as_tensor(sd_alphas_cumprod())
    pred = to_x0_eps(eps.double(), x_t.double(), alphas[[t, t]], "epsilon")
    ours = ddim_step(pred.x0, pred.eps, alphas[s])
    theirs = sched.step(eps, t, x_t, eta=0.0).prev_sample
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_parameterisations_round_trip(kind):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g).double(), torch.randn(3, 4, 4, 4, generator=g).double()
    alpha = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)
    a = alpha.reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]
    pred = to_x0_eps(out, x_t, alpha, kind)
    torch.testing.assert_close(pred.x0, x0)
    torch.testing.assert_close(pred.eps, eps)


def test_lcm_scalings_match_diffusers():
    sched = LCMScheduler(**{k: v for k, v in SD15_SCHEDULE.items() if k != "clip_sample"})
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        ours = lcm_boundary_scalings(t)
        assert ours[0] == pytest.approx(float(c_skip), rel=1e-6) and ours[1] == pytest.approx(float(c_out), rel=1e-6)
    assert lcm_boundary_scalings(0) == (1.0, 0.0)


@pytest.mark.parametrize("steps, gamma", [(1, 1.0), (2, 0.3), (4, 0.3), (8, 0.0)])
def test_tcd_timesteps_match_diffusers(steps, gamma):
    sched = TCDScheduler(**{k: v for k, v in SD15_SCHEDULE.items() if k != "clip_sample"})
    sched.set_timesteps(steps)
    pairs = tcd_timesteps(steps, gamma)
    assert [t for t, _ in pairs] == sched.timesteps.tolist()
    prev = sched.timesteps.tolist()[1:] + [0]
    assert [s for _, s in pairs] == [int(np.floor((1 - gamma) * p)) for p in prev]


def test_denoiser_cfg_is_linear_in_guidance():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, norm_num_groups=16)
    den = Denoiser(unet, sd_alphas_cumprod())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    c, u = {"encoder_hidden_states": torch.randn(2, 3, 16)}, {"encoder_hidden_states": torch.zeros(2, 3, 16)}
    with torch.no_grad():
        pc, pu = den(x, t, c), den(x, t, u)
        p1, p3 = den(x, t, c, u, 1.0), den(x, t, c, u, 3.0)
    torch.testing.assert_close(p1.eps, pc.eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p3.eps, pu.eps + 3 * (pc.eps - pu.eps), atol=1e-5, rtol=1e-5)
    assert den.alpha(torch.tensor([-1]))[0] == 1.0


def test_multistep_path_hand_values():
    assert multistep_path(999, -1, 4).tolist() == [999, 749, 499, 249, -1]
    assert multistep_path(999, 749, 1).tolist() == [999, 749]
    assert multistep_path(10, 0, 3).tolist() == [10, 7, 4, 0]  # floor((i·10)/3): 0, 3, 6, 10
    paths = multistep_path(np.array([999, 500]), np.array([499, 100]), 2)
    assert paths.shape == (3, 2) and paths[:, 0].tolist() == [999, 749, 499] and paths[:, 1].tolist() == [500, 300, 100]
    with pytest.raises(ValueError, match="each step must move"):
        multistep_path(5, 3, 4)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_multistep_solve_matches_diffusers_ddim(n):
    """The teacher's n-step jump 999 → clean equals diffusers' DDIM (trailing, ᾱ_final = 1)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, norm_num_groups=16).eval()
    sched = DDIMScheduler(**{**SD15_SCHEDULE, "timestep_spacing": "trailing", "set_alpha_to_one": True,
                             "steps_offset": 0})
    sched.set_timesteps(n)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16)}
    den = Denoiser(lambda z, t, **kw: unet(z.float(), t, **kw), sched.alphas_cumprod)
    ours = den.solve(x.float(), multistep_path(999, -1, n), cond)
    theirs = x.float()
    with torch.no_grad():
        for t in sched.timesteps:
            theirs = sched.step(unet(theirs, t, **cond).sample, t, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
