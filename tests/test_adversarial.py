"""The adversarial term on a tiny UNet: features, gradient isolation, and a critic that learns."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from hypersd.distill.methods.adversarial import AdversarialConfig, Discriminator, encoder_features
from hypersd.testing import tiny_sdxl


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, norm_num_groups=16).requires_grad_(False)


def _inputs(n=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.full((n,), 249), torch.randn(n, 4, 8, 8, generator=g),
            torch.full((n,), 499), {"encoder_hidden_states": torch.randn(n, 3, 16, generator=g)})


def test_features_follow_the_encoder():
    unet = _unet()
    x, t, _, _, cond = _inputs()
    shapes = [f.shape for f in encoder_features(unet, x, t, cond)]
    assert shapes == [(4, 32, 4, 4), (4, 64, 4, 4), (4, 64, 4, 4)]


def test_sdxl_features_use_pooled_embeddings_and_time_ids():
    unet = tiny_sdxl().unet
    x = torch.randn(2, 4, 8, 8)
    cond = {"encoder_hidden_states": torch.randn(2, 16, unet.config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.zeros(2, 6)}}
    assert len(encoder_features(unet, x, torch.tensor([10, 900]), cond)) == 3


@pytest.mark.parametrize("loss", ["hinge", "nonsaturating"])
@pytest.mark.parametrize("conditional", [True, False])
def test_phases_are_isolated(loss, conditional):
    unet = _unet()
    feats = lambda x, t, c: encoder_features(unet, x, t, c)  # noqa: E731
    real, t_end, x_t, t, cond = _inputs()
    disc = Discriminator(feats, (real, t_end, cond), AdversarialConfig(loss=loss, conditional=conditional))
    fake = (real + 0.5).requires_grad_(True)
    disc.critic_loss(real, fake, t_end, x_t, t, cond).mean().backward()
    assert fake.grad is None and all(p.grad is not None for p in disc.heads.parameters())
    assert all(p.grad is None for p in unet.parameters())
    disc.zero_grad()
    disc.generator_loss(fake, t_end, x_t, t, cond).mean().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_critic_learns_to_separate():
    unet = _unet()
    feats = lambda x, t, c: encoder_features(unet, x, t, c)  # noqa: E731
    real, t_end, x_t, t, cond = _inputs(8)
    disc = Discriminator(feats, (real, t_end, cond), AdversarialConfig())
    fake = real.flip(0) * 0.2 + 1.0
    opt = torch.optim.Adam(disc.heads.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = disc.critic_loss(real, fake, t_end, x_t, t, cond).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        assert (disc(real, t_end, x_t, t, cond) > disc(fake, t_end, x_t, t, cond)).all()
