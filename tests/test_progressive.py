"""Progressive (SDXL-Lightning) distillation: its grids against diffusers, its target against the
teacher's own sampler, its discriminator's inputs and isolation, its stages and resumption."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from peft import LoraConfig
from safetensors import safe_open

from hypersd.distill.loop import distill
from hypersd.distill.methods.progressive import LightningAdversarialConfig, ProgressiveConfig, ProgressiveMethod
from hypersd.distill.networks import Networks
from hypersd.distill.protocol import StageContext
from hypersd.distill.recipe import StageConfig
from hypersd.distill.schedule import progressive_path, trailing_timesteps
from hypersd.errors import UserError
from hypersd.models.mini import SD15_SCHEDULE
from hypersd.testing import assert_same_weights, tiny_sd15, tiny_sdxl
from test_distill import _examples, _run, checkpoint_state

BUILD = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 128])
def test_trailing_timesteps_are_diffusers(n):
    schedule = {k: SD15_SCHEDULE[k] for k in ("beta_start", "beta_end", "beta_schedule")}
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        sched = cls(**schedule, timestep_spacing="trailing")
        sched.set_timesteps(n)
        assert trailing_timesteps(n).tolist() == sched.timesteps.long().tolist()


def test_progressive_path_splits_the_teacher_grid_at_the_student_steps():
    path = progressive_path(128, 32, np.arange(32))      # (5, 32): 4 teacher steps per student step
    student = np.append(trailing_timesteps(32), -1)
    assert path.shape == (5, 32)
    assert (path[0] == student[:-1]).all() and (path[-1] == student[1:]).all()
    assert (np.diff(path, axis=0) < 0).all()
    assert np.unique(path[:-1]).size == 128 and set(path.ravel()) <= set(trailing_timesteps(128)) | {-1}
    with pytest.raises(ValueError):
        progressive_path(12, 8, 0)
    with pytest.raises(ValueError):
        progressive_path(8, 2, 2)


def _method(pipe, lora=True, **cfg):
    nets = Networks(pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"])
                    if lora else None)
    examples = _examples(pipe)
    ctx = StageContext(nets, pipe.scheduler.alphas_cumprod.double(), "epsilon",
                       probe=examples.sample(2, torch.Generator().manual_seed(0)))
    return ProgressiveMethod(ProgressiveConfig(**cfg), ctx), examples


@pytest.mark.parametrize("guided", [False, True])
def test_target_is_where_the_teachers_sampler_lands(guided):
    """From pure noise the 8-step DDIM (trailing) sampler's latents after 4 and 8 steps are the
    targets of the 2-step student's two steps."""
    pipe = tiny_sd15()
    method, examples = _method(pipe, teacher="base", teacher_steps=8, student_steps=2,
                               guidance=(3.0, 3.0) if guided else None)
    d = method.sample(examples.sample(2, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    d.j = torch.tensor([0, 0])
    x_t, t, _ = method.start(d)
    assert (t == 999).all() and torch.equal(x_t, d.noise)  # the schedule fix: pure noise at T
    sched = DDIMScheduler(**{**SD15_SCHEDULE, "timestep_spacing": "trailing", "set_alpha_to_one": True})
    sched.set_timesteps(8)
    x, landed = d.noise.clone(), []
    with torch.no_grad():
        for i, ts in enumerate(sched.timesteps):
            tt = torch.full((2,), int(ts))
            eps = pipe.unet(x, tt, **d.cond).sample
            if guided:
                u = pipe.unet(x, tt, **d.uncond).sample
                eps = u + 3.0 * (eps - u)
            x = sched.step(eps, ts, x).prev_sample
            if i in (3, 7):
                landed.append(x.clone())
    torch.testing.assert_close(method.teacher_target(d.noise, d), landed[0], atol=1e-5, rtol=1e-5)
    d.j = torch.tensor([1, 1])
    torch.testing.assert_close(method.teacher_target(landed[0], d), landed[1], atol=1e-5, rtol=1e-5)


def test_without_the_fix_the_top_step_starts_from_noised_data():
    method, examples = _method(tiny_sd15(), teacher="base", teacher_steps=4, student_steps=1, pure_noise=False)
    d = method.sample(examples.sample(2, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    x_t, _, s = method.start(d)
    a = method.student.alpha(torch.tensor([999])).float()
    torch.testing.assert_close(x_t, a.sqrt() * d.latents + (1 - a).sqrt() * d.noise)
    assert (s == -1).all()


def _draw(method, examples):
    d = method.sample(examples.sample(2, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    method.phases(0)
    return d


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("conditional", [True, False])
def test_discriminator_sees_its_inputs_and_only_its_weights_learn_in_its_phase(family, conditional):
    pipe = BUILD[family]()
    adv = LightningAdversarialConfig(conditional_steps=-1 if conditional else 0)
    method, examples = _method(pipe, teacher="base", teacher_steps=4, student_steps=2, mse_weight=0.0,
                               adversarial=adv)
    phase = "critic" if conditional else "critic_uncond"
    assert method.phases(0) == ["student", phase] and list(method.critics) == [phase]
    critic, d = method.critics[phase], _draw(method, examples)
    x_s, x_t, t, s = d.noise, d.latents, torch.full((2,), 999), torch.full((2,), 499)
    with torch.no_grad():
        base = critic.disc(x_s, s, x_t, t, d.cond)
        other_xt = critic.disc(x_s, s, x_t + 1, t, d.cond)
        other_cond = critic.disc(x_s, s, x_t, t, d.uncond)
    assert not torch.allclose(base, other_cond)                     # the prompt is an input
    assert torch.allclose(base, other_xt) != conditional             # x_t only for the conditional one
    student, disc = method.params()["student"], critic.params()
    loss, _ = method.loss("student", d)
    loss.backward()
    assert all(p.grad is None for p in disc) and any(p.grad is not None for p in student)
    for p in student:
        p.grad = None
    loss, _ = method.loss(phase, d)
    loss.backward()
    assert all(p.grad is None for p in student) and all(p.grad is not None for p in disc)


def test_discriminator_starts_from_the_teacher_with_a_fresh_copy_per_phase():
    pipe = tiny_sd15()
    method, _ = _method(pipe, teacher="base", teacher_steps=4, student_steps=2,
                        adversarial=LightningAdversarialConfig(conditional_steps=3))
    assert method.phases(2)[1] == "critic" and method.phases(3)[1] == "critic_uncond"
    weights = pipe.unet.state_dict()
    for critic in method.critics.values():
        key = "down_blocks.0.resnets.0.conv1.weight"
        torch.testing.assert_close(critic.disc.backbone.state_dict()[key], weights[f"{key[:-7]}.base_layer.weight"])
        assert len(critic.disc.backbone.up_blocks) == 0 and critic.disc.backbone.conv_out is None
    a, b = (c.disc.backbone.conv_in.weight for c in method.critics.values())
    assert a.data_ptr() != b.data_ptr()


def test_merged_unet_is_the_student_without_adapters():
    pipe = tiny_sd15()
    method, examples = _method(pipe, teacher="base", teacher_steps=4, student_steps=2)
    nets = method.ctx.nets
    nets.load_state("student", {k: torch.randn_like(v) * 0.1 for k, v in nets.state("student").items()})
    merged = nets.merged_unet("student")
    batch = examples.sample(2, torch.Generator().manual_seed(0))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, **batch.cond).sample, nets.student(x, t, **batch.cond).sample,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(nets.merged_unet("teacher")(x, t, **batch.cond).sample,
                                   nets.teacher(x, t, **batch.cond).sample)
    assert not any("lora" in k for k in merged.state_dict())


def _stage(name, **kw):
    return StageConfig.make("progressive", kw.pop("steps", 2), name=name, batch_size=2, lr=1e-3, **kw)


def test_stages_chain_teachers_and_name_their_recipe(tmp_path):
    pipe = tiny_sd15()
    stages = [_stage("a", teacher="base", guidance=[2.0, 4.0], teacher_steps=8, student_steps=4),
              _stage("b", teacher_steps=4, student_steps=2, mse_weight=0.0, adversarial={"lr": 1e-3}),
              _stage("c", teacher="a", teacher_steps=4, student_steps=1, prediction="sample")]
    loras = distill(_run(tmp_path, stages), examples=_examples(pipe), pipe=pipe)
    with safe_open(str(loras[-1]), "pt") as f:
        info = f.metadata()["hypersd"]
    assert '"recipe": "lightning-1step"' in info and '"prediction_type": "sample"' in info
    assert pipe.unet.peft_config.keys() == {"student", "target"}  # each stage's teacher role is gone
    bad = _run(tmp_path / "bad", [_stage("x", teacher="nowhere", teacher_steps=4, student_steps=2)])
    with pytest.raises(UserError, match="no finished stage"):
        distill(bad, examples=_examples(pipe), pipe=tiny_sd15())


def test_a_lora_file_can_be_the_teacher_of_a_full_network_stage(tmp_path):
    pipe = tiny_sd15()
    lora, = distill(_run(tmp_path / "a", [_stage("a", teacher="base", teacher_steps=4, student_steps=2)]),
                    examples=_examples(pipe), pipe=pipe)
    pipe = tiny_sd15()
    run = _run(tmp_path / "b", [_stage("b", teacher=str(lora), start_from=str(lora), teacher_steps=2, student_steps=1,
                                       adversarial={"conditional_steps": 0})], full_unet=True)
    unet, = distill(run, examples=_examples(pipe), pipe=pipe)
    assert (unet / "config.json").exists() and unet.with_suffix(".safetensors").exists()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_resume_inside_an_adversarial_stage_gives_the_same_weights(tmp_path, family):
    stage = dict(teacher="base", teacher_steps=4, student_steps=2, mse_weight=0.5,
                 adversarial={"lr": 1e-3, "conditional_steps": 2})
    pipe = BUILD[family]()
    full, = distill(_run(tmp_path / "a", [_stage("s", steps=4, **stage)]), examples=_examples(pipe), pipe=pipe)
    state = checkpoint_state(tmp_path / "a" / "run" / "s.ckpt")
    assert state["method"].keys() == {"critic", "critic_uncond"} and state["step"] == 4
    pipe = BUILD[family]()
    distill(_run(tmp_path / "b", [_stage("s", steps=3, **stage)]), examples=_examples(pipe), pipe=pipe)
    (tmp_path / "b" / "run" / "s.safetensors").unlink()  # as if interrupted after step 3
    pipe = BUILD[family]()
    resumed, = distill(_run(tmp_path / "b", [_stage("s", steps=4, **stage)]), examples=_examples(pipe), pipe=pipe)
    assert_same_weights(full, resumed)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        ProgressiveConfig(teacher_steps=12, student_steps=8)
    with pytest.raises(ValueError, match="prediction"):
        ProgressiveConfig(prediction="x0")
    with pytest.raises(ValueError, match="mse_weight"):
        ProgressiveConfig(mse_weight=0.0)
    with pytest.raises(ValueError, match="conditional_steps"):
        LightningAdversarialConfig(conditional_steps=-2)
    with pytest.raises(ValueError, match="unconditional"):
        LightningAdversarialConfig(conditional_steps=0, unconditional=False)


def test_without_the_unconditional_fine_tune_the_conditional_discriminator_stays():
    method, _ = _method(tiny_sd15(), teacher="base", teacher_steps=4, student_steps=2,
                        adversarial=LightningAdversarialConfig(conditional_steps=3, unconditional=False))
    assert list(method.critics) == ["critic"] and method.phases(5) == ["student", "critic"]
