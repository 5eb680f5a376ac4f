"""FID Inception and ImageReward on randomly initialised weights of the published shapes."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipConfig, BlipForImageTextRetrieval

from hypersd.errors import UserError
from hypersd.metrics.imagereward import ImageReward, convert_checkpoint, published_layout
from hypersd.metrics.inception import FidInception, InceptionFid, load_fid_inception
from hypersd.metrics.real import AestheticHead
from hypersd.testing import _tokenizer


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    model = FidInception()
    for m in model.modules():  # variance-preserving, so that 2048-d features still vary
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("fid") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def test_fid_inception_has_the_published_size_and_features(inception_file):
    model = load_fid_inception(inception_file)
    # torchvision's Inception-v3 has 27,161,264 parameters; less its auxiliary classifier
    # (3,326,696) and with 1008 classes instead of 1000 (+16,392)
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 16_392
    metric = InceptionFid(model, batch=4)
    feats = metric.features(_images(3))
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    # batching does not change features
    assert np.allclose(metric.features(_images(3)[:1]), feats[:1], atol=1e-5)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_difference(inception_file):
    metric = InceptionFid.from_pretrained(inception_file)
    imgs = _images(4)
    ref = metric.features(imgs)
    same = metric(imgs, ref)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 0.05
    dark = [Image.fromarray((np.asarray(i) // 4).astype(np.uint8)) for i in imgs]
    assert metric(dark, ref)["fid"] > 10 * max(same["fid"], 1e-6)


def test_fid_weights_missing_or_wrong_say_so(tmp_path):
    with pytest.raises(UserError, match="pt_inception-2015-12-05"):
        load_fid_inception(tmp_path / "absent.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not the FID Inception"):
        load_fid_inception(tmp_path / "wrong.pth")


@pytest.fixture(scope="module")
def tiny_blip():
    torch.manual_seed(0)
    config = BlipConfig(
        text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, encoder_hidden_size=48),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        image_text_hidden_size=16)
    model = BlipForImageTextRetrieval(config)
    for p in model.parameters():  # BLIP's 0.02 init hides the image from the first token
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.3)
    return model


def test_imagereward_checkpoint_round_trips_through_the_published_names(tiny_blip):
    head = AestheticHead(32)
    published = published_layout(tiny_blip, head)
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in published
    assert "blip.visual_encoder.cls_token" in published and "mlp.layers.7.bias" in published
    blip, head_state = convert_checkpoint(published)
    ours = {k: v for k, v in tiny_blip.state_dict().items()
            if k.startswith(("vision_model.", "text_encoder."))}
    assert set(blip) == set(ours) and all(torch.equal(blip[k], ours[k]) for k in ours)
    assert set(head_state) == set(head.state_dict())
    with pytest.raises(UserError, match="not an ImageReward"):
        convert_checkpoint({"foo": torch.zeros(1)})


def test_imagereward_scores_depend_on_prompt_and_image(tiny_blip):
    torch.manual_seed(1)
    metric = ImageReward(tiny_blip, _tokenizer(), AestheticHead(32))
    imgs = _images(2)
    scores = metric(imgs, ["a red apple", "a red apple"])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    assert scores[0] != pytest.approx(scores[1])
    assert metric(imgs[:1], ["a rocket"])[0] != pytest.approx(scores[0])
    assert metric(imgs[:1], ["a red apple"])[0] == pytest.approx(scores[0], abs=1e-5)


def test_imagereward_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(UserError, match="ImageReward.pt"):
        ImageReward.from_pretrained(str(tmp_path / "ImageReward.pt"))


def test_imagereward_as_a_reward_passes_gradients_to_the_images(tiny_blip):
    from hypersd.rewards.real import ImageRewardReward
    torch.manual_seed(1)
    metric = ImageReward(tiny_blip, _tokenizer(), AestheticHead(32))
    reward = ImageRewardReward(metric, torch.nn.ModuleList([metric.blip, metric.head])).frozen()
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    r = reward.score(x, ["a red apple", "a rocket"])
    assert r.shape == (2,) and torch.isfinite(r).all()
    r.sum().backward()
    assert x.grad.abs().sum() > 0
