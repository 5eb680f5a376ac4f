"""The bundled mini model: stock diffusers loads it, and the teacher training path runs."""

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from hypersd.generate import generate
from hypersd.models.mini import MINI_DIR, load_text_encoder
from hypersd.teacher import TeacherConfig, export_pipeline, train_teacher


def test_stock_diffusers_loads_and_matches_ours():
    tokenizer, encoder = load_text_encoder()
    pipe = StableDiffusionPipeline.from_pretrained(MINI_DIR, text_encoder=encoder, tokenizer=tokenizer,
                                                   safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.cross_attention_dim == encoder.config.hidden_size == 384
    stock = pipe(["rocket", "red apple"], num_inference_steps=4, guidance_scale=3.0,
                 generator=[torch.Generator().manual_seed(s) for s in (0, 0)]).images
    ours = generate(["rocket", "red apple"], recipe="teacher", steps=4, seed=0)
    assert stock[0].size == (32, 32)
    a = np.stack([np.asarray(i, np.float32) for i in stock])
    b = np.stack([np.asarray(i, np.float32) for i in ours.images])
    np.testing.assert_array_equal(a, b)
    assert np.abs(a[0] - a[1]).mean() > 5, "different prompts gave the same image"


def test_demo_writes_labelled_grid(tmp_path):
    from hypersd.demo import STUDENT_STEPS, run_demo
    path = run_demo(tmp_path, prompts=["rocket", "ghost"])
    grid = Image.open(path)
    assert grid.width > 128 * (1 + len(STUDENT_STEPS)) and grid.height > 2 * 128


def test_teacher_training_resumes_and_exports(tmp_path):
    common = dict(run_dir=str(tmp_path / "run"), batch_size=4, max_images=16, checkpoint_every=2,
                  warmup_steps=1, handoff=str(tmp_path / "handoff.safetensors"), threads=1)
    train_teacher(TeacherConfig(phase="vae", steps=2, **common))
    train_teacher(TeacherConfig(phase="unet", steps=2, **common))
    train_teacher(TeacherConfig(phase="unet", steps=4, **common))  # resumes from checkpoint-2
    assert sorted(p.name for p in (tmp_path / "run" / "unet-checkpoints").iterdir()) == \
        ["step-00000002", "step-00000004"]
    assert (tmp_path / "handoff.safetensors").exists()
    from hypersd.teacher.train import handoff_from_checkpoint
    assert handoff_from_checkpoint(tmp_path / "run", str(tmp_path / "again.safetensors")) == 4
    out = export_pipeline(tmp_path / "run", tmp_path / "pipe")
    image = generate(["rocket"], model=str(out), recipe="teacher", steps=2).images[0]
    assert image.size == (32, 32)


def test_bad_teacher_config_exits_2(capsys):
    from hypersd.cli import main
    assert main(["train-teacher", "--phase", "clip"]) == 2
    assert "phase must be" in capsys.readouterr().err
