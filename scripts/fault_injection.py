"""Kill a distillation run with SIGKILL again and again, resume it until it finishes, and
compare what it exported with an uninterrupted run's, bit for bit.

    .venv/bin/python scripts/fault_injection.py                 # 20 kills (about 10 minutes)
    .venv/bin/python scripts/fault_injection.py --kills 3 --out /tmp/faults

The run is three stages on a tiny SD1.5-shaped model (so that a restart costs seconds): TSCD
with the adversarial term (a critic phase with its own optimizer), DMD with the anchor (the
fake score, a second adapter with its own optimizer, the teacher pool made at the stage's
start, the frozen starting student), then TSCD at one segment; a checkpoint after every step.
Each kill is one of:
  write     while a checkpoint is being written (as soon as the n-th temporary checkpoint
            folder of that process appears, n random in 1-3)
  boundary  right after a stage's LoRA appears, before the next stage has a checkpoint
  random    at a random moment up to 1.5 s after the process's first checkpoint
Writes benchmarks/fault-injection.md and .json: each kill, where it landed, the step the
next process resumed from, and whether every exported file is equal to the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["0-tscd-k2", "1-dmd-k1", "2-tscd-k1"]


def child(out: str) -> None:
    """One process of the run: build the tiny model and data, distil (resuming what is there)."""
    from hypersd.distill.data import LatentCaptions
    from hypersd.distill.loop import distill
    from hypersd.distill.recipe import LoraSettings, RunConfig, StageConfig
    from hypersd.testing import tiny_sd15

    torch.set_num_threads(1)
    pipe = tiny_sd15()
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = LatentCaptions(pipe, images, [f"emoji {i}" for i in range(8)])
    common = dict(batch_size=2, lr=1e-3)
    stages = [StageConfig.make("tscd", 100, segments=2, distance_weight=0.5,
                               adversarial={"weight": 0.5, "lr": 1e-3}, **common),
              StageConfig.make("dmd", 100, pool_size=4, pool_steps=2, update_ratio=2, anchor_weight=1.0, **common),
              StageConfig.make("tscd", 60, segments=1, **common)]
    run = RunConfig(stages=stages, output_dir=out, checkpoint_every=1, log_every=1000,
                    lora=LoraSettings(rank=4, alpha=4.0))
    distill(run, examples=data, pipe=pipe)
    print("finished", flush=True)


def _start(out: Path, log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, __file__, "--child", str(out)], stdout=log, stderr=log, env=env)


def _tmp_dirs(out: Path) -> set[str]:
    return {str(p) for p in out.glob("*.ckpt/.tmp-step-*")}


def _steps(out: Path) -> dict[str, int]:
    """Each stage's newest checkpoint step (by name; a crash may have left it broken)."""
    found = {}
    for stage in STAGES:
        dirs = [int(p.name[5:]) for p in (out / f"{stage}.ckpt").glob("step-*")]
        found[stage] = max(dirs, default=0)
    return found


def _finals(out: Path) -> int:
    return sum((out / f"{s}.safetensors").exists() for s in STAGES)


def _kill_when(proc: subprocess.Popen, kind: str, out: Path, rng: random.Random) -> str | None:
    """Wait for the kind's moment and SIGKILL ``proc``; return where it landed (None: it finished)."""
    start_steps, start_finals, seen = _steps(out), _finals(out), set()
    wanted, deadline = rng.randint(1, 3), None
    while proc.poll() is None:
        steps = _steps(out)
        trained = steps != start_steps
        if kind == "write":
            seen |= _tmp_dirs(out)
            if len(seen) >= wanted:
                time.sleep(rng.uniform(0, 0.02))
                return _landed(proc, out)
        elif kind == "boundary":
            if _finals(out) > start_finals:
                return _landed(proc, out)
        elif trained:
            deadline = deadline or time.time() + rng.uniform(0, 1.5)
            if time.time() >= deadline:
                return _landed(proc, out)
        time.sleep(0.002)
    return None


def _landed(proc: subprocess.Popen, out: Path) -> str:
    writing = bool(_tmp_dirs(out))
    stage = next((s for s in STAGES if not (out / f"{s}.safetensors").exists()), "the last export")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return f"in {stage}" + (", a checkpoint half written" if writing else "")


def _compare(a: Path, b: Path) -> list[str]:
    """The exported files whose tensors (bit for bit) or headers differ between two runs; the
    header's "seconds" (the stage's wall time) is the one field allowed to differ."""

    def header(f):
        meta = dict(f.metadata() or {})
        info = json.loads(meta.pop("hypersd", "{}"))
        info.pop("seconds", None)
        return meta, info

    differ = []
    for path in sorted(a.glob("*.safetensors")):
        other = b / path.name
        if not other.exists():
            differ.append(path.name)
            continue
        with safe_open(str(path), "pt") as x, safe_open(str(other), "pt") as y:
            same = header(x) == header(y) and sorted(x.keys()) == sorted(y.keys()) and all(
                _bits(x.get_tensor(k)) == _bits(y.get_tensor(k)) for k in x.keys())
        if not same:
            differ.append(path.name)
    return differ


def _bits(t) -> tuple:
    return str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "fault-injection"))
    parser.add_argument("--report", default=str(ROOT / "benchmarks" / "fault-injection"),
                        help="where the .md and .json report go ('' for none)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    work = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    began = time.time()
    with open(work / "log.txt", "w") as log:
        print("reference run (uninterrupted) ...", flush=True)
        if _start(work / "reference", log).wait() != 0:
            raise SystemExit(f"the reference run failed: see {work / 'log.txt'}")
        rows = _kill_repeatedly(work / "killed", args.kills, random.Random(args.seed), log)
        for _ in range(3):  # then resume until it finishes
            if _start(work / "killed", log).wait() == 0:
                break
        else:
            raise SystemExit(f"the killed run does not finish: see {work / 'log.txt'}")
    differ = _compare(work / "reference", work / "killed")
    summary = {"kills": len(rows), "planned": args.kills, "survived": len(rows) if not differ else 0,
               "files_compared": len(list((work / "reference").glob("*.safetensors"))),
               "files_differing": differ, "seconds": round(time.time() - began), "kill_log": rows}
    _report(summary, args.report)
    return 0 if not differ and len(rows) == args.kills else 1


def _kill_repeatedly(run: Path, kills: int, rng: random.Random, log) -> list[dict]:
    """Start the run and kill it ``kills`` times (2/5 in writes, up to 2 at stage boundaries,
    the rest at random moments); one row per kill."""
    kinds = ["write"] * (kills * 2 // 5) + ["boundary"] * min(2, kills // 5)
    kinds += ["random"] * (kills - len(kinds))
    rng.shuffle(kinds)
    rows = []
    for i, kind in enumerate(kinds, 1):
        landed = _kill_when(_start(run, log), kind, run, rng)
        if landed is None:
            print(f"the run finished before kill {i}: lengthen the stages", flush=True)
            break
        rows.append({"kill": i, "kind": kind, "landed": landed, "steps_after": _steps(run)})
        print(f"kill {i:2d} ({kind}): {landed}; newest checkpoints {rows[-1]['steps_after']}", flush=True)
    return rows


def _report(summary: dict, out: str) -> None:
    verdict = "all equal, bit for bit" if not summary["files_differing"] else \
        f"DIFFERENT: {', '.join(summary['files_differing'])}"
    lines = ["# Fault injection: `python scripts/fault_injection.py`", "",
             f"{summary['kills']} SIGKILLs of {summary['planned']} planned; after resuming to the end, "
             f"the {summary['files_compared']} exported files against an uninterrupted run's (tensors and "
             f"headers; the header's training time aside): {verdict}. "
             f"{summary['seconds']} s in all.", "", "| kill | aimed at | landed | newest checkpoints after |",
             "|---:|---|---|---|"]
    for row in summary["kill_log"]:
        after = ", ".join(f"{k}: {v}" for k, v in row["steps_after"].items())
        lines.append(f"| {row['kill']} | {row['kind']} | {row['landed']} | {after} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out + ".md").write_text(text)
        Path(out + ".json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
