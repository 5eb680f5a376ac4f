"""Training on your own data: every kind of source gives batches and trains through the loop;
the latent cache is built once, keyed by what made it, resumes a stopped build to the same
tensors and captions, and draws ahead exactly what it would draw on the spot; bad data is one
line, exit 2, and leaves nothing in the cache."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from hypersd.cli import main
from hypersd.distill.cache import cached_examples, ensure_cache
from hypersd.distill.cache.examples import CachedExamples
from hypersd.distill.cache.prefetch import Prefetched
from hypersd.distill.data import LatentCaptions, Prompts, examples_for
from hypersd.distill.loop import distill
from hypersd.distill.recipe import DataSettings, LoraSettings, RunConfig, StageConfig, load_run
from hypersd.distill.sources.webdataset import expand_braces
from hypersd.errors import UserError
from hypersd.generate import loading
from hypersd.testing import add_to_tar, assert_same_weights, tiny_flux, tiny_qwen_image, tiny_sd15, tiny_sdxl

SIZES = [(20, 20), (28, 20), (20, 30), (24, 24), (20, 26), (32, 20)]  # (width, height)
CAPTIONS = ["a red square", "a blue ghost", "a green apple", "a cat face", "a rocket", "a star"]


def _png(i: int, size=(20, 20), mode="RGB") -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, captions=CAPTIONS):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, caption in enumerate(captions):
        (root / f"{i}.png").write_bytes(_png(i, SIZES[i], "RGBA" if i == 1 else "RGB"))
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _shards(root):
    """Two webdataset shards of three samples: .png + .txt, then .png + .json."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(2):
        with tarfile.open(root / f"{s:03d}.tar", "w") as tar:
            for i in range(3 * s, 3 * s + 3):
                add_to_tar(tar, f"{i:06d}.png", _png(i, SIZES[i]))
                if s == 0:
                    add_to_tar(tar, f"{i:06d}.txt", CAPTIONS[i].encode())
                else:
                    add_to_tar(tar, f"{i:06d}.json", json.dumps({"text": CAPTIONS[i]}).encode())
    return root


def _saved_dataset(root):
    datasets = pytest.importorskip("datasets", reason="the datasets package is not installed")
    images = [Image.open(io.BytesIO(_png(i, SIZES[i]))) for i in range(len(CAPTIONS))]
    ds = datasets.Dataset.from_dict({"image": images, "text": CAPTIONS},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    ds.save_to_disk(str(root))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n\n")
    return {"folder": _folder(root / "folder"), "shards": _shards(root / "shards"), "root": root}


def _source(data, kind: str) -> str:
    return {"folder": str(data["folder"]), "shards-dir": str(data["shards"]),
            "shards-pattern": f"{data['shards']}/{{000..001}}.tar", "prompts": str(data["root"] / "prompts.txt"),
            "hf": str(data["root"] / "hf"), "emoji32": "emoji32"}[kind]


def _settings(tmp_path, source, **kw) -> DataSettings:
    return DataSettings(source=source, cache_dir=str(tmp_path / "cache"), num_workers=0, **kw)


def _run(tmp_path, data: DataSettings, method="tscd", steps=2, **stage) -> RunConfig:
    fields = {"tscd": {"segments": 2}, "dmd": {"pool_size": 4, "pool_steps": 2, "update_ratio": 2}}[method]
    return RunConfig(stages=[StageConfig.make(method, steps=steps, batch_size=2, lr=1e-3, **fields, **stage)],
                     output_dir=str(tmp_path / "run"), checkpoint_every=2, lora=LoraSettings(rank=4, alpha=4.0),
                     data=data)


def _count_vae_calls(pipe) -> list:
    calls, encode = [], pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: calls.append(len(x)) or encode(x, *a, **k)
    return calls


@pytest.mark.parametrize("kind", ["folder", "hf", "shards-dir", "shards-pattern", "prompts", "emoji32"])
def test_each_source_gives_batches_and_trains(tmp_path, data, kind):
    if kind == "hf" and not (data["root"] / "hf").exists():
        _saved_dataset(data["root"] / "hf")
    pipe = tiny_sd15()
    run = _run(tmp_path, _settings(tmp_path, _source(data, kind)), method="dmd" if kind == "prompts" else "tscd")
    examples = examples_for(pipe, run)
    expected = {"prompts": Prompts, "emoji32": LatentCaptions}.get(kind, CachedExamples)
    assert isinstance(examples, expected)
    batch = examples.sample(4, torch.Generator().manual_seed(0))
    assert len(batch.prompts) == 4 and batch.cond["encoder_hidden_states"].shape[:2] == (4, 16)
    if kind not in ("prompts", "emoji32"):
        assert len(examples) == 6 and set(batch.prompts) <= set(CAPTIONS)
        assert batch.latents.shape == (4, 4, 8, 8) and torch.isfinite(batch.latents).all()
    lora, = distill(run, examples=None if kind != "emoji32" else examples, pipe=pipe)
    assert lora.exists()


def test_sdxl_time_ids_are_each_images_size_and_crop(tmp_path, data):
    """(original height, width, crop top, left, target height, width), the crop in the resized image."""
    pipe = tiny_sdxl()
    run = _run(tmp_path, _settings(tmp_path, str(data["folder"]), shard_size=4))
    examples = examples_for(pipe, run)
    batch = examples.sample(8, torch.Generator().manual_seed(1))
    for prompt, ids, un in zip(batch.prompts, batch.cond["added_cond_kwargs"]["time_ids"],
                               batch.uncond["added_cond_kwargs"]["time_ids"]):
        w, h = SIZES[CAPTIONS.index(prompt)]
        rw, rh = max(16, round(w * 16 / min(w, h))), max(16, round(h * 16 / min(w, h)))
        assert ids.tolist() == [h, w, (rh - 16) // 2, (rw - 16) // 2, 16, 16]
        assert torch.equal(ids, un)
    assert len({tuple(t.tolist()) for t in batch.cond["added_cond_kwargs"]["time_ids"]}) > 1
    lora, = distill(run, pipe=pipe)
    assert lora.exists()


@pytest.mark.parametrize("build, cond", [(tiny_flux, {"encoder_hidden_states", "pooled_projections"}),
                                         (tiny_qwen_image, {"encoder_hidden_states", "encoder_hidden_states_mask"})])
def test_a_flow_model_trains_from_cached_shards(tmp_path, data, build, cond):
    """FLUX's and Qwen-Image's (one-frame video VAE, per-channel latent statistics) latents cached."""
    pipe = build()
    run = _run(tmp_path, _settings(tmp_path, str(data["shards"])))
    lora, = distill(run, pipe=pipe)
    assert lora.exists()
    batch = examples_for(pipe, run).sample(2, torch.Generator().manual_seed(0))
    assert set(batch.cond) == cond and batch.latents.shape == (2, 4, 8, 8)


def test_the_cache_is_built_once_and_reused(tmp_path, data):
    settings = _settings(tmp_path, str(data["folder"]), shard_size=4)
    calls = _count_vae_calls(pipe := tiny_sd15())
    first = cached_examples(pipe, settings).sample(4, torch.Generator().manual_seed(0))
    assert sum(calls) == 6
    calls = _count_vae_calls(pipe := tiny_sd15())  # a new process: the same weights
    again = cached_examples(pipe, settings).sample(4, torch.Generator().manual_seed(0))
    assert calls == [] and again.prompts == first.prompts
    torch.testing.assert_close(again.latents, first.latents)


def test_a_changed_caption_or_vae_makes_a_new_entry(tmp_path, data):
    folder = _folder(tmp_path / "images")
    settings = _settings(tmp_path, str(folder))
    entry, _ = ensure_cache(tiny_sd15(), settings)
    _folder(folder, captions=[*CAPTIONS[:-1], "a yellow star"])
    changed, _ = ensure_cache(tiny_sd15(), settings)
    assert changed != entry
    pipe = tiny_sd15()
    with torch.no_grad():
        pipe.vae.encoder.conv_in.weight.mul_(1.001)
    calls = _count_vae_calls(pipe)
    assert ensure_cache(pipe, settings)[0] not in (entry, changed) and sum(calls) == 6
    assert "a yellow star" in cached_examples(pipe, settings).shards.rows(torch.arange(6))[1]


def test_a_stopped_build_resumes_to_the_same_entry(tmp_path, data):
    whole = _settings(tmp_path / "a", str(data["folder"]), shard_size=2)
    reference, _ = ensure_cache(tiny_sd15(), whole)
    settings = _settings(tmp_path / "b", str(data["folder"]), shard_size=2)
    pipe = tiny_sd15()
    calls, encode = [], pipe.vae.encode

    def dies_on_the_third_chunk(x, *a, **k):
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return encode(x, *a, **k)
    pipe.vae.encode = dies_on_the_third_chunk
    with pytest.raises(RuntimeError, match="killed"):
        ensure_cache(pipe, settings)
    entry = tmp_path / "b" / "cache" / reference.name
    assert sorted(p.name for p in entry.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    calls = _count_vae_calls(pipe := tiny_sd15())
    assert ensure_cache(pipe, settings) == (entry, True) and calls == [2]  # the last shard only
    assert _entry(entry) == _entry(reference)


def _entry(folder) -> dict:
    """Every file of a cache entry: the index's text, each safetensors file's metadata and tensors."""
    from safetensors import safe_open
    out = {"index.json": (folder / "index.json").read_text()}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[path.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()})
    assert len(out) == len(list(folder.iterdir()))
    return out


def test_batches_drawn_ahead_are_the_ones_drawn_on_the_spot(tmp_path, data):
    """Workers draw along the loop's seed stride; an unforeseen draw (another size, a used
    generator) is made on the spot; batches and generator states are the same either way."""
    settings = _settings(tmp_path, str(data["shards"]), caption_dropout=0.3, shard_size=2)
    pipe = tiny_sdxl()
    plain = cached_examples(pipe, settings)
    ahead = Prefetched(cached_examples(pipe, settings), workers=1)
    draws = [(1000 + 101 * s, 3) for s in range(6)] + [(7, 5)] + [(1000 + 101 * s, 3) for s in range(6, 9)]
    for seed, n in draws:
        g, h = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        a, b = plain.sample(n, g), ahead.sample(n, h)
        assert a.prompts == b.prompts and torch.equal(a.latents, b.latents)
        assert torch.equal(a.cond["added_cond_kwargs"]["time_ids"], b.cond["added_cond_kwargs"]["time_ids"])
        assert torch.equal(g.get_state(), h.get_state())
    assert ahead.hits == 7  # all but the first two of the stride and the odd one
    used = [torch.Generator().manual_seed(1000 + 101 * 9) for _ in range(2)]  # the next seed, but used
    for g in used:
        torch.rand(1, generator=g)
    assert ahead.sample(3, used[0]).prompts == plain.sample(3, used[1]).prompts and ahead.hits == 7
    ahead.close()


def test_a_resumed_run_with_workers_drawing_ahead_ends_with_the_same_weights(tmp_path, data):
    settings = _settings(tmp_path, str(data["folder"]), caption_dropout=0.5)
    settings.num_workers = 1
    full, = distill(_run(tmp_path / "a", settings, steps=4), pipe=tiny_sd15())
    distill(_run(tmp_path / "b", settings), pipe=tiny_sd15())
    (tmp_path / "b" / "run" / "0-tscd-k2.safetensors").unlink()  # as if stopped after step 2
    resumed, = distill(_run(tmp_path / "b", settings, steps=4), pipe=tiny_sd15())
    assert_same_weights(full, resumed)


def test_dropped_captions_are_empty_and_drawn_from_the_generator(tmp_path, data):
    pipe = tiny_sd15()
    all_dropped = cached_examples(pipe, _settings(tmp_path, str(data["folder"]), caption_dropout=1.0))
    batch = all_dropped.sample(3, torch.Generator().manual_seed(0))
    assert batch.prompts == [""] * 3 and torch.equal(batch.cond["encoder_hidden_states"],
                                                     batch.uncond["encoder_hidden_states"])
    some = cached_examples(pipe, _settings(tmp_path, str(data["folder"]), caption_dropout=0.5))
    a, b = (some.sample(16, torch.Generator().manual_seed(3)) for _ in range(2))
    assert a.prompts == b.prompts and 0 < a.prompts.count("") < 16
    kept = Prompts(pipe, CAPTIONS).sample(4, torch.Generator().manual_seed(5))  # no dropout: no extra draw
    assert kept.prompts == Prompts(pipe, CAPTIONS, 0.0).sample(4, torch.Generator().manual_seed(5)).prompts


def test_the_data_field_of_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {method: tscd, steps: 1}\ndata: some/images\n")
    assert load_run(str(recipe)).data == DataSettings(source="some/images")
    assert load_run(str(recipe), ["data.num_workers=0"]).data == DataSettings("some/images", num_workers=0)
    recipe.write_text("stages:\n  - {method: tscd, steps: 1}\ndata: {source: x.txt, caption_dropout: 0.1}\n")
    assert load_run(str(recipe), ["data.crop=random"]).data == DataSettings("x.txt", crop="random",
                                                                            caption_dropout=0.1)
    assert load_run(str(recipe), ["data=emoji32"]).data.source == "emoji32"
    with pytest.raises(UserError, match="data.crop must be center or random"):
        load_run(str(recipe), ["data.crop=middle"])
    with pytest.raises(UserError, match=r"caption_dropout: must be >= 0 and <= 1"):
        load_run(str(recipe), ["data.caption_dropout=2"])
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{8..9}") == ["a-8", "a-9", "b-8", "b-9"]


def _bad(root, case: str) -> str:
    """A data source with one problem; returns it as --data takes it."""
    folder = _folder(root / case)
    meta = folder / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    if case == "missing-image":
        lines[1] = json.dumps({"file_name": "gone.png", "text": "x"})
    elif case == "unreadable-image":
        (folder / "3.png").write_bytes(b"not a png")
    elif case == "no-caption":
        lines[2] = json.dumps({"file_name": "2.png", "caption": "x"})
    elif case == "malformed-line":
        lines[1] = '{"file_name": "1.png", "text": '
    elif case == "empty-prompts":
        (root / "empty.txt").write_text("\n  \n")
        return str(root / "empty.txt")
    elif case == "empty-folder":
        (root / "nothing").mkdir()
        return str(root / "nothing")
    elif case == "sample-without-caption":
        with tarfile.open(root / "bad.tar", "w") as tar:
            add_to_tar(tar, "a.png", _png(0))
            add_to_tar(tar, "a.txt", b"fine")
            add_to_tar(tar, "b.png", _png(1))
        return str(root / "bad.tar")
    meta.write_text("\n".join(lines) + "\n")
    return str(folder)


BAD = [("missing-image", "metadata.jsonl line 2: image gone.png does not exist"),
       ("unreadable-image", "metadata.jsonl line 4 (3.png): cannot read the image"),
       ("no-caption", "metadata.jsonl line 3 (2.png): no \"text\" caption"),
       ("malformed-line", "metadata.jsonl line 2: not a JSON object"),
       ("empty-prompts", "empty.txt is empty: write one prompt a line"),
       ("empty-folder", "nothing is empty: add images and a metadata.jsonl"),
       ("sample-without-caption", "bad.tar: sample b: no caption")]


@pytest.mark.parametrize("command", ["cache", "distill"])
@pytest.mark.parametrize("case, fragment", BAD, ids=[c for c, _ in BAD])
def test_bad_data_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, command, case, fragment):
    if command == "cache" and case == "empty-prompts":
        pytest.skip("prompt files are not cached")
    monkeypatch.setattr(loading, "_load_base", lambda model, config: tiny_sd15())
    source, cache = _bad(tmp_path / "data", case), tmp_path / "cache"
    sets = ["--set", f"data.cache_dir={cache}", "--set", "data.num_workers=1", "--set", "data.shard_size=2"]
    if command == "distill":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"stages:\n  - {{method: tscd, steps: 1, batch_size: 2}}\noutput_dir: {tmp_path / 'run'}\n")
        argv = ["distill", str(recipe), "--data", source, *sets]
    else:
        argv = ["cache", "mini", "--data", source, *sets]
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines()  # less the progress bar's updates
           if line.strip() and not line.startswith("caching latents")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("hypersd: error: ") and fragment in err[0], err
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))


def test_the_cache_command_fills_the_entry_a_run_reads(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setattr(loading, "_load_base", lambda model, config: tiny_sd15())
    cache = tmp_path / "cache"
    assert main(["cache", "mini", "--data", str(data["folder"]), "--set", f"data.cache_dir={cache}"]) == 0
    entry = next(cache.iterdir())
    assert f"cached latents in {entry}" in capsys.readouterr().out
    calls = _count_vae_calls(pipe := tiny_sd15())
    assert len(cached_examples(pipe, DataSettings(str(data["folder"]), cache_dir=str(cache)))) == 6 and not calls


def test_a_run_resumes_only_on_the_data_it_started_with(tmp_path, data):
    """Other data (source, captions' dropout) is refused at resume; the cache's place and the
    workers are not the arithmetic's, so changing them is not."""
    settings = _settings(tmp_path, str(data["folder"]))
    distill(_run(tmp_path, settings), pipe=tiny_sd15())
    (tmp_path / "run" / "0-tscd-k2.safetensors").unlink()  # as if stopped after its checkpoint
    changed = _settings(tmp_path, str(data["folder"]), caption_dropout=0.5)
    with pytest.raises(UserError, match="caption_dropout"):
        distill(_run(tmp_path, changed, steps=4), pipe=tiny_sd15())
    moved = _settings(tmp_path, str(data["folder"]))
    moved.num_workers = 1
    distill(_run(tmp_path, moved, steps=4), pipe=tiny_sd15())


@pytest.mark.parametrize("kind", ["folder", "prompts"])
def test_the_mini_model_distils_on_a_folder_or_prompt_file_made_from_emoji32(tmp_path, kind):
    """`hypersd distill hyper-sd-mini --data SOURCE` end to end on the bundled mini model: a
    folder of 12 emoji32 images with metadata.jsonl, or a file of their captions (DMD2, which
    trains from prompts alone)."""
    from hypersd.data import load_emoji32
    emoji = load_emoji32()
    idx = emoji.indices("distill")[:12]
    if kind == "folder":
        source = tmp_path / "emoji"
        source.mkdir()
        with (source / "metadata.jsonl").open("w") as f:
            for i in idx:
                Image.fromarray(emoji.images[i]).save(source / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "text": emoji.captions[i]}) + "\n")
        recipe, stage = "hyper-sd-mini-mse", ["stages=[{method: tscd, segments: 4, steps: 2, batch_size: 4}]"]
    else:
        source = tmp_path / "prompts.txt"
        source.write_text("\n".join(emoji.captions[i] for i in idx) + "\n")
        recipe, stage = "dmd2-mini", ["stages=[{method: dmd2, steps: 2, batch_size: 4, update_ratio: 1}]"]
    out = tmp_path / "run"
    sets = [x for s in stage + [f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
            for x in ("--set", s)]
    assert main(["distill", recipe, "--data", str(source), *sets]) == 0
    assert len(list(out.glob("*.safetensors"))) >= 1
    assert (kind == "folder") == (tmp_path / "cache").exists()  # prompts alone need no latents
