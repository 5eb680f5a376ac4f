"""Real-model metrics on tiny randomly initialised weights of the right shapes."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from hypersd.errors import UserError
from hypersd.metrics.real import AestheticHead, AestheticScore, ClipScore, clip_pixels
from hypersd.testing import _tokenizer


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=102),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(config)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_clip_preprocessing_matches_shape_and_normalisation():
    x = clip_pixels([Image.new("RGB", (64, 40), (255, 255, 255))], 32)
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073]))
                          / torch.tensor([0.26862954, 0.26130258, 0.27577711]))


def test_clip_score_is_cosine_times_100(tiny_clip):
    metric = ClipScore(tiny_clip, _tokenizer())
    scores = metric(_images(), ["a cat", "a dog", "a red apple"])
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()
    # the same image and prompt give the same score, whatever the batch
    single = metric(_images()[:1], ["a cat"])
    assert single[0] == pytest.approx(scores[0], abs=1e-4)


def test_aesthetic_head_loads_the_published_layout(tiny_clip, tmp_path):
    head = AestheticHead(16)
    assert [k for k in head.state_dict()][:2] == ["layers.0.weight", "layers.0.bias"]
    metric = AestheticScore(tiny_clip, head)
    assert metric(_images()).shape == (3,)


def test_missing_weights_name_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="aesthetic head"):
        AestheticScore.from_pretrained(str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="CLIP"):
        ClipScore.from_pretrained(str(tmp_path / "no-clip"))


def test_tensor_preprocessing_agrees_with_pil_and_passes_gradients():
    from hypersd.metrics.real import clip_tensor
    pil = _images()[0].crop((0, 0, 32, 32))
    x = torch.from_numpy(np.asarray(pil, np.float32) / 127.5 - 1).permute(2, 0, 1)[None].requires_grad_(True)
    torch.testing.assert_close(clip_tensor(x, 32), clip_pixels([pil], 32), atol=1e-5, rtol=1e-5)
    wide = torch.rand(1, 3, 40, 64) * 2 - 1
    assert clip_tensor(wide, 32).shape == (1, 3, 32, 32)
    clip_tensor(x, 24).sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["clip", "aesthetic"])
def test_real_rewards_score_like_their_metric_and_pass_gradients(tiny_clip, kind):
    from hypersd.rewards.real import AestheticReward, ClipReward
    if kind == "clip":
        metric = ClipScore(tiny_clip, _tokenizer())
        reward, expected = ClipReward(metric, metric.model).frozen(), lambda imgs, p: metric(imgs, p) / 100
    else:
        metric = AestheticScore(tiny_clip, AestheticHead(16))
        reward, expected = AestheticReward(metric, torch.nn.ModuleList([metric.model, metric.head])).frozen(), metric
    pils = [img.crop((0, 0, 32, 32)) for img in _images()]
    x = torch.stack([torch.from_numpy(np.asarray(p, np.float32) / 127.5 - 1).permute(2, 0, 1) for p in pils])
    x.requires_grad_(True)
    prompts = ["a cat", "a dog", "a red apple"]
    r = reward.score(x, prompts)
    want = torch.as_tensor(expected(pils, prompts))
    if kind == "clip":  # the metric clamps negative cosines at 0
        r_cmp = r.detach().clamp(min=0)
    else:
        r_cmp = r.detach()
    torch.testing.assert_close(r_cmp, want.float(), atol=1e-4, rtol=1e-4)
    r.sum().backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in reward.parameters())
