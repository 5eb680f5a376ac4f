"""Checkpoints: safetensors + a checksummed manifest, written whole or not at all, verified
before they are loaded, with a fall-back to the previous one and clear errors."""

import errno
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from hypersd import checkpoint
from hypersd.checkpoint import CheckpointError, latest, save
from hypersd.distill.loop import distill
from hypersd.distill.recipe import StageConfig
from hypersd.errors import UserError
from hypersd.io import remove
from hypersd.testing import tiny_sd15
from test_distill import _examples, _run


def _optimizer_state() -> dict:
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([w], lr=1e-3, betas=(0.0, 0.99))
    w.sum().backward()
    opt.step()
    return opt.state_dict()


def _state() -> dict:
    base = torch.arange(12.0)
    return {"student": {"a.lora_A.weight": torch.randn(4, 3, dtype=torch.bfloat16), "b": torch.zeros(0)},
            "optimizers": {"student": _optimizer_state()}, "shared": [base, base[2:6]],
            "plain": {"inf": float("inf"), "nan": float("nan"), "none": None, "t": (1, "x", True)},
            "rng": torch.get_rng_state(), "scalar": torch.tensor(3.5)}


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def test_state_round_trips_bit_for_bit_with_int_keys_tuples_and_non_finite_floats(tmp_path):
    state = _state()
    save(tmp_path, 7, state, settings={"lr": 1e-3})
    ck = latest(tmp_path)
    assert ck.step == 7 and ck.settings == {"lr": 1e-3}
    _assert_same(ck.state(), state)
    _assert_same(ck.state("student"), state["student"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    opt.load_state_dict(ck.state("optimizers")["student"])  # what torch needs back, it gets


def test_only_the_newest_are_kept_and_a_crashed_write_leaves_no_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, {"x": torch.full((2,), float(step))}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    (tmp_path / ".tmp-step-00000004").mkdir()  # a write killed before its rename
    (tmp_path / ".tmp-step-00000004" / "state.safetensors").write_bytes(b"half")
    assert latest(tmp_path).step == 3
    save(tmp_path, 4, {"x": torch.zeros(2)}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def _flip_byte(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing file", "edited manifest",
                                    "unreadable manifest"])
def test_a_damaged_checkpoint_is_named_set_aside_and_the_previous_one_used(tmp_path, capsys, damage):
    for step in (1, 2):
        save(tmp_path, step, {"x": torch.full((64,), float(step))})
    newest = tmp_path / "step-00000002"
    state, manifest = newest / "state.safetensors", newest / "checkpoint.json"
    if damage == "flipped byte":
        _flip_byte(state)
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[:-10])
    elif damage == "missing file":
        state.unlink()
    elif damage == "edited manifest":
        manifest.write_text(manifest.read_text().replace('"step": 2', '"step": 9'))
    else:
        manifest.write_text(manifest.read_text()[:40])
    ck = latest(tmp_path)
    assert ck.step == 1 and torch.equal(ck.state()["x"], torch.full((64,), 1.0))
    assert "step-00000002 is not whole" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt-step-00000002", "step-00000001"]


def test_when_no_checkpoint_is_whole_the_error_names_them_and_nothing_is_loaded(tmp_path):
    save(tmp_path, 1, {"x": torch.ones(8)})
    _flip_byte(tmp_path / "step-00000001" / "state.safetensors")
    with pytest.raises(CheckpointError, match=r"step-00000001 is not whole: state.safetensors does not "
                                              r"match its SHA-256.*delete it to start over"):
        latest(tmp_path)
    assert (tmp_path / "step-00000001").is_dir()  # left for the user to inspect
    old = tmp_path / "old.ckpt"
    old.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="older format"):
        latest(old)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save(tmp_path, 1, {"x": torch.ones(4)})
    real = checkpoint.save_file

    def disk_full(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(10)  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*step-00000001 is intact: free disk space"):
        save(tmp_path, 2, {"x": torch.zeros(4)})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]
    assert latest(tmp_path).step == 1


def test_a_write_refused_by_the_operating_system_keeps_the_previous_checkpoint(tmp_path):
    """A real failed write: the process may not grow a file past 64 KiB (RLIMIT_FSIZE)."""
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from hypersd.checkpoint import CheckpointError, save
        save({str(tmp_path)!r}, 1, {{"x": torch.ones(16)}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            save({str(tmp_path)!r}, 2, {{"x": torch.ones(1 << 20)}})
        except CheckpointError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "could not write the checkpoint of step 2" in out.stdout and "step-00000001 is intact" in out.stdout, out
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


STAGE = dict(method="tscd", segments=2, batch_size=2, lr=1e-3)


def _distill(root, steps, **run_fields):
    pipe = tiny_sd15()
    run = _run(root, [StageConfig.make(steps=steps, **STAGE)])
    for k, v in {"checkpoint_every": 1, **run_fields}.items():
        setattr(run, k, v)
    return distill(run, examples=_examples(pipe), pipe=pipe)


def test_a_run_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path, capsys):
    full, = _distill(tmp_path / "a", 3)
    _distill(tmp_path / "b", 2)
    ckpt = tmp_path / "b" / "run" / "0-tscd-k2.ckpt"
    (tmp_path / "b" / "run" / "0-tscd-k2.safetensors").unlink()  # as if killed after step 2
    _flip_byte(ckpt / "step-00000002" / "state.safetensors", offset=-100)
    resumed, = _distill(tmp_path / "b", 3)
    assert "resuming from step-00000001" in capsys.readouterr().err
    with safe_open(str(full), "pt") as a, safe_open(str(resumed), "pt") as b:
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_a_full_disk_stops_the_run_with_one_clear_error_and_it_resumes_after(tmp_path, monkeypatch):
    real, calls = checkpoint.write_tensor_file, []

    def fails_on_the_second(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, state)

    monkeypatch.setattr(checkpoint, "write_tensor_file", fails_on_the_second)
    with pytest.raises(UserError, match="step-00000001 is intact: free disk space and run again to resume"):
        _distill(tmp_path, 3)
    monkeypatch.undo()
    ckpt = tmp_path / "run" / "0-tscd-k2.ckpt"
    assert [p.name for p in ckpt.iterdir()] == ["step-00000001"]
    lora, = _distill(tmp_path, 3)
    assert lora.exists() and latest(ckpt).step == 3


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    _distill(tmp_path, 1)
    (tmp_path / "run" / "0-tscd-k2.safetensors").unlink()
    pipe = tiny_sd15()
    run = _run(tmp_path, [StageConfig.make(steps=2, **{**STAGE, "lr": 5e-4})])
    with pytest.raises(UserError, match=r"other settings \(stage.lr: 0.001 -> 0.0005\): put them back"):
        distill(run, examples=_examples(pipe), pipe=pipe)


def test_the_manifest_is_json_with_sizes_and_checksums(tmp_path):
    save(tmp_path, 3, {"x": torch.ones(2)}, settings={"seed": 0})
    manifest = json.loads((tmp_path / "step-00000003" / "checkpoint.json").read_text())
    files = manifest["body"]["files"]
    assert set(files) == {"state.safetensors"} and len(files["state.safetensors"]["sha256"]) == 64
    assert manifest["body"]["step"] == 3 and manifest["body"]["settings"] == {"seed": 0}


@pytest.mark.parametrize("killed", ["between the stages", "inside the anchored DMD stage"])
def test_a_killed_two_stage_run_resumes_bit_for_bit(tmp_path, killed):
    """Killed between two stages, the next stage's new roles (DMD's fake score, a critic) start
    from the (seed, stage) RNG, not from what the process drew before; killed inside DMD, its
    anchor (the frozen target: the stage's starting student) comes back from the checkpoint."""
    def run(root, dmd_steps):
        pipe = tiny_sd15()
        stages = [StageConfig.make(steps=2, **STAGE, distance_weight=0.5, adversarial={"weight": 0.5}),
                  StageConfig.make("dmd", dmd_steps, pool_size=2, pool_steps=2, update_ratio=2, anchor_weight=1.0,
                                   batch_size=2, lr=1e-3)]
        return distill(_run(root, stages), examples=_examples(pipe), pipe=pipe)
    _, whole = run(tmp_path / "a", 4)
    run(tmp_path / "b", 4 if killed == "between the stages" else 2)
    leftovers = ["1-dmd-k1.safetensors"] + (["1-dmd-k1.ckpt"] if killed == "between the stages" else [])
    for name in leftovers:
        remove(tmp_path / "b" / "run" / name)
    _, again = run(tmp_path / "b", 4)
    with safe_open(str(whole), "pt") as a, safe_open(str(again), "pt") as b:
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("a file where a folder should be")
    run = _run(tmp_path, [StageConfig.make(steps=1, **STAGE)])
    run.output_dir = str(tmp_path / "notes.txt" / "run")
    with pytest.raises(UserError, match="is a file, not a folder: choose another output_dir"):
        distill(run, examples=None, pipe=None)
