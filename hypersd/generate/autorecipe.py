"""The recipe a student was made for, when the user names none: read from the file's own
header (our exports) or from the published accelerators' file names, and said in one line.

A LoRA run with another accelerator's sampler still draws, only worse (Hyper-SDXL's N-step
LoRAs under TCD instead of DDIM trailing are a common case), so the pick is always said.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypersd.errors import UserError, note
from hypersd.generate.recipes import Recipe, get_recipe, load_recipes

# The published accelerators' files, as their model cards name them: (pattern, recipe, what
# the file is). A pattern is searched case-insensitively in the file's name, then in the
# names of the folders above it (diffusers saves ``pytorch_lora_weights.safetensors`` in a
# folder named for the model, e.g. the hub's ``models--latent-consistency--lcm-lora-sdxl``).
# The first row that matches wins, so specific rows come first; ``(?P<n>..)`` is the step
# count the file was made for, ``(?P<kind>..)`` whether it is a LoRA or a UNet.
PUBLISHED = (
    (r"hyper-sd(15|xl)-1steps?-lora", "hyper-sd-unified", "Hyper-SD's unified 1-step LoRA (TCD sampler)"),
    (r"hyper-sd(15|xl)-(?P<n>\d+)steps?-cfg-lora", "hyper-sd-cfg", "Hyper-SD's {n}-step CFG-preserving LoRA"),
    (r"hyper-sd(15|xl)-(?P<n>\d+)steps?-lora", "hyper-sd", "Hyper-SD's {n}-step LoRA"),
    (r"hyper-sdxl-1steps?-unet", "hyper-sdxl-1step-unet", "Hyper-SDXL's 1-step UNet"),
    (r"sdxl[-_]lightning[-_]1steps?[-_]unet[-_]x0", "lightning-1step", "SDXL-Lightning's 1-step x0 UNet"),
    (r"sdxl[-_]lightning[-_](?P<n>\d+)steps?[-_](?P<kind>lora|unet)", "lightning",
     "SDXL-Lightning's {n}-step {kind}"),
    (r"lcm[-_]lora", "lcm-lora", "LCM-LoRA"),
    (r"tcd[-_]sd(15|xl)[-_]lora", "tcd", "TCD's LoRA"),
    (r"dmd2[-_]sdxl[-_]1steps?[-_]unet", "dmd2-1step", "DMD2's 1-step UNet"),
    (r"dmd2[-_]sdxl[-_](?P<n>\d+)steps?[-_](?P<kind>lora|unet)", "dmd2", "DMD2's {n}-step {kind}"),
    # flow models: one recipe per file, as their cards give each its own guidance or steps
    (r"hyper-sd3-4steps?-cfg-lora", "hyper-sd3-4step", "Hyper-SD3's 4-step CFG LoRA"),
    (r"hyper-sd3-8steps?-cfg-lora", "hyper-sd3-8step", "Hyper-SD3's 8-step CFG LoRA"),
    (r"hyper-sd3-16steps?-cfg-lora", "hyper-sd3-16step", "Hyper-SD3's 16-step CFG LoRA"),
    (r"hyper-flux\.1-dev-8steps?-lora", "hyper-flux-8step", "Hyper-FLUX.1-dev's 8-step LoRA"),
    (r"hyper-flux\.1-dev-16steps?-lora", "hyper-flux-16step", "Hyper-FLUX.1-dev's 16-step LoRA"),
    (r"qwen-image-lightning-4steps?", "qwen-image-lightning-4step", "Qwen-Image-Lightning's 4-step LoRA"),
    (r"qwen-image-lightning-8steps?", "qwen-image-lightning-8step", "Qwen-Image-Lightning's 8-step LoRA"),
)
FOLDERS_UP = 4  # folders above a file searched for a name (hub cache: models--x/snapshots/<hash>/)
KIND = {"lora": "LoRA", "unet": "UNet"}


@dataclass(frozen=True)
class Verdict:
    """What one file says about how it is run."""

    file: str
    recipe: str
    steps: int | None   # the step count it was made for, None: the recipe's default
    why: str


@dataclass(frozen=True)
class Choice:
    """The recipe to resolve, the steps to ask of it, and why (None: the caller chose)."""

    recipe: str | Recipe | None
    steps: int | None
    why: str | None = None

    @contextmanager
    def explaining(self):
        """A recipe the caller did not name that refuses their settings says why it was picked."""
        try:
            yield
        except UserError as e:
            if self.why is None:
                raise
            raise UserError(f"{e} (recipe {self.recipe} was picked because {self.why}; pass --recipe "
                            "to choose another)") from None

    def say(self, recipe: Recipe) -> None:
        """One line on stderr naming the recipe picked and why; silent when the caller chose."""
        if self.why is not None:
            n = len(recipe.timesteps) if recipe.timesteps else recipe.steps
            note(f"recipe {recipe.name} ({n} step{'s' * (n != 1)}): {self.why}")


def choose_recipe(recipe: str | Recipe | None, steps: int | None, files, default: str = "teacher") -> Choice:
    """``recipe`` if given (silently); else the recipe the first file with an opinion was made
    for (a LoRA's or UNet's header, then its name), else the model's ``default`` (the teacher's,
    or the bundled flow model's own). Files without an opinion (a style LoRA) are passed over;
    later files that disagree are named and ignored."""
    files = [str(f) for f in files if f]
    if recipe is not None or not files:
        return Choice(recipe if recipe is not None else default, steps)
    verdicts = [v for v in map(verdict, files) if v is not None]
    if not verdicts:
        names = ", ".join(Path(f).name for f in files)
        return Choice(default, steps, f"no file says which recipe it was made for ({names})")
    first = verdicts[0]
    why = first.why + "".join(f"; {Path(v.file).name} suggests {v.recipe}, ignored: the first file's wins"
                              for v in verdicts[1:] if v.recipe != first.recipe)
    default = get_recipe(first.recipe).steps
    if steps is None and first.steps is not None and first.steps != default:
        steps = first.steps  # the recipe's default keeps its explicit timesteps (dmd2)
    return Choice(first.recipe, steps, why)


def verdict(file: str) -> Verdict | None:
    """What ``file`` says: its hypersd header, else its name (or its folders'), else None."""
    return from_header(file) or from_name(file)


def from_name(file: str) -> Verdict | None:
    """The first row of ``PUBLISHED`` found in the file's name or, failing that, in a folder's."""
    path = Path(file)
    names = [path.name] + [p.name for p in list(path.parents)[:FOLDERS_UP] if p.name]
    for i, name in enumerate(names):
        for pattern, recipe, what in PUBLISHED:
            m = re.search(pattern, name, re.IGNORECASE)
            if m:
                found = m.groupdict()
                n = int(found["n"]) if found.get("n") else None
                what = what.format(n=n, kind=KIND.get((found.get("kind") or "").lower(), ""))
                steps, outside = _within(recipe, n)
                return Verdict(file, recipe, steps, f"{'file' if i == 0 else 'folder'} name {name} "
                                                    f"matches {what}{outside}")
    return None


def from_header(file: str) -> Verdict | None:
    """Our exports' header: {"hypersd": {"recipe": ..., "steps_served": "1-8" or "4"}}."""
    info = _header(Path(file)).get("hypersd")
    try:
        info = json.loads(info) if info else {}
    except ValueError:
        return None
    name = info.get("recipe") if isinstance(info, dict) else None
    recipes = load_recipes()
    if name not in recipes:
        return None
    served = str(info.get("steps_served", ""))
    lo, _, hi = served.partition("-")
    if not (lo.isdigit() and (not hi or hi.isdigit())):
        return Verdict(file, name, None, f"{Path(file).name} was made by hypersd for it")
    lo, hi = int(lo), int(hi or lo)
    default = recipes[name].steps
    want = default if lo <= default <= hi else lo  # the recipe's default where the file serves it
    steps, outside = _within(name, want)
    return Verdict(file, name, steps, f"{Path(file).name} was made by hypersd for it (serves {served} "
                                      f"steps){outside}")


def _within(recipe: str, n: int | None) -> tuple[int | None, str]:
    """``n`` kept within the recipe's step range, and what to say when it had to move."""
    if n is None:
        return None, ""
    lo, hi = get_recipe(recipe).steps_range
    if lo <= n <= hi:
        return n, ""
    return min(max(n, lo), hi), f", but the recipe serves {lo}-{hi} steps"


def _header(path: Path) -> dict:
    """A safetensors file's metadata (a folder's first .safetensors file's); {} when unreadable."""
    from safetensors import safe_open
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.safetensors"))), path)
    if not path.is_file() or path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - a broken file is reported by whatever loads it
        return {}
