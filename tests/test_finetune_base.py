"""Fine-tuning a second mini base model from the bundled teacher on another emoji32 style."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from hypersd.errors import UserError
from hypersd.generate import generate
from hypersd.models.mini import MINI_DIR, build_unet, load_text_encoder
from hypersd.teacher import TeacherConfig, export_pipeline, train_teacher
from hypersd.teacher.train import _UnetTask, handoff_from_checkpoint


def _unet(folder) -> dict[str, torch.Tensor]:
    return UNet2DConditionModel.from_pretrained(folder, use_safetensors=True,
                                                torch_dtype=torch.float32).state_dict()


def _distance(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _config(tmp_path, **overrides) -> TeacherConfig:
    fields = dict(phase="unet", data="twemoji", init_from="mini", run_dir=str(tmp_path / "run"),
                  batch_size=4, max_images=16, steps=2, checkpoint_every=2, warmup_steps=1,
                  handoff=str(tmp_path / "handoff.safetensors"), threads=1)
    return TeacherConfig(**{**fields, **overrides})


def test_starts_from_the_teachers_unet_on_the_chosen_style(tmp_path):
    task = _UnetTask(_config(tmp_path), tmp_path, "cpu")  # the model training begins with, at step 0
    assert _distance(task.model.state_dict(), _unet(MINI_DIR / "unet")) == 0
    noto = _UnetTask(_config(tmp_path, data="noto"), tmp_path, "cpu")
    assert not torch.equal(task.images, noto.images), "data='twemoji' trained on the noto images"
    assert torch.equal(task.text, noto.text), "the two styles share their captions"


def test_finetune_resumes_leaves_the_handoff_alone_and_exports(tmp_path):
    teacher = _unet(MINI_DIR / "unet")
    train_teacher(_config(tmp_path))
    after = _unet(tmp_path / "run" / "unet")  # the EMA after two steps
    assert 0 < _distance(after, teacher) < 0.1 * _distance(build_unet().state_dict(), teacher)
    train_teacher(_config(tmp_path, steps=3))  # resumes from step-00000002
    assert sorted(p.name for p in (tmp_path / "run" / "unet-checkpoints").iterdir()) == \
        ["step-00000002", "step-00000003"]
    assert not (tmp_path / "handoff.safetensors").exists()
    assert not (tmp_path / "teacher-vae").exists()
    with pytest.raises(UserError, match="fine-tune"):
        handoff_from_checkpoint(tmp_path / "run", str(tmp_path / "handoff.safetensors"))
    with pytest.raises(UserError, match="--init-from mini"):  # resuming it as a run from scratch
        train_teacher(_config(tmp_path, init_from="", steps=4))

    out = export_pipeline(tmp_path / "run", tmp_path / "mini-twemoji", handoff=None)
    index = json.loads((out / "model_index.json").read_text())
    assert index == {**json.loads((MINI_DIR / "model_index.json").read_text()),
                     "_diffusers_version": index["_diffusers_version"]}
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (MINI_DIR / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert "CC BY 4.0" in (out / "NOTICE").read_text()  # Twemoji's licence travels with the weights
    tokenizer, encoder = load_text_encoder()
    stock = StableDiffusionPipeline.from_pretrained(out, text_encoder=encoder, tokenizer=tokenizer,
                                                    safety_checker=None, requires_safety_checker=False)
    assert _distance(stock.unet.float().state_dict(), _unet(tmp_path / "run" / "unet")) < 1e-2  # fp16
    image = generate(["rocket"], model=str(out), recipe="teacher", steps=2).images[0]
    assert image.size == (32, 32)


def test_export_never_overwrites_the_model_a_run_was_finetuned_from(tmp_path):
    init = tmp_path / "base"
    shutil.copytree(MINI_DIR, init)
    run = tmp_path / "run"
    shutil.copytree(MINI_DIR / "unet", run / "unet")
    (run / "unet-init.json").write_text(json.dumps({"init_from": str(init), "data": "twemoji"}))
    with pytest.raises(UserError, match="overwrite"):
        export_pipeline(run, init)
    assert (init / "unet" / "config.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(data="klingon"), "emoji32 style"),
    (dict(phase="vae"), "init_from starts the unet phase"),
    (dict(phase="controlnet"), "init_from starts the unet phase"),
])
def test_bad_finetune_config(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _config(tmp_path, **overrides)


def test_missing_init_folder_fails_before_the_run_is_made(tmp_path):
    with pytest.raises(UserError, match="diffusers pipeline folder"):
        train_teacher(_config(tmp_path, init_from=str(tmp_path / "nowhere")))
    assert not (tmp_path / "run").exists()


def test_cli_export_of_a_finetune_needs_a_folder(tmp_path, capsys):
    from hypersd.cli import main
    assert main(["train-teacher", "--init-from", "mini", "--data", "twemoji", "--export",
                 "--run-dir", str(tmp_path / "run"), "--steps", "1"]) == 2
    assert "--export-to" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
