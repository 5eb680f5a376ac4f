"""``hypersd eval``: quality against steps, on the emoji32 evaluation split or any prompt file.

For each step count, N images are generated (the split's prompts in turn, seeds counting up
from ``seed``), saved as PNGs (an interrupted run reuses them) and scored with the emoji
network: FD to the dataset (of the style named by ``data``, with that style's network: a
model fine-tuned on Twemoji is compared with Twemoji by a network that knows Twemoji), FD to the teacher's own 25-step samples of the same prompts and
seeds, top-1/top-5 prompt adherence and diversity, each with a 95% bootstrap interval. Rows
accumulate in ``results.json`` so one table compares every method evaluated into the folder.

With ``prompts`` (a text file, one prompt a line) any model is evaluated on those prompts with
the real-model metrics whose weights are given (CLIP score, LAION aesthetic, ImageReward,
FID/KID to a ``reference`` folder of images); the emoji network, which knows only emoji32's
captions, is not used. ``table-real.md`` then has Hyper-SD's shape: CLIP / aesthetic /
ImageReward of each method at each step count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from hypersd.data import load_style
from hypersd.data.emoji32 import get_style
from hypersd.errors import UserError
from hypersd.files import check_writable, write_file, writing
from hypersd.generate import load_loras, load_pipeline, resolve_recipe, run_pipeline
from hypersd.generate.grid import make_grid
from hypersd.distill.sources import read_prompts
from hypersd.generate.loading import check_lora_file, load_unet, parse_lora

REFERENCE = ("teacher", 25)  # (recipe, steps) of the teacher reference set
REFERENCE_RECIPES = {"flux": "mini-flow"}  # a flow model's own many-step recipe (others: "teacher")
COLUMNS = [("fd", "FD→data ↓"), ("fd_teacher", "FD→teacher ↓"), ("top1", "top-1 % ↑"),
           ("top5", "top-5 % ↑"), ("diversity", "diversity"), ("clip", "CLIP ↑"),
           ("aesthetic", "aesthetic ↑"), ("imagereward", "ImageReward ↑"), ("fid", "FID ↓"),
           ("kid", "KID ↓"), ("mini-adherence", "adherence reward ↑"),
           ("mini-structure", "structure reward ↑")]


@dataclass
class EvalConfig:
    model: str | None = None                 # None = the bundled mini teacher
    unet: str | None = None                  # a UNet replacing the model's (full-network student)
    loras: list[str] = field(default_factory=list)
    step_loras: dict[int, str] = field(default_factory=dict)  # one LoRA per step count (N-step LoRAs)
    step_unets: dict[int, str] = field(default_factory=dict)  # one UNet per step count (N-step UNets)
    recipe: str = "teacher"
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    label: str | None = None                 # row name; default: the recipe (plus LoRA file)
    split: str = "eval"
    data: str = "noto"                       # the emoji32 style FD compares against
    samples: int | None = None               # images per step count; default: 840 (eval split: 2 per
                                             # prompt), or one per prompt of a prompt file
    prompts: str | None = None               # a text file of prompts, one a line: real metrics only
    reference: str | None = None             # a folder of images FID/KID compare with (default: the
                                             # split's emoji32 images; a prompt file needs one)
    seed: int = 0
    batch: int = 105
    out_dir: str = "outputs/eval"
    grid_prompts: int = 8
    classifier: str | None = None            # emoji network folder; None = the bundled one of ``data``
    clip: str | None = None                  # CLIP folder or hub id: CLIP score
    aesthetic: str | None = None             # LAION aesthetic head (.pth) on aesthetic_clip
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    imagereward: str | None = None           # ImageReward.pt, on imagereward_blip's shape
    imagereward_blip: str = "Salesforce/blip-itm-large-coco"
    inception: str | None = None             # FID Inception weights (.pth): FID/KID to data
    rewards: list[str] = field(default_factory=list)  # mini rewards (hypersd.rewards): mean score

    def __post_init__(self):
        if self.samples is None:
            self.samples = len(read_prompts(self.prompts)) if self.prompts else 840
        counts = {"--steps": self.steps, "--step-lora": list(self.step_loras),
                  "--step-unet": list(self.step_unets)}
        for flag, steps in counts.items():
            if any(not isinstance(n, int) or n < 1 for n in steps):
                raise UserError(f"{flag}: step counts must be whole numbers of 1 or more, not {steps}")
        if not self.steps:
            raise UserError("--steps: give at least one step count, e.g. 1,2,4,8")
        sizes = {"--samples": self.samples, "batch": self.batch, "grid_prompts": self.grid_prompts}
        for flag, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} {value}: give at least 1")
        for spec in self.loras + list(self.step_loras.values()):
            parse_lora(spec)  # a scale that is not a finite number fails here, before any work
        get_style(self.data)  # an unknown style fails here
        if self.prompts and not (self.clip or self.aesthetic or self.imagereward or self.inception):
            raise UserError(f"--prompts {self.prompts}: the emoji network scores emoji32 captions only; "
                            "pass a real metric's weights: --clip, --aesthetic, --imagereward or --inception")
        if self.prompts and self.inception and not self.reference:
            raise UserError("--inception with --prompts: FID/KID need images to compare with: pass "
                            "--reference FOLDER")


def parse_steps(text: str) -> list[int]:
    """Step counts from ``--steps``: "1,2,4,8" -> [1, 2, 4, 8]."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--steps {text!r}: write step counts separated by commas, e.g. 1,2,4,8") from None


def real_metrics(cfg: EvalConfig) -> dict:
    """The real-model metrics whose weights ``cfg`` names, built now (errors say what is missing)."""
    from hypersd.metrics.imagereward import ImageReward
    from hypersd.metrics.inception import InceptionFid
    from hypersd.metrics.real import AestheticScore, ClipScore
    out = {}
    if cfg.clip:
        out["clip"] = ClipScore.from_pretrained(cfg.clip)
    if cfg.aesthetic:
        out["aesthetic"] = AestheticScore.from_pretrained(cfg.aesthetic, cfg.aesthetic_clip)
    if cfg.imagereward:
        out["imagereward"] = ImageReward.from_pretrained(cfg.imagereward, cfg.imagereward_blip)
    if cfg.inception:
        out["fid"] = InceptionFid.from_pretrained(cfg.inception)
    return out


def score_real(scorers: dict, images, prompts, data_features, rounds: int = 200) -> dict:
    """Per-image metrics as means with percentile intervals; FID/KID against ``data_features``."""
    from hypersd.metrics.stats import bootstrap_ci
    row = {}
    for name, metric in scorers.items():
        if name == "fid":
            r = metric(images, data_features)
            row.update(fid=r["fid"], kid=r["kid"], kid_ci=(r["kid"] - 2 * r["kid_std"],
                                                           r["kid"] + 2 * r["kid_std"]))
            continue
        values = np.asarray(metric(images, prompts), np.float64)
        row[name] = float(values.mean())
        row[f"{name}_ci"] = bootstrap_ci(lambda idx: values[idx].mean(), len(values), rounds)
    return row


def load_rewards(names: list[str]) -> dict:
    """The rewards to report, loaded now (an unknown name or missing weights: a UserError)."""
    from hypersd.rewards import load_reward
    try:
        return {name: load_reward(name) for name in names}
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e


def score_rewards(rewards: dict, images, prompts, split: str, rounds: int = 200,
                  data: str = "noto") -> dict:
    """Each reward's mean score with a percentile interval; rewards that compare with a
    reference image get the split's image of the prompt."""
    import torch

    from hypersd.imaging import to_signed_unit
    from hypersd.metrics.stats import bootstrap_ci
    row = {}
    x = to_signed_unit(np.stack([np.asarray(img) for img in images]))
    for name, reward in rewards.items():
        refs = reference_images(prompts, split, data) if reward.needs_references else None
        with torch.no_grad():
            values = torch.cat([reward.score(x[i:i + 256], prompts[i:i + 256],
                                             references=None if refs is None else refs[i:i + 256])
                                for i in range(0, len(x), 256)]).double().numpy()
        row[name] = float(values.mean())
        row[f"{name}_ci"] = bootstrap_ci(lambda idx: values[idx].mean(), len(values), rounds)
    return row


def reference_images(prompts: list[str], split: str, style: str = "noto"):
    """The split's image of each prompt (the first, where a caption has several) in one
    emoji32 style, in [-1, 1]."""
    from hypersd.imaging import to_signed_unit
    data = load_style(style)
    first = {}
    for i in data.indices(split):
        first.setdefault(data.captions[i], i)
    return to_signed_unit(data.images[[first[p] for p in prompts]])


def _prompts(cfg: EvalConfig) -> list[str]:
    """The prompt of each image: the file's or the split's, in turn, ``samples`` of them."""
    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)
    else:
        try:
            prompts = load_style().prompts(cfg.split)  # every style has the same captions and split
        except ValueError as e:
            raise UserError(str(e)) from e
    return [prompts[i % len(prompts)] for i in range(cfg.samples)]


def reference_folder_images(folder: str) -> list[Image.Image]:
    """The images of a folder (png, jpg, jpeg, webp), for FID/KID."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not paths:
        raise UserError(f"--reference {folder}: no .png, .jpg or .webp images there")
    return [Image.open(p).convert("RGB") for p in paths]


def _seeds(seed: int, prompts: list[str]) -> list[int]:
    """Seed of each image: seed + how many times its prompt came before."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        out.append(seed + seen.get(p, 0))
        seen[p] = seen.get(p, 0) + 1
    return out


def generate_set(pipe, recipe, prompts, seeds, folder: Path, batch: int, desc: str) -> list[Image.Image]:
    """Generate (or reuse from ``folder``) one image per (prompt, seed); each PNG is written
    whole or not at all, so a rerun after a full disk reuses only whole images."""
    paths = [folder / f"{i:05d}.png" for i in range(len(prompts))]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    for start in tqdm(range(0, len(todo), batch), desc=desc, leave=False):
        idx = todo[start:start + batch]
        images = run_pipeline(pipe, [prompts[i] for i in idx], recipe, [seeds[i] for i in idx])
        for i, img in zip(idx, images):
            write_file(paths[i], lambda tmp, img=img: img.save(tmp, format="PNG"))
    return [Image.open(p).convert("RGB") for p in paths]


class Scoring:
    """What every row is scored with: the emoji network (emoji32 prompts), the real metrics and
    rewards whose weights are given, and the reference sets FD, FID and KID compare with."""

    def __init__(self, cfg: EvalConfig):
        from hypersd.metrics.classifier import classifier_dir
        from hypersd.metrics.mini import MiniMetrics
        self.cfg, self.mini, self.teacher = cfg, None, None
        data = None if cfg.prompts else load_style(cfg.data)
        if data is not None:
            try:
                self.mini = MiniMetrics(cfg.classifier or classifier_dir(cfg.data), data=data)
            except FileNotFoundError as e:
                raise UserError(str(e)) from e
        self.scorers, self.rewards = real_metrics(cfg), load_rewards(cfg.rewards)
        self.data_features = None
        if "fid" in self.scorers:
            refs = (reference_folder_images(cfg.reference) if cfg.reference else
                    [Image.fromarray(data.images[i]) for i in data.indices(cfg.split)])
            self.data_features = self.scorers["fid"].features(refs)

    def row(self, images, prompts: list[str]) -> dict:
        cfg, row = self.cfg, {}
        if self.mini is not None:
            scored = self.mini.score(images, prompts)
            row = self.mini.report(scored, prompts)
            row["fd_teacher"] = self.mini.fd(scored.features, self.teacher)
            row["fd_teacher_ci"] = _fd_ci(self.mini, scored.features, self.teacher)
        row.update(score_real(self.scorers, images, prompts, self.data_features))
        if self.rewards:
            row.update(score_rewards(self.rewards, images, prompts, cfg.split, data=cfg.data))
        return row


class _Students:
    """Puts each step count's student in the pipeline: its UNet, its LoRAs at their scales
    (loading only what changes from one step count to the next)."""

    def __init__(self, cfg: EvalConfig, pipe, recipes: dict):
        self.cfg, self.pipe, self.recipes = cfg, pipe, recipes
        self.base_unet = getattr(pipe, "unet", None)
        self.unet, self.loaded = None, None

    def at(self, n: int) -> bool:
        """Set up step count ``n``; True when it is the base model alone (no LoRA, no UNet)."""
        cfg, pipe = self.cfg, self.pipe
        if cfg.step_unets.get(n, cfg.unet) != self.unet:  # after the reference set, drawn by the model's own
            self.unet, self.loaded = cfg.step_unets.get(n, cfg.unet), None
            pipe.unload_lora_weights()
            pipe.unet = (self.base_unet if self.unet is None else
                         load_unet(self.unet, self.base_unet).to(pipe.device, pipe.dtype))
        loras = cfg.loras + ([cfg.step_loras[n]] if n in cfg.step_loras else [])
        scaled = [(p, self.recipes[n].lora_scale if s is None else s) for p, s in map(parse_lora, loras)]
        if scaled != self.loaded:  # (re)load only when this step count needs other LoRAs or scales
            pipe.unload_lora_weights()
            load_loras(pipe, scaled)
            self.loaded = scaled
        return not loras and self.unet is None


def _label(cfg: EvalConfig) -> str:
    every_lora = cfg.loras + list(cfg.step_loras.values())
    return cfg.label or "+".join([cfg.recipe] + [Path(p).stem for p in [cfg.unet, *cfg.step_unets.values()] if p]
                                 + [Path(parse_lora(spec)[0]).stem for spec in every_lora])


def _check_students(cfg: EvalConfig) -> None:
    missing = sorted((set(cfg.step_loras) | set(cfg.step_unets)) - set(cfg.steps))
    if missing:
        raise UserError(f"LoRAs or UNets are given for step counts {missing} that --steps does not list: "
                        "add those counts to --steps")
    for lora in cfg.loras + list(cfg.step_loras.values()):
        check_lora_file(parse_lora(lora)[0])


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate one model/LoRA/recipe at each step count; return all rows of the folder."""
    out, label = Path(cfg.out_dir), _label(cfg)
    _check_students(cfg)
    recipes = {n: resolve_recipe(cfg.recipe, steps=n) for n in cfg.steps}
    check_writable(out)
    prompts = _prompts(cfg)
    seeds = _seeds(cfg.seed, prompts)
    scoring = Scoring(cfg)
    pipe = load_pipeline(cfg.model)
    tag = f"{'prompts-' + _slug(Path(cfg.prompts).stem) if cfg.prompts else cfg.split}-n{cfg.samples}-s{cfg.seed}"
    from hypersd.generate.loading import model_family
    reference_recipe = resolve_recipe(REFERENCE_RECIPES.get(model_family(pipe), REFERENCE[0]), steps=REFERENCE[1])
    teacher = None
    if scoring.mini is not None:  # the teacher's own samples: FD→teacher compares with them
        teacher = generate_set(pipe, reference_recipe, prompts, seeds,
                               out / "images" / f"reference-{tag}", cfg.batch, "teacher reference")
        scoring.teacher = scoring.mini.score(teacher, prompts).features
    results_file = out / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else {}
    students, grid_rows = _Students(cfg, pipe, recipes), []
    for n in tqdm(cfg.steps, desc=f"eval {label}"):
        if students.at(n) and teacher is not None and recipes[n] == reference_recipe:
            images = teacher  # the reference itself
        else:
            images = generate_set(pipe, recipes[n], prompts, seeds,
                                  out / "images" / f"{_slug(label)}-{n}-{tag}", cfg.batch, f"{n} steps")
        rows[f"{label}@{n}"] = {**scoring.row(images, prompts), "method": label, "steps": n,
                                "samples": cfg.samples, "split": cfg.split, "data": cfg.data,
                                **({"prompts": cfg.prompts} if cfg.prompts else {})}
        grid_rows.append(images[:cfg.grid_prompts])
    _write_outputs(out, rows, grid_rows, prompts, cfg, label)
    return rows


def _write_outputs(out: Path, rows: dict, grid_rows: list, prompts: list[str], cfg: EvalConfig,
                   label: str) -> None:
    cols = [f"{n} step{'s' * (n > 1)}" for n in cfg.steps]
    grid = make_grid([list(r) for r in zip(*grid_rows)], prompts[:cfg.grid_prompts], cols, corner=label)
    write_file(out / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1) + "\n"))
    with writing(out):
        (out / "table.md").write_text(markdown_table(rows))
        if any("fd" in r for r in rows.values()):
            (out / "table-by-steps.md").write_text(steps_table(rows))
        real = tuple(k for k in ("clip", "aesthetic", "imagereward") if any(k in r for r in rows.values()))
        if real:  # Hyper-SD's table: CLIP / aesthetic / ImageReward per method and step count
            (out / "table-real.md").write_text(steps_table(rows, real))
        grid.save(out / f"grid-{_slug(label)}.png")
        plot_metrics(rows, out / "metrics.png")


def _fd_ci(metrics, features, reference, rounds: int = 200):
    from hypersd.metrics.stats import bootstrap_ci
    lo, hi = bootstrap_ci(lambda idx: metrics.fd(features[idx], reference), len(features), rounds,
                          centred=True)
    return max(lo, 0.0), hi


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def markdown_table(rows: dict) -> str:
    """Rows (method, steps) by metric, each as value [95% interval]; columns no row has are left out."""
    columns = _columns(rows)
    head = "| method | steps | " + " | ".join(name for _, name in columns) + " |\n"
    head += "|---|---:|" + "---:|" * len(columns) + "\n"
    lines = []
    for row in sorted(rows.values(), key=lambda r: (r["method"], r["steps"])):
        cells = []
        for key, _ in columns:
            if key not in row:
                cells.append("–")
                continue
            lo, hi = row.get(f"{key}_ci", (np.nan, np.nan))
            digits = 4 if key == "kid" else 2
            cells.append(f"{row[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]")
        lines.append(f"| {row['method']} | {row['steps']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def steps_table(rows: dict, keys=("fd", "top1")) -> str:
    """Methods by step count, each cell ``FD / top-1`` (the paper's layout); intervals in table.md."""
    steps = sorted({r["steps"] for r in rows.values()})
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows.values(), key=lambda r: r["method"])))
    names = dict(COLUMNS)
    out = (f"| method ({' / '.join(names[k] for k in keys)}) | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in steps)
           + " |\n|---|" + "---:|" * len(steps) + "\n")
    for m in methods:
        cells = {r["steps"]: " / ".join(_cell(r, k) for k in keys) for r in rows.values() if r["method"] == m}
        if any(k in r for r in rows.values() if r["method"] == m for k in keys):
            out += f"| {m} | " + " | ".join(cells.get(n, "–") for n in steps) + " |\n"
    return out


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return "–"
    return f"{row[key]:.2f}" if key in ("aesthetic", "imagereward") else f"{row[key]:.1f}"


def _columns(rows: dict) -> list[tuple[str, str]]:
    return [(k, name) for k, name in COLUMNS if any(k in r for r in rows.values())]


def plot_metrics(rows: dict, path: Path) -> None:
    """One panel per metric against steps (log scale), a line per method, CIs as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(rows)
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3.4), squeeze=False)
    axes = axes[0]
    methods = sorted({r["method"] for r in rows.values()})
    for ax, (key, name) in zip(axes, columns):
        for m in methods:
            pts = sorted((r["steps"], r[key], *r.get(f"{key}_ci", (r[key], r[key])))
                         for r in rows.values() if r["method"] == m and key in r)
            if not pts:
                continue
            s, v, lo, hi = map(np.array, zip(*pts))
            yerr = [np.maximum(v - lo, 0), np.maximum(hi - v, 0)]
            ax.errorbar(s, v, yerr=yerr, marker="o", capsize=3, label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(name)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
