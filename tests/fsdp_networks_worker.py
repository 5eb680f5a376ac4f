"""Run by tests/test_networks_fsdp.py under torchrun (2 CPU processes, gloo): the networks'
weights read, averaged and loaded while a role is sharded by torch's FSDP."""

import json
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from hypersd.distill.networks import Networks
from hypersd.testing import tiny_sd15


def main(lora: bool, out: str) -> None:
    dist.init_process_group("gloo")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "conv1"]) if lora else None
    nets = Networks(tiny_sd15().unet, config)
    full_shapes = {k: list(v.shape) for k, v in nets.state("student").items()}
    wrapped = FSDP(nets.module("student"), device_id=torch.device("cpu"), use_orig_params=True)
    nets.use_wrapped("student", wrapped)
    opt = torch.optim.AdamW(nets.trainable("student"), lr=1e-2)
    g = torch.Generator().manual_seed(dist.get_rank())  # each process its own batch
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 300])
    nets.student(x, t, encoder_hidden_states=torch.randn(2, 4, 32, generator=g)).sample.pow(2).mean().backward()
    opt.step()
    nets.update_target(0.5)
    state, target = nets.state("student"), nets.state("target")
    nets.load_state("target", state)
    reloaded = nets.state("target")
    result = {"shapes_full": {k: list(v.shape) for k, v in state.items()} == full_shapes,
              "target_between": max(float((target[k] - state[k]).abs().max()) for k in state),
              "reload_equal": all(torch.equal(reloaded[k], state[k]) for k in state),
              "checksum": float(sum(v.double().sum() for v in state.values()))}
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] == "lora", sys.argv[2])
    # Leave without the interpreter's teardown: on some runs a background thread of the CPU
    # process group's FSDP state aborts the process at exit ("terminate called without an
    # active exception") after all the work above has finished and been written.
    sys.stdout.flush()
    os._exit(0)
