"""hypersd: distil a diffusion model into a 1-8 step student, run few-step students with
the settings they were made for, and measure them."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hypersd.errors import UserError


def _generate(args) -> None:
    from hypersd.files import check_writable
    from hypersd.generate import generate
    from hypersd.generate.controlnet import pair_controls
    check_writable(args.out)  # before the work, not after it
    result = generate(args.prompts, model=args.model, loras=args.lora or [], recipe=args.recipe,
                      steps=args.steps, sampler=args.sampler, eta=args.eta, guidance=args.guidance,
                      distilled_guidance=args.distilled_guidance, negative=args.negative, seed=args.seed,
                      batch=args.batch, config=args.config, unet=args.unet, lora_dir=args.lora_dir,
                      width=args.width, height=args.height,
                      controlnets=pair_controls(args.controlnet, args.control_image, args.control_scale))
    paths = result.save(args.out)
    print(f"wrote {len(paths) - 1} image(s) and the grid {paths[-1]}")


def _recipes(args) -> None:
    from hypersd.generate.recipes import load_recipes
    for name, recipe in load_recipes().items():
        print(f"{name:27s} {recipe.models_named():11s} {recipe.description}")


def _demo(args) -> None:
    from hypersd.demo import run_demo
    print(f"wrote {run_demo(args.out, seed=args.seed)}")


def _data(args) -> None:
    from hypersd.data.emoji32 import STYLES, build_emoji32
    out = args.out or STYLES[args.style].out_dir
    data = build_emoji32(args.tarball, out, style=args.style)
    print(f"emoji32 ({args.style}): {len(data)} images, sha256 {data.digest()} -> {out}")


def _train_teacher(args) -> None:
    from hypersd.teacher import TeacherConfig, export_pipeline, train_teacher
    fields = {f.name for f in dataclasses.fields(TeacherConfig)}
    cfg = TeacherConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if args.export and cfg.init_from and not args.export_to:
        raise UserError("--export writes the bundled teacher: a fine-tune (--init-from) needs "
                        "--export-to FOLDER")
    run_dir = train_teacher(cfg)
    if not (args.export or args.export_to):
        return
    folder = {"out_dir": args.export_to} if args.export_to else {}
    if cfg.phase == "unet":
        print(f"exported {export_pipeline(run_dir, **folder)}")
    if cfg.phase == "controlnet":
        from hypersd.teacher.controlnet import export_controlnet
        print(f"exported {export_controlnet(run_dir, **folder)}")
    if cfg.phase == "flow":
        from hypersd.teacher.flow import export_flow_pipeline
        print(f"exported {export_flow_pipeline(run_dir, **folder)}")


def _export_teacher(args) -> None:
    if args.phase == "flow":
        from hypersd.teacher.flow import MINI_FLOW_DIR, export_flow_pipeline
        print(f"exported {export_flow_pipeline(args.run_dir, args.out or MINI_FLOW_DIR)}")
    else:
        from hypersd.models.mini import MINI_DIR
        from hypersd.teacher import export_pipeline
        print(f"exported {export_pipeline(args.run_dir, args.out or MINI_DIR)}")
    if args.handoff:
        from hypersd.teacher.train import handoff_from_checkpoint
        step = handoff_from_checkpoint(args.run_dir, args.handoff, args.phase)
        print(f"wrote {args.handoff} (step {step})")


def _config_from_flags(config_cls, args):
    """The dataclass from the flags ``_add_config_flags`` made (unset flags keep defaults)."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def _train_classifier(args) -> None:
    from hypersd.metrics.classifier import ClassifierConfig, train_classifier
    print(f"wrote {train_classifier(_config_from_flags(ClassifierConfig, args))}")


def _train_reward(args) -> None:
    from hypersd.rewards.mini import AdherenceConfig, train_adherence
    from hypersd.rewards.structure import StructureConfig, train_structure
    config, train = {"adherence": (AdherenceConfig, train_adherence),
                     "structure": (StructureConfig, train_structure)}[args.kind]
    print(f"wrote {train(_config_from_flags(config, args))}")


def _per_step(items: list[str] | None, flag: str) -> dict[int, str]:
    """{N: PATH} from repeated ``N=PATH`` flags."""
    out = {}
    for item in items or []:
        n, sep, path = item.partition("=")
        if not (sep and n.isdigit() and path):
            raise UserError(f"{flag} {item!r}: write N=PATH, e.g. 4=stage-4.safetensors")
        out[int(n)] = path
    return out


def _eval_control(args) -> None:
    from hypersd.controlnet.evaluate import ControlEvalConfig, control_table, evaluate_control
    from hypersd.evaluate import parse_steps
    if args.steps:
        args.steps = parse_steps(args.steps)
    cfg = _config_from_flags(ControlEvalConfig, args)
    print(control_table(evaluate_control(cfg)))
    print(f"wrote {cfg.out_dir}/table.md and results.json")


def _eval(args) -> None:
    from hypersd.evaluate import EvalConfig, parse_steps, run_eval
    cfg = EvalConfig(model=args.model, unet=args.unet, loras=args.lora or [], recipe=args.recipe,
                     step_loras=_per_step(args.step_lora, "--step-lora"),
                     step_unets=_per_step(args.step_unet, "--step-unet"),
                     steps=parse_steps(args.steps), label=args.label,
                     split=args.split, data=args.data, samples=args.samples, seed=args.seed, out_dir=args.out,
                     clip=args.clip, aesthetic=args.aesthetic, imagereward=args.imagereward,
                     inception=args.inception, rewards=args.reward or [], prompts=args.prompts,
                     reference=args.reference)
    rows = run_eval(cfg)
    from hypersd.evaluate import markdown_table
    print(markdown_table(rows))
    print(f"wrote {cfg.out_dir}/table.md, results.json, metrics.png and the grid")


def _bench(args) -> None:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "train-cost":
        from hypersd.bench.train_cost import TrainCostConfig, bench_train_cost
        cfg = TrainCostConfig(repeats=args.repeats, out_dir=args.out, overrides=tuple(args.set or ()))
        if args.recipe:
            cfg.cases = tuple(args.recipe)
        for row in bench_train_cost(cfg):
            print(f"{row['case']:24s} {row['method']:5s} step / floor = {row['step_over_floor']:.3f}")
        print(f"wrote {args.out}/train_cost.md")
        return
    if args.what == "realsize":
        from hypersd.bench.realsize import RealSizeConfig, bench_realsize
        cfg = RealSizeConfig(model=args.model or "sd15", out_dir=f"{args.out}/realsize")
        if args.case:
            cfg.cases = tuple(args.case)
        bench_realsize(cfg)
        print(f"wrote {cfg.out_dir}/{cfg.model}.md")
        return
    from hypersd.bench.speed import SpeedConfig, bench_speed
    cfg = SpeedConfig(model=args.model, repeats=args.repeats, out_dir=args.out, threads=args.threads,
                      lora=args.lora, speedup=args.speedup)
    bench_speed(cfg)
    print(f"wrote {cfg.out_dir}/speed.md and speed.json")


def _serve(args) -> None:
    from hypersd.serve import ServeConfig, serve
    serve(_config_from_flags(ServeConfig, args))


def _with_data(run, source: str | None):
    """``run`` with ``--data SOURCE`` as its data source (taken as given, not parsed as YAML)."""
    if source is not None:
        run.data = dataclasses.replace(run.data, source=source)
    return run


def _distill(args) -> None:
    from hypersd.distill.loop import distill
    from hypersd.distill.recipe import load_run
    run = _with_data(load_run(args.recipe, args.set or []), args.data)
    paths = distill(run)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        for path in paths:
            print(f"wrote {path}")


def _cache(args) -> None:
    import torch

    from hypersd.distill.cache import ensure_cache
    from hypersd.distill.recipe import load_data_settings
    from hypersd.generate.loading import load_pipeline
    model, data = load_data_settings(args.recipe_or_model, args.set or [])
    data = dataclasses.replace(data, source=args.data) if args.data else data
    folder, _ = ensure_cache(load_pipeline(model, dtype=torch.float32), data)
    print(f"cached latents in {folder}")


def _lora(args) -> None:
    from hypersd.files import check_writable
    from hypersd.lora import tools
    if len(args.inputs) < 2:
        raise UserError("give the input file(s) and then the output file")
    *args.inputs, args.out = args.inputs
    check_writable(args.out, "output path", folder=False)
    if args.action == "merge":
        from hypersd.generate.loading import parse_lora
        files = [(tools.read_lora(p), 1.0 if w is None else w) for p, w in map(parse_lora, args.inputs)]
        result = tools.merge(files)
    else:
        if len(args.inputs) != 1:
            raise UserError(f"lora {args.action} takes one input file")
        result = tools.read_lora(args.inputs[0])
        if args.action == "rescale":
            result = tools.rescale(result, args.scale)
    if args.to:
        names = None
        if args.to == "diffusers" and result.format == "kohya":
            from hypersd.generate.loading import load_pipeline
            names = tools.unet_module_names(load_pipeline(args.model))
        result = tools.to_format(result, args.to, names)
    print(f"wrote {tools.write_lora(result, args.out, args.dtype)} ({result.format}, {len(result.modules)} modules)")


def _add_config_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    """One --flag per dataclass field, typed like its default (None = keep the default)."""
    for f in dataclasses.fields(config_cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default))


def _at_least(least: int):
    """An argparse type: a whole number of ``least`` or more."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of {least} or more")
        return value
    return count


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: one line, like every other bad input."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from hypersd.data.emoji32 import STYLES
    from hypersd.models.mini import MINI_DIR
    from hypersd.generate.speedup import SPEEDUPS
    from hypersd.serve.config import ServeConfig

    parser = _Parser(prog="hypersd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with a base model, LoRAs and a recipe")
    g.add_argument("prompts", nargs="+", metavar="PROMPT")
    g.add_argument("--model", help="'mini' (default), a diffusers folder, a hub id or a .safetensors file")
    g.add_argument("--config", help="diffusers config folder/hub id for a single-file --model")
    g.add_argument("--unet", help="a UNet folder or .safetensors file replacing the model's (a full-network student)")
    g.add_argument("--lora", action="append", metavar="PATH[:SCALE]", help="repeat for several")
    g.add_argument("--lora-dir", metavar="DIR", help="where <lora:NAME:WEIGHT> in a prompt finds NAME "
                   "(default $HYPERSD_LORA_DIR)")
    g.add_argument("--controlnet", action="append", metavar="MODEL",
                   help="a diffusers ControlNet folder or hub id; repeat for several, each with a --control-image")
    g.add_argument("--control-image", action="append", metavar="IMG", help="one per --controlnet, in order")
    g.add_argument("--control-scale", action="append", type=float, metavar="S",
                   help="conditioning scale, 0 to 2 (default 1): one per --controlnet, or none")
    g.add_argument("--recipe", help="a named preset (see `hypersd recipes`); default: the one the "
                   "LoRA or --unet was made for (said on stderr), else 'teacher'")
    g.add_argument("--steps", type=int)
    g.add_argument("--sampler", help="ddim | euler | lcm | tcd (SD1.5/SDXL) | flow_euler (SD3, FLUX, Qwen-Image)")
    g.add_argument("--eta", type=float)
    g.add_argument("--guidance", type=float, help="classifier-free guidance (FLUX, Qwen-Image: true CFG)")
    g.add_argument("--distilled-guidance", type=float, metavar="G",
                   help="a guidance-distilled transformer's guidance (FLUX.1-dev's guidance_scale)")
    g.add_argument("--width", type=int, help="image width in pixels (with --height; default: the model's)")
    g.add_argument("--height", type=int, help="image height in pixels (with --width)")
    g.add_argument("--negative", help="negative prompt (with guidance > 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--out", default="outputs/generate")
    g.set_defaults(func=_generate)

    ds = sub.add_parser("distill", help="distil a few-step student from a YAML recipe of stages")
    ds.add_argument("recipe", help="a YAML file or a bundled recipe name (e.g. hyper-sd-mini)")
    ds.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a recipe field, e.g. stages.0.steps=100 (repeatable)")
    ds.add_argument("--data", metavar="SOURCE", help="training data: a folder with metadata.jsonl, a saved "
                    "Hugging Face dataset or hf:NAME, .tar shards (a folder or shards/{000..009}.tar), "
                    "a .txt of prompts, or emoji32 (the recipe's data.source; default emoji32)")
    ds.set_defaults(func=_distill)

    ca = sub.add_parser("cache", help="encode a data source's images and captions into the latent cache")
    ca.add_argument("recipe_or_model", metavar="RECIPE_OR_MODEL",
                    help="a distill recipe (its model and data settings) or a model ('mini', a folder, a hub id)")
    ca.add_argument("--data", metavar="SOURCE", help="the images: a folder with metadata.jsonl, a saved "
                    "Hugging Face dataset or hf:NAME, or .tar shards (default: the recipe's data.source)")
    ca.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a recipe field, e.g. data.crop=random (repeatable)")
    ca.set_defaults(func=_cache)

    lo = sub.add_parser("lora", help="rescale, merge or convert LoRA files (diffusers/kohya)")
    lo.add_argument("action", choices=["convert", "rescale", "merge"])
    lo.add_argument("inputs", nargs="+", metavar="IN[:WEIGHT]", help="input file(s), then the output")
    lo.add_argument("--to", choices=["diffusers", "kohya"], help="output format (default: the input's)")
    lo.add_argument("--scale", type=float, default=1.0, help="rescale: multiply the LoRA's effect")
    lo.add_argument("--model", help="base model, for kohya -> diffusers module names")
    lo.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="output precision (default: the input's)")
    lo.set_defaults(func=_lora)

    v = sub.add_parser("eval", help="quality against steps on the emoji32 evaluation split or a prompt file")
    v.add_argument("--model")
    v.add_argument("--unet", help="a UNet folder or .safetensors file replacing the model's")
    v.add_argument("--lora", action="append", metavar="PATH[:SCALE]")
    v.add_argument("--step-lora", action="append", metavar="N=PATH[:SCALE]",
                   help="a LoRA used only at N steps (Hyper-SD's N-step LoRAs); repeat per N")
    v.add_argument("--step-unet", action="append", metavar="N=PATH",
                   help="a UNet used only at N steps (SDXL-Lightning's N-step UNets); repeat per N")
    v.add_argument("--recipe", default="teacher")
    v.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    v.add_argument("--label", help="row name in the table (default: recipe + LoRA)")
    v.add_argument("--split", default="eval", help="eval | distill | all")
    v.add_argument("--data", default="noto", metavar="STYLE",
                   help="the emoji32 style FD compares against: noto | twemoji (a model fine-tuned on it)")
    v.add_argument("--samples", type=int, help="images per step count (default: 840 on emoji32, one per "
                   "prompt of --prompts)")
    v.add_argument("--prompts", metavar="FILE", help="evaluate on these prompts (one a line) with the real "
                   "metrics given (--clip, --aesthetic, --imagereward, --inception) instead of emoji32")
    v.add_argument("--reference", metavar="FOLDER", help="images FID/KID compare with (with --prompts: needed "
                   "for --inception)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--out", default="outputs/eval")
    v.add_argument("--clip", metavar="MODEL", help="CLIP folder or hub id: adds CLIP score")
    v.add_argument("--aesthetic", metavar="PTH", help="LAION aesthetic head: adds aesthetic score")
    v.add_argument("--imagereward", metavar="PT", help="ImageReward.pt: adds ImageReward")
    v.add_argument("--reward", action="append", metavar="NAME",
                   help="a reward's mean score (mini-adherence, mini-structure); repeat for more")
    v.add_argument("--inception", metavar="PTH",
                   help="pt_inception-2015-12-05-6726825d.pth: adds FID and KID to the data")
    v.set_defaults(func=_eval)

    vc = sub.add_parser("eval-control", help="control fidelity of the mini scribble ControlNet against steps")
    vc.add_argument("--controlnet", help="a ControlNet folder (default: the bundled mini-controlnet)")
    vc.add_argument("--lora", help="the accelerator (default: the bundled unified LoRA)")
    vc.add_argument("--recipe", help="the accelerator's recipe (default: hyper-sd-unified)")
    vc.add_argument("--steps", help="comma-separated step counts (default: 1,2,4,8)")
    vc.add_argument("--scale", type=float, help="controlnet_conditioning_scale (default: 1)")
    vc.add_argument("--prompts", type=int, help="the first N eval prompts only (default: all 420)")
    vc.add_argument("--out", dest="out_dir", help="default: benchmarks/controlnet")
    vc.set_defaults(func=_eval_control)

    sp = sub.add_parser("bench", help="benchmarks: `bench speed`, `bench train-cost`, `bench realsize`")
    sp.add_argument("what", choices=["speed", "train-cost", "realsize"])
    sp.add_argument("--model")
    sp.add_argument("--repeats", type=_at_least(1), default=7)
    sp.add_argument("--threads", type=_at_least(0), default=0, help="0: torch's default")
    sp.add_argument("--out", default="benchmarks")
    sp.add_argument("--recipe", action="append", metavar="NAME[:STAGE]",
                    help="train-cost: a recipe and stage index to time (repeatable; default: one stage "
                         "of each method)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="train-cost: override a recipe field")
    sp.add_argument("--case", action="append", help="realsize: tscd, tscd+gc, tscd+bf16, tscd+gc+bf16, dmd, "
                    "dmd+gc+bf16 (repeatable; default: all); --model sd15 (default) or sdxl")
    sp.add_argument("--lora", metavar="PATH", help="speed: the student's LoRA (default: the bundled one on the "
                    "mini model; 'none' for none)")
    sp.add_argument("--speedup", choices=list(SPEEDUPS), default="trace",
                    help="speed: how the fast path runs the UNet and VAE (default: trace)")
    sp.set_defaults(func=_bench)

    sv = sub.add_parser("serve", help="the live web demo: one-step text to image and real-time scribble")
    sv.add_argument("--model", help="'mini' (default), a diffusers folder, a hub id or a .safetensors file")
    sv.add_argument("--lora", metavar="PATH[:SCALE]", help="the accelerator fused in (default: the bundled "
                    "one on the mini model; 'none' for none)")
    sv.add_argument("--recipe", help="default: the one the LoRA was made for")
    sv.add_argument("--controlnet", metavar="FOLDER", help="the scribble tab's ControlNet (default: the "
                    "bundled mini-controlnet)")
    sv.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_at_least(0), help="default 7860; 0: any free port")
    sv.add_argument("--speedup", choices=list(SPEEDUPS),
                    help="how the UNet, VAE and ControlNet run (default: trace)")
    sv.add_argument("--threads", type=_at_least(0), help="torch CPU threads (0: torch's default)")
    for flag, what in (("max-steps", "steps"), ("max-batch", "images"), ("max-size", "image side in pixels "
                       "(0: twice the model's)"), ("max-prompt", "prompt characters"), ("queue-size",
                       "requests waiting at once")):
        dest = flag.replace("-", "_")
        sv.add_argument(f"--{flag}", dest=dest, type=_at_least(0),
                        help=f"cap: {what}; default {getattr(ServeConfig, dest)}")
    sv.set_defaults(func=_serve)

    r = sub.add_parser("recipes", help="list the inference recipes")
    r.set_defaults(func=_recipes)

    d = sub.add_parser("demo", help="the bundled model: teacher at 25 steps next to 1/2/4/8 steps")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    b = sub.add_parser("data", help="build the emoji32 dataset (one style) from its npm package")
    b.add_argument("--style", choices=list(STYLES), default="noto",
                   help=", ".join(f"{name}: {spec.source}" for name, spec in STYLES.items()))
    b.add_argument("--tarball", help="the style's package .tgz, e.g. emoji-datasource-google-16.0.0.tgz "
                   "(default: npm pack)")
    b.add_argument("--out", help="default: the style's folder in hypersd/assets")
    b.set_defaults(func=_data)

    t = sub.add_parser("train-teacher", help="train the mini teacher (phase vae, then unet), its "
                       "scribble ControlNet (phase controlnet) and the mini flow model (phase flow)")
    from hypersd.teacher.config import TeacherConfig
    _add_config_flags(t, TeacherConfig)
    t.add_argument("--export", action="store_true",
                   help=f"after the unet phase, write {MINI_DIR}; after controlnet or flow, mini-controlnet "
                   "or mini-flow beside it")
    t.add_argument("--export-to", metavar="FOLDER",
                   help="after the unet or controlnet phase, write it to FOLDER instead (a fine-tune's "
                   "pipeline keeps its --init-from's VAE)")
    t.set_defaults(func=_train_teacher)

    c = sub.add_parser("train-classifier", help="train the emoji network behind the mini-world metrics")
    from hypersd.metrics.classifier import ClassifierConfig
    _add_config_flags(c, ClassifierConfig)
    c.set_defaults(func=_train_classifier)

    r = sub.add_parser("train-reward", help="train the mini world's reward network for feedback learning")
    r.add_argument("kind", choices=["adherence", "structure"],
                   help="adherence: the mini CLIP (image vs caption); structure: the foreground segmenter")
    r.add_argument("--out-dir", dest="out_dir")
    for flag, kind in (("steps", int), ("batch_size", int), ("lr", float), ("width", int), ("seed", int),
                       ("threads", int)):
        r.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind)
    r.set_defaults(func=_train_reward)

    e = sub.add_parser("export-teacher", help="write a run's VAE + EMA UNet as the pipeline folder "
                       "(a fine-tune's VAE is its --init-from's)")
    e.add_argument("--run-dir", default="runs/teacher")
    e.add_argument("--phase", choices=["unet", "flow"], default="unet",
                   help="flow: the mini flow model's EMA transformer as a FluxPipeline folder")
    e.add_argument("--out", help=f"default: {MINI_DIR} (flow: mini-flow beside it)")
    e.add_argument("--handoff", help="also write this handoff file from the latest checkpoint")
    e.set_defaults(func=_export_teacher)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hypersd.quiet import quiet_libraries
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UserError as e:
        message = " ".join(line.strip() for line in str(e).splitlines())  # one line, whatever it quotes
        print(f"hypersd: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hypersd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
