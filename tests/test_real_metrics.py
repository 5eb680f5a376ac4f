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
