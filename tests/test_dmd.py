"""Distribution matching (DMD, DMD2) on tiny SD1.5- and SDXL-shaped models: each phase trains
only its own network, the generator gradient is DMD2's, the loop resumes a DMD stage exactly."""

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from hypersd.distill.data import Prompts
from hypersd.distill.loop import StageTrainer, distill, setup
from hypersd.distill.methods.dmd import DMDConfig
from hypersd.distill.recipe import LoraSettings, RunConfig, StageConfig
from hypersd.errors import UserError
from hypersd.testing import tiny_sd15, tiny_sdxl
from test_distill import checkpoint_state

BUILD = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}
PROMPTS = ["a red apple", "a rocket", "a ghost", "a cat face"]
SMALL = dict(pool_size=4, pool_steps=2, update_ratio=2)


def _run(tmp_path, method="dmd", steps=4, **fields):
    stage = StageConfig.make(method, steps=steps, batch_size=2, lr=1e-3, **{**SMALL, **fields})
    return RunConfig(stages=[stage], output_dir=str(tmp_path / "run"), checkpoint_every=2,
                     lora=LoraSettings(rank=4, alpha=4.0))


def _images(pipe):
    from hypersd.distill.data import LatentCaptions
    images = torch.rand(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return LatentCaptions(pipe, images, PROMPTS)


def _trainer(tmp_path, family, images=False, **fields):
    pipe = BUILD[family]()
    run = _run(tmp_path, **fields)
    acc = Accelerator(cpu=True)
    pipe, examples, ctx = setup(run, acc, _images(pipe) if images else Prompts(pipe, PROMPTS), pipe)
    return StageTrainer(run, 0, ctx, examples, acc)


def _weights(nets, role):
    return {k: v.clone() for k, v in nets.state(role).items()}


def _changed(before, after) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_each_phase_trains_only_its_own_network(tmp_path, family):
    trainer = _trainer(tmp_path, family)
    nets = trainer.method.ctx.nets
    assert trainer.method.phases(1) == ["fake"] and trainer.method.phases(2) == ["student", "fake"]
    student, fake = _weights(nets, "student"), _weights(nets, "fake")
    logs = trainer.step(1)  # the fake score alone
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert not _changed(student, _weights(nets, "student")) and _changed(fake, _weights(nets, "fake"))
    fake = _weights(nets, "fake")
    d = trainer.sample(2)
    loss, logs = trainer.method.loss("student", d)  # the generator: its gradient reaches no fake weight
    loss.backward()
    assert {"dm", "regression"} <= set(logs) and torch.isfinite(loss)
    assert all(p.grad is None for p in nets.trainable("fake"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.trainable("student"))
    trainer.step(2)
    assert _changed(student, _weights(nets, "student")) and _changed(fake, _weights(nets, "fake"))


def test_generator_gradient_is_the_normalised_score_difference(tmp_path):
    """∂L_dm/∂x = (x̂₀_fake - x̂₀_real) / (N · mean|x - x̂₀_real|) for the mean-reduced loss."""
    method = _trainer(tmp_path, "sd15", regression_weight=0.0).method
    d = method.sample(method.ctx.data.sample(2, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    with torch.no_grad():  # make the fake score differ from the real one
        for p in method.ctx.nets.trainable("fake"):
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss, _ = method._distribution_matching(x, d)
    loss.backward()
    with torch.no_grad():
        x_t = method.teacher.noised(x, d.t, d.eps)
        real = method.teacher(x_t, d.t, d.cond, d.uncond, method.cfg.real_guidance).x0
        fake = method.fake(x_t, d.t, d.cond).x0
        expected = (fake - real) / (x - real).abs().mean(dim=(1, 2, 3), keepdim=True) / x.numel()
    assert expected.abs().max() > 0
    torch.testing.assert_close(x.grad, expected.float(), atol=1e-9, rtol=1e-4)


@pytest.mark.parametrize("family, method", [("sd15", "dmd"), ("sdxl", "dmd2")])
def test_resume_inside_a_dmd_stage_equals_an_uninterrupted_run(tmp_path, family, method):
    def run(root, steps):
        pipe = BUILD[family]()
        return distill(_run(root, method, steps=steps), examples=Prompts(pipe, PROMPTS), pipe=pipe)
    full, = run(tmp_path / "a", 5)
    state = checkpoint_state(tmp_path / "a" / "run" / f"0-{method}-k1.ckpt")
    assert "fake" in state["method"] and set(state["optimizers"]) == {"student", "fake"}
    run(tmp_path / "b", 2)
    (tmp_path / "b" / "run" / f"0-{method}-k1.safetensors").unlink()
    resumed, = run(tmp_path / "b", 5)
    with safe_open(str(full), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert '"steps_served"' in a.metadata()["hypersd"]
        assert not any(".fake." in k for k in a.keys())
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-6, rtol=1e-5)


def test_the_fake_role_leaves_with_its_stage(tmp_path):
    pipe = tiny_sd15()
    run = RunConfig(stages=[StageConfig.make("dmd2", steps=2, batch_size=2, **SMALL),
                            StageConfig.make("dmd2", steps=2, batch_size=2, **SMALL)],
                    output_dir=str(tmp_path / "run"), lora=LoraSettings(rank=4, alpha=4.0))
    distill(run, examples=Prompts(pipe, PROMPTS), pipe=pipe)
    assert list(pipe.unet.peft_config) == ["student", "target"]


def test_config_is_checked():
    with pytest.raises(ValueError, match="t_range"):
        DMDConfig(t_range=(20, 1000))
    with pytest.raises(ValueError, match="update_ratio"):
        DMDConfig(update_ratio=0)


def test_reward_terms_join_the_generator_loss(tmp_path):
    from hypersd.rewards.mini import AdherenceConfig, AdherenceModel, _save
    reward = _save(AdherenceModel(width=8, dim=16), AdherenceConfig(out_dir=str(tmp_path / "r"), width=8, dim=16), {})
    trainer = _trainer(tmp_path, "sd15", regression_weight=0.0,
                       rewards=[{"name": "mini-adherence", "path": str(reward), "weight": 2.0}])
    loss, logs = trainer.method.loss("student", trainer.sample(0))
    assert "reward/mini-adherence" in logs
    torch.testing.assert_close(loss.item(), logs["dm"] + 2.0 * (1 - logs["reward/mini-adherence"]), rtol=1e-5, atol=1e-6)


def test_full_unet_dmd_trains_a_copy_as_the_fake_score(tmp_path):
    pipe = tiny_sd15()
    stage = StageConfig.make("dmd", steps=2, batch_size=2, lr=1e-3, input_timestep=800,
                             recipe="hyper-sdxl-1step-unet", steps_served="1", **SMALL)
    run = RunConfig(stages=[stage], output_dir=str(tmp_path / "run"), full_unet=True)
    folder, = distill(run, examples=Prompts(pipe, PROMPTS), pipe=pipe)
    assert (folder / "config.json").exists() and (folder / "diffusion_pytorch_model.safetensors").exists()
    from hypersd.generate.loading import load_unet  # the single file beside it holds the same UNet
    single = load_unet(str(folder.with_suffix(".safetensors")), pipe.unet).state_dict()
    assert all(torch.equal(single[k], v) for k, v in pipe.unet.state_dict().items())
    with safe_open(str(folder.with_suffix(".safetensors")), "pt") as f:
        assert '"input_timestep": 800' in f.metadata()["hypersd"]


def test_a_full_student_starts_from_base_plus_lora_as_diffusers_fuses_it(tmp_path):
    """start_from a LoRA file on a full-UNet run: the student is the base with ΔW merged,
    equal to diffusers' fuse_lora of the same file."""
    from hypersd.distill.networks import merged_lora
    lora_run = _run(tmp_path, steps=2)
    pipe = tiny_sd15()
    lora, = distill(lora_run, examples=Prompts(pipe, PROMPTS), pipe=pipe)
    fused = tiny_sd15()
    fused.load_lora_weights(str(lora))
    fused.fuse_lora()
    fused.unload_lora_weights()
    ours = merged_lora(tiny_sd15().unet.state_dict(), str(lora))
    theirs = fused.unet.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ours[k], v) for k, v in tiny_sd15().unet.state_dict().items())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_dmd2_gan_term_trains_the_head_in_its_phase_and_reaches_only_the_student(tmp_path, family):
    """DMD2's GAN term: the critic phase trains the classifier head alone; G's term moves no
    fake-score or head weight, and its gradient is that of softplus(-D(noised x))."""
    trainer = _trainer(tmp_path, family, images=True, method="dmd2", gan_weight=0.5)
    method, nets = trainer.method, trainer.method.ctx.nets
    assert method.needs_images and method.phases(0) == ["student", "fake", "critic"]
    head = {k: v.clone() for k, v in method.gan.head.state_dict().items()}
    student = _weights(nets, "student")
    logs = trainer.step(1)  # fake, then critic
    assert {"loss/fake", "loss/critic"} <= set(logs) and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert _changed(head, method.gan.head.state_dict()) and not _changed(student, _weights(nets, "student"))
    d = trainer.sample(2)
    loss, logs = method.loss("student", d)
    loss.backward()
    assert "gan" in logs and torch.isfinite(loss)
    assert all(p.grad is None for p in nets.trainable("fake") + method.gan.params())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.trainable("student"))
    x = torch.randn_like(d.real, requires_grad=True)  # the term's gradient, against autograd's own
    surrogate, value = method.gan.generator_loss(x, d.t, d.eps, d.cond)
    surrogate.backward()
    x2 = x.detach().clone().requires_grad_(True)
    direct = torch.nn.functional.softplus(-method.gan.logits(method.teacher.noised(x2, d.t, d.eps), d.t, d.cond)).mean()
    direct.backward()
    assert x2.grad.abs().max() > 0 and abs(value - direct.item()) < 1e-6
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-8)


def test_dmd2_gan_needs_images_and_checkpoints_its_head(tmp_path):
    pipe = tiny_sd15()
    run = _run(tmp_path, "dmd2", steps=2, gan_weight=0.5)
    with pytest.raises(UserError, match="needs images"):
        distill(run, examples=Prompts(pipe, PROMPTS), pipe=pipe)
    pipe = tiny_sd15()
    distill(run, examples=_images(pipe), pipe=pipe)
    state = checkpoint_state(tmp_path / "run" / "0-dmd2-k1.ckpt")
    assert set(state["optimizers"]) == {"student", "fake", "critic"} and "critic" in state["method"]


def test_the_anchor_holds_the_student_below_the_input_timestep_to_where_the_stage_began(tmp_path):
    """anchor_weight: ‖x̂₀ - x̂₀_start‖² at the pool's outputs noised to t; zero while the student
    is the stage's starting one, positive once it moves, and its gradient reaches only the student."""
    trainer = _trainer(tmp_path, "sd15", regression_weight=0.0, anchor_weight=2.0)
    method, nets = trainer.method, trainer.method.ctx.nets
    d = trainer.sample(0)
    assert d.reg_x0 is not None  # the pool is built for the anchor alone too
    _, logs = method.loss("student", d)
    assert logs["anchor"] < 1e-12
    with torch.no_grad():
        for p in nets.trainable("student"):
            p.add_(0.05 * torch.randn_like(p))
    d = trainer.sample(0)
    loss, logs = method.loss("student", d)
    loss.backward()
    assert logs["anchor"] > 0
    assert all(p.grad is None for p in nets.trainable("fake"))
    assert not any(p.requires_grad for n, p in nets.unet.named_parameters() if ".target." in n)
