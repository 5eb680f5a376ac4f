"""The emoji network's training: one network per emoji32 style, written whole in fp16."""

import pytest
from safetensors import safe_open

from hypersd.data import load_style
from hypersd.errors import UserError
from hypersd.metrics.classifier import CLASSIFIER_DIR, ClassifierConfig, classifier_dir, load_classifier, train_classifier


def test_each_style_has_its_own_bundled_folder():
    assert classifier_dir() == CLASSIFIER_DIR
    assert classifier_dir("twemoji").name == "emoji-classifier-twemoji"
    with pytest.raises(UserError, match="unknown emoji32 style"):
        classifier_dir("openmoji")


def test_a_style_trains_into_a_folder_that_loads(tmp_path):
    out = train_classifier(ClassifierConfig(data="twemoji", out_dir=str(tmp_path / "net"), epochs=1,
                                            batch_size=512, width=4, feature_dim=8, threads=1))
    net, classes = load_classifier(out)
    assert classes == list(dict.fromkeys(load_style("twemoji").captions))
    assert net.head.out_features == len(classes)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys() if "num_batches" not in k} == {"torch.float16"}
    assert "CC BY 4.0" in (out / "NOTICE").read_text()  # Twemoji's licence travels with the weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]  # no temporary folder left
