"""Bad input anywhere on the command line: one line `hypersd: error: ...` naming the problem and
the fix, exit code 2, no traceback and no output files; plus what is not an error (a long prompt
is cut with a warning) and a large batch made in chunks that draw the same images."""

import errno
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

import hypersd.generate.loading as loading
from hypersd.cli import main
from hypersd.generate import generate
from hypersd.generate.api import warn_truncated
from hypersd.lora import to_kohya
from hypersd.testing import tiny_sd15, tiny_sdxl


def _lora_state(pipe) -> dict:
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k"]))
    return {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the cases point at: good, cut short, of the wrong base, not safetensors at all."""
    root = tmp_path_factory.mktemp("inputs")
    good = _lora_state(tiny_sd15())
    save_file(good, root / "lora.safetensors")
    whole = (root / "lora.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(whole[:len(whole) // 2])
    (root / "text.safetensors").write_text("not weights\n")
    (root / "notes.txt").write_text("a file where a folder should be\n")
    sdxl = tiny_sdxl()
    save_file(_lora_state(sdxl), root / "sdxl-lora.safetensors")
    save_file(to_kohya(_lora_state(tiny_sdxl()), 2, sdxl=True), root / "sdxl-kohya.safetensors")
    save_file({"unet.nowhere.proj.lora_A.weight": torch.zeros(2, 8),
               "unet.nowhere.proj.lora_B.weight": torch.zeros(8, 2)}, root / "foreign-lora.safetensors")
    save_file(tiny_sdxl().unet.state_dict(), root / "sdxl-unet.safetensors")
    (root / "empty-folder").mkdir()
    for name in ("lora.bin", "model.ckpt"):  # pickles: refused by name, never opened
        (root / name).write_bytes(b"\x80\x02unread")
    (root / "broken.yaml").write_text("stages:\n  - {method: tscd, steps: 10\n")
    (root / "list.yaml").write_text("- method: tscd\n")
    (root / "typo.yaml").write_text("stages:\n  - {method: tscd, steps: 10}\nlearning_rate: 1e-4\n")
    return root


@pytest.fixture()
def tiny_model(monkeypatch):
    """The default model is a tiny SD1.5-shaped pipeline (fast), other models load as usual."""
    load_base = loading._load_base
    monkeypatch.setattr(loading, "_load_base", lambda model, config: tiny_sd15() if model in (None, "mini")
                        else load_base(model, config))


@pytest.fixture()
def no_heavy_work(monkeypatch):
    """Bad input must be refused before training or evaluation starts: fail loudly if it is not."""
    import hypersd.distill.loop
    import hypersd.evaluate

    def started(*args, **kwargs):
        raise AssertionError("the work started: the bad input was not refused")
    monkeypatch.setattr(hypersd.distill.loop, "distill", started)
    monkeypatch.setattr(hypersd.evaluate, "_prompts", started)


G = ["generate", "a cat", "--steps", "2"]
TCD = ["generate", "a cat", "--recipe", "tcd"]
D = ["distill", "hyper-sd-mini", "--set"]
LORA, CUT, NONE, OUT = "IN/lora.safetensors", "IN/cut.safetensors", "IN/none.safetensors", "OUT/o.safetensors"
NOT_A_FOLDER = "is a file, not a folder: choose another"
CASES = [
    # generate: sampler settings, counts
    ("guidance-nan", G + ["--guidance", "nan"], "guidance nan is not a number"),
    ("guidance-inf", G + ["--guidance", "inf"], "guidance inf is infinite"),
    ("guidance-negative", G + ["--guidance", "-4"], "guidance -4 is negative: pass --guidance 0 or more"),
    ("eta-negative", TCD + ["--eta", "-1"], "eta -1 is negative: pass --eta from 0"),
    ("eta-above-1", TCD + ["--eta", "1.5"], "eta 1.5 is above 1"),
    ("eta-nan", TCD + ["--eta", "nan"], "eta nan is not a number"),
    ("steps-0", ["generate", "a cat", "--steps", "0"], "0 steps is outside the 1-1000"),
    ("steps-negative", ["generate", "a cat", "--steps", "-3"], "-3 steps is outside"),
    ("steps-huge", ["generate", "a cat", "--steps", "100000"], "100000 steps is outside the 1-1000"),
    ("steps-not-a-number", ["generate", "a cat", "--steps", "four"], "invalid int value: 'four'"),
    ("steps-outside-recipe", ["generate", "a cat", "--recipe", "hyper-sd", "--steps", "20"], "outside the 1-8"),
    ("batch-0", G + ["--batch", "0"], "--batch 0: give at least 1"),
    ("batch-huge", G + ["--batch", "100000"], "more than the 4096 one call makes: lower --batch to at most 4096"),
    ("batch-times-prompts", ["generate", "a", "b", "c", "--batch", "2000"], "= 6000 images, more than the 4096"),
    ("seed-negative", G + ["--seed", "-1"], "--seed -1: use a whole number from 0"),
    ("empty-prompt", ["generate", "  "], "empty prompt"),
    ("unknown-recipe", G + ["--recipe", "turbo"], "unknown recipe 'turbo'; choose one of"),
    ("unknown-sampler", G + ["--sampler", "plms"], "unknown sampler 'plms'; use one of"),
    ("negative-without-cfg", G + ["--recipe", "lightning", "--negative", "x"], "needs classifier-free"),
    # generate: LoRAs
    ("lora-scale-inf", G + ["--lora", f"{LORA}:inf"], f"{LORA}: LoRA scale inf is infinite"),
    ("lora-scale-nan", G + ["--lora", f"{LORA}:nan"], "is not a number: use a number from -10 to 10"),
    ("lora-scale-absurd", G + ["--lora", f"{LORA}:1e6"], "LoRA scale 1e+06 is above 10"),
    ("lora-scale-not-a-number", G + ["--lora", f"{LORA}:abc"], "LoRA scale 'abc' in"),
    ("lora-missing", G + ["--lora", NONE], f"LoRA file {NONE} does not exist"),
    ("lora-truncated", G + ["--lora", CUT], "is cut short"),
    ("lora-not-safetensors", G + ["--lora", "IN/text.safetensors"], "not a readable safetensors file"),
    ("lora-for-sdxl", G + ["--lora", "IN/sdxl-lora.safetensors"], "its layers have other shapes than this model's"),
    ("lora-kohya-for-sdxl", G + ["--lora", "IN/sdxl-kohya.safetensors"], "none of its layers is in this model"),
    ("lora-pickle", G + ["--lora", "IN/lora.bin"], "is a pickle (.bin), which hypersd does not read"),
    ("model-pickle", G + ["--model", "IN/model.ckpt"], "is a pickle (.ckpt), which hypersd does not read"),
    ("lora-matching-nothing", G + ["--lora", "IN/foreign-lora.safetensors"], "none of its layers is in this model"),
    # generate: model, UNet, output
    ("model-missing", G + ["--model", "/nonexistent/model"], "model '/nonexistent/model' not found"),
    ("model-not-a-pipeline", G + ["--model", "IN/empty-folder"], "has no model_index.json"),
    ("unet-missing", G + ["--unet", NONE], "not found"),
    ("unet-truncated", G + ["--unet", CUT], f"cannot load UNet {CUT}"),
    ("unet-other-architecture", G + ["--unet", "IN/sdxl-unet.safetensors"], "does not fit this base model"),
    ("out-under-a-file", G + ["--out", "IN/notes.txt/sub"], f"IN/notes.txt {NOT_A_FOLDER} --out"),
    ("out-is-a-file", G + ["--out", "IN/notes.txt"], "it is a file: choose another --out"),
    # distill: recipe loading
    ("distill-unknown-recipe", ["distill", "hyper-sd-mnii"], "unknown recipe 'hyper-sd-mnii': pass a YAML file"),
    ("distill-missing-yaml", ["distill", "IN/none.yaml"], "config file IN/none.yaml does not exist"),
    ("distill-broken-yaml", ["distill", "IN/broken.yaml"], "is not valid YAML at line"),
    ("distill-not-a-mapping", ["distill", "IN/list.yaml"], "holds a list, not a mapping"),
    ("distill-unknown-key", ["distill", "IN/typo.yaml"], "unknown field(s) learning_rate"),
    ("distill-set-no-equals", D + ["stages.0.steps"], "must look like key=value"),
    ("distill-set-unknown-path", D + ["nosuch.x=1"], "unknown field(s) nosuch"),
    ("distill-set-unknown-stage-field", D + ["stages.0.segmnts=2"], "unknown field(s) segmnts"),
    ("distill-set-no-such-stage", D + ["stages.9.lr=1e-4"], "names no field"),
    ("distill-set-wrong-type", D + ["stages.0.steps=ten"], "recipe.stages[0].steps: expected int, got 'ten'"),
    ("distill-set-bad-yaml", D + ["stages.0.lr=[1"], "the value is not valid YAML"),
    ("distill-steps-0", D + ["stages.0.steps=0"], "recipe.stages[0].steps: must be >= 1, got 0"),
    ("distill-batch-size-negative", D + ["stages.1.batch_size=-2"], "stages[1].batch_size: must be >= 1"),
    ("distill-lr-nan", D + ["stages.0.lr=nan"], "recipe.stages[0].lr: expected a finite number, got nan"),
    ("distill-lr-inf", D + ["stages.0.lr=.inf"], "expected a finite number, got inf"),
    ("distill-lr-0", D + ["stages.0.lr=0"], "recipe.stages[0].lr: must be > 0, got 0.0"),
    ("distill-lr-negative", D + ["stages.0.lr=-1e-4"], "must be > 0, got -0.0001"),
    ("distill-lora-rank-0", D + ["lora.rank=0"], "recipe.lora.rank: must be >= 1"),
    # eval
    ("eval-steps-not-numbers", ["eval", "--steps", "1,x"], "--steps '1,x': write step counts separated by commas"),
    ("eval-steps-0", ["eval", "--steps", "0"], "--steps: step counts must be whole numbers of 1 or more"),
    ("eval-samples-0", ["eval", "--samples", "0"], "--samples 0: give at least 1"),
    ("eval-lora-missing", ["eval", "--lora", NONE], "does not exist"),
    ("eval-lora-scale-inf", ["eval", "--lora", f"{LORA}:inf"], "is infinite"),
    ("eval-step-lora-no-n", ["eval", "--step-lora", LORA], f"--step-lora '{LORA}': write N=PATH"),
    ("eval-step-lora-missing", ["eval", "--step-lora", f"4={NONE}"], "does not exist"),
    ("eval-step-lora-unlisted", ["eval", "--steps", "1,2", "--step-lora", f"4={LORA}"], "--steps does not list"),
    ("eval-step-lora-truncated", ["eval", "--step-lora", f"4={CUT}"], "is cut short"),
    ("eval-out-under-a-file", ["eval", "--out", "IN/notes.txt/eval"], f"{NOT_A_FOLDER} --out"),
    # lora
    ("lora-convert-missing", ["lora", "convert", NONE, OUT], "does not exist"),
    ("lora-convert-truncated", ["lora", "convert", CUT, OUT], "is cut short"),
    ("lora-rescale-inf", ["lora", "rescale", LORA, OUT, "--scale", "inf"], "--scale: LoRA scale inf is infinite"),
    ("lora-rescale-nan", ["lora", "rescale", LORA, OUT, "--scale", "nan"], "not a number"),
    ("lora-merge-weight-nan", ["lora", "merge", f"{LORA}:nan", LORA, OUT], f"{LORA}: LoRA scale nan is not a number"),
    ("lora-out-under-a-file", ["lora", "convert", LORA, "IN/notes.txt/o.safetensors", "--to", "kohya"],
     f"{NOT_A_FOLDER} output path"),
    ("lora-out-is-a-folder", ["lora", "convert", LORA, "IN/empty-folder", "--to", "kohya"],
     "it is a folder: choose another output path"),
    ("lora-kohya-wrong-model", ["lora", "convert", "IN/sdxl-kohya.safetensors", OUT, "--to", "diffusers"],
     "are not in the base model, e.g. lora_unet_"),
    ("lora-kohya-model-missing", ["lora", "convert", "IN/sdxl-kohya.safetensors", OUT, "--to", "diffusers",
                                  "--model", "/nonexistent/model"], "not found"),
    ("lora-one-path", ["lora", "convert", LORA], "give the input file(s) and then the output file"),
    # other commands
    ("demo-out-under-a-file", ["demo", "--out", "IN/notes.txt/demo"], f"{NOT_A_FOLDER} --out"),
    ("data-tarball-missing", ["data", "--tarball", "IN/none.tgz", "--out", "OUT/d"], "tarball IN/none.tgz does not"),
    ("bench-threads-negative", ["bench", "speed", "--threads", "-1"], "--threads: '-1': give a whole number of 0"),
    # the parser itself
    ("no-command", [], "the following arguments are required"),
    ("unknown-flag", G + ["--bogus"], "unrecognized arguments: --bogus"),
    ("unknown-lora-action", ["lora", "split", LORA, OUT], "invalid choice: 'split'"),
]


def _argv(argv, inputs, out):
    argv = [a.replace("IN/", f"{inputs}/").replace("OUT/", f"{out}/") for a in argv]
    if argv[:1] in (["generate"], ["eval"]) and "--out" not in argv:
        argv += ["--out", str(out)]
    return argv


def _files(*folders):
    return {p for folder in folders for p in folder.rglob("*")}


def assert_refused(rc, err, fragment, before, after):
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("hypersd: error: "), err
    assert "Traceback" not in err and fragment in lines[0], err
    assert after == before, f"files left behind: {sorted(map(str, after - before))}"


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, inputs, tmp_path, capsys, tiny_model, no_heavy_work):
    out = tmp_path / "out"
    argv = _argv(argv, inputs, out)
    fragment = fragment.replace("IN/", f"{inputs}/")
    before = _files(tmp_path, inputs)
    rc = main(argv)
    assert_refused(rc, capsys.readouterr().err, fragment, before, _files(tmp_path, inputs))


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "folder-of-an-earlier-run"])
def test_a_full_disk_leaves_no_partial_images(existing, tmp_path, capsys, monkeypatch, tiny_model):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "0000-seed0.png").write_bytes(b"an earlier run's image")
    save, calls = Image.Image.save, []

    def fills_the_disk(img, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            return save(img, path, *args, **kwargs)
        with open(path, "wb") as f:  # half an image, then the disk is full
            f.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Image.Image, "save", fills_the_disk)
    before = _files(tmp_path)
    rc = main(["generate", "a cat", "--steps", "1", "--batch", "3", "--out", str(out)])
    assert_refused(rc, capsys.readouterr().err, "the disk is full: free space or choose another --out",
                   before, _files(tmp_path))
    assert len(calls) == 2
    if existing:
        assert (out / "0000-seed0.png").read_bytes() == b"an earlier run's image"


def test_saving_into_a_folder_of_an_earlier_run_keeps_its_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "0000-seed0.png").write_bytes(b"an earlier run's image")
    paths = generate(["a cat"], steps=1, batch=2, pipe=tiny_sd15()).save(out)
    assert sorted(p.name for p in out.iterdir()) == ["0000-seed0.png", "0001-seed1.png", "grid.png", "notes.txt"]
    assert paths[-1] == out / "grid.png" and Image.open(out / "0000-seed0.png").text["seed"] == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "hypersd.cli", "generate", "a cat", "--guidance", "nan",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("hypersd: error: guidance nan"), run.stderr
    assert run.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def _array(images):
    return np.stack([np.asarray(i, dtype=np.float32) for i in images])


def test_a_large_batch_is_made_in_chunks_that_draw_the_same_images(capsys):
    pipe = tiny_sd15()
    kwargs = dict(recipe="tcd", steps=2, seed=5, batch=3, pipe=pipe)  # TCD draws fresh noise every step
    one_call = generate(["a cat", "a dog"], **kwargs)
    assert "generating" not in capsys.readouterr().err  # one call: no progress bar
    chunked = generate(["a cat", "a dog"], chunk=2, **kwargs)
    assert "generating" in capsys.readouterr().err  # three calls: a progress bar over them
    assert chunked.seeds == one_call.seeds == [5, 6, 7, 5, 6, 7]
    np.testing.assert_array_equal(_array(chunked.images), _array(one_call.images))


def test_a_long_prompt_is_cut_with_one_warning_line(tmp_path, capsys, tiny_model):
    words = " ".join(f"word{i}" for i in range(12))  # the tiny model's tokenizer keeps 16 tokens
    out = tmp_path / "out"
    assert main(["generate", words, "--steps", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("hypersd: warning: prompt 'word0 word1"), err
    assert "dropped:" in err[0] and err[0].rstrip("'").endswith("word11")
    assert (out / "0000-seed0.png").exists() and (out / "grid.png").exists()


def test_the_mini_models_window_is_32_tokens(capsys):
    from transformers import AutoTokenizer

    from hypersd.models.mini import MAX_TOKENS, minilm_path
    from hypersd.testing import tiny_sd15
    pipe = tiny_sd15()  # an SD1.5-shaped pipeline with the mini model's tokenizer
    pipe.tokenizer = AutoTokenizer.from_pretrained(minilm_path(), model_max_length=MAX_TOKENS)
    warn_truncated(pipe, ["red apple", "a red apple " + "and a red apple " * 10 + "and a pear"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "32 tokens" in err[0] and err[0].endswith("and a pear'"), err
