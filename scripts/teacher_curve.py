"""Plot the teacher UNet's training loss from its TensorBoard logs (benchmarks/teacher-curve.*).

Points already in benchmarks/teacher-curve.json (earlier machines' logs) are kept.
"""
import glob
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = sys.argv[1] if len(sys.argv) > 1 else "runs/teacher"
points = {}
try:
    old = json.load(open("benchmarks/teacher-curve.json"))
    points.update(zip(old["steps"], old["loss"]))
except FileNotFoundError:
    pass
for path in sorted(glob.glob(f"{run}/teacher-unet/events*")):
    ea = EventAccumulator(path)
    ea.Reload()
    points.update({e.step: e.value for e in ea.Scalars("loss")})
steps = np.array(sorted(points))
loss = np.array([points[s] for s in steps])
window = 10
smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
plt.figure(figsize=(6, 3.2))
plt.plot(steps, loss, alpha=0.3, label="loss (every 50 steps)")
plt.plot(steps[window - 1:], smooth, label=f"mean of {window}")
plt.yscale("log")
plt.xlabel("UNet step (batch 64)")
plt.ylabel("min-SNR-5 weighted ε MSE")
plt.legend()
plt.tight_layout()
plt.savefig("benchmarks/teacher-curve.png", dpi=110)
json.dump({"steps": steps.tolist(), "loss": loss.tolist()}, open("benchmarks/teacher-curve.json", "w"))
print(f"{len(steps)} points, last step {steps[-1]}, last mean loss {smooth[-1]:.4f}")
