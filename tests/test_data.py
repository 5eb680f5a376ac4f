import io
import json
import tarfile
from functools import partial

import numpy as np
import pytest
from PIL import Image

from hypersd.data import build_emoji32, load_emoji32
from hypersd.data.emoji32 import _caption
from hypersd.testing import add_to_tar


def _fake_package(path):
    """A tarball shaped like emoji-datasource-google, with three emoji (one with skin tones)."""
    records = []
    with tarfile.open(path, "w:gz") as tar:
        add = partial(add_to_tar, tar)
        for i, (code, name) in enumerate([("1F600", "GRINNING FACE"), ("1F44D", "THUMBS UP SIGN"),
                                          ("1F34E", "RED APPLE")]):
            rgba = np.zeros((64, 64, 4), np.uint8)
            rgba[8 + i:40, 10:50] = (200, 40 * i, 30, 255)
            buf = io.BytesIO()
            Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
            rec = {"unified": code, "name": name, "image": f"{code.lower()}.png", "sort_order": i,
                   "has_img_google": True}
            add(f"package/img/google/64/{code.lower()}.png", buf.getvalue())
            if code == "1F44D":
                rec["skin_variations"] = {"1F3FD": {"image": "1f44d-1f3fd.png", "has_img_google": True}}
                add("package/img/google/64/1f44d-1f3fd.png", buf.getvalue())
            records.append(rec)
        add("package/emoji.json", json.dumps(records).encode())


def test_build_is_deterministic_and_round_trips(tmp_path):
    _fake_package(tmp_path / "pkg.tgz")
    a = build_emoji32(tmp_path / "pkg.tgz", tmp_path / "a")
    b = build_emoji32(tmp_path / "pkg.tgz", tmp_path / "b")
    assert a.digest() == b.digest()
    assert (tmp_path / "a" / "images.png").read_bytes() == (tmp_path / "b" / "images.png").read_bytes()
    loaded = load_emoji32(tmp_path / "a")
    assert loaded.digest() == a.digest()
    assert loaded.captions == ["grinning face", "thumbs up sign", "thumbs up sign: medium skin tone",
                               "red apple"]
    assert loaded.images.shape == (4, 32, 32, 3)
    # composited on white: the corners of every image are white, and outside the mask
    assert (loaded.images[:, 0, 0] == 255).all()
    assert loaded.masks.shape == (4, 32, 32) and (loaded.masks[:, 0, 0] == 0).all()
    assert (loaded.masks[:, 12, 16] == 255).all()  # inside every painted rectangle
    # a skin-tone variant shares its base emoji, hence its split
    assert loaded.base[1] == loaded.base[2] and loaded.split[1] == loaded.split[2]


def test_caption_names_skin_tones():
    assert _caption("WAVING HAND SIGN", None) == "waving hand sign"
    assert _caption("HANDSHAKE", "1F3FB-1F3FF") == "handshake: light skin tone, dark skin tone"


def test_committed_dataset():
    data = load_emoji32()
    assert len(data) == 3786 and data.images.dtype == np.uint8
    assert all(c == c.lower() and c for c in data.captions)
    by_split = {s: {b for b, t in zip(data.base, data.split) if t == s} for s in ("distill", "eval")}
    assert not by_split["distill"] & by_split["eval"], "a base emoji is in both splits"
    assert 0.07 < len(by_split["eval"]) / len(set(data.base)) < 0.13
    assert set(data.prompts("eval")).isdisjoint(data.prompts("distill"))
    # the foreground masks: transparent pixels were composited to white (within the Lanczos
    # filter's ringing, since image and mask are downsampled separately), opaque ones are not
    assert data.masks.shape == (3786, 32, 32)
    assert (data.images[data.masks == 0] >= 240).all() and data.images[data.masks == 255].mean() < 200


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        load_emoji32().prompts("test")


@pytest.mark.slow
def test_npm_build_reproduces_committed_dataset(tmp_path):
    assert build_emoji32(out_dir=tmp_path).digest() == load_emoji32().digest()
