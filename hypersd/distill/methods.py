"""The distillation methods: each is a consistency-loss setting, registered in one line.

[LCM: t_end = clean, c_skip/c_out boundary, pseudo-Huber; TCD/CTM: t_end ~ U[0, t_{n-1}];
PCM: t_end at the phase edge; Hyper-SD TSCD: t_end ~ U[t_b, t_{n-1}] over k segments, MSE.]
"""

from __future__ import annotations

from hypersd.distill.consistency import ConsistencyConfig, ConsistencyLoss


def _consistency(rule: str, distance: str, boundary: bool = False, one_segment: bool = False):
    def build(stage, offset_noise: float = 0.0) -> ConsistencyLoss:
        return ConsistencyLoss(ConsistencyConfig(
            segments=1 if one_segment else stage.segments, t_end=rule, solver_points=stage.solver_points,
            guidance=stage.guidance, student_guidance=stage.student_guidance, distance=distance,
            boundary=boundary, offset_noise=offset_noise))
    return build


METHODS = {
    "lcm": _consistency("zero", "huber", boundary=True, one_segment=True),
    "tcd": _consistency("uniform", "huber", one_segment=True),
    "pcm": _consistency("edge", "huber"),
    "tscd": _consistency("uniform", "mse"),
}


def recommended_recipe(stage) -> str:
    """The inference recipe (``hypersd/recipes/inference.yaml``) that serves a stage's student."""
    if stage.student_guidance or stage.guidance is None:  # no guidance distilled in: sample with CFG
        return "tscd-cfg"
    if stage.method in ("lcm", "tcd"):
        return stage.method
    return "hyper-sd-unified" if stage.method == "tscd" and stage.segments == 1 else "hyper-sd"
