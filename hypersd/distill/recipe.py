"""A distillation run as typed config: the base model, the LoRA, and a list of stages.

YAML files hold only what differs from these defaults (see ``hypersd/recipes/distill/``). A
stage's fields are the loop's (``StageConfig``) and its method's (the method's config class).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from hypersd.config import Range, apply_overrides, check_ranges, load_dataclass, load_yaml
from hypersd.errors import UserError

# LCM-LoRA's targets: attention, feed-forward, resnet convs, samplers, time-embedding projections
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                    "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                    "upsamplers.0.conv", "time_emb_proj"]


POSITIVE, AT_LEAST_1, NOT_NEGATIVE = Range(gt=0), Range(ge=1), Range(ge=0)


@dataclass
class LoraSettings:
    rank: Annotated[int, AT_LEAST_1] = 64
    alpha: Annotated[float, POSITIVE] = 64.0
    targets: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGETS))

    def __post_init__(self):
        check_ranges(self)


@dataclass
class DataSettings:
    """Where a run's training examples come from and how they are prepared
    (``hypersd.distill.sources``; image sources go through ``hypersd.distill.cache``)."""

    source: str = "emoji32"              # emoji32 | a folder with metadata.jsonl | a saved Hugging Face
                                         # dataset folder or hf:NAME | .tar shards (a folder, or a brace
                                         # pattern such as shards/{000..009}.tar) | a .txt of prompts
    image_column: str = "image"          # Hugging Face datasets: the image column
    caption_column: str = "text"         # the caption column (datasets, metadata.jsonl) or .json field
    dataset_split: str = "train"         # the split of a hub dataset or a saved DatasetDict
    crop: str = "center"                 # "center" | "random" (one random crop per image, fixed by its name)
    caption_dropout: Annotated[float, Range(ge=0, le=1)] = 0.0  # chance a drawn caption becomes ""
    cache_dir: str = ""                  # the latent cache; "": $HYPERSD_CACHE or ~/.cache/hypersd/latents
    shard_size: Annotated[int, AT_LEAST_1] = 256   # examples per cache file
    num_workers: Annotated[int, NOT_NEGATIVE] = 2  # processes that decode images and draw batches ahead

    def __post_init__(self):
        check_ranges(self)
        if not self.source.strip():
            raise UserError("data.source is empty: name emoji32, a folder, hf:NAME, .tar shards or a .txt file")
        if self.crop not in ("center", "random"):
            raise UserError(f"data.crop must be center or random, not {self.crop!r}")


@dataclass
class StageConfig:
    """The loop's fields of a stage; every other field of a recipe stage is the method's own
    (its config dataclass in ``hypersd.distill.methods``), kept in ``config``."""

    method: str                          # a registered method: lcm, tcd, pcm, tscd, ...
    steps: Annotated[int, AT_LEAST_1]    # optimizer steps of this stage
    name: str = ""                       # default: "<index>-<method>-k<segments>"
    lr: Annotated[float, POSITIVE] = 1e-4          # the student's learning rate
    batch_size: Annotated[int, AT_LEAST_1] = 32    # examples per optimizer step and process
    start_from: str = "previous"         # "previous" stage, "base" (a fresh LoRA) or a LoRA file
    config: Any = None                   # the method's settings: its dataclass or a mapping

    def __post_init__(self):
        check_ranges(self)

    @classmethod
    def make(cls, method: str, steps: int, **fields) -> "StageConfig":
        """A stage from flat fields, as a recipe writes them: ``make("tscd", 500, segments=4)``."""
        loop = {k: fields.pop(k) for k in list(fields) if k in _LOOP_FIELDS}
        return cls(method=method, steps=steps, **loop, config=fields)


_LOOP_FIELDS = {f.name for f in dataclasses.fields(StageConfig)}


@dataclass
class RunConfig:
    stages: list[StageConfig]
    model: str = "mini"                  # base model: "mini", a diffusers folder or a hub id
    output_dir: str = "runs/distill"
    full_unet: bool = False              # train the whole UNet instead of a LoRA
    lora: LoraSettings = field(default_factory=LoraSettings)
    split: str = "distill"               # emoji32 prompts used for training (data: emoji32)
    data: DataSettings | str = field(default_factory=DataSettings)  # a source alone, or its settings
    mixed_precision: str = "no"          # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    gradient_accumulation: Annotated[int, AT_LEAST_1] = 1  # micro-batches per optimizer step: each
                                         # pass takes batch_size / N examples, the update is the same
    max_grad_norm: Annotated[float, POSITIVE] = 1.0  # gradients are clipped to this norm, per phase
    checkpoint_every: Annotated[int, AT_LEAST_1] = 200
    keep_checkpoints: Annotated[int, AT_LEAST_1] = 2  # the newest N checkpoints of a stage are kept
    log_every: Annotated[int, AT_LEAST_1] = 20
    seed: Annotated[int, NOT_NEGATIVE] = 0
    offset_noise: Annotated[float, NOT_NEGATIVE] = 0.0  # noise perturbation [Hyper-SD §3.1, offset noise]
    threads: Annotated[int, NOT_NEGATIVE] = 0

    def __post_init__(self):
        check_ranges(self)
        if isinstance(self.data, str):
            self.data = DataSettings(source=self.data)
        if not self.stages:
            raise UserError("a run needs at least one stage")
        for i, stage in enumerate(self.stages):
            _check_stage(i, stage, self.gradient_accumulation)
            if stage.start_from == "previous" and i == 0:
                stage.start_from = "base"
            stage.name = stage.name or f"{i}-{stage.method}-k{getattr(stage.config, 'segments', 1)}"
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise UserError(f"mixed_precision must be no, fp16 or bf16, not {self.mixed_precision!r}")


def _check_stage(i: int, stage: StageConfig, accumulation: int) -> None:
    """Known method, positive sizes, and the method's own fields checked against its config."""
    from hypersd.distill.protocol import methods
    registry = methods()
    if stage.method not in registry:
        raise UserError(f"stage {i}: unknown method {stage.method!r}; known: {', '.join(registry)}")
    if stage.batch_size % accumulation:
        raise UserError(f"stage {i}: batch_size {stage.batch_size} must be a multiple of "
                        f"gradient_accumulation {accumulation} (the micro-batches are equal)")
    config_cls = registry[stage.method].config
    if stage.config is None or isinstance(stage.config, dict):
        stage.config = load_dataclass(config_cls, stage.config or {}, f"stage {i} ({stage.method})")
    elif not isinstance(stage.config, config_cls):
        raise UserError(f"stage {i}: method {stage.method} takes a {config_cls.__name__}, "
                        f"not a {type(stage.config).__name__}")


BUNDLED = Path(__file__).resolve().parents[1] / "recipes" / "distill"


def recipe_path(name: str) -> Path:
    """A YAML path, or the name of a bundled recipe (``hyper-sd-mini``)."""
    bundled = BUNDLED / f"{name}.yaml"
    if Path(name).exists() or not bundled.exists() and Path(name).suffix in (".yaml", ".yml"):
        return Path(name)
    if not bundled.exists():
        names = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.yaml")))
        raise UserError(f"unknown recipe {name!r}: pass a YAML file or a bundled recipe ({names})")
    return bundled


def load_run(name: str, overrides: list[str] = ()) -> RunConfig:
    """Read a run recipe (a YAML path or a bundled name), apply "key=value" overrides, check
    every field (the method's own fields against its config)."""
    data = load_yaml(recipe_path(name))
    if isinstance(data.get("data"), str):  # a source alone: its settings, so data.* overrides apply
        data["data"] = {"source": data["data"]}
    data = apply_overrides(data, list(overrides))
    stages = data.get("stages")
    for stage in stages if isinstance(stages, list) else []:
        if isinstance(stage, dict):  # a stage's flat fields: the loop's, then the method's
            extra = {k: stage.pop(k) for k in list(stage) if k not in _LOOP_FIELDS}
            if extra:
                stage["config"] = {**(stage.get("config") or {}), **extra}
    return load_dataclass(RunConfig, data, "recipe")


def load_data_settings(name: str, overrides: list[str] = ()) -> tuple[str, DataSettings]:
    """The model and data settings of a recipe (a YAML file or a bundled name), or of a model
    ("mini", a folder, a hub id) with default data settings; "data.field=value" overrides apply."""
    if Path(name).suffix in (".yaml", ".yml") or (BUNDLED / f"{name}.yaml").exists():
        run = load_run(name, overrides)
        return run.model, run.data
    data = apply_overrides({}, list(overrides))
    other = sorted(set(data) - {"data"})
    if other:
        raise UserError(f"{name} is a model, not a recipe: only data.* fields can be set, not {', '.join(other)}")
    return name, load_dataclass(DataSettings, data.get("data"), "data")
