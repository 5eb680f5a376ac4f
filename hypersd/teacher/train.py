"""Teacher training on emoji32, with accelerate: checkpoints (``hypersd.checkpoint``), resume, EMA,
TensorBoard.

Phase "vae" trains the autoencoder (L1 + MSE reconstruction + a small KL term) and sets its
``scaling_factor`` to 1 / std of the latents, as SD does. Phase "unet" trains the
epsilon-predicting UNet on cached latents and cached MiniLM token embeddings, with caption
dropout for classifier-free guidance and min-SNR weighting. Both train on one emoji32 style
(``TeacherConfig.data``). With ``init_from`` the UNet phase is a fine-tune, as community
fine-tunes of SD1.5 are made: the UNet and its EMA start from a pipeline's UNet, the latents
come from that pipeline's VAE, and the export keeps that VAE.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hypersd import checkpoint
from hypersd.data import Emoji32, load_style
from hypersd.data.emoji32 import weights_notice
from hypersd.errors import UserError
from hypersd.imaging import to_signed_unit
from hypersd.io import atomic_path
from hypersd.models.mini import (MINI_DIR, build_scheduler, build_unet, build_vae,
                                 load_text_encoder)
from hypersd.teacher.config import TeacherConfig


def _save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep: int, model, opt, lr_sched,
                     ema) -> None:
    """Model, optimizer, LR schedule, EMA and RNG as one checksummed checkpoint (``hypersd.checkpoint``)."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_schedule": lr_sched.state_dict(),
             "rng": torch.get_rng_state()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    checkpoint.save(folder, step, state, keep=keep, rank=accelerator.process_index,
                    barrier=accelerator.wait_for_everyone)


def _load_checkpoint(ck: checkpoint.Checkpoint, model, opt, lr_sched, ema) -> int:
    state = ck.state()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_schedule"])
    torch.set_rng_state(state["rng"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return ck.step


def _dataset(cfg: TeacherConfig) -> Emoji32:
    return load_style(cfg.data)


def _images(data: Emoji32, device, limit: int = 0) -> torch.Tensor:
    return to_signed_unit(data.images[:limit or None]).to(device)


HANDOFF_PHASES = ("unet", "flow")  # phases whose weights + EMA can travel in git between machines
# The flow model's travels in fp16, half what a session commits: a resume continues from weights
# rounded once (relative error 5e-4), with a fresh optimizer as every handoff resume has.
HANDOFF_DTYPE = {"unet": torch.float32, "flow": torch.float16}
INIT_RECORD = "unet-init.json"  # in run_dir: the pipeline a fine-tune started from


def init_folder(init_from: str) -> Path:
    """The pipeline folder ``init_from`` names: "mini" is the bundled teacher."""
    folder = MINI_DIR if init_from == "mini" else Path(init_from)
    missing = [part for part in ("unet", "vae") if not (folder / part / "config.json").exists()]
    if missing:
        raise UserError(f"init_from {init_from!r}: {folder} has no {' or '.join(missing)}/config.json; "
                        "pass 'mini' or a diffusers pipeline folder like hypersd/assets/mini-teacher")
    return folder


def _init_record(run_dir: str | Path) -> dict:
    """What a fine-tune recorded of its start ({} for a run trained from scratch)."""
    record = Path(run_dir) / INIT_RECORD
    return json.loads(record.read_text()) if record.exists() else {}


def run_init(run_dir: str | Path) -> str:
    """The ``init_from`` a run was fine-tuned from ("" for a run trained from scratch)."""
    return _init_record(run_dir).get("init_from", "")


def _record_init(cfg: TeacherConfig, run_dir: Path) -> None:
    """Remember a fine-tune's init in run_dir, and refuse to resume a run from another start
    (its checkpoints hold weights trained on another VAE's latents)."""
    recorded = run_init(run_dir)
    started = any((run_dir / "unet-checkpoints").glob("step-*"))
    if recorded != cfg.init_from and (recorded or started):
        was = f"fine-tuned from {recorded!r}" if recorded else "trained from scratch"
        fix = f"pass init_from={recorded!r} (--init-from {recorded})" if recorded else "leave init_from out"
        raise UserError(f"{run_dir} was {was}: {fix} to resume it, or use another run_dir")
    if cfg.init_from and not recorded:
        (run_dir / INIT_RECORD).write_text(json.dumps({"init_from": cfg.init_from, "data": cfg.data}) + "\n")


@torch.no_grad()
def encode_captions(captions: list[str], batch: int = 256) -> torch.Tensor:
    """MiniLM token embeddings (N, MAX_TOKENS, 384) of captions, padded as the pipeline pads."""
    tokenizer, encoder = load_text_encoder()
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i:i + batch], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(encoder(ids)[0])
    return torch.cat(out)


class _VaeTask:
    def __init__(self, cfg: TeacherConfig, device):
        self.cfg, self.images = cfg, _images(_dataset(cfg), device, cfg.max_images)
        self.model = build_vae()

    def loss(self, model, g: torch.Generator):
        idx = torch.randint(len(self.images), (self.cfg.batch_size,), generator=g)
        x = self.images[idx.to(self.images.device)]
        posterior = model.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(x)
        recon = model.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        return rec + self.cfg.kl_weight * kl, {"recon": rec.item(), "kl": kl.item()}

    @torch.no_grad()
    def finish(self, model, run_dir: Path) -> None:
        model.eval()
        latents = torch.cat([model.encode(self.images[i:i + 512]).latent_dist.mean
                             for i in range(0, len(self.images), 512)])
        model.register_to_config(scaling_factor=float(1.0 / latents.std()))
        model.save_pretrained(run_dir / "vae")
        if self.cfg.uses_handoff:  # the UNet phase on another machine needs the same VAE
            model.save_pretrained(Path(self.cfg.handoff).with_name("teacher-vae"))


class _UnetTask:
    """The UNet's denoising loss on cached latents and caption embeddings (min-SNR weighted).

    The UNet starts at random, or from ``cfg.init_from``'s UNet; the latents come from
    ``vae_dir``, else the init's VAE, else the run's own trained VAE."""

    def __init__(self, cfg: TeacherConfig, run_dir: Path, device, vae_dir: Path | None = None):
        self.cfg = cfg
        init = init_folder(cfg.init_from) if cfg.init_from else None
        if vae_dir is None:
            vae_dir = init / "vae" if init else vae_folder(run_dir, cfg.handoff if cfg.uses_handoff else None)
        if not (vae_dir / "config.json").exists():
            raise UserError(f"no trained VAE in {vae_dir}: run the 'vae' phase first")
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().to(device)
        data = _dataset(cfg)
        self.images = _images(data, device, cfg.max_images)
        with torch.no_grad():
            dists = [vae.encode(self.images[i:i + 512]).latent_dist for i in range(0, len(self.images), 512)]
        self.mean = torch.cat([d.mean for d in dists]) * vae.config.scaling_factor
        self.std = torch.cat([d.std for d in dists]) * vae.config.scaling_factor
        self.text = self.encode(data.captions[:len(self.images)]).to(device)
        self.empty = self.encode([""]).to(device)
        self.scheduler = build_scheduler()
        alphas = self.scheduler.alphas_cumprod.to(device)
        self.snr = alphas / (1 - alphas)
        self.model = self.network(init)

    def encode(self, captions: list[str]) -> torch.Tensor:
        """The caption embeddings the network reads, one row per caption."""
        return encode_captions(captions)

    def network(self, init: Path | None):
        """The network to train: ``init``'s UNet, else a new one."""
        if init:
            return UNet2DConditionModel.from_pretrained(init / "unet", use_safetensors=True,
                                                        torch_dtype=torch.float32)
        return build_unet()

    def loss(self, model, g: torch.Generator):
        cfg, n = self.cfg, self.cfg.batch_size
        idx = torch.randint(len(self.mean), (n,), generator=g).to(self.mean.device)
        z0 = self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g).to(self.mean)
        text = self._captions(idx, g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=g).to(z0.device)
        noise = torch.randn(z0.shape, generator=g).to(z0)
        zt = self.scheduler.add_noise(z0, noise, t)
        eps = self.predict(model, zt, t, text, idx, g)
        per_sample = (eps.float() - noise).pow(2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:  # min-SNR-γ weights for epsilon prediction
            snr = self.snr[t]
            per_sample = per_sample * torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        return per_sample.mean(), {}

    def _captions(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The batch's caption embeddings: a ``caption_dropout`` share replaced by the empty
        caption, then a ``caption_mismatch`` share by another image's caption."""
        cfg, text = self.cfg, self.text[idx]
        u = torch.rand(len(idx), generator=g).to(text.device)
        text = torch.where((u < cfg.caption_dropout)[:, None, None], self.empty.expand_as(text), text)
        if cfg.caption_mismatch > 0:  # no extra draw otherwise: earlier runs resume on the same stream
            other = (idx + torch.randint(1, len(self.text), idx.shape, generator=g).to(idx)) % len(self.text)
            swap = (u >= cfg.caption_dropout) & (u < cfg.caption_dropout + cfg.caption_mismatch)
            text = torch.where(swap[:, None, None], self.text[other], text)
        return text

    def predict(self, model, zt, t, text, idx, g):
        """The ε prediction for the noised batch (``idx``: its images; ``g``: further draws)."""
        return model(zt, t, text).sample

    def finish(self, model, run_dir: Path) -> None:
        pass


def train_teacher(cfg: TeacherConfig) -> Path:
    """Train one phase, resuming from its latest checkpoint; return the run folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    if cfg.init_from:
        init_folder(cfg.init_from)  # a bad folder fails before run_dir is made
    ckpt_dir = run_dir / f"{cfg.phase}-checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if cfg.phase == "unet":
        _record_init(cfg, run_dir)
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(run_dir))
    set_seed(cfg.seed)
    task = _task(cfg, run_dir, accelerator.device)
    model = task.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup_steps)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay) if cfg.phase != "vae" else None
    model, opt, lr_sched = accelerator.prepare(model, opt, lr_sched)
    start = 0
    if (last := checkpoint.latest(ckpt_dir, set_aside=accelerator.is_main_process)) is not None:
        start = _load_checkpoint(last, accelerator.unwrap_model(model), opt, lr_sched, ema)
        accelerator.print(f"resuming {cfg.phase} from step {start}")
    elif cfg.phase in HANDOFF_PHASES and cfg.uses_handoff and Path(cfg.handoff).exists():
        start = _load_handoff(cfg.handoff, accelerator.unwrap_model(model), ema)
        lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup_steps // 4)
        accelerator.print(f"resuming {cfg.phase} from the handoff {cfg.handoff} at step {start} "
                          "(fresh optimizer state)")
    accelerator.init_trackers(f"teacher-{cfg.phase}")
    began = time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"teacher {cfg.phase}",
               disable=not accelerator.is_local_main_process)
    step, avg = start, None
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # resume-stable batches
        loss, logs = task.loss(model, g)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; last good checkpoint kept")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
        if (step + 1) % cfg.log_every == 0:
            accelerator.log({"loss": loss.item(), "lr": lr_sched.get_last_lr()[0], **logs}, step=step + 1)
        out_of_time = cfg.max_minutes and time.time() - began > cfg.max_minutes * 60
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
            _save_checkpoint(accelerator, ckpt_dir, step + 1, cfg.keep_checkpoints,
                             accelerator.unwrap_model(model), opt, lr_sched, ema)
            _save_weights(accelerator.unwrap_model(model), ema, run_dir, cfg.phase, task)
            if out_of_time:
                break
    if cfg.phase in HANDOFF_PHASES and cfg.uses_handoff and accelerator.is_main_process:
        _save_handoff(cfg.handoff, accelerator.unwrap_model(model), ema, step + 1, HANDOFF_DTYPE[cfg.phase])
    accelerator.end_training()
    return run_dir


def _task(cfg: TeacherConfig, run_dir: Path, device):
    if cfg.phase == "vae":
        return _VaeTask(cfg, device)
    if cfg.phase == "controlnet":
        from hypersd.teacher.controlnet import ControlNetTask
        return ControlNetTask(cfg, run_dir, device)
    if cfg.phase == "flow":
        from hypersd.teacher.flow import FlowTask
        return FlowTask(cfg, run_dir, device)
    return _UnetTask(cfg, run_dir, device)


def _save_handoff(path: str, model, ema, step: int, dtype=torch.float32) -> None:
    """Model and EMA weights (no optimizer state): small enough to keep in git."""
    tensors = {f"model.{k}": v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{i}": p.detach().to(dtype).contiguous() for i, p in enumerate(ema.shadow_params)})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"step": str(step), "ema_step": str(ema.optimization_step)})


def handoff_from_checkpoint(run_dir: str | Path, path: str, phase: str = "unet") -> int:
    """Write the handoff file from the latest checkpoint of ``phase`` ("unet" or "flow"), e.g.
    after stopping a run."""
    if init_from := run_init(run_dir):
        raise UserError(f"{run_dir} is a fine-tune of {init_from!r}: the handoff keeps the bundled "
                        "teacher's own training, not a fine-tune's")
    last = checkpoint.latest(Path(run_dir) / f"{phase}-checkpoints")
    if last is None:
        raise UserError(f"no {phase} checkpoint under {run_dir}")
    if phase == "flow":
        from hypersd.models.mini_flow import build_transformer
        model = build_transformer()
    else:
        model = build_unet()
    model.load_state_dict(last.state("model"))
    ema = EMAModel(model.parameters())
    ema.load_state_dict(last.state("ema"))
    _save_handoff(path, model, ema, last.step, HANDOFF_DTYPE[phase])
    return last.step


def _load_handoff(path: str, model, ema) -> int:
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        model.load_state_dict({k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")})
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(f.get_tensor(f"ema.{i}"))
    ema.optimization_step = int(meta["ema_step"])
    return int(meta["step"])


def _save_weights(model, ema, run_dir: Path, phase: str, task) -> None:
    """The phase's trained part as a diffusers folder in run_dir (the EMA weights, if kept)."""
    if phase == "vae":
        task.finish(model, run_dir)
        model.train()
        return
    net = copy.deepcopy(model).eval()
    ema.copy_to(net.parameters())
    with atomic_path(run_dir / phase) as tmp:
        net.save_pretrained(tmp)


def vae_folder(run_dir: str | Path, handoff: str | None) -> Path:
    """The trained VAE: run_dir's own, else the one kept beside the handoff file."""
    vae_dir = Path(run_dir) / "vae"
    if not (vae_dir / "config.json").exists() and handoff:
        vae_dir = Path(handoff).with_name("teacher-vae")
    return vae_dir


def export_pipeline(run_dir: str | Path, out_dir: str | Path = MINI_DIR,
                    handoff: str | None = "train-state/teacher-unet.safetensors") -> Path:
    """Write run_dir's EMA UNet and the VAE it was trained on as a diffusers
    StableDiffusionPipeline folder in fp16: a fine-tune's is its init's VAE; a run from
    scratch's is its own, else the one beside ``handoff``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if init_from := run_init(run_dir):
        init = init_folder(init_from)
        if out_dir.resolve() == init.resolve():
            raise UserError(f"{run_dir} was fine-tuned from {init}: exporting there would overwrite it; "
                            "pass another folder")
        vae_dir = init / "vae"
    else:
        vae_dir = vae_folder(run_dir, handoff)
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(run_dir / "unet", use_safetensors=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    style = _init_record(run_dir).get("data", "noto")  # the bundled teacher's own run: noto
    with atomic_path(out_dir) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True, variant=None)
        if style != "noto":  # weights from another style's images keep that style's notice
            (tmp / "NOTICE").write_text(weights_notice(style))
    return out_dir

