"""`bench scaling`: K-step refinement vs the one-step model as the context grows; each point in a fresh process."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from iai_dist.bench import sync_device, write
from iai_dist.config import load_config
from iai_dist.devices import resolve_device
from iai_dist.refiner import IterativeModel
from iai_dist.rollout import refine
from iai_dist.tasks import build_family


def scaling_one(mode: str, points: int, tasks: int, device: str) -> dict:
    """One measurement in a fresh process: adapting to `points` context points, K-step vs one-step."""
    dev = resolve_device(device)
    base = load_config("linreg-paper")
    b = base.task.batch_size
    sets = ({"task.steps": points // b} if mode == "k-step" else {"task.steps": 1, "task.batch_size": points})
    cfg = base.with_overrides(sets)
    torch.manual_seed(0)
    model = IterativeModel(cfg, build_family(cfg.task)).to(dev)
    ep = model.family.sample(0, torch.arange(tasks), device=dev)
    refine(model, ep.tasks(slice(0, 1)))  # warm up kernels
    sync_device(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    refine(model, ep)
    sync_device(dev)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    return {"mode": mode, "points": points, "steps": cfg.task.steps, "batch": cfg.task.batch_size, "tasks": tasks,
            "seconds": seconds, "peak_bytes": peak, "device": str(dev)}


def scaling(args) -> None:
    rows = []
    for n in (int(p) for p in args.points.split(",")):
        for mode in ("k-step", "one-step"):
            cmd = [sys.executable, "-m", "iai_dist.bench", "_scaling_one", mode, str(n), str(args.tasks), args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"mode": mode, "points": n, "error": proc.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    head = ("| context points | mode | steps x batch | wall time (s) | peak memory (MiB) |\n|---|---|---|---|---|")
    lines = [f"| {r['points']} | {r['mode']} | "
             + (f"failed: {r['error']} | | |" if "error" in r else
                f"{r['steps']} x {r['batch']} | {r['seconds']:.3f} | {r['peak_bytes'] / 2**20:.1f} |") for r in rows]
    note = (f"\n{args.tasks} tasks at once, linreg-paper refiner (untrained: cost does not depend on the weights). "
            "CPU memory is the growth of the process's peak RSS during the adaptation.")
    write(Path(args.out), "scaling", {"rows": rows}, "\n".join([head, *lines]) + note)


def main(args) -> None:
    if args.bench == "_scaling_one":
        print(json.dumps(scaling_one(args.mode, args.points, args.tasks, args.device)))
    else:
        scaling(args)
