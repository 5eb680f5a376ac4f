from dataclasses import dataclass, field

import pytest

from hypersd.config import apply_overrides, load_dataclass
from hypersd.errors import UserError


@dataclass
class Inner:
    rank: int = 64
    targets: list[str] = field(default_factory=lambda: ["to_q"])


@dataclass
class Outer:
    lr: float = 1e-4
    name: str = "x"
    guidance: tuple[float, float] | None = (2.0, 4.0)
    inner: Inner = field(default_factory=Inner)
    stages: list[Inner] = field(default_factory=list)


def test_builds_nested_and_coerces_ints_to_floats():
    cfg = load_dataclass(Outer, {"lr": 1, "inner": {"rank": 8}, "stages": [{"rank": 4}], "guidance": [3, 5]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner.rank == 8 and cfg.stages[0].rank == 4 and cfg.guidance == (3.0, 5.0)
    assert load_dataclass(Outer, {"guidance": None}).guidance is None


@pytest.mark.parametrize("data, message", [
    ({"lrr": 1}, "unknown field(s) lrr"),
    ({"lr": "fast"}, "Outer.lr: expected float"),
    ({"inner": {"rank": 1.5}}, "Outer.inner.rank: expected int"),
    ({"stages": [{"bogus": 1}]}, "Outer.stages[0]: unknown field(s) bogus"),
    ({"guidance": [1, 2, 3]}, "expected 2 values"),
    ({"name": True}, "quote it"),  # YAML 1.1 reads an unquoted no/yes as a boolean
])
def test_refuses_bad_fields_with_their_path(data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_dataclass(Outer, data)


def test_overrides_use_yaml_values_and_list_indices():
    data = apply_overrides({"stages": [{"rank": 4}]}, ["lr=3e-4", "stages.0.rank=16", "inner.targets=[a, b]"])
    cfg = load_dataclass(Outer, data)
    assert cfg.lr == 3e-4 and cfg.stages[0].rank == 16 and cfg.inner.targets == ["a", "b"]
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["lr"])
