"""The main job on the embedded default: the bundled teacher at 25 steps beside 1/2/4/8 steps.

When the bundled unified Hyper-SD LoRA (the last stage of the complete recipe,
``hyper-sd-mini-unified``: TSCD, feedback learning, DMD) is present, the 1/2/4/8-step columns
use it with the unified TCD recipe; otherwise they show the undistilled teacher at trailing DDIM steps, the gap
distillation has to close.
"""

from __future__ import annotations

from pathlib import Path

from hypersd.files import check_writable, write_file
from hypersd.generate import get_recipe, load_loras, load_pipeline, run_pipeline
from hypersd.generate.grid import make_grid
from hypersd.models.mini import MINI_DIR

DEMO_PROMPTS = ["grinning face", "red apple", "soccer ball", "rocket", "japan flag", "ghost",
                "thumbs up sign: medium skin tone"]
STUDENT_STEPS = (1, 2, 4, 8)
BUNDLED_LORA = MINI_DIR.parent / "loras" / "hyper-sd-mini-unified.safetensors"


def run_demo(out_dir: str | Path = "outputs/demo", seed: int = 0, prompts=DEMO_PROMPTS) -> Path:
    """Write ``grid.png`` under ``out_dir`` and return its path."""
    check_writable(out_dir)
    pipe = load_pipeline()
    teacher = get_recipe("teacher")
    seeds = [seed] * len(prompts)
    columns = [("teacher, 25 steps", run_pipeline(pipe, prompts, teacher, seeds))]
    if BUNDLED_LORA.exists():
        load_loras(pipe, [(str(BUNDLED_LORA), 1.0)])
        student, label = get_recipe("hyper-sd-unified"), "Hyper-SD unified LoRA"
    else:
        student, label = teacher.with_overrides(timestep_spacing="trailing"), "teacher"
    for n in STUDENT_STEPS:
        columns.append((f"{label}, {n} step{'s' * (n > 1)}",
                        run_pipeline(pipe, prompts, student.with_overrides(steps=n), seeds)))
    rows = [[images[i] for _, images in columns] for i in range(len(prompts))]
    grid = make_grid(rows, prompts, [label for label, _ in columns])
    return write_file(Path(out_dir) / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
