"""Feedback learning (ReFL) on tiny SD1.5- and SDXL-shaped models, with a mini reward of random
weights: the reward's gradient reaches the student through the VAE decoder, and only it."""

import pytest
import torch
from accelerate import Accelerator

from hypersd.distill.data import LatentCaptions, Prompts
from hypersd.distill.loop import StageTrainer, distill, setup
from hypersd.distill.methods.feedback import FeedbackConfig
from hypersd.distill.recipe import LoraSettings, RunConfig, StageConfig
from hypersd.rewards import load_reward
from hypersd.errors import UserError
from hypersd.rewards.mini import AdherenceConfig, AdherenceModel, _save
from hypersd.rewards.structure import Segmenter, StructureConfig, soft_iou
from hypersd.testing import tiny_sd15, tiny_sdxl

BUILD = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}
PROMPTS = ["a red apple", "a rocket", "a ghost", "a cat face"]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("reward") / "adherence"
    return str(_save(AdherenceModel(width=8, dim=16), AdherenceConfig(out_dir=str(out), width=8, dim=16), {}))


@pytest.fixture(scope="module")
def structure_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("reward") / "structure"
    return str(_save(Segmenter(width=8), StructureConfig(out_dir=str(out), width=8), {}))


def _stage(reward_dir, steps=2, reward="mini-adherence", **fields):
    return StageConfig.make("feedback", steps=steps, batch_size=2, lr=1e-3,
                            rewards=[{"name": reward, "path": reward_dir, "alpha": 1.0}], **fields)


def _images(pipe):
    images = torch.rand(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return LatentCaptions(pipe, images, PROMPTS)


def _trainer(tmp_path, family, stage):
    pipe = BUILD[family]()
    run = RunConfig(stages=[stage], output_dir=str(tmp_path / "run"), lora=LoraSettings(rank=4, alpha=4.0))
    pipe, examples, ctx = setup(run, Accelerator(cpu=True), _images(pipe), pipe)
    return StageTrainer(run, 0, ctx, examples, Accelerator(cpu=True))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("reward", ["mini-adherence", "mini-structure"])
def test_each_rewards_gradient_reaches_the_student_through_the_decoder(tmp_path, family, reward, reward_dir,
                                                                     structure_dir):
    path = reward_dir if reward == "mini-adherence" else structure_dir
    trainer = _trainer(tmp_path, family, _stage(path, reward=reward, step_counts=[4]))
    method, nets = trainer.method, trainer.method.ctx.nets
    with torch.no_grad():  # a student that differs from the teacher, so lora_A gets gradient too
        for p in nets.trainable("student"):
            p.add_(0.01 * torch.randn_like(p))
    d = method.sample(method.ctx.data.sample(2, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(3))
    d.i = 2  # two sampler steps without gradient, then the gradient step
    loss, logs = method.loss("student", d)
    loss.backward()
    assert torch.isfinite(loss) and f"reward/{reward}" in logs
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.trainable("student"))
    assert all(p.grad is None for p in method.ctx.vae.parameters())
    assert all(p.grad is None for r in method.rewards.rewards for p in r.parameters())


def test_reward_score_is_differentiable_and_prefers_its_caption(reward_dir):
    reward = load_reward("mini-adherence", reward_dir)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    r = reward.score(images * 2 - 1, ["a rocket", "a ghost"])
    assert r.shape == (2,) and r.abs().max() <= 1 + 1e-5
    r.sum().backward()
    assert images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_feedback_stage_trains_with_an_anchor_and_exports(tmp_path, family, reward_dir):
    pipe = BUILD[family]()
    run = RunConfig(stages=[_stage(reward_dir, steps=3, anchor_weight=1.0)], output_dir=str(tmp_path / "run"),
                    lora=LoraSettings(rank=4, alpha=4.0))
    lora, = distill(run, examples=Prompts(pipe, PROMPTS), pipe=pipe)
    assert lora.exists()


def test_structure_reward_compares_masks_and_needs_images(tmp_path, structure_dir):
    reward = load_reward("mini-structure", structure_dir)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(reward.score(images, ["a", "b"], references=images), torch.ones(2))
    p, q = torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.5, 0.5, 1.0]])
    torch.testing.assert_close(soft_iou(p, q), torch.tensor([1.0 / 2.5]))
    pipe = tiny_sd15()
    run = RunConfig(stages=[_stage(structure_dir, reward="mini-structure")], output_dir=str(tmp_path / "run"),
                    lora=LoraSettings(rank=4, alpha=4.0))
    with pytest.raises(UserError, match="needs images"):
        distill(run, examples=Prompts(pipe, PROMPTS), pipe=pipe)


def test_config_checks():
    with pytest.raises(ValueError, match="at least one reward"):
        FeedbackConfig(rewards=[])
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("no-such-reward")


def test_mask2former_structure_reward_on_a_tiny_model(tmp_path):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig
    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, feature_size=32, mask_feature_size=32,
                               num_queries=8, encoder_layers=1, decoder_layers=2, dim_feedforward=64,
                               num_attention_heads=2, encoder_feedforward_dim=64, num_labels=3,
                               use_pretrained_backbone=False)
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(tmp_path / "m2f")
    reward = load_reward("mask2former", str(tmp_path / "m2f"))
    reward.size = 64
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    references = torch.rand(2, 3, 32, 32) * 2 - 1
    r = reward.score(images, ["a", "b"], references=references)
    assert r.shape == (2,) and ((r >= 0) & (r <= 1)).all()
    r.sum().backward()
    assert images.grad.abs().sum() > 0
    torch.testing.assert_close(reward.score(references, ["a", "b"], references=references), torch.ones(2))
    with pytest.raises(UserError, match="Mask2Former"):
        load_reward("mask2former", str(tmp_path / "missing"))


def test_bundled_mini_rewards_prefer_the_truth_on_the_eval_split():
    """The committed reward networks, on images they never saw: a caption scores its own
    emoji above other emoji, and an emoji's mask agrees with its own more than with others'."""
    from PIL import Image

    from hypersd.data import load_emoji32
    from hypersd.evaluate import load_rewards, score_rewards
    data = load_emoji32()
    idx = data.indices("eval")[:200:2]
    images = [Image.fromarray(data.images[i]) for i in idx]
    captions = [data.captions[i] for i in idx]
    rewards = load_rewards(["mini-adherence", "mini-structure"])
    right = score_rewards(rewards, images, captions, "eval", rounds=10)
    wrong = score_rewards(rewards, images[1:] + images[:1], captions, "eval", rounds=10)
    assert right["mini-adherence"] > wrong["mini-adherence"] + 0.1
    assert right["mini-structure"] > 0.99 > wrong["mini-structure"]
    with pytest.raises(UserError, match="unknown reward"):
        load_rewards(["no-such-reward"])
