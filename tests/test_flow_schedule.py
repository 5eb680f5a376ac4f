"""Flow-matching schedule math and the Flow process: hand values, and diffusers'
FlowMatchEulerDiscreteScheduler step by step."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from hypersd.distill import flow
from hypersd.distill.denoiser import Denoiser
from hypersd.distill.process import VP, Flow, process_of
from hypersd.distill.schedule import sd_alphas_cumprod, solver_grid, trailing_timesteps


def test_shift_by_hand():
    assert flow.shift_sigmas(0.5, 3.0) == pytest.approx(0.75)
    assert flow.shift_sigmas(0.25, 3.0) == pytest.approx(0.75 / 1.5)
    np.testing.assert_allclose(flow.shift_sigmas([0.0, 1.0], 3.0), [0.0, 1.0])
    np.testing.assert_allclose(flow.shift_sigmas([0.1, 0.7], 1.0), [0.1, 0.7])
    with pytest.raises(ValueError):
        flow.shift_sigmas(0.5, 0.0)


def test_time_shift_is_the_static_shift_at_e_to_the_mu():
    s = np.linspace(0.01, 1, 50)
    np.testing.assert_allclose(flow.time_shift(s, math.log(3.0)), flow.shift_sigmas(s, 3.0), rtol=1e-12)


def test_flux_mu_ends():
    assert flow.flux_mu(256) == pytest.approx(0.5)
    assert flow.flux_mu(4096) == pytest.approx(1.15)
    assert flow.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


@pytest.mark.parametrize("steps", [1, 4, 8, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_scheduler_sigmas_match_diffusers(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    np.testing.assert_allclose(flow.scheduler_sigmas(steps, shift), sched.sigmas.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 4, 16])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
def test_dynamic_sigmas_match_diffusers_as_fluxs_pipeline_calls_it(steps, seq_len):
    """FluxPipeline passes σ = linspace(1, 1/N, N) and μ from the image's token count."""
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = flow.flux_mu(seq_len)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    np.testing.assert_allclose(flow.trailing_sigmas(steps, mu=mu), sched.sigmas.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_trailing_sigmas_with_static_shift_match_diffusers(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    np.testing.assert_allclose(flow.trailing_sigmas(4, shift), sched.sigmas.numpy(), rtol=1e-6)


def test_flow_step_is_diffusers_euler_step_along_a_whole_sampling():
    """x_s = (1 - s)·x̂₀ + s·ε̂ with (x̂₀, ε̂) from v̂ at σ is the scheduler's Euler step."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ours = x.double()
    weights = torch.randn(4, 4, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.einsum("bchw,cd->bdhw", x, weights).tanh()  # any velocity field
        sigma, nxt = sched.sigmas[i].double(), sched.sigmas[i + 1].double()
        x0, eps = ours - sigma * v.double(), ours + (1 - sigma) * v.double()
        ours = flow.flow_step(x0, eps, nxt)
        x = sched.step(v, t, x).prev_sample
        torch.testing.assert_close(ours.float(), x, atol=1e-5, rtol=1e-5)


def test_logit_normal_is_a_sigmoid_of_the_normal():
    np.testing.assert_allclose(flow.logit_normal([0.0, 100.0, -100.0]), [0.5, 1.0, 0.0], atol=1e-12)
    assert flow.logit_normal(1.0, mean=0.5, std=2.0) == pytest.approx(1 / (1 + math.exp(-2.5)))


def test_vp_alpha_has_the_same_snr():
    s = np.array([0.1, 0.5, 0.9])
    a = flow.vp_alpha(s)
    np.testing.assert_allclose(a / (1 - a), ((1 - s) / s) ** 2)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_flow_process_axis_puts_trailing_grids_on_pipeline_sigmas(steps, shift):
    """σ(t) on the trailing grid T/N·n - 1 is the σ that FLUX's pipeline samples N steps at."""
    t = torch.as_tensor(np.append(trailing_timesteps(steps), -1))
    np.testing.assert_allclose(Flow(shift).sigma(t).numpy(), flow.trailing_sigmas(steps, shift), rtol=1e-12)


def test_flow_segment_edges_are_even_in_sigma():
    """TSCD's k-segment edges (T/k·j - 1) are σ = j/k at shift 1; the solver grid holds them."""
    edges = torch.as_tensor(solver_grid(4))
    np.testing.assert_allclose(Flow(1.0).sigma(edges).numpy(), [0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("process, kind", [(Flow(3.0), "flow"), (VP(sd_alphas_cumprod()), "epsilon"),
                                           (VP(sd_alphas_cumprod()), "v_prediction")])
def test_process_target_and_split_invert_each_other(process, kind):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g).double(), torch.randn(3, 4, 8, 8, generator=g).double()
    t = torch.tensor([999, 500, 3])
    x_t = process.noised(x0, t, eps)
    x0_hat, eps_hat = process.split(process.target(x0, eps, t, kind), x_t, t, kind)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_flow_noised_by_hand():
    x0, eps = torch.ones(1, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert Flow(1.0).noised(x0, torch.tensor([499]), eps).flatten()[0] == pytest.approx(0.5)
    assert Flow(3.0).noised(x0, torch.tensor([499]), eps).flatten()[0] == pytest.approx(0.25)
    assert Flow(3.0).noised(x0, torch.tensor([-1]), eps).flatten()[0] == 1.0


@pytest.mark.parametrize("process", [Flow(3.0), VP(sd_alphas_cumprod())])
def test_renoise_gives_the_forward_marginal(process):
    """x_s → x_t re-noised has the marginal of x_t: mean a_t·x₀ and noise scale b_t."""
    n = 200_000
    g = torch.Generator().manual_seed(2)
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    s, t = torch.full((n,), 249), torch.full((n,), 749)
    x_s = process.noised(x0, s, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    x_t = process.renoise(x_s, s, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    a_t, b_t = (float(c[0]) for c in process.coefficients(t[:1]))
    assert x_t.mean().item() == pytest.approx(a_t * 0.7, abs=5e-3)
    assert x_t.std().item() == pytest.approx(b_t, rel=1e-2)


def test_vp_renoise_is_the_ratio_formula():
    vp = VP(sd_alphas_cumprod())
    x, e = torch.randn(2, 4, 8, 8).double(), torch.randn(2, 4, 8, 8).double()
    s, t = torch.tensor([100, 200]), torch.tensor([600, 999])
    r = (vp.alpha(t) / vp.alpha(s)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(vp.renoise(x, s, t, e), r.sqrt() * x + (1 - r).sqrt() * e)


def test_process_of_reads_the_scheduler():
    assert isinstance(process_of(FlowMatchEulerDiscreteScheduler(shift=3.0)), Flow)
    assert process_of(FlowMatchEulerDiscreteScheduler(shift=3.0)).shift == 3.0
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    assert process_of(dynamic).shift == 1.0  # no image size: no shift
    assert process_of(dynamic, 4096).shift == pytest.approx(math.exp(1.15))


def test_denoiser_refuses_a_vp_parameterisation_for_a_flow():
    with pytest.raises(ValueError, match="flow"):
        Denoiser(lambda *a, **k: None, Flow(), "epsilon")
