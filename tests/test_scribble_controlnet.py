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
    crossed = by[("teacher, no ControlNet", "crossed")]
    assert crossed["top1_scribble"] <= crossed["top1"]  # without control, the prompt draws its own emoji
    assert control_table(rows).count("\n") == 2 + 3 and (tmp_path / "out" / "table.md").exists()


def _caption_task(dropout, mismatch, n=8):
    from hypersd.teacher.train import _UnetTask
    task = object.__new__(_UnetTask)  # only the caption draw: no VAE, no data
    task.cfg = TeacherConfig(phase="controlnet", caption_dropout=dropout, caption_mismatch=mismatch)
    task.text = torch.arange(1.0, n + 1).view(n, 1, 1).expand(n, 3, 2).clone()  # embedding i+1 for image i
    task.empty = torch.zeros(1, 3, 2)
    return task


def test_caption_mismatch_gives_a_share_of_the_batch_another_images_caption():
    task = _caption_task(0.3, 0.4)
    idx = torch.randint(0, 8, (4000,), generator=torch.Generator().manual_seed(1))
    text = task._captions(idx, torch.Generator().manual_seed(0))[:, 0, 0]
    own, empty = text == idx + 1, text == 0
    other = ~own & ~empty
    assert abs(empty.double().mean() - 0.3) < 0.03 and abs(other.double().mean() - 0.4) < 0.03
    assert ((text[other] >= 1) & (text[other] <= 8)).all()  # another image's caption, never its own


def test_without_mismatch_the_caption_draw_is_the_dropout_alone():
    """A run that does not mismatch draws as before, so older checkpoints resume on the same stream."""
    task, idx = _caption_task(0.5, 0.0), torch.arange(8).repeat(4)
    g = torch.Generator().manual_seed(3)
    text = task._captions(idx, g)
    drop = torch.rand(32, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(text[:, 0, 0] == 0, drop)
    assert torch.equal(g.get_state(), _advanced(torch.Generator().manual_seed(3), 32).get_state())


def _advanced(g, n):
    torch.rand(n, generator=g)
    return g


@pytest.mark.parametrize("fields, message", [
    (dict(phase="unet", caption_mismatch=0.2), "the unet phase does not take it"),
    (dict(phase="controlnet", caption_dropout=0.7, caption_mismatch=0.5), "together at most 1"),
])
def test_caption_shares_are_checked(fields, message):
    from hypersd.errors import UserError
    with pytest.raises(UserError, match=message):
        TeacherConfig(**fields)
