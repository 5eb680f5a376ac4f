"""hypersd.torchfile reads torch.save files as torch.load does, and runs nothing in them."""

import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from hypersd.errors import UserError
from hypersd.torchfile import load_state_dict, load_weights


def _same(ours, theirs, where="state"):
    """Equal bit for bit: types, keys, _metadata, dtypes, shapes, strides, offsets, bytes."""
    assert type(ours) is type(theirs), where
    if isinstance(ours, dict):
        assert list(ours) == list(theirs), where
        assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None), where
        for key in ours:
            _same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(ours, torch.Tensor):
        assert (ours.dtype, ours.shape, ours.stride(), ours.storage_offset(), ours.requires_grad) \
            == (theirs.dtype, theirs.shape, theirs.stride(), theirs.storage_offset(),
                theirs.requires_grad), where
        assert bytes(ours.untyped_storage()) == bytes(theirs.untyped_storage()), where
    else:
        assert ours == theirs, where


def _flat():
    g = torch.Generator().manual_seed(0)
    return {"fp32": torch.randn(3, 4, generator=g), "fp16": torch.randn(5, generator=g).half(),
            "bf16": torch.randn(2, 3, generator=g).bfloat16(), "int64": torch.arange(-3, 7),
            "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
            "empty": torch.empty(0, 4), "int8": torch.tensor([-128, 0, 127], dtype=torch.int8)}


def _views():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {"base": base, "transposed": base.t(), "slice": base[1:, 2:5], "row": base[2],
            "strided": base[::2, ::3]}


CASES = {
    "flat": _flat,
    "module": lambda: torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).state_dict(),
    "nested": lambda: {"state_dict": {"a": torch.ones(2)}, "step": 7, "lr": 1e-4, "name": "run",
                       "flags": [True, None], "shape": (1, 2)},
    "parameter": lambda: {"w": torch.nn.Parameter(torch.randn(3, 2)),
                          "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False)},
    "shared_and_strided": _views,
    "float8_uint16": lambda: {"f8": torch.tensor([0.5, -2.0]).to(torch.float8_e4m3fn),
                              "u16": torch.tensor([1, 65535], dtype=torch.uint16)},
}


@pytest.mark.parametrize("case", CASES)
def test_reads_what_torch_save_writes_as_torch_load_does(case, tmp_path):
    torch.save(CASES[case](), tmp_path / "w.pth")
    _same(load_state_dict(tmp_path / "w.pth"), torch.load(tmp_path / "w.pth", weights_only=True))


@pytest.mark.parametrize("case", ["flat", "module", "parameter", "shared_and_strided"])
def test_reads_the_legacy_serialisation_as_torch_load_does(case, tmp_path):
    torch.save(CASES[case](), tmp_path / "w.pth", _use_new_zipfile_serialization=False)
    _same(load_state_dict(tmp_path / "w.pth"), torch.load(tmp_path / "w.pth", weights_only=True))


def test_reads_pickle_protocol_5(tmp_path):
    state = {**_flat(), **_views()}
    torch.save(state, tmp_path / "w.pth", pickle_protocol=5)
    _same(load_state_dict(tmp_path / "w.pth"), state)


def test_tensors_of_one_storage_share_it_as_after_torch_load(tmp_path):
    torch.save(_views(), tmp_path / "w.pth")
    views = load_state_dict(tmp_path / "w.pth")
    views["base"][1, 2] = -1.0
    assert views["transposed"][2, 1] == -1.0 and views["slice"][0, 0] == -1.0


def test_load_weights_reads_safetensors_and_torch_files(tmp_path):
    state = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        _same(dict(sorted(load_weights(tmp_path / name).items())), state)


class _Armed:
    """Unpickled, it opens (so creates) the marker file: what a hostile weights file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class _Settings:
    def __init__(self):
        self.lr = 1e-4


def _refusal(path) -> str:
    with pytest.raises(UserError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_a_callable_in_the_pickle_is_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "armed.pth"
    torch.save({"w": torch.ones(2), "x": _Armed(marker)}, path)
    message = _refusal(path)
    assert "which hypersd does not read" in message and "open" in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unpickler does run it
    assert marker.exists()


def test_a_class_instance_is_refused_naming_it(tmp_path):
    torch.save({"w": torch.ones(2), "settings": _Settings()}, tmp_path / "obj.pth")
    assert "test_torchfile._Settings" in _refusal(tmp_path / "obj.pth")


def test_a_plain_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "armed.pkl").write_bytes(pickle.dumps(_Armed(marker), protocol=4))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "which hypersd does not read" in _refusal(tmp_path / "armed.pkl")
    assert not marker.exists()
    assert "not a torch.save file" in _refusal(tmp_path / "plain.pkl")


@pytest.mark.parametrize("damage, says", [("truncated_zip", "damaged"), ("truncated_legacy", "damaged"),
                                           ("not_torch", "not a torch.save file"),
                                           ("empty", "not a torch.save file")])
def test_damaged_or_foreign_files_are_refused(damage, says, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_flat(), path, _use_new_zipfile_serialization=damage != "truncated_legacy")
    data = path.read_bytes()
    path.write_bytes({"truncated_zip": data[:len(data) // 2], "not_torch": b"hello, world\n",
                      "truncated_legacy": data[:len(data) - 10], "empty": b""}[damage])
    assert says in _refusal(path)


def test_a_big_endian_file_is_refused(tmp_path):
    torch.save(_flat(), tmp_path / "w.pth")
    with zipfile.ZipFile(tmp_path / "w.pth") as src, \
            zipfile.ZipFile(tmp_path / "big.pth", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"big" if name.endswith("/byteorder") else src.read(name))
    assert "big-endian" in _refusal(tmp_path / "big.pth")


def test_a_saved_tensor_is_not_a_state_dict(tmp_path):
    torch.save(torch.ones(3), tmp_path / "t.pth")
    assert "not a state dict" in _refusal(tmp_path / "t.pth")


def test_an_ordered_dict_keeps_its_module_metadata(tmp_path):
    state = torch.nn.BatchNorm1d(2).state_dict()
    torch.save(state, tmp_path / "bn.pth")
    loaded = load_state_dict(tmp_path / "bn.pth")
    assert isinstance(loaded, OrderedDict) and loaded._metadata == state._metadata


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=102),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_aesthetic_head_is_read_from_a_torch_or_safetensors_file(suffix, tmp_path):
    from hypersd.metrics.real import AestheticHead, AestheticScore
    _tiny_clip().save_pretrained(tmp_path / "clip")
    head = AestheticHead(16).state_dict()
    path = tmp_path / f"head{suffix}"
    save_file(head, path) if suffix == ".safetensors" else torch.save(head, path)
    metric = AestheticScore.from_pretrained(str(path), str(tmp_path / "clip"))
    _same(dict(metric.head.state_dict()), dict(head))


def test_imagereward_reads_the_published_checkpoint_layout(tmp_path):
    from transformers import BlipConfig, BlipForImageTextRetrieval
    from hypersd.metrics.imagereward import ImageReward, published_layout
    from hypersd.metrics.real import AestheticHead
    from hypersd.testing import _tokenizer
    torch.manual_seed(0)
    blip = BlipForImageTextRetrieval(BlipConfig(
        text_config=dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, encoder_hidden_size=48),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        image_text_hidden_size=16))
    BlipForImageTextRetrieval(blip.config).save_pretrained(tmp_path / "blip")  # other weights
    _tokenizer().save_pretrained(tmp_path / "blip")
    torch.save(published_layout(blip, AestheticHead(32)), tmp_path / "ImageReward.pt")
    metric = ImageReward.from_pretrained(str(tmp_path / "ImageReward.pt"), str(tmp_path / "blip"))
    assert torch.equal(metric.blip.vision_model.embeddings.class_embedding,
                       blip.vision_model.embeddings.class_embedding)


def test_a_model_folder_with_only_a_pickled_bin_is_refused_unread(tmp_path):
    from hypersd.metrics.real import AestheticHead, AestheticScore
    folder, marker = tmp_path / "clip", tmp_path / "marker"
    _tiny_clip().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"x": _Armed(marker)}, folder / "pytorch_model.bin")
    torch.save(AestheticHead(16).state_dict(), tmp_path / "head.pth")
    with pytest.raises(UserError, match="CLIP weights not found.*safetensors"):
        AestheticScore.from_pretrained(str(tmp_path / "head.pth"), str(folder))
    assert not marker.exists()
