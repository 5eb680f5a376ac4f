"""Our exported LoRAs, as the tools people load LoRAs with read them: every module mapped, at
its scale, in ComfyUI, A1111, sd-scripts and diffusers, for SD1.5- and SDXL-sized UNets.

ComfyUI, A1111 and sd-scripts are not installed here: each one's key rule is re-implemented
below from its source (the function each imitates is named in its docstring). The UNets are
the real SD1.5 and SDXL architectures, built without weights; the LoRA is random, rank 4,
alpha 2 (scale 0.5), on LCM-LoRA's targets, written by ``save_lora``.
"""

import re

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs

from hypersd.distill.export import save_lora
from hypersd.distill.recipe import LCM_LORA_TARGETS
from hypersd.lora.tools import merge, read_lora, rescale, to_format, unet_module_names, write_lora
from hypersd.models.real import SD15_UNET, SDXL_UNET
from hypersd.testing import tiny_sdxl

RANK, ALPHA = 4, 2.0
SD15, SDXL = SD15_UNET, SDXL_UNET
CONFIGS = {"sd15": SD15, "sdxl": SDXL}
LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


# ---- the original-layout UNet (ldm/sgm openaimodel.UNetModel), the model ComfyUI, A1111 and
# sd-scripts' SDXL networks name modules in, written from its __init__ ----

def ldm_modules(cfg) -> dict[str, str]:
    """Linear/Conv2d paths of the original-layout UNet -> the sd-scripts class holding them."""
    per, depths = cfg["layers_per_block"], _depths(cfg)
    out, n = {"input_blocks.0.0": "", "time_embed.0": "", "time_embed.2": "", "out.2": ""}, 1
    widths = cfg["block_out_channels"]

    def res(prefix, skip):
        out.update({f"{prefix}.{m}": "ResnetBlock2D" for m in ("in_layers.2", "emb_layers.1", "out_layers.3")})
        if skip:
            out[f"{prefix}.skip_connection"] = "ResnetBlock2D"

    def attn(prefix, depth):
        out.update({f"{prefix}.{m}": "Transformer2DModel" for m in ("proj_in", "proj_out")})
        for t in range(depth):
            for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                      "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
                out[f"{prefix}.transformer_blocks.{t}.{m}"] = "Transformer2DModel"

    ch = widths[0]
    skips = [ch]
    for level, width in enumerate(widths):
        for _ in range(per):
            res(f"input_blocks.{n}.0", ch != width)
            if depths[level]:
                attn(f"input_blocks.{n}.1", depths[level])
            ch, n = width, n + 1
            skips.append(ch)
        if level < len(widths) - 1:
            out[f"input_blocks.{n}.0.op"] = "Downsample2D"
            n += 1
            skips.append(ch)
    res("middle_block.0", False)
    attn("middle_block.1", depths[-1] or 1)
    res("middle_block.2", False)
    n = 0
    for level in reversed(range(len(widths))):
        for i in range(per + 1):
            res(f"output_blocks.{n}.0", True)
            if depths[level]:
                attn(f"output_blocks.{n}.1", depths[level])
            if level and i == per:
                out[f"output_blocks.{n}.{2 if depths[level] else 1}.conv"] = "Upsample2D"
            n += 1
    if cfg.get("addition_embed_type"):
        out.update({"label_emb.0.0": "", "label_emb.0.2": ""})
    return out


def _depths(cfg):
    t = cfg.get("transformer_layers_per_block", 1)
    t = [t] * len(cfg["block_out_channels"]) if isinstance(t, int) else list(t)
    return [d if "CrossAttn" in kind else 0 for d, kind in zip(t, cfg["down_block_types"])]


def comfy_unet_to_diffusers(cfg) -> dict[str, str]:
    """ComfyUI comfy/utils.py unet_to_diffusers: diffusers UNet module -> original-layout module
    (its block walk: down levels, the middle, up levels with depth popped off the end)."""
    per, depths = cfg["layers_per_block"], _depths(cfg)
    res = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}
    block = ["proj_in", "proj_out"] + [f"transformer_blocks.{{t}}.{m}" for m in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
        "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")]
    out = {}

    def attn(src, dst, depth):
        for m in block:
            for t in range(depth if "{t}" in m else 1):
                out[f"{src}.{m.format(t=t)}"] = f"{dst}.{m.format(t=t)}"

    levels = len(cfg["block_out_channels"])
    for x in range(levels):
        n = 1 + (per + 1) * x
        for i in range(per):
            out.update({f"down_blocks.{x}.resnets.{i}.{a}": f"input_blocks.{n}.0.{b}" for a, b in res.items()})
            if depths[x]:
                attn(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", depths[x])
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attn("mid_block.attentions.0", "middle_block.1", depths[-1] or 1)
    for i, n in enumerate([0, 2]):
        out.update({f"mid_block.resnets.{i}.{a}": f"middle_block.{n}.{b}" for a, b in res.items()})
    up_depths = [d for d in depths for _ in range(per + 1)]
    for x in range(levels):
        n = (per + 1) * x
        for i in range(per + 1):
            out.update({f"up_blocks.{x}.resnets.{i}.{a}": f"output_blocks.{n}.0.{b}" for a, b in res.items()})
            c, depth = 1, up_depths.pop()
            if depth:
                c += 1
                attn(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", depth)
            if i == per:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update({"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2"})
    return out


# ---- each tool's rule: LoRA file -> {target module: (up, down, scale)} ----

def comfyui(lora, cfg, diffusers_names):
    """ComfyUI comfy/lora.py model_lora_keys_unet + load_lora: ``lora_unet_`` + the original or
    the diffusers path (underscores), ``diffusion_model.``/``unet.``/bare diffusers paths with
    attention renamed ``processor.to_*`` (old diffusers format); up/down as lora_up/lora_down or
    lora_B/lora_A; alpha from ``<name>.alpha``, scale alpha / rank, else 1."""
    key_map = {}
    for ldm in ldm_modules(cfg):
        key_map[f"lora_unet_{ldm.replace('.', '_')}"] = ldm
        key_map[f"diffusion_model.{ldm}"] = ldm
    for k, ldm in comfy_unet_to_diffusers(cfg).items():
        key_map[f"lora_unet_{k.replace('.', '_')}"] = ldm
        for p in ("", "unet."):
            name = p + k.replace(".to_", ".processor.to_")
            key_map[name.removesuffix(".0") if name.endswith(".to_out.0") else name] = ldm
    out = {}
    for x, target in key_map.items():
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if x + up in lora:
                alpha = lora.get(x + ".alpha")
                d = lora[x + down]
                out[target] = (lora[x + up], d, 1.0 if alpha is None else alpha.item() / d.shape[0])
                break
    return out


A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key):
    """A1111 extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis (UNet part):
    SD1.5's block arithmetic, 3 layers a level, upsampler at .1 for up block 0."""
    for pattern, fn in (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
         f"{A1111_RESNET.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_"
         f"{A1111_RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m:
         f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_"
         f"{A1111_RESNET.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m:
         f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    ):
        if m := re.match(pattern, key):
            return fn(m)
    return key


def a1111(lora, cfg, diffusers_names):
    """A1111 networks.py load_network: the name before the first dot, converted, looked up in
    ``sd_model.model.named_modules()`` (original layout, dots as _), else ``lora_unet`` ->
    ``diffusion_model``; network_lora.py: lora_up/lora_down, network.py calc_scale alpha / dim."""
    layers = {f"diffusion_model_{n.replace('.', '_')}": n for n in ldm_modules(cfg)}
    groups = {}
    for key, value in lora.items():
        name, _, part = key.partition(".")
        hit = a1111_compvis_name(name)
        if hit not in layers and "lora_unet" in name:
            hit = name.replace("lora_unet", "diffusion_model")
        if hit in layers:
            groups.setdefault(layers[hit], {})[part] = value
    return {t: (w["lora_up.weight"], w["lora_down.weight"],
                w["alpha"].item() / w["lora_down.weight"].shape[0] if "alpha" in w else 1.0)
            for t, w in groups.items() if "lora_up.weight" in w and "lora_down.weight" in w}


def sd_scripts(lora, cfg, diffusers_names):
    """sd-scripts networks/lora.py create_network_from_weights + LoRANetwork.create_modules: the
    Linear/Conv2d children of Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D
    modules, named ``lora_unet_<parent>_<child>`` in the UNet sd-scripts trains (SD1.5:
    library/original_unet.py, diffusers names; SDXL: library/sdxl_original_unet.py, the
    original layout); modules_dim/alpha from the file, alpha defaulting to the rank."""
    if cfg.get("addition_embed_type"):
        names = {n: n for n, kind in ldm_modules(cfg).items() if kind}
    else:
        names = diffusers_names
    out = {}
    for n in names:
        x = f"lora_unet_{n.replace('.', '_')}"
        if x + ".lora_down.weight" in lora:
            d = lora[x + ".lora_down.weight"]
            alpha = lora.get(x + ".alpha")
            out[n] = (lora[x + ".lora_up.weight"], d, 1.0 if alpha is None else alpha.item() / d.shape[0])
    return out


def diffusers_stock(path, cfg):
    """Stock diffusers, its own functions: ``lora_state_dict`` (kohya keys converted, SDXL's
    original layout remapped by the UNet config), ``convert_unet_state_dict_to_peft``, and the
    adapter config ``load_lora_adapter`` builds: the file's peft metadata, else ``get_peft_kwargs``
    from the ranks and the kohya alphas."""
    state, alphas, meta = StableDiffusionXLPipeline.lora_state_dict(
        str(path), unet_config=_Config(cfg), return_lora_metadata=True)
    peft = convert_unet_state_dict_to_peft({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    if meta:
        kw = {k.removeprefix("unet."): v for k, v in meta.items()}
    else:
        ranks = {k: v.shape[1] for k, v in peft.items() if "lora_B" in k}
        kw = get_peft_kwargs(ranks, {k[5:]: v for k, v in (alphas or {}).items()} or None, peft)
    out = {}
    for key, down in peft.items():
        if key.endswith(".lora_A.weight"):
            name = key[:-len(".lora_A.weight")]
            alpha = (kw.get("alpha_pattern") or {}).get(name, kw["lora_alpha"])
            out[name] = (peft[f"{name}.lora_B.weight"], down,
                         alpha / (kw.get("rank_pattern") or {}).get(name, kw["r"]))
    return out


class _Config(dict):
    __getattr__ = dict.__getitem__


# ---- the exports ----

@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per family: the UNet's Linear/Conv2d paths, our export's delta per module, and its two files."""
    out = {}
    for family, cfg in CONFIGS.items():
        with init_empty_weights():
            unet = UNet2DConditionModel(**cfg)
        layers = {n: m for n, m in unet.named_modules() if isinstance(m, LAYERS)}
        assert len(ldm_modules(cfg)) == len(layers)  # the original layout has as many layers
        g = torch.Generator().manual_seed(0)
        state = {}
        for n, m in layers.items():
            if not any(n == t or n.endswith("." + t) for t in LCM_LORA_TARGETS):
                continue
            if isinstance(m, torch.nn.Linear):
                a, b = (RANK, m.in_features), (m.out_features, RANK)
            else:
                a, b = (RANK, m.in_channels, *m.kernel_size), (m.out_channels, RANK, 1, 1)
            state[f"{n}.lora_A.weight"] = torch.randn(a, generator=g) * 0.01
            state[f"{n}.lora_B.weight"] = torch.randn(b, generator=g) * 0.01
        path = tmp_path_factory.mktemp(family) / "student.safetensors"
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LCM_LORA_TARGETS)
        save_lora(state, config, path, {"method": "test"}, sdxl=family == "sdxl", unet_config=unet.config)
        out[family] = {"layers": list(layers), "cfg": cfg, "state": state,
                       "files": {"diffusers": path, "kohya": path.with_suffix(".kohya.safetensors")}}
    return out


def _expected(e):
    """module -> (scaled up, down) as trained: ΔW = alpha / r · B A."""
    return {k[:-len(".lora_A.weight")]: (e["state"][k.replace("lora_A", "lora_B")] * (ALPHA / RANK), v)
            for k, v in e["state"].items() if k.endswith(".lora_A.weight")}


# what each tool maps of each file; diffusers-format files: A1111 reads none of them and
# ComfyUI only the modules outside attention (it knows attention only as ``processor.to_*``)
TOOLS = {"comfyui": comfyui, "a1111": a1111, "sd-scripts": sd_scripts}
COVERAGE = {("sd15", "kohya"): {"comfyui": 278, "a1111": 278, "sd-scripts": 278, "diffusers": 278},
            ("sdxl", "kohya"): {"comfyui": 788, "a1111": 788, "sd-scripts": 788, "diffusers": 788},
            ("sd15", "diffusers"): {"comfyui": 150, "a1111": 0, "sd-scripts": 0, "diffusers": 278},
            ("sdxl", "diffusers"): {"comfyui": 228, "a1111": 0, "sd-scripts": 0, "diffusers": 788}}


@pytest.mark.parametrize("family,fmt", list(COVERAGE))
def test_every_tool_maps_every_module_at_its_scale(exports, family, fmt):
    e = exports[family]
    expected = _expected(e)
    path = e["files"][fmt]
    lora = load_file(path)
    to_diffusers = {v: k for k, v in comfy_unet_to_diffusers(e["cfg"]).items()}  # original -> diffusers
    found = {name: tool(lora, e["cfg"], e["layers"]) for name, tool in TOOLS.items()}
    found["diffusers"] = diffusers_stock(path, e["cfg"])
    counts = {}
    for tool, mapped in found.items():
        counts[tool] = len(mapped)
        for target, (up, down, scale) in mapped.items():
            name = to_diffusers.get(target, target)
            assert name in expected, f"{tool} put {target} on a module the LoRA does not train"
            want_up, want_down = expected[name]
            torch.testing.assert_close(down, want_down)
            torch.testing.assert_close(up * scale, want_up)
    print(family, fmt, counts)
    assert counts == COVERAGE[family, fmt]
    assert len(expected) == COVERAGE[family, "kohya"]["comfyui"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_exports_carry_sd_scripts_and_modelspec_metadata(exports, family):
    for fmt, path in exports[family]["files"].items():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
        assert meta["modelspec.architecture"] == ("stable-diffusion-xl-v1-base/lora" if family == "sdxl"
                                                  else "stable-diffusion-v1/lora")
        assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["ss_network_module"] == "networks.lora"
        assert meta["ss_network_dim"] == str(RANK)
        assert meta["ss_network_alpha"] == (f"{ALPHA:g}" if fmt == "kohya" else str(RANK))  # folded into B
        assert "hypersd" in meta


def test_sdxl_kohya_names_are_original_layout_and_convert_back(exports):
    kohya = read_lora(exports["sdxl"]["files"]["kohya"])
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in kohya.modules)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in kohya.modules
    assert "lora_unet_output_blocks_2_2_conv" in kohya.modules
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL)
    back = to_format(kohya, "diffusers", [("unet", [n for n, _ in unet.named_modules() if n])])
    want = read_lora(exports["sdxl"]["files"]["diffusers"])
    assert set(back.modules) == set(want.modules)
    for name, (a, b, _) in want.modules.items():
        torch.testing.assert_close(back.scale_of(name) * back.modules[name][1], b)
        torch.testing.assert_close(back.modules[name][0], a)


def _tiny_sdxl_lora(tmp_path):
    pipe = tiny_sdxl()
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=LCM_LORA_TARGETS)
    pipe.unet.add_adapter(config)
    state = {k: v * 5 for k, v in get_peft_model_state_dict(pipe.unet).items()}
    paths = save_lora(state, config, tmp_path / "s.safetensors", {"method": "test"}, sdxl=True,
                      unet_config=pipe.unet.config)
    return paths


def _draw(path):
    pipe = tiny_sdxl()
    if path is not None:
        pipe.load_lora_weights(str(path))
    return pipe("a cat", num_inference_steps=2, guidance_scale=1.0, height=16, width=16,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_sdxl_kohya_export_loads_in_stock_diffusers_like_the_diffusers_file(tmp_path):
    diffusers_file, kohya_file = _tiny_sdxl_lora(tmp_path)
    assert any("input_blocks" in k for k in load_file(kohya_file))
    plain, ours, theirs = _draw(None), _draw(diffusers_file), _draw(kohya_file)
    assert np.abs(ours - plain).max() > 1e-2  # the LoRA changes the images
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_merge_normalises_names_and_tools_update_metadata(tmp_path):
    diffusers_file, kohya_file = _tiny_sdxl_lora(tmp_path)
    ours = read_lora(kohya_file)
    # the same LoRA as older tools wrote it: SDXL's modules under diffusers names
    legacy = write_lora(_diffusers_named(read_lora(diffusers_file)), tmp_path / "legacy.safetensors")
    merged = merge([(ours, 0.5), (read_lora(legacy), 0.5)])
    assert set(merged.modules) == set(ours.modules)  # one entry per layer
    for name in ours.modules:
        a, b, _ = ours.modules[name]
        delta = merged.scale_of(name) * merged.modules[name][1].flatten(1) @ merged.modules[name][0].flatten(1)
        torch.testing.assert_close(delta, ours.scale_of(name) * b.flatten(1) @ a.flatten(1), atol=1e-6, rtol=1e-5)
    out = write_lora(merged, tmp_path / "merged.safetensors")
    meta = read_lora(out).metadata
    assert meta["ss_network_dim"] == str(2 * RANK) and meta["ss_network_alpha"] == str(2 * RANK)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    half = read_lora(write_lora(rescale(ours, 0.5), tmp_path / "half.safetensors")).metadata
    assert half["ss_network_dim"] == str(RANK) and half["ss_network_alpha"] == f"{ALPHA:g}"
    converted = read_lora(write_lora(to_format(read_lora(diffusers_file), "kohya"), tmp_path / "c.safetensors"))
    assert set(converted.modules) == set(ours.modules)
    assert converted.metadata["ss_network_alpha"] == str(RANK)  # from the folded diffusers file


def _diffusers_named(lf):
    """A kohya LoraFile with SDXL's UNet under diffusers names and lora_te_ (what older tools wrote)."""
    from hypersd.lora.tools import LoraFile
    return LoraFile("kohya", {"lora_unet_" + n[len("unet."):].replace(".", "_"): m
                              for n, m in lf.modules.items()}, {"ss_base_model_version": "sdxl_base_v1-0"})


def test_sdxl_text_encoder_is_lora_te1():
    from hypersd.lora.tools import LoraFile
    names = unet_module_names(tiny_sdxl())
    a, b = torch.zeros(2, 32), torch.zeros(32, 2)
    q = {c: next(n for n in found if n.endswith("layers.0.self_attn.q_proj")) for c, found in names[1:]}
    lf = LoraFile("diffusers", {f"{c}.{n}": [a, b, 2.0] for c, n in q.items()})
    kohya = to_format(lf, "kohya")
    assert set(kohya.modules) == {f"lora_te1_{q['text_encoder'].replace('.', '_')}",
                                  f"lora_te2_{q['text_encoder_2'].replace('.', '_')}"}
    assert set(to_format(kohya, "diffusers", names).modules) == set(lf.modules)
