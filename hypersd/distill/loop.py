"""The one training loop: every method and every stage of a run goes through ``distill``.

The loop owns optimisation (one AdamW per phase of the method), precision, gradient
accumulation, data, checkpoints, logging and export; the method (``protocol.Method``) owns
its networks' roles, phases and losses. Everything distributed goes through accelerate: the
trainable modules and the optimizers are ``accelerator.prepare``d (DDP, FSDP or DeepSpeed
by ``accelerate launch --config_file``), micro-batches run under ``accelerator.accumulate``
and gradients are clipped with ``accelerator.clip_grad_norm_`` (which unscales fp16 first).

Per stage: the student starts from the previous stage (or a fresh LoRA, or a file); each step
draws a batch with a generator seeded by (seed, stage, step, process), so a resumed run
replays the same examples, and the global RNG is seeded by (seed, stage) when a stage starts, so
what a method draws then (new adapters, heads) does not depend on what the process ran before.
Checkpoints (student, target, the method's state, optimizers, RNG, step;
``hypersd.checkpoint``: safetensors, checksummed, fsynced, renamed into place) are written every
``checkpoint_every`` steps and verified before a resume; a finished stage exports its LoRA. A
non-finite loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from peft import LoraConfig
from tqdm.auto import tqdm

from hypersd import checkpoint
from hypersd.distill.data import examples_for
from hypersd.distill.export import save_lora
from hypersd.distill.family import Family, family_of
from hypersd.distill.networks import Networks
from hypersd.distill.protocol import StageContext, methods
from hypersd.distill.recipe import LCM_LORA_TARGETS, RunConfig
from hypersd.errors import UserError
from hypersd.files import check_writable, writing
from hypersd.io import atomic_path


def _generator(seed: int, stage: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 10_000_019 + step) * 101 + rank)


def _stage_seed(seed: int, stage: int) -> int:
    return (seed * 1_000_003 + 7_919 * (stage + 1)) % 2**32


def replica_checksum(nets: Networks) -> float:
    """A number that differs between processes whose students have drifted apart."""
    return float(sum(v.double().sum() * (i + 1) for i, v in enumerate(nets.state("student").values())))


def lora_config(run: RunConfig, fam: Family | None = None) -> LoraConfig | None:
    """The student's LoRA; a transformer's targets are its family's projections unless the recipe
    names others, less the modules of the family that reach no output."""
    if run.full_unet:
        return None
    targets = run.lora.targets
    if fam is not None and fam.lora_targets and targets == LCM_LORA_TARGETS:
        targets = fam.lora_targets
    exclude = [m for m in (fam.lora_exclude if fam is not None else ()) if any(m.endswith(f".{t}") for t in targets)]
    return LoraConfig(r=run.lora.rank, lora_alpha=run.lora.alpha, target_modules=list(targets),
                      exclude_modules=exclude or None, init_lora_weights=True)


def make_accelerator(run: RunConfig) -> Accelerator:
    """One accelerator per run; ``accelerate launch`` (or torchrun) decides the processes."""
    registry = methods()
    unused = any(registry[s.method].method.unused_parameters for s in run.stages)
    return Accelerator(cpu=not torch.cuda.is_available(),  # cpu: gloo across CPU processes
                       mixed_precision=run.mixed_precision, log_with="tensorboard",
                       project_dir=run.output_dir, gradient_accumulation_steps=run.gradient_accumulation,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])


def setup(run: RunConfig, accelerator: Accelerator, examples=None, pipe=None):
    """The base pipeline, the training examples and the networks' context of a run."""
    from hypersd.generate.loading import load_pipeline

    pipe = pipe or load_pipeline(run.model, dtype=torch.float32, device=str(accelerator.device))
    fam = family_of(pipe)
    examples = examples or examples_for(pipe, run, accelerator)
    if run.gradient_checkpointing:
        fam.net.enable_gradient_checkpointing()
    set_seed(run.seed)  # the LoRA's random A matrices: the same on every process
    nets = Networks(fam.net, lora_config(run, fam), feature_fn=fam.features)
    ctx = StageContext(nets, fam.process, "flow" if fam.flow else pipe.scheduler.config.prediction_type,
                       run.offset_noise, probe=examples.sample(2, torch.Generator().manual_seed(0)),
                       data=examples, vae=pipe.vae.requires_grad_(False), call=fam.call,
                       latent_shape=fam.latent_shape)
    return pipe, examples, ctx


def distill(run: RunConfig, examples=None, pipe=None, accelerator: Accelerator | None = None) -> list[Path]:
    """Run every stage of ``run`` (resuming finished and interrupted stages); return the LoRAs.

    ``pipe`` defaults to ``run.model`` loaded by hypersd; ``examples`` to its emoji32 split.
    """
    if run.threads:
        torch.set_num_threads(run.threads)
    check_writable(run.output_dir, "output_dir")
    with writing(run.output_dir, "output_dir"):
        Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator(run)
    pipe, examples, ctx = setup(run, accelerator, examples, pipe)
    accelerator.init_trackers("distill")
    exported, previous = [], None
    for index in range(len(run.stages)):
        path, previous = _run_stage(run, index, ctx, examples, accelerator, previous, family_of(pipe))
        exported.append(path)
        ctx.finished[run.stages[index].name] = Path(run.output_dir) / f"{run.stages[index].name}.ckpt"
    _report_replicas(run, ctx.nets, accelerator)
    accelerator.end_training()
    return exported


class StageTrainer:
    """One stage: its method, an optimizer per phase, both prepared by accelerate."""

    def __init__(self, run: RunConfig, index: int, ctx: StageContext, examples, accelerator: Accelerator):
        self.run, self.index, self.stage = run, index, run.stages[index]
        self.examples, self.accelerator = examples, accelerator
        try:
            self.method = methods()[self.stage.method].method(self.stage.config, ctx)
        except (ValueError, FileNotFoundError) as e:  # e.g. a reward whose weights are missing
            raise UserError(f"stage {self.stage.name}: {e}") from e
        if self.method.needs_images and not examples.has_images:
            raise UserError(f"stage {self.stage.name}: method {self.stage.method} needs images; "
                            f"the data has prompts only")
        self.params, settings = self.method.params(), self.method.optimizer_settings(self.stage.lr)
        self.optimizers = {ph: torch.optim.AdamW(ps, **{"weight_decay": 0.0, **settings[ph]})
                           for ph, ps in self.params.items()}
        self.modules = self._prepare(self.method.modules())

    def _prepare(self, modules: dict) -> dict:
        """Each distinct module is prepared once (phases may train parts of one module)."""
        phases = list(self.optimizers)
        unique = list({id(modules[ph]): modules[ph] for ph in phases}.values())
        objs = unique + [self.optimizers[ph] for ph in phases]
        prepared = self.accelerator.prepare(*objs)
        prepared = prepared if isinstance(prepared, (list, tuple)) else (prepared,)
        self.optimizers = dict(zip(phases, prepared[len(unique):]))
        by_id = {id(m): w for m, w in zip(unique, prepared[:len(unique)])}
        wrapped = {ph: by_id[id(modules[ph])] for ph in phases}
        for phase, module in wrapped.items():
            self.method.wrapped(phase, module)
        return wrapped

    def sample(self, step: int):
        """The step's examples and every random draw the method makes, from one generator."""
        g = _generator(self.run.seed, self.index, step, self.accelerator.process_index)
        return self.method.sample(self.examples.sample(self.stage.batch_size, g), g)

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step of every phase the method runs at ``step``; returns the logs."""
        micro = split_batch(self.sample(step), self.run.gradient_accumulation)
        logs: dict[str, float] = {}
        for phase in self.method.phases(step):
            logs.update(self._phase(phase, micro, step))
            self.method.after_step(phase)
        return logs

    def _phase(self, phase: str, micro: list, step: int) -> dict[str, float]:
        acc, module, opt = self.accelerator, self.modules[phase], self.optimizers[phase]
        sums: dict[str, float] = {}
        for part in micro:
            with acc.accumulate(module):
                with acc.autocast():
                    loss, logs = self.method.loss(phase, part)
                value = loss.item()
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"{phase} loss is {value} at step {step}")
                acc.backward(loss)
                if acc.sync_gradients:  # after the last micro-batch: clip (unscaled) and step
                    norm = float(acc.clip_grad_norm_(self.params[phase], self.run.max_grad_norm))
                opt.step()
                opt.zero_grad(set_to_none=True)
            for key, x in {f"loss/{phase}": value, **logs}.items():
                sums[key] = sums.get(key, 0.0) + x / len(micro)
        return {**sums, f"grad_norm/{phase}": norm}

    def save(self, folder: Path, step: int) -> None:
        """Every process calls this (weights of sharded modules are gathered collectively); the
        main process writes the state, and each process its optimizers' shard under FSDP."""
        acc = self.accelerator
        nets = self.method.ctx.nets
        state = {"student": nets.state("student"), "target": nets.state("target"),
                 "method": self.method.state_dict(), "rng": torch.get_rng_state()}
        optimizers = {ph: opt.state_dict() for ph, opt in self.optimizers.items()}
        if not self._sharded:
            state["optimizers"] = optimizers
        checkpoint.save(folder, step, state, settings=stage_settings(self.run, self.index),
                        shard=optimizers if self._sharded else None, rank=acc.process_index,
                        barrier=acc.wait_for_everyone, keep=self.run.keep_checkpoints)

    def load(self, ck: checkpoint.Checkpoint) -> int:
        """Restore a verified checkpoint of this stage; return its step."""
        _check_settings(ck, stage_settings(self.run, self.index))
        state = ck.state()
        self.method.ctx.nets.load_states(state["student"], state["target"])
        self.method.load_state_dict(state["method"])
        optimizers = ck.shard(self.accelerator.process_index) if self._sharded else state["optimizers"]
        for phase, opt in self.optimizers.items():
            opt.load_state_dict(optimizers[phase])
        torch.set_rng_state(state["rng"])
        return ck.step

    @property
    def _sharded(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP


class NonFiniteLoss(Exception):
    pass


def stage_settings(run: RunConfig, index: int) -> dict:
    """What a stage's checkpoint must have been trained with to be resumed: every field of the
    stage but its length and name, and the run's fields that change the arithmetic."""
    stage = {k: v for k, v in dataclasses.asdict(run.stages[index]).items() if k not in ("steps", "name")}
    fields = ("model", "full_unet", "lora", "split", "mixed_precision", "gradient_accumulation",
              "max_grad_norm", "seed", "offset_noise")
    settings = {"stage": stage, **{f: getattr(run, f) for f in fields}}
    data = {k: v for k, v in dataclasses.asdict(run.data).items() if k not in ("cache_dir", "num_workers", "shard_size")}
    if data != {k: v for k, v in dataclasses.asdict(type(run.data)()).items() if k in data}:
        settings["data"] = data  # other data than emoji32's (absent, so older checkpoints still resume)
    return json.loads(json.dumps(settings, default=_plain))


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def _check_settings(ck: checkpoint.Checkpoint, settings: dict) -> None:
    changed = [f"{k}: {old!r} -> {new!r}" for k, old, new in _differences(ck.settings, settings)]
    if changed:
        raise UserError(f"checkpoint {ck.path} was written with other settings ({'; '.join(changed[:4])}): "
                        "put them back to resume, or choose another output_dir to start over")


def _differences(old, new, key: str = ""):
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _differences(old.get(k), new.get(k), f"{key}.{k}" if key else k)
    elif old != new:
        yield key, old, new


def split_batch(example, parts: int) -> list:
    """``parts`` equal micro-batches of a batch-first dataclass (tensors, lists, nested dicts)."""
    if parts == 1:
        return [example]
    fields = {f.name: _chunks(getattr(example, f.name), parts) for f in dataclasses.fields(example)}
    return [type(example)(**{k: v[i] for k, v in fields.items()}) for i in range(parts)]


def _chunks(value, parts: int) -> list:
    if isinstance(value, torch.Tensor):
        return list(value.chunk(parts))
    if isinstance(value, list):
        size = len(value) // parts
        return [value[i * size:(i + 1) * size] for i in range(parts)]
    if isinstance(value, dict):
        split = {k: _chunks(v, parts) for k, v in value.items()}
        return [{k: v[i] for k, v in split.items()} for i in range(parts)]
    return [value] * parts


def _run_stage(run: RunConfig, index: int, ctx: StageContext, examples, accelerator: Accelerator,
               previous: dict | None, fam: Family) -> tuple[Path, dict]:
    """Train (or resume, or skip if finished) one stage; return its export and student."""
    stage, out = run.stages[index], Path(run.output_dir)
    final, ckpt = out / f"{stage.name}.safetensors", out / f"{stage.name}.ckpt"
    last = checkpoint.latest(ckpt, set_aside=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if final.exists() and last is not None and last.step >= stage.steps:  # finished: restore, move on
        student = last.state("student")
        ctx.nets.load_state("student", student)
        return (final if ctx.nets.lora is not None else final.with_suffix("")), student
    set_seed(_stage_seed(run.seed, index))  # a method's first draws: the same in any process
    trainer = StageTrainer(run, index, ctx, examples, accelerator)
    if last is not None:
        start = trainer.load(last)
        accelerator.print(f"resuming stage {stage.name} at step {start}")
    else:
        start = 0
        _init_student(ctx.nets, stage.start_from, previous)
    began = time.time()
    _train(trainer, start, ckpt)
    trainer.method.close()
    served = trainer.method.export_info()
    info = {"base_model": run.model, "method": stage.method, **served,
            "recipe": fam.student_recipe(served["recipe"]), "stage": stage.name, "train_steps": stage.steps, "mixed_precision": run.mixed_precision,
            "seconds": round(time.time() - began, 1)}
    del trainer
    accelerator.free_memory()  # the next stage prepares its own modules and optimizers
    student = ctx.nets.state("student")
    accelerator.wait_for_everyone()
    return _export(ctx.nets, student, final, info, fam, accelerator.is_main_process), student


def _train(trainer: StageTrainer, start: int, ckpt: Path) -> None:
    run, stage, acc = trainer.run, trainer.stage, trainer.accelerator
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=stage.name,
               disable=not acc.is_local_main_process)
    avg, latest = None, {}  # latest: each key's last value (phases need not run every step)
    for step in bar:
        try:
            logs = trainer.step(step)
        except NonFiniteLoss as e:
            kept = checkpoint.latest(ckpt, set_aside=False)
            raise UserError(f"stage {stage.name}: {e}; the last good checkpoint is "
                            f"{kept.path if kept else 'none'} (lower lr?)") from None
        latest.update(logs)
        loss = next(v for k, v in logs.items() if k.startswith("loss/"))
        avg = loss if avg is None else 0.95 * avg + 0.05 * loss
        bar.set_postfix(loss=f"{avg:.4g}")
        if (step + 1) % run.log_every == 0:
            acc.log({f"{stage.name}/{k}": v for k, v in latest.items()}, step=step + 1)
        if (step + 1) % run.checkpoint_every == 0 or step + 1 == stage.steps:
            trainer.save(ckpt, step + 1)


def _export(nets: Networks, student: dict, final: Path, info: dict, fam: Family, main: bool) -> Path:
    """The stage's student: a LoRA file (diffusers + kohya for UNets), or for full training a
    diffusers folder of the network beside (UNets) one original-layout file (``final``, what
    A1111/ComfyUI load)."""
    unet = fam.net
    if nets.lora is None and fam.flow:
        folder = final.with_suffix("")
        if main:
            with atomic_path(folder) as tmp:
                unet.save_pretrained(tmp)
        return folder
    if nets.lora is None:
        from hypersd.models.single_file import save_unet_single_file
        folder = final.with_suffix("")
        if main:
            with atomic_path(folder) as tmp:
                unet.save_pretrained(tmp)
            with atomic_path(final) as tmp:
                save_unet_single_file(unet, tmp, metadata={"hypersd": json.dumps(info, sort_keys=True)})
        return folder
    if main:
        save_lora(student, nets.lora, final, info, sdxl=fam.name == "sdxl", unet_config=unet.config,
                  prefix=fam.lora_prefix, base=fam.metadata_base)
    return final


def _report_replicas(run: RunConfig, nets: Networks, accelerator: Accelerator) -> None:
    """Every process reports its replica's checksum, so drift between processes is visible."""
    if accelerator.num_processes == 1:
        return
    sums = accelerator.gather(torch.tensor([replica_checksum(nets)], dtype=torch.float64))
    if accelerator.is_main_process:
        (Path(run.output_dir) / "replicas.json").write_text(json.dumps({"checksums": sums.tolist()}) + "\n")


def _init_student(nets: Networks, start_from: str, previous: dict | None) -> None:
    if start_from == "previous" and previous is not None:
        nets.load_states(previous)
    elif start_from not in ("previous", "base"):
        try:
            nets.load_states(nets.file_state(start_from))
        except (FileNotFoundError, RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"cannot start from {start_from}: {str(e).splitlines()[0][:200]}") from e
    else:  # a fresh LoRA: B = 0, so the student starts as the teacher
        nets.load_states({k: torch.zeros_like(v) if "lora_B" in k else v
                          for k, v in nets.state("student").items()} if nets.lora is not None
                         else nets.state("teacher"))
