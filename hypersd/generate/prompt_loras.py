"""LoRAs named inside prompts, as A1111 writes them: ``<lora:NAME:WEIGHT>``.

A tag applies the LoRA NAME at WEIGHT (1 without one) to the prompt it is in, as
``--lora PATH:WEIGHT`` does to every prompt, and is removed from the text the encoder sees.
NAME is looked up in the LoRA folder (``--lora-dir``, else ``$HYPERSD_LORA_DIR``; also in its
sub-folders, by file name), else taken as a path; ``.safetensors`` may be left out.

Prompts of one call may name different LoRAs: they are grouped by the set of LoRAs they
apply (``--lora`` ones included) and each group is one pipeline pass with its adapters
active. Every file is loaded once. Seeds belong to images, so an image is the one a call
with that group's LoRAs alone would draw.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hypersd.errors import UserError
from hypersd.generate.loading import PICKLED, check_lora_file, load_loras, parse_lora
from hypersd.generate.recipes import check_lora_scale

ENV = "HYPERSD_LORA_DIR"
TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
OPENING = re.compile(r"<\s*lora\s*:", re.IGNORECASE)  # what is left of a tag that is not whole
FORM = "write <lora:NAME> or <lora:NAME:WEIGHT>, e.g. <lora:my-style:0.8>"

Lora = tuple[str, float]  # (path, scale)


@dataclass
class LoraPlan:
    """Every LoRA of a call: the ``--lora`` ones and each prompt's tags, files checked."""

    texts: list[str]                              # each prompt as the encoder sees it (tags removed)
    shared: list[tuple[str, float | None]]        # --lora: (path, scale or None: the recipe's)
    tagged: list[list[Lora]]                      # each prompt's tags, resolved
    adapters: dict[str, str] = field(default_factory=dict)  # path -> adapter name, once loaded

    @property
    def any_tags(self) -> bool:
        return any(self.tagged)

    @property
    def files(self) -> list[str]:
        """Each file once, the --lora ones first, then the tags' in the order they appear."""
        return list(dict.fromkeys([p for p, _ in self.shared] + [p for tags in self.tagged for p, _ in tags]))

    def sets(self, default_scale: float) -> list[list[Lora]]:
        """Each prompt's LoRAs: --lora (unscaled ones at ``default_scale``), then its tags; a tag
        naming a --lora file sets that file's scale for its prompt."""
        shared = [(p, default_scale if s is None else s) for p, s in self.shared]
        return [list({**dict(shared), **dict(tags)}.items()) for tags in self.tagged]

    def load(self, pipe, default_scale: float) -> None:
        """Load the call's LoRAs: without tags as ever (active at their scales); with tags every
        file once (``passes`` then activates each group's at its scales)."""
        if not self.any_tags:
            load_loras(pipe, [(p, default_scale if s is None else s) for p, s in self.shared])
            return
        if any(pipe.get_list_adapters().values()):
            raise UserError("LoRA tags in prompts need a pipeline without LoRAs loaded: pass model= "
                            "and let generate load them, --lora ones included")
        self.adapters = dict(zip(self.files, load_loras(pipe, [(p, 1.0) for p in self.files])))

    def passes(self, pipe, batch: int, default_scale: float):
        """Image indices (prompt-major, ``batch`` per prompt) of each pipeline pass, the pass's
        LoRAs active meanwhile: one pass without tags, else one per distinct set of LoRAs."""
        if not self.any_tags:
            yield list(range(len(self.texts) * batch))
            return
        groups: dict[tuple, list[int]] = {}
        for i, loras in enumerate(self.sets(default_scale)):
            groups.setdefault(tuple(loras), []).extend(range(i * batch, (i + 1) * batch))
        for loras, images in groups.items():
            if loras:
                pipe.enable_lora()
                pipe.set_adapters([self.adapters[p] for p, _ in loras], adapter_weights=[s for _, s in loras])
            else:
                pipe.disable_lora()
            yield images
        pipe.enable_lora()


def plan_loras(prompts: list[str], loras=(), lora_dir: str | Path | None = None) -> LoraPlan:
    """The ``--lora`` specs ("PATH" or "PATH:SCALE") and the prompts' tags, resolved and every
    file checked, before any model loads."""
    shared = [parse_lora(spec) for spec in loras]
    folder = lora_dir if lora_dir is not None else os.environ.get(ENV) or None
    texts, tagged = zip(*(split_prompt(p, folder) for p in prompts)) if prompts else ((), ())
    plan = LoraPlan(list(texts), shared, list(tagged))
    for path in plan.files:  # a missing or broken file fails fast
        check_lora_file(path)
    return plan


def split_prompt(prompt: str, lora_dir: str | Path | None = None) -> tuple[str, list[Lora]]:
    """(the prompt without its LoRA tags, the tags' (path, weight) in order)."""
    tags = []
    for m in TAG.finditer(prompt):
        name, weight = _parse_tag(m.group(0), m.group(1), prompt)
        path = _resolve(name, lora_dir, m.group(0), prompt)
        if path in dict(tags):
            raise UserError(f"{m.group(0)} in prompt {_short(prompt)}: that LoRA is named twice; "
                            "name it once with the weight you want")
        tags.append((path, weight))
    text = TAG.sub(" ", prompt)
    if OPENING.search(text):
        raise UserError(f"prompt {_short(prompt)} has a LoRA tag that is not whole: {FORM}")
    if tags:  # the commas a tag leaves alone go too: "a dog, <lora:x>" -> "a dog"
        text = ", ".join(part for part in (" ".join(p.split()) for p in text.split(",")) if part)
    if tags and not text:
        raise UserError(f"prompt {_short(prompt)} is only LoRA tags: add the text to draw")
    return text, tags


def _parse_tag(tag: str, body: str, prompt: str) -> tuple[str, float]:
    """NAME and WEIGHT of ``<lora:NAME[:WEIGHT]>``; no weight means 1, as in A1111."""
    name, sep, weight = (part.strip() for part in body.rpartition(":"))
    if not sep or Path(body.strip()).exists():
        name, weight = body.strip(), None
    if not name:
        raise UserError(f"{tag} in prompt {_short(prompt)} names no LoRA: {FORM}")
    if weight is None:
        return name, 1.0
    if "=" in weight or re.fullmatch(r"[^:]+:[-+.\d\s]+", name):  # A1111's te=/unet=/dyn= or two weights
        raise UserError(f"{tag} in prompt {_short(prompt)}: hypersd takes one weight, for the whole "
                        f"LoRA: {FORM}")
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"{tag} in prompt {_short(prompt)}: weight {weight!r} is not a number: {FORM}") from None
    return name, check_lora_scale(value, f"{tag} in prompt {_short(prompt)}")


def _resolve(name: str, lora_dir: str | Path | None, tag: str, prompt: str) -> str:
    """The file NAME means: in the LoRA folder (NAME, NAME.safetensors, or a file of that name
    in a sub-folder), else NAME as a path; ``.safetensors`` may be left out."""
    endings = ("", ".safetensors", *PICKLED)  # a pickle is found so that loading names it and refuses it
    places = [Path(lora_dir) / name] if lora_dir else []
    for place in places + [Path(name).expanduser()]:
        for ending in endings:
            candidate = place.with_name(place.name + ending)
            if candidate.exists():
                return str(candidate)
    if lora_dir and Path(lora_dir).is_dir():
        found = sorted({p for ending in endings for p in Path(lora_dir).rglob(name + ending)})
        if len(found) == 1:
            return str(found[0])
        if len(found) > 1:
            shown = ", ".join(str(p.relative_to(lora_dir)) for p in found[:3])
            raise UserError(f"{tag} in prompt {_short(prompt)}: {len(found)} LoRAs of that name in "
                            f"{lora_dir} ({shown}): write its sub-folder too, <lora:SUBFOLDER/{name}>")
    where = (f"in the LoRA folder {lora_dir} or " if lora_dir else "") + "at that path"
    fix = "check the name" if lora_dir else f"pass --lora-dir DIR (or set {ENV}) or write the path"
    raise UserError(f"{tag} in prompt {_short(prompt)}: no LoRA {name!r} {where}: {fix}")


def _short(prompt: str) -> str:
    return repr(prompt[:60] + ("..." if len(prompt) > 60 else ""))
