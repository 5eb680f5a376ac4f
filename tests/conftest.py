import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny SD1.5- and SDXL-shaped pipelines saved as diffusers folders, built once."""
    from hypersd.testing import tiny_sd15, tiny_sdxl
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for name, build in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl)):
        build().save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs
