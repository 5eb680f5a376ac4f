"""The training loop end to end on tiny SD1.5- and SDXL-shaped models."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from hypersd.checkpoint import latest
from hypersd.distill.loop import distill
from hypersd.distill.methods.consistency import TSCDConfig
from hypersd.distill.recipe import RunConfig, StageConfig, load_run
from hypersd.errors import UserError
from hypersd.testing import assert_same_weights, full_and_resumed, random_examples, tiny_run, tiny_sd15, tiny_sdxl


def checkpoint_state(folder: Path) -> dict:
    """The newest checkpoint's state, with its step."""
    ck = latest(folder)
    return {**ck.state(), "step": ck.step}

BUILD = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}
RECIPES = Path(__file__).resolve().parents[1] / "hypersd" / "recipes" / "distill"


_examples, _run = random_examples, tiny_run


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("method, k", [("lcm", 1), ("tcd", 1), ("pcm", 4), ("tscd", 8)])
def test_each_method_trains_and_exports(tmp_path, family, method, k):
    pipe = BUILD[family]()
    segments = {"segments": k} if method in ("pcm", "tscd") else {}  # LCM and TCD have one segment
    run = _run(tmp_path, [StageConfig.make(method=method, steps=3, batch_size=2, lr=1e-3, **segments)])
    lora, = distill(run, examples=_examples(pipe), pipe=pipe)
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        assert "hypersd" in f.metadata() and all(k.startswith("unet.") for k in keys)
        assert any(f.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k), "the LoRA did not train"
    assert lora.with_suffix(".kohya.safetensors").exists()
    # stock diffusers loads what we wrote
    stock = BUILD[family]()
    stock.load_lora_weights(str(lora), adapter_name="x")
    assert "x" in stock.get_list_adapters()["unet"]


def test_cfg_preserving_stage_trains_and_names_its_recipe(tmp_path):
    pipe = tiny_sd15()
    stage = StageConfig.make(method="tscd", segments=4, steps=2, batch_size=2, lr=1e-3, student_guidance=True)
    lora, = distill(_run(tmp_path, [stage]), examples=_examples(pipe), pipe=pipe)
    with safe_open(str(lora), "pt") as f:
        assert '"recipe": "tscd-cfg"' in f.metadata()["hypersd"]
    with pytest.raises(UserError, match="needs a guidance range"):
        RunConfig(stages=[StageConfig.make(method="tscd", steps=1, guidance=None, student_guidance=True)])


def test_resume_gives_the_same_weights(tmp_path):
    full, resumed = full_and_resumed(tiny_sd15, tmp_path, segments=4)  # stopped after step 2
    assert_same_weights(full, resumed)


def test_stages_chain_and_recipe_errors(tmp_path):
    pipe = tiny_sd15()
    stages = [StageConfig.make(method="tscd", segments=k, steps=2, batch_size=2, lr=1e-3) for k in (8, 4, 2, 1)]
    loras = distill(_run(tmp_path, stages), examples=_examples(pipe), pipe=pipe)
    assert [p.name for p in loras] == ["0-tscd-k8.safetensors", "1-tscd-k4.safetensors",
                                       "2-tscd-k2.safetensors", "3-tscd-k1.safetensors"]
    with pytest.raises(UserError, match="unknown method"):
        RunConfig(stages=[StageConfig.make(method="sdxl-turbo", steps=1)])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {method: tscd, steps: 10, segmnts: 4}\n")
    with pytest.raises(UserError, match="unknown field"):
        load_run(str(bad))
    pipe = tiny_sd15()
    with pytest.raises(UserError, match="no such LoRA"):
        distill(_run(tmp_path / "c", [StageConfig.make(method="tcd", steps=1, start_from="/missing.safetensors")]),
                examples=_examples(pipe), pipe=pipe)


def test_nan_loss_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path):
    pipe = tiny_sd15()
    stage = dict(method="tscd", segments=2, batch_size=2, lr=1e-3)
    distill(_run(tmp_path, [StageConfig.make(steps=2, **stage)]), examples=_examples(pipe), pipe=pipe)
    ckpt = tmp_path / "run" / "0-tscd-k2.ckpt"
    (tmp_path / "run" / "0-tscd-k2.safetensors").unlink()  # as if interrupted after step 2
    good = {p.name: p.read_bytes() for p in (ckpt / "step-00000002").iterdir()}
    bad = _examples(pipe)
    bad.mean = torch.full_like(bad.mean, float("nan"))
    with pytest.raises(UserError, match=r"loss is nan at step 2; the last good checkpoint is .*0-tscd-k2.ckpt/step-00000002"):
        distill(_run(tmp_path, [StageConfig.make(steps=4, **stage)]), examples=bad, pipe=tiny_sd15())
    assert {p.name: p.read_bytes() for p in (ckpt / "step-00000002").iterdir()} == good
    assert [p.name for p in ckpt.iterdir()] == ["step-00000002"]


def test_a_lora_of_another_shape_cannot_start_a_stage(tmp_path):
    pipe = tiny_sdxl()
    lora, = distill(_run(tmp_path / "xl", [StageConfig.make(method="tcd", steps=1, batch_size=2)]),
                    examples=_examples(pipe), pipe=pipe)
    pipe = tiny_sd15()
    with pytest.raises(UserError, match="cannot start from"):
        distill(_run(tmp_path / "sd15", [StageConfig.make(method="tcd", steps=1, batch_size=2,
                                                     start_from=str(lora))]),
                examples=_examples(pipe), pipe=pipe)


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    stages = [StageConfig.make(method="tscd", segments=4, steps=2, batch_size=2, lr=1e-3)]
    out = {}
    for name, kw in (("plain", {}), ("ckpt", {"gradient_checkpointing": True})):
        pipe = tiny_sd15()
        lora, = distill(_run(tmp_path / name, stages, **kw), examples=_examples(pipe), pipe=pipe)
        with safe_open(str(lora), "pt") as f:
            out[name] = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in out["plain"].items():
        torch.testing.assert_close(out["ckpt"][key], value, atol=1e-6, rtol=1e-5)


def test_bundled_recipe_loads_by_name_with_typed_method_fields():
    run = load_run("hyper-sd-mini", ["stages.0.steps=10", "stages.2.adversarial.lr=3e-4"])
    assert [s.config.segments for s in run.stages] == [8, 4, 2, 1] and run.stages[0].steps == 10
    assert run.stages[1].start_from == "previous" and run.stages[0].start_from == "base"
    assert isinstance(run.stages[0].config, TSCDConfig) and run.stages[0].config.adversarial is None
    assert run.stages[2].config.adversarial.weight == 0.1 and run.stages[2].config.adversarial.lr == 3e-4
    assert run.stages[2].config.distance_weight == 0.8
    with pytest.raises(UserError, match=r"stage 0 \(lcm\): unknown field\(s\) segments"):
        load_run("lcm-mini", ["stages.0.segments=4"])
    with pytest.raises(UserError, match="adversarial loss must be hinge or nonsaturating"):
        load_run("hyper-sd-mini", ["stages.1.adversarial.loss=wasserstein"])
    with pytest.raises(UserError, match="names no field"):
        load_run("lcm-mini", ["stages.3.lr=1"])
    with pytest.raises(UserError, match="must be a multiple of gradient_accumulation"):
        load_run("lcm-mini", ["gradient_accumulation=3"])


def test_exported_lora_gives_stock_diffusers_the_same_images(tmp_path, tiny_dirs):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd15"])
    run = _run(tmp_path, [StageConfig.make(method="tscd", segments=1, steps=3, batch_size=2, lr=1e-2)])
    lora, = distill(run, examples=_examples(pipe), pipe=pipe)
    from hypersd.generate import generate
    from hypersd.generate.loading import SCHEDULERS
    ours = generate(["emoji 1"], model=tiny_dirs["sd15"], loras=[str(lora)], recipe="hyper-sd-unified",
                    steps=2, seed=5)
    stock = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd15"])
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(lora))
    stock.scheduler = SCHEDULERS["tcd"].from_config(stock.scheduler.config, timestep_spacing="trailing")
    image = stock("emoji 1", num_inference_steps=2, guidance_scale=0.0, eta=1.0,
                  generator=[torch.Generator().manual_seed(5)]).images[0]
    np.testing.assert_array_equal(np.asarray(ours.images[0]), np.asarray(image))
    plain = generate(["emoji 1"], model=tiny_dirs["sd15"], recipe="hyper-sd-unified", steps=2, seed=5)
    assert np.abs(np.asarray(plain.images[0], np.float32) - np.asarray(image, np.float32)).max() > 0


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_adversarial_stage_trains_and_resumes(tmp_path, family):
    stage = dict(method="tscd", segments=2, batch_size=2, lr=1e-3, distance_weight=0.5,
                 adversarial={"weight": 0.5, "lr": 1e-3})
    pipe = BUILD[family]()
    full, = distill(_run(tmp_path / "a", [StageConfig.make(steps=4, **stage)]), examples=_examples(pipe), pipe=pipe)
    state = checkpoint_state(tmp_path / "a" / "run" / "0-tscd-k2.ckpt")
    assert "critic" in state["method"] and state["step"] == 4
    pipe = BUILD[family]()
    distill(_run(tmp_path / "b", [StageConfig.make(steps=2, **stage)]), examples=_examples(pipe), pipe=pipe)
    (tmp_path / "b" / "run" / "0-tscd-k2.safetensors").unlink()
    pipe = BUILD[family]()
    resumed, = distill(_run(tmp_path / "b", [StageConfig.make(steps=4, **stage)]), examples=_examples(pipe), pipe=pipe)
    assert_same_weights(full, resumed)


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_bundled_recipe_is_valid(name):
    run = load_run(str(RECIPES / f"{name}.yaml"))
    if run.model == "mini" and all(s.method in ("lcm", "tcd", "pcm", "tscd") for s in run.stages):
        assert sum(s.steps for s in run.stages) == 2000, "the mini consistency runs compare at one budget"


def test_two_processes_train_and_agree(tmp_path, tiny_dirs):
    """torchrun with 2 CPU processes (gloo): accelerate wraps the student and the critic in DDP,
    so gradients are averaged and replicas stay equal, across stage boundaries too, and through
    a DMD2 stage whose phases each train one of two adapters on one UNet (and a GAN head)."""
    import json
    import os
    import subprocess
    import sys
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_dirs['sd15']}\noutput_dir: {tmp_path / 'run'}\n"
                      "lora: {rank: 4, alpha: 4}\nsplit: eval\nthreads: 1\n"
                      "stages:\n  - {method: tscd, segments: 2, steps: 3, batch_size: 2, lr: 1.0e-3,"
                      " adversarial: {weight: 0.5, lr: 1.0e-3}}\n"
                      "  - {method: tcd, steps: 2, batch_size: 2, lr: 1.0e-3}\n"
                      "  - {method: dmd2, steps: 3, batch_size: 2, lr: 1.0e-3, update_ratio: 1, gan_weight: 0.5}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29517", "-m", "hypersd.cli", "distill", str(recipe)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    sums = json.loads((tmp_path / "run" / "replicas.json").read_text())["checksums"]
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=1e-9)
    assert all((tmp_path / "run" / f"{name}.safetensors").exists() for name in ("0-tscd-k2", "1-tcd-k1", "2-dmd2-k1"))


def test_bf16_mixed_precision_trains_close_to_fp32(tmp_path, tiny_dirs):
    """bf16 autocast, in its own process (accelerate keeps one mixed-precision state per process)."""
    import json
    import subprocess
    import sys
    loras = {}
    for precision in ("no", "bf16"):
        recipe = tmp_path / f"{precision}.yaml"
        recipe.write_text(f"model: {tiny_dirs['sd15']}\noutput_dir: {tmp_path / precision}\n"
                          f"lora: {{rank: 4, alpha: 4}}\nsplit: eval\nmixed_precision: \"{precision}\"\n"
                          "stages:\n  - {method: tscd, segments: 2, steps: 3, batch_size: 2, lr: 1.0e-3}\n")
        result = subprocess.run([sys.executable, "-m", "hypersd.cli", "distill", str(recipe)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        with safe_open(str(tmp_path / precision / "0-tscd-k2.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["hypersd"])["mixed_precision"] == precision
            loras[precision] = {k: f.get_tensor(k) for k in f.keys() if "lora_B" in k}
    fp32, bf16 = (torch.cat([v.flatten() for _, v in sorted(loras[p].items())]) for p in ("no", "bf16"))
    assert torch.isfinite(bf16).all() and fp32.abs().max() > 0  # B starts at 0: these are the updates
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0).item()
    print(f"cosine(bf16 update, fp32 update) = {cosine:.3f}")
    assert not torch.equal(fp32, bf16) and cosine > 0.5  # rounding shows, the direction is the same


def _lora_tensors(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _optimizer_steps(tmp_path, n: int, stage: dict) -> list[tuple[str, list[torch.Tensor]]]:
    """One loop step with accumulation over ``n`` micro-batches, from a LoRA with B ≠ 0 (so
    every LoRA matrix has a gradient); the gradients each inner optimizer step saw, in order."""
    from hypersd.distill.loop import StageTrainer, make_accelerator, setup
    run = _run(tmp_path / str(n), [StageConfig.make(**stage)], gradient_accumulation=n)
    pipe = tiny_sd15()
    accelerator = make_accelerator(run)
    _, examples, ctx = setup(run, accelerator, _examples(pipe), pipe)
    trainer = StageTrainer(run, 0, ctx, examples, accelerator)
    seen = []
    for phase, opt in trainer.optimizers.items():
        def record(*args, _phase=phase, _inner=opt.optimizer.step, **kwargs):
            seen.append((_phase, [p.grad.clone() for p in trainer.params[_phase]]))
            return _inner(*args, **kwargs)
        opt.optimizer.step = record
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.params["student"]:
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    trainer.step(0)
    accelerator.free_memory()
    return seen


@pytest.mark.parametrize("adversarial", [False, True])
def test_gradient_accumulation_gives_the_gradient_of_one_batch(tmp_path, adversarial):
    """N micro-batches of b accumulate into the gradient of one batch of N·b on the same
    examples, in every phase (the critic's too), with one optimizer step per N micro-batches."""
    stage = dict(method="tscd", segments=4, steps=2, batch_size=4, lr=1e-3)
    if adversarial:
        stage["adversarial"] = {"weight": 0.5, "lr": 1e-3}
    one = _optimizer_steps(tmp_path, 1, stage)
    assert [phase for phase, _ in one] == (["student", "critic"] if adversarial else ["student"])
    for n in (2, 4):
        accumulated = _optimizer_steps(tmp_path, n, stage)
        assert [phase for phase, _ in accumulated] == [phase for phase, _ in one]
        for (_, grads), (_, reference) in zip(accumulated, one):
            total = torch.cat([r.flatten() for r in reference]).norm()
            assert total > 0
            for g, r in zip(grads, reference):
                # the same sums over other batch shapes: equal to float32 rounding (1e-4 seen);
                # a tensor whose gradient cancels to 0 is held to rounding of the whole gradient
                assert (g - r).norm() <= 1e-3 * r.norm() + 1e-6 * total


FP16_SCRIPT = """
import sys, torch
from accelerate import Accelerator
from hypersd.distill.data import LatentCaptions
from hypersd.distill.loop import distill
from hypersd.distill.recipe import LoraSettings, RunConfig, StageConfig
from hypersd.testing import tiny_sd15
out = sys.argv[1]
for name, scaled in (("plain", False), ("scaled", True)):
    pipe = tiny_sd15()
    g = torch.Generator().manual_seed(0)
    examples = LatentCaptions(pipe, torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, [f"e{i}" for i in range(8)])
    run = RunConfig(stages=[StageConfig.make("tscd", steps=3, segments=4, batch_size=2, lr=1e-3)],
                    output_dir=f"{out}/{name}", lora=LoraSettings(rank=4, alpha=4.0), max_grad_norm=1e-3,
                    mixed_precision="fp16")
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    if scaled:  # on a GPU accelerate scales fp16 losses with a GradScaler; on CPU install one,
        # and keep the maths in fp32 (no autocast), so its power-of-two scaling is exact
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), True
        acc.autocast = lambda *a, **k: __import__("contextlib").nullcontext()
        prepare = acc.prepare
        def prepare_fp32(*objs):  # prepare wraps forward in autocast when native_amp is set
            acc.native_amp = False
            out = prepare(*objs)
            acc.native_amp = True
            return out
        acc.prepare = prepare_fp32
    distill(run, examples=examples, pipe=pipe, accelerator=acc)
    print(name, "scale", acc.scaler.get_scale() if scaled else None)
"""


def test_fp16_loss_scaling_is_undone_before_clipping(tmp_path):
    """With a GradScaler (fp16) the loop's update equals the unscaled one: gradients are
    unscaled before they are clipped (max_grad_norm 1e-3 clips every step). Clipping scaled
    gradients would shrink every update by the scale, 2^16."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", FP16_SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scaled scale 65536.0" in result.stdout  # the scaler was used and found no overflow
    plain, scaled = (_lora_tensors(tmp_path / n / "0-tscd-k4.safetensors") for n in ("plain", "scaled"))
    for key, value in plain.items():
        torch.testing.assert_close(scaled[key], value, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name, kind", [("single-gpu", "NO"), ("multi-gpu", "MULTI_GPU"), ("fsdp-sdxl", "FSDP")])
def test_shipped_accelerate_configs_load(name, kind):
    """accelerate reads each example config; FSDP's wrap classes name real diffusers blocks."""
    from accelerate.commands.config.config_args import load_config_from_file
    from diffusers.models import attention, resnet
    cfg = load_config_from_file(str(RECIPES.parents[2] / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.name == kind and cfg.mixed_precision == "bf16"
    if kind == "FSDP":
        classes = cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
        assert all(hasattr(attention, c) or hasattr(resnet, c) for c in classes)
        assert cfg.fsdp_config["fsdp_use_orig_params"] is True  # Networks reads original parameters


@pytest.mark.parametrize("override, message", [("stages.0.segments=4", "stage 0 (lcm): unknown field(s) segments"),
                                               ("stages.5.lr=1", "names no field"),
                                               ("stages.0.adversarial.loss=x", "hinge or nonsaturating"),
                                               ("stages.0.rewards.0.name=nope", "unknown reward 'nope'")])
def test_distill_cli_refuses_bad_method_fields_with_exit_2(tmp_path, capsys, override, message):
    from hypersd.cli import main
    recipe = "hyper-sd-mini-feedback" if "rewards" in override else "lcm-mini"
    assert main(["distill", recipe, "--set", f"output_dir={tmp_path / 'run'}", "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()
