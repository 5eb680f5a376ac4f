"""The one training loop: every method and every stage of a run goes through ``distill``.

Per stage: the student starts from the previous stage (or a fresh LoRA, or a file), the EMA
target from the student; each step draws a batch with a generator seeded by (seed, stage,
step), so a resumed run replays the same examples. Checkpoints (student, target, optimizer,
step) are written atomically every ``checkpoint_every`` steps; a finished stage exports its
LoRA. A non-finite loss stops the run and keeps the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig
from tqdm.auto import tqdm

from hypersd.distill.adversarial import AdversarialConfig, Discriminator
from hypersd.distill.data import emoji32_examples
from hypersd.distill.denoiser import Denoiser
from hypersd.distill.export import save_lora
from hypersd.distill.methods import METHODS, recommended_recipe
from hypersd.distill.networks import Networks
from hypersd.distill.recipe import RunConfig
from hypersd.errors import UserError


def _generator(seed: int, stage: int, step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 10_000_019 + step) * 101 + rank)


def _average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Data parallelism: each process's gradients averaged over processes in one all-reduce."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def replica_checksum(nets: Networks) -> float:
    """A number that differs between processes whose students have drifted apart."""
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(nets.trainable())))


def _lora_config(run: RunConfig) -> LoraConfig | None:
    if run.full_unet:
        return None
    return LoraConfig(r=run.lora.rank, lora_alpha=run.lora.alpha, target_modules=list(run.lora.targets),
                      init_lora_weights=True)


def _save_checkpoint(path: Path, nets: Networks, opt, step: int, critic=None) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    state = {"student": nets.student_state(), "target": nets.target_state(),
             "optimizer": opt.state_dict(), "step": step}
    if critic is not None:
        state["critic"] = critic[0].heads.state_dict()
        state["critic_optimizer"] = critic[1].state_dict()
    torch.save(state, tmp)
    os.replace(tmp, path)


def _critic(stage, nets: Networks, examples):
    """A fresh discriminator (re-initialised every stage, as Lightning does) and its optimizer."""
    if stage.adv_weight <= 0:
        return None
    probe = examples.sample(2, torch.Generator().manual_seed(0))
    disc = Discriminator(nets.teacher_features, (probe.latents, torch.tensor([999, 0]), probe.cond),
                         AdversarialConfig(loss=stage.adv_loss, conditional=stage.adv_conditional))
    return disc, torch.optim.AdamW(disc.heads.parameters(), lr=stage.critic_lr, betas=(0.0, 0.99))


def distill(run: RunConfig, examples=None, pipe=None) -> list[Path]:
    """Run every stage of ``run`` (resuming finished and interrupted stages); return the LoRAs.

    ``pipe`` defaults to ``run.model`` loaded by hypersd; ``examples`` to its emoji32 split.
    """
    from hypersd.generate.loading import load_pipeline

    if run.threads:
        torch.set_num_threads(run.threads)
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),  # cpu: gloo across CPU processes
                              mixed_precision=run.mixed_precision, log_with="tensorboard",
                              project_dir=str(out), gradient_accumulation_steps=run.gradient_accumulation)
    pipe = pipe or load_pipeline(run.model, dtype=torch.float32, device=str(accelerator.device))
    examples = examples or emoji32_examples(pipe, run.split)
    alphas = pipe.scheduler.alphas_cumprod.double()
    prediction_type = pipe.scheduler.config.prediction_type
    lora = _lora_config(run)
    if run.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    set_seed(run.seed)  # the LoRA's random A matrices: the same on every process
    nets = Networks(pipe.unet, lora)
    accelerator.init_trackers("distill")
    exported, previous = [], None
    for index, stage in enumerate(run.stages):
        final = out / f"{stage.name}.safetensors"
        ckpt = out / f"{stage.name}.ckpt"
        loss_fn = METHODS[stage.method](stage, run.offset_noise)
        opt = torch.optim.AdamW(nets.trainable(), lr=stage.lr, weight_decay=0.0)
        critic = _critic(stage, nets, examples)
        start = 0
        if final.exists() and ckpt.exists():  # a finished stage: restore its weights, move on
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            nets.load_states(state["student"], state["target"])
            exported.append(final)
            previous = state["student"]
            continue
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            nets.load_states(state["student"], state["target"])
            opt.load_state_dict(state["optimizer"])
            if critic is not None:
                critic[0].heads.load_state_dict(state["critic"])
                critic[1].load_state_dict(state["critic_optimizer"])
            start = state["step"]
            accelerator.print(f"resuming stage {stage.name} at step {start}")
        else:
            _init_student(nets, stage.start_from, previous)
        student = Denoiser(nets.student, alphas, prediction_type)
        teacher = Denoiser(nets.teacher, alphas, prediction_type)
        target = Denoiser(nets.target, alphas, prediction_type)
        bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=stage.name,
                   disable=not accelerator.is_local_main_process)
        began, avg = time.time(), None
        for step in bar:
            g = _generator(run.seed, index, step, accelerator.process_index)
            batch = examples.sample(stage.batch_size, g)
            with accelerator.autocast():
                terms = loss_fn.terms(student, teacher, target, batch, g)
                loss = stage.mse_weight * terms.per_sample.mean()
                logs = dict(terms.logs, consistency=terms.per_sample.mean().item())
                if critic is not None:  # generator phase: the student's candidate should look real
                    adv = critic[0].generator_loss(terms.prediction, terms.t_end, terms.x_t, terms.t,
                                                   batch.cond).mean()
                    loss = loss + stage.adv_weight * adv
                    logs["adversarial"] = adv.item()
            if not math.isfinite(loss.item()):
                raise UserError(f"stage {stage.name}: loss is {loss.item()} at step {step}; the last "
                                f"good checkpoint is {ckpt if ckpt.exists() else 'none'} (lower lr?)")
            accelerator.backward(loss)
            _average_gradients(nets.trainable(), accelerator)
            torch.nn.utils.clip_grad_norm_(nets.trainable(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            nets.update_target(stage.ema_decay)
            if critic is not None:  # critic phase: only the heads learn, from detached candidates
                disc, critic_opt = critic
                critic_opt.zero_grad(set_to_none=True)
                with accelerator.autocast():
                    c_loss = disc.critic_loss(terms.target, terms.prediction, terms.t_end, terms.x_t,
                                              terms.t, batch.cond).mean()
                c_loss.backward()
                _average_gradients(list(disc.heads.parameters()), accelerator)
                critic_opt.step()
                logs["critic"] = c_loss.item()
            avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
            bar.set_postfix(loss=f"{avg:.4g}")
            if (step + 1) % run.log_every == 0:
                accelerator.log({f"{stage.name}/loss": loss.item(),
                                 **{f"{stage.name}/{k}": v for k, v in logs.items()}}, step=step + 1)
            if ((step + 1) % run.checkpoint_every == 0 or step + 1 == stage.steps) and accelerator.is_main_process:
                _save_checkpoint(ckpt, nets, opt, step + 1, critic)
        info = {"base_model": run.model, "method": stage.method, "segments": stage.segments,
                "steps_served": "1-8", "recipe": recommended_recipe(stage),
                "stage": stage.name, "train_steps": stage.steps,
                "mixed_precision": run.mixed_precision, "seconds": round(time.time() - began, 1)}
        previous = nets.student_state()
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            exported.append(final)
            continue
        if lora is not None:
            exported.append(save_lora(previous, lora, final, info, sdxl=hasattr(pipe, "text_encoder_2"))[0])
        else:
            pipe.unet.save_pretrained(out / stage.name)
            final.touch()
            exported.append(out / stage.name)
    if accelerator.num_processes > 1:  # every process reports its replica, so drift is visible
        sums = accelerator.gather(torch.tensor([replica_checksum(nets)], dtype=torch.float64))
        if accelerator.is_main_process:
            (out / "replicas.json").write_text(json.dumps({"checksums": sums.tolist()}) + "\n")
    accelerator.end_training()
    return exported


def _init_student(nets: Networks, start_from: str, previous: dict | None) -> None:
    if start_from == "previous" and previous is not None:
        nets.load_states(previous)
    elif start_from not in ("previous", "base"):
        from safetensors.torch import load_file
        if not Path(start_from).exists():
            raise UserError(f"cannot start from {start_from}: no such LoRA file")
        state = {k.removeprefix("unet."): v for k, v in load_file(start_from).items()}
        try:
            nets.load_states(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"cannot start from {start_from}: {str(e).splitlines()[0][:200]}") from e
    else:  # a fresh LoRA: B = 0, so the student starts as the teacher
        nets.load_states({k: torch.zeros_like(v) if "lora_B" in k else v
                          for k, v in nets.student_state().items()} if nets.lora is not None
                         else nets.teacher.state_dict())
