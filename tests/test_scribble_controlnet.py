"""The mini world's scribbles (strokes drawn from pixels, hand-drawn variation, control F1) and
the training phase of its scribble ControlNet."""

import pytest
import torch
from diffusers import ControlNetModel

from hypersd.controlnet.scribble import augment, edge_f1, scribble
from hypersd.teacher import TeacherConfig, train_teacher


def _square(size=16, lo=4, hi=12, colour=0.0):
    img = torch.ones(1, 3, size, size)
    img[:, :, lo:hi, lo:hi] = colour
    return img


def test_a_flat_square_scribbles_as_its_outline():
    m = scribble(_square())[0, 0]
    ring = torch.zeros(16, 16)
    ring[4:12, 4:12] = 1
    ring[5:11, 5:11] = 0
    assert torch.equal(m, ring)


def test_an_edge_inside_the_foreground_is_a_stroke():
    img = _square(colour=0.0)
    img[:, :, 4:12, 8:12] = 0.9 * torch.tensor([1.0, 0.6, 0.6]).view(1, 3, 1, 1)  # a pink half, still foreground
    m = scribble(img)[0, 0]
    assert m[6:10, 7:9].sum() > 0  # the boundary between the halves
    assert m[6:10, 5].sum() == 0   # flat inside


def test_f1_is_one_for_equal_maps_and_tolerates_a_pixel():
    m = scribble(_square())
    shifted = torch.roll(m, 1, dims=3)
    assert edge_f1(m, m).item() == 1.0
    assert edge_f1(m, shifted, tolerance=1).item() == 1.0
    assert edge_f1(m, shifted, tolerance=0).item() < 0.6
    assert edge_f1(m, torch.zeros_like(m)).item() == 0.0
    assert edge_f1(torch.zeros_like(m), torch.zeros_like(m)).item() == 1.0


def test_augmentation_is_drawn_from_the_generator_and_stays_a_stroke_map():
    m = scribble(torch.rand(8, 3, 32, 32).round())
    a = augment(m, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment(m, torch.Generator().manual_seed(3)))
    assert a.shape == m.shape and set(a.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a, augment(m, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("steps", [2])
def test_the_controlnet_phase_trains_resumes_and_writes_a_diffusers_controlnet(tmp_path, steps):
    common = dict(phase="controlnet", run_dir=str(tmp_path / "run"), batch_size=4, max_images=16,
                  checkpoint_every=1, warmup_steps=1, threads=1)
    train_teacher(TeacherConfig(steps=steps, **common))
    train_teacher(TeacherConfig(steps=steps + 1, **common))  # resumes from step 2
    assert sorted(p.name for p in (tmp_path / "run" / "controlnet-checkpoints").iterdir()) == \
        ["step-00000002", "step-00000003"]
    net = ControlNetModel.from_pretrained(tmp_path / "run" / "controlnet", use_safetensors=True)
    assert net.config.conditioning_embedding_out_channels == [16, 32, 64]
    x = torch.randn(1, 4, 8, 8)
    cond = torch.zeros(1, 3, 32, 32)
    down, mid = net(x, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 32, 384),
                    controlnet_cond=cond, return_dict=False)
    assert mid.shape[-1] == 2 and all(d.shape[-1] in (8, 4, 2) for d in down)  # the UNet's grid


def test_a_zero_initialised_controlnet_leaves_the_teacher_as_it_was(tmp_path):
    """eval-control's rows on a fresh ControlNet (its zero convolutions add nothing): the same
    F1 and top-1 as the teacher without one, matched and crossed."""
    from diffusers import UNet2DConditionModel

    from hypersd.controlnet.evaluate import ControlEvalConfig, control_table, evaluate_control
    from hypersd.models.mini import MINI_DIR
    from hypersd.teacher.controlnet import CONDITIONING_CHANNELS
    unet = UNet2DConditionModel.from_pretrained(MINI_DIR / "unet", use_safetensors=True)
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS).save_pretrained(
        tmp_path / "cn")
    rows = evaluate_control(ControlEvalConfig(controlnet=str(tmp_path / "cn"), steps=[1], prompts=6, batch=6,
                                              reference_steps=2, out_dir=str(tmp_path / "out")))
    by = {(r["method"], r["case"]): r for r in rows}
    for case in ("matched", "crossed"):
        plain, controlled = by[("teacher, no ControlNet", case)], by[("teacher + ControlNet", case)]
        assert plain["f1"] == pytest.approx(controlled["f1"]) and plain["top1"] == controlled["top1"]
    assert by[("teacher, no ControlNet", "matched")]["f1"] > by[("teacher, no ControlNet", "crossed")]["f1"]
    assert control_table(rows).count("\n") == 2 + 3 and (tmp_path / "out" / "table.md").exists()
