"""The method protocol: a method added in its own module trains through the unchanged loop,
from prompts alone; networks as named roles; a finished student made the next teacher."""

from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from hypersd.distill.data import Prompts
from hypersd.distill.loop import distill
from hypersd.distill.networks import Networks
from hypersd.distill.protocol import METHODS, Method, register
from hypersd.distill.recipe import LoraSettings, RunConfig, StageConfig
from hypersd.distill.schedule import multistep_path
from hypersd.errors import UserError
from hypersd.testing import tiny_sd15


@dataclass
class JumpConfig:
    teacher_steps: int = 2             # the student's one step from pure noise lands where these land


@dataclass
class Jump:
    noise: torch.Tensor
    cond: dict


class OneJump(Method):
    """A toy progressive-distillation method: from pure noise at t = 999 the student predicts
    the clean image the teacher reaches in ``teacher_steps`` DDIM steps. Prompts only."""

    needs_images = False

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.student, self.teacher = (ctx.denoiser(r) for r in ("student", "teacher"))

    def sample(self, batch, g):
        return Jump(torch.randn(len(batch.prompts), 4, 8, 8, generator=g), batch.cond)

    def loss(self, phase, ex):
        t = torch.full((len(ex.noise),), 999)
        target = self.teacher.solve(ex.noise, multistep_path(999, -1, self.cfg.teacher_steps), ex.cond)
        x0 = self.student(ex.noise, t, ex.cond).x0
        loss = (x0 - target).pow(2).mean()
        return loss, {"mse": loss.item()}

    def export_info(self):
        return {"recipe": "hyper-sd", "steps_served": "1"}


@pytest.fixture
def one_jump():
    register("one-jump", JumpConfig, OneJump)  # the one line a new method adds
    yield
    METHODS.pop("one-jump")


def _run(tmp_path, stage, **kw):
    return RunConfig(stages=[stage], output_dir=str(tmp_path / "run"), lora=LoraSettings(rank=4, alpha=4.0), **kw)


def test_a_new_method_trains_from_prompts_alone(tmp_path, one_jump):
    pipe = tiny_sd15()
    prompts = Prompts(pipe, ["a red apple", "a rocket", "a ghost"])
    assert prompts.sample(2, torch.Generator()).latents is None
    stage = StageConfig.make("one-jump", steps=3, batch_size=2, lr=1e-2, teacher_steps=4)
    assert stage.config == {"teacher_steps": 4}
    lora, = distill(_run(tmp_path, stage), examples=prompts, pipe=pipe)
    with safe_open(str(lora), "pt") as f:
        assert '"method": "one-jump"' in f.metadata()["hypersd"]
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if "lora_B" in k)
    with pytest.raises(UserError, match=r"stage 0 \(one-jump\): unknown field\(s\) segments"):
        _run(tmp_path, StageConfig.make("one-jump", steps=1, segments=4))


def test_a_method_that_needs_images_refuses_prompt_only_data(tmp_path):
    pipe = tiny_sd15()
    with pytest.raises(UserError, match="needs images; the data has prompts only"):
        distill(_run(tmp_path, StageConfig.make("tscd", steps=1, batch_size=2)),
                examples=Prompts(pipe, ["a rocket"]), pipe=pipe)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 300]), \
        {"encoder_hidden_states": torch.randn(2, 4, 32, generator=g)}


def _perturb(nets, role):
    with torch.no_grad():
        for p in nets.trainable(role):
            p.add_(0.1 * torch.randn_like(p))


def test_roles_are_adapters_of_one_unet():
    nets = Networks(tiny_sd15().unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"]))
    fake = nets.add_role("fake", trainable=True, like="student")
    assert nets.roles() == ["teacher", "student", "target", "fake"]
    x, t, cond = _inputs()
    _perturb(nets, "student")
    with torch.no_grad():
        before = nets.student(x, t, **cond).sample
        assert not torch.allclose(fake(x, t, **cond).sample, before)  # a copy taken before the change
    assert all(p.requires_grad for p in nets.trainable("fake")) and nets.trainable("fake")
    assert not any(p.requires_grad for p in nets.trainable("target"))
    nets.copy_role("fake", "student")
    with torch.no_grad():
        torch.testing.assert_close(fake(x, t, **cond).sample, before)
    with pytest.raises(ValueError, match="exists already"):
        nets.add_role("fake")


@pytest.mark.parametrize("lora", [True, False])
def test_promoted_student_is_the_next_teacher(lora):
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"]) if lora else None
    nets = Networks(tiny_sd15().unet, config)
    x, t, cond = _inputs()
    _perturb(nets, "student")
    with torch.no_grad():
        student, teacher = nets.student(x, t, **cond).sample, nets.teacher(x, t, **cond).sample
        assert (student - teacher).abs().max() > 1e-3
        nets.promote_student()
        torch.testing.assert_close(nets.teacher(x, t, **cond).sample, student, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(nets.student(x, t, **cond).sample, student, atol=1e-5, rtol=1e-5)
