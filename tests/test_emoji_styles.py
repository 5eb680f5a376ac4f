import io
import json
import tarfile
from functools import partial

import numpy as np
import pytest
from PIL import Image

from hypersd.cli import main
from hypersd.data import build_emoji32, load_emoji32
from hypersd.data.emoji32 import ASSETS, STYLES, _split_of
from hypersd.errors import UserError
from hypersd.testing import add_to_tar


def _fake_package(path, image_set):
    """A tarball in the emoji-data layout (package/emoji.json, package/img/<set>/64/*.png)
    with four emoji: one with skin tones, one whose base image this set lacks, and one skin
    tone this set lacks."""
    records = []
    with tarfile.open(path, "w:gz") as tar:
        add = partial(add_to_tar, tar)

        def add_png(image, colour):
            rgba = np.zeros((64, 64, 4), np.uint8)
            rgba[8:40, 10:50] = (*colour, 255)
            buf = io.BytesIO()
            Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
            add(f"package/img/{image_set}/64/{image}", buf.getvalue())

        flag = f"has_img_{image_set}"
        for i, (code, name, has_image) in enumerate([("1F600", "GRINNING FACE", True),
                                                     ("1F44D", "THUMBS UP SIGN", True),
                                                     ("1FAE8", "SHAKING FACE", False),
                                                     ("1F34E", "RED APPLE", True)]):
            rec = {"unified": code, "name": name, "image": f"{code.lower()}.png", "sort_order": i,
                   flag: has_image}
            if has_image:
                add_png(rec["image"], (200, 40 * i, 30))
            if code == "1F44D":
                rec["skin_variations"] = {
                    "1F3FD": {"image": "1f44d-1f3fd.png", flag: True},
                    "1F3FF": {"image": "1f44d-1f3ff.png", flag: False},
                }
                add_png("1f44d-1f3fd.png", (120, 80, 30))
            records.append(rec)
        add("package/emoji.json", json.dumps(records).encode())


@pytest.fixture(scope="module")
def committed():
    return {name: load_emoji32(spec.out_dir) for name, spec in STYLES.items()}


@pytest.mark.parametrize("name, package, image_set, folder", [
    ("noto", "emoji-datasource-google", "google", "emoji32"),
    ("twemoji", "emoji-datasource-twitter", "twitter", "emoji32-twemoji"),
])
def test_style_table(name, package, image_set, folder):
    spec = STYLES[name]
    assert (spec.package, spec.version, spec.image_set) == (package, "16.0.0", image_set)
    assert spec.out_dir == ASSETS / folder and spec.source == f"{package}@16.0.0"
    assert (spec.out_dir / "NOTICE").is_file()


@pytest.mark.parametrize("name", list(STYLES))
def test_committed_dataset_loads(committed, name):
    data = committed[name]
    assert data.source == STYLES[name].source
    assert len(data) == 3786 and data.images.shape == (3786, 32, 32, 3)
    assert data.masks.shape == (3786, 32, 32)
    # composited on white: transparent pixels are white within the Lanczos filter's ringing
    # (image and mask are downsampled separately); the opaque ones are drawn
    assert (data.images[data.masks == 0] >= 230).all() and data.images[data.masks == 255].mean() < 200


def test_styles_share_captions_and_splits(committed):
    noto, twemoji = committed["noto"], committed["twemoji"]
    split_of = {name: dict(zip(data.captions, data.split)) for name, data in committed.items()}
    shared = split_of["noto"].keys() & split_of["twemoji"].keys()
    assert len(shared) == 3780  # every caption (six are shared by two code points in both)
    assert all(split_of["noto"][c] == split_of["twemoji"][c] for c in shared)
    assert noto.prompts("eval") == twemoji.prompts("eval") and len(noto.prompts("eval")) == 420
    assert not np.array_equal(noto.images, twemoji.images)  # a different style, not a copy


def test_build_reads_the_twitter_image_folder(tmp_path):
    _fake_package(tmp_path / "pkg.tgz", "twitter")
    data = build_emoji32(tmp_path / "pkg.tgz", tmp_path / "out", style="twemoji")
    loaded = load_emoji32(tmp_path / "out")
    assert loaded.digest() == data.digest() and loaded.source == "emoji-datasource-twitter@16.0.0"
    # the emoji and the skin tone without a twitter image are left out
    assert loaded.captions == ["grinning face", "thumbs up sign", "thumbs up sign: medium skin tone",
                               "red apple"]
    assert loaded.split == [_split_of(c) for c in ["grinning face", "thumbs up sign",
                                                   "thumbs up sign", "red apple"]]
    assert (loaded.images[:, 0, 0] == 255).all() and (loaded.masks[:, 12, 16] == 255).all()
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["source"] == "emoji-datasource-twitter@16.0.0"


def test_cli_builds_a_style(tmp_path, capsys):
    _fake_package(tmp_path / "pkg.tgz", "twitter")
    assert main(["data", "--style", "twemoji", "--tarball", str(tmp_path / "pkg.tgz"),
                 "--out", str(tmp_path / "out")]) == 0
    assert "emoji32 (twemoji): 4 images" in capsys.readouterr().out
    assert len(load_emoji32(tmp_path / "out")) == 4


def test_package_of_another_style_is_refused(tmp_path):
    _fake_package(tmp_path / "pkg.tgz", "google")
    with pytest.raises(UserError, match=r"no images in package/img/twitter/64.*emoji-datasource-twitter"):
        build_emoji32(tmp_path / "pkg.tgz", tmp_path / "out", style="twemoji")


def test_unknown_style_is_refused(tmp_path):
    with pytest.raises(UserError, match="unknown emoji32 style 'apple': use one of noto, twemoji"):
        build_emoji32(out_dir=tmp_path, style="apple")
    assert main(["data", "--style", "apple"]) == 2


def test_missing_dataset_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="hypersd data --style STYLE --out PATH"):
        load_emoji32(tmp_path)
