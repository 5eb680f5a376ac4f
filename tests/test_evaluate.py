"""`hypersd eval` end to end on the bundled model with a randomly initialised emoji network."""

import json

import pytest
from safetensors.torch import save_file

from hypersd.data import load_emoji32
from hypersd.errors import UserError
from hypersd.evaluate import EvalConfig, markdown_table, run_eval
from hypersd.metrics.classifier import EmojiNet


@pytest.fixture(scope="module")
def random_classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    classes = list(dict.fromkeys(load_emoji32().captions))
    net = EmojiNet(len(classes), width=8, feature_dim=8)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"width": 8, "feature_dim": 8, "classes": classes}))
    return str(folder)


def test_eval_writes_table_plot_grid_and_resumes(tmp_path, random_classifier):
    cfg = EvalConfig(recipe="teacher-trailing", steps=[1, 2], samples=12, batch=6, out_dir=str(tmp_path),
                     classifier=random_classifier, grid_prompts=3)
    rows = run_eval(cfg)
    assert set(rows) == {"teacher-trailing@1", "teacher-trailing@2"}
    for row in rows.values():
        lo, hi = row["top5_ci"]
        assert 0 <= lo <= row["top5"] <= hi <= 100
        assert row["fd"] >= 0 and row["fd_teacher"] >= 0
    for name in ("results.json", "table.md", "table-by-steps.md", "metrics.png", "grid-teacher-trailing.png"):
        assert (tmp_path / name).exists()
    by_steps = (tmp_path / "table-by-steps.md").read_text().splitlines()
    assert by_steps[0].endswith("| 1 step | 2 steps |") and by_steps[2].startswith("| teacher-trailing | ")
    images = sorted((tmp_path / "images").rglob("*.png"))
    assert len(images) == 3 * 12  # the teacher reference and two step counts
    stamps = [p.stat().st_mtime_ns for p in images]
    run_eval(EvalConfig(**{**cfg.__dict__, "steps": [2], "label": "again"}))
    assert [p.stat().st_mtime_ns for p in images] == stamps, "an interrupted run must reuse images"
    table = markdown_table(json.loads((tmp_path / "results.json").read_text()))
    assert table.count("\n") == 2 + 3 and "| again | 2 |" in table


def test_data_names_the_style_fd_compares_against(tmp_path, random_classifier):
    cfg = EvalConfig(recipe="teacher-trailing", steps=[1], samples=6, batch=6, out_dir=str(tmp_path),
                     classifier=random_classifier, grid_prompts=2)
    noto = run_eval(cfg)["teacher-trailing@1"]
    twemoji = run_eval(EvalConfig(**{**cfg.__dict__, "data": "twemoji"}))["teacher-trailing@1"]
    assert (noto["data"], twemoji["data"]) == ("noto", "twemoji")
    assert twemoji["fd"] != pytest.approx(noto["fd"])  # the same images, another reference set
    assert twemoji["fd_teacher"] == pytest.approx(noto["fd_teacher"])
    with pytest.raises(UserError, match="unknown emoji32 style 'openmoji'"):
        EvalConfig(data="openmoji")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    import torch
    from transformers import CLIPConfig, CLIPModel

    from hypersd.testing import _tokenizer

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, eos_token_id=102),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return str(folder)


def test_eval_adds_real_metric_columns_when_their_weights_are_given(tmp_path, random_classifier, tiny_clip_dir):
    cfg = EvalConfig(recipe="teacher-trailing", steps=[1], samples=6, batch=6,
                     out_dir=str(tmp_path / "out"), classifier=random_classifier, clip=tiny_clip_dir)
    row = run_eval(cfg)["teacher-trailing@1"]
    lo, hi = row["clip_ci"]
    assert 0 <= lo <= row["clip"] <= hi <= 100
    assert "CLIP ↑" in (tmp_path / "out" / "table.md").read_text()
    with pytest.raises(UserError, match="Inception weights"):
        run_eval(EvalConfig(**{**cfg.__dict__, "clip": None, "inception": str(tmp_path / "x.pth")}))


def test_step_loras_apply_only_at_their_step_count(tmp_path, random_classifier):
    import numpy as np
    from PIL import Image

    from hypersd.errors import UserError
    lora = "benchmarks/loras/hyper-sd-mini.safetensors"
    base = dict(recipe="hyper-sd", steps=[1, 2], samples=6, batch=6, out_dir=str(tmp_path),
                classifier=random_classifier, grid_prompts=2)
    run_eval(EvalConfig(**base, label="plain"))
    rows = run_eval(EvalConfig(**base, label="n-step", step_loras={1: lora}))
    assert {"plain@1", "plain@2", "n-step@1", "n-step@2"} <= set(rows)

    def pixels(label, n):
        folder, = (tmp_path / "images").glob(f"{label}-{n}-*")
        return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])
    assert not np.array_equal(pixels("n-step", 1), pixels("plain", 1))  # the LoRA acts at 1 step
    np.testing.assert_array_equal(pixels("n-step", 2), pixels("plain", 2))  # and only there
    with pytest.raises(UserError, match="does not list"):
        run_eval(EvalConfig(**base, step_loras={4: lora}))
    with pytest.raises(UserError, match="does not exist"):
        run_eval(EvalConfig(**base, step_loras={1: str(tmp_path / "missing.safetensors")}))


def test_cli_step_lora_needs_n_equals_path(tmp_path, capsys):
    from hypersd.cli import main
    assert main(["eval", "--step-lora", "four.safetensors", "--out", str(tmp_path / "o")]) == 2
    assert "write N=PATH" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _scaled_unet(folder) -> str:
    """The bundled UNet with every weight scaled by 0.9, saved as a diffusers folder."""
    import torch

    from hypersd.generate import load_pipeline
    unet = load_pipeline(device="cpu").unet
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(0.9)
    unet.save_pretrained(folder)
    return str(folder)


def _pixels(images, pattern):
    """The one image folder below ``images`` matching ``pattern``, as an array."""
    import numpy as np
    from PIL import Image
    folder, = images.glob(pattern)
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_a_replacement_unet_draws_the_row_and_the_base_model_the_reference(tmp_path, random_classifier):
    """eval --unet: the model's own UNet draws the teacher reference, the given UNet the row."""
    import numpy as np
    unet = _scaled_unet(tmp_path / "unet")
    base = dict(recipe="hyper-sdxl-1step-unet", steps=[1], samples=4, batch=4, classifier=random_classifier,
                grid_prompts=2)
    rows = run_eval(EvalConfig(**base, unet=unet, out_dir=str(tmp_path / "a")))
    run_eval(EvalConfig(**base, out_dir=str(tmp_path / "b")))

    def pixels(root, pattern):
        return _pixels(tmp_path / root / "images", pattern)
    assert list(rows) == ["hyper-sdxl-1step-unet+unet@1"]
    np.testing.assert_array_equal(pixels("a", "reference-*"), pixels("b", "reference-*"))
    assert not np.array_equal(pixels("a", "hyper-sdxl-1step-unet_unet-1-*"), pixels("b", "hyper-sdxl-1step-unet-1-*"))


def test_step_unets_draw_only_their_step_count(tmp_path, random_classifier):
    import numpy as np
    unet = _scaled_unet(tmp_path / "unet")
    base = dict(recipe="lightning", steps=[1, 2], samples=4, batch=4, classifier=random_classifier,
                grid_prompts=2, out_dir=str(tmp_path))
    run_eval(EvalConfig(**base, label="plain"))
    rows = run_eval(EvalConfig(**base, label="n-step", step_unets={2: unet}))
    assert {"n-step@1", "n-step@2"} <= set(rows)
    images = tmp_path / "images"
    np.testing.assert_array_equal(_pixels(images, "n-step-1-*"), _pixels(images, "plain-1-*"))
    assert not np.array_equal(_pixels(images, "n-step-2-*"), _pixels(images, "plain-2-*"))


def test_prompt_file_evaluates_any_model_with_real_metrics_in_hyper_sds_table(tmp_path, tiny_dirs, tiny_clip_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a sofa\n\na red bicycle\na lighthouse at dusk\n")
    cfg = EvalConfig(model=tiny_dirs["sd15"], recipe="teacher-trailing", steps=[1, 2], batch=3,
                     out_dir=str(tmp_path / "out"), clip=tiny_clip_dir, prompts=str(prompts))
    assert cfg.samples == 3  # one image per prompt
    rows = run_eval(cfg)
    assert set(rows) == {"teacher-trailing@1", "teacher-trailing@2"}
    for row in rows.values():
        assert "clip" in row and "fd" not in row and "top1" not in row
    real = (tmp_path / "out" / "table-real.md").read_text().splitlines()
    assert real[0] == "| method (CLIP ↑) | 1 step | 2 steps |" and real[2].startswith("| teacher-trailing | ")
    assert not (tmp_path / "out" / "table-by-steps.md").exists()
    assert len(list((tmp_path / "out" / "images").rglob("*.png"))) == 2 * 3  # no emoji reference set


@pytest.mark.parametrize("text, fields, message", [
    ("a cat\n", {}, "pass a real metric's weights"),
    ("a cat\n", {"inception": "x.pth"}, "pass --reference FOLDER"),
    ("\n \n", {"clip": "c"}, "is empty"),
])
def test_bad_prompt_file_evaluations_say_what_to_do(tmp_path, text, fields, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text(text)
    with pytest.raises(UserError, match=message):
        EvalConfig(prompts=str(prompts), **fields)
