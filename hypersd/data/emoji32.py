"""The emoji32 dataset: emoji at 32x32 with captions from their names, in one of two styles.

Source: the iamcal emoji-data npm packages, pinned to 16.0.0, which share one ``emoji.json``
and ship each image set's 64x64 PNGs: ``emoji-datasource-google`` for the ``noto`` style
(Noto Emoji, Apache-2.0: emoji32 proper, ``hypersd/assets/emoji32``) and
``emoji-datasource-twitter`` for the ``twemoji`` style (Twemoji, CC-BY 4.0, a second style to
fine-tune a second base model on: ``hypersd/assets/emoji32-twemoji``); each folder's NOTICE
says what its images are. The build composites each image on white, downsamples it to 32x32
with a Lanczos filter and stores everything as one lossless PNG atlas plus a JSON index.
Splits are deterministic: every image trains the teacher; base emoji (with all their
skin-tone variants) are split about 90/10 by a hash of their name into a distillation split
and an evaluation split, so that no caption is in both, and a caption's split is the same in
every style.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
ATLAS_COLUMNS = 64
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_DIR = ASSETS / "emoji32"
EVAL_FRACTION = 0.1


@dataclass(frozen=True)
class Style:
    """Where one style's images come from, and where its built dataset lives."""

    package: str  # the npm package
    version: str
    image_set: str  # its images are package/img/<image_set>/64, flagged has_img_<image_set>
    out_dir: Path

    @property
    def source(self) -> str:
        return f"{self.package}@{self.version}"


STYLES = {
    "noto": Style("emoji-datasource-google", "16.0.0", "google", DEFAULT_DIR),
    "twemoji": Style("emoji-datasource-twitter", "16.0.0", "twitter", ASSETS / "emoji32-twemoji"),
}

SKIN_TONES = {  # Fitzpatrick modifiers, named as Unicode's CLDR names them
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}


@dataclass
class Emoji32:
    """The processed dataset: ``images`` is uint8 (N, 32, 32, 3); one record per image."""

    images: np.ndarray
    captions: list[str]
    base: list[str]  # code point of the base emoji, shared by its skin-tone variants
    split: list[str]  # "distill" or "eval"
    masks: np.ndarray | None = None  # uint8 (N, 32, 32): each source image's alpha, downsampled
    source: str = STYLES["noto"].source  # the npm package the images came from

    def __len__(self) -> int:
        return len(self.captions)

    def prompts(self, split: str) -> list[str]:
        """Captions of one split ("distill", "eval" or "all"), in dataset order."""
        if split not in ("distill", "eval", "all"):
            raise ValueError(f"unknown split {split!r}: use 'distill', 'eval' or 'all'")
        return [c for c, s in zip(self.captions, self.split) if split in ("all", s)]

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.split) if split in ("all", s)]

    def digest(self) -> str:
        """SHA-256 over pixels and records: equal digests mean equal datasets."""
        h = hashlib.sha256(self.images.tobytes())
        h.update(json.dumps([self.captions, self.base, self.split]).encode())
        return h.hexdigest()


def _caption(name: str, tone_key: str | None) -> str:
    caption = name.lower()
    if tone_key:
        caption += ": " + ", ".join(SKIN_TONES[k] for k in tone_key.split("-"))
    return caption


def _split_of(name: str) -> str:
    # A stable hash of the base name (two code points can share one), independent of order.
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if bucket < EVAL_FRACTION else "distill"


def _to32(png_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The image on white, and its alpha (the foreground mask), both at 32x32."""
    rgba = Image.open(io.BytesIO(png_bytes)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    small = lambda im: np.asarray(im.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)  # noqa: E731
    return small(rgb), small(rgba.getchannel("A"))


def get_style(name: str) -> Style:
    if name not in STYLES:
        from hypersd.errors import UserError
        raise UserError(f"unknown emoji32 style {name!r}: use one of {', '.join(STYLES)}")
    return STYLES[name]


def fetch_package(dest: Path, style: str = "noto") -> Path:
    """Run ``npm pack`` for the style's pinned package into ``dest``; return the tarball's path."""
    try:
        out = subprocess.run(
            ["npm", "pack", get_style(style).source, "--silent"],
            cwd=dest, check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
    except FileNotFoundError as e:
        raise RuntimeError("npm is not installed: install Node.js, or pass --tarball") from e
    return dest / out


def build_emoji32(tarball: str | Path | None = None, out_dir: str | Path | None = None,
                  style: str = "noto") -> Emoji32:
    """Build one style of emoji32 from its npm tarball (fetched with npm when not given) into
    ``out_dir`` (default: the style's folder)."""
    from hypersd.errors import UserError
    spec = get_style(style)
    if tarball and not Path(tarball).is_file():
        raise UserError(f"tarball {tarball} does not exist: pass {spec.source}'s .tgz, or leave "
                        "--tarball out to fetch it with npm")
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tarball) if tarball else fetch_package(Path(tmp), style)
        flag, folder = f"has_img_{spec.image_set}", f"package/img/{spec.image_set}/64"
        with tarfile.open(tarball) as tar:
            members = {m.name: m for m in tar.getmembers()}
            read = lambda name: tar.extractfile(members[name]).read()  # noqa: E731
            records = json.loads(read("package/emoji.json"))
            records.sort(key=lambda r: (r["sort_order"], r["unified"]))
            images, masks, captions, bases, splits = [], [], [], [], []
            for rec in records:
                if not rec.get(flag):
                    continue
                variants = [(None, rec)] + sorted((rec.get("skin_variations") or {}).items())
                for tone, var in variants:
                    path = f"{folder}/{var['image']}"
                    if path not in members or not var.get(flag, True):
                        continue
                    image, mask = _to32(read(path))
                    images.append(image)
                    masks.append(mask)
                    captions.append(_caption(rec["name"], tone))
                    bases.append(rec["unified"])
                    splits.append(_split_of(_caption(rec["name"], None)))
    if not images:
        raise UserError(f"{tarball} has no images in {folder}: is it {spec.source}, "
                        f"the package of style {style!r}?")
    data = Emoji32(np.stack(images), captions, bases, splits, np.stack(masks), spec.source)
    save_emoji32(data, spec.out_dir if out_dir is None else out_dir)
    return data


def _atlas(tiles: np.ndarray, fill: int) -> Image.Image:
    rows = -(-len(tiles) // ATLAS_COLUMNS)
    atlas = np.full((rows * SIZE, ATLAS_COLUMNS * SIZE, *tiles.shape[3:]), fill, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ATLAS_COLUMNS)
        atlas[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] = tile
    return Image.fromarray(atlas)


def _tiles(atlas: np.ndarray, n: int) -> np.ndarray:
    s, cols = SIZE, ATLAS_COLUMNS
    return np.stack([atlas[(i // cols) * s:(i // cols + 1) * s, (i % cols) * s:(i % cols + 1) * s]
                     for i in range(n)])


def save_emoji32(data: Emoji32, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(data)
    _atlas(data.images, 255).save(out_dir / "images.png", optimize=True)
    if data.masks is not None:
        _atlas(data.masks, 0).save(out_dir / "masks.png", optimize=True)
    index = {
        "source": data.source, "size": SIZE, "columns": ATLAS_COLUMNS, "count": n,
        "records": [{"caption": c, "base": b, "split": s}
                    for c, b, s in zip(data.captions, data.base, data.split)],
    }
    (out_dir / "index.json").write_text(json.dumps(index, indent=0) + "\n")


def weights_notice(style: str) -> str:
    """The NOTICE for weights trained on one style: the dataset's own notice, which travels
    with anything derived from its images."""
    folder = get_style(style).out_dir
    return (f"These weights were trained on {folder.name} (hypersd/assets/{folder.name}), whose images "
            f"carry this notice:\n\n{(folder / 'NOTICE').read_text()}")


def load_style(name: str = "noto") -> Emoji32:
    """The committed dataset of one style (``noto`` or ``twemoji``); an unknown name is a UserError."""
    return load_emoji32(get_style(name).out_dir)


def load_emoji32(path: str | Path = DEFAULT_DIR) -> Emoji32:
    """Load a processed dataset of any style (the committed noto copy by default); the
    committed twemoji copy is ``load_emoji32(STYLES["twemoji"].out_dir)``."""
    path = Path(path)
    if not (path / "index.json").exists():
        command = next((f"hypersd data --style {name}" for name, spec in STYLES.items()
                        if spec.out_dir == path.resolve()), "hypersd data --style STYLE --out PATH")
        raise FileNotFoundError(f"no emoji32 dataset at {path}: build it with `{command}`")
    index = json.loads((path / "index.json").read_text())
    if (index["size"], index["columns"]) != (SIZE, ATLAS_COLUMNS):
        raise ValueError(f"{path}: an atlas of {index['size']} px tiles in {index['columns']} columns "
                         f"is not emoji32's ({SIZE}, {ATLAS_COLUMNS})")
    n, recs = index["count"], index["records"]
    images = _tiles(np.asarray(Image.open(path / "images.png").convert("RGB")), n)
    masks = (_tiles(np.asarray(Image.open(path / "masks.png").convert("L")), n)
             if (path / "masks.png").exists() else None)
    return Emoji32(images, [r["caption"] for r in recs], [r["base"] for r in recs],
                   [r["split"] for r in recs], masks, index["source"])
