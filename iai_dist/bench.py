"""Benchmarks: each prints a markdown table and writes JSON + markdown under --out (bench_results/).

    python -m iai_dist.bench quality    [--minutes M] [--settings a,b] : error vs baselines after M minutes of training
    python -m iai_dist.bench learner    [--tasks 256] [--device D]     : learner steps/s, episodes/s, refinement steps/s
    python -m iai_dist.bench scaling    [--points 100,1000,10000]      : K-step refinement vs the one-step model
    python -m iai_dist.bench transfer   [--minutes M] [--pairs digits:fashion_mnist,...] : image refiners on their
                                        own test split and on another data set, per regime, vs one-step and Adam
    python -m iai_dist.bench sampler    [--presets digits,...]         : image episodes/s alone vs the learner's rate
    python -m iai_dist.bench throughput [--preset P] [--minutes M]     : Ray service: in process vs 1+1 vs 2+2 workers
    python -m iai_dist.bench memory     [--at 5,30]                    : Ray service: RSS of driver and workers over a run
The first five need torch only (they run on the GPU machine without Ray); the last two run the Ray service.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from iai_dist import baselines
from iai_dist.config import ConfigError, ExperimentConfig, load_config
from iai_dist.evaluate import _fmt, evaluate, format_table
from iai_dist.refiner import IterativeModel
from iai_dist.rollout import refine
from iai_dist.tasks import build_family
from iai_dist.train import one_step_config
from iai_dist.training import Trainer, resolve_device

# name -> (preset, overrides). The linreg-paper rows are the DESIGN.md reference setting.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "linreg-paper/parametric/obs": ("linreg-paper", ["regime.signal=obs"]),
    "linreg-paper/parametric/grad": ("linreg-paper", ["regime.signal=grad"]),
    "linreg-paper/parametric/obs+grad": ("linreg-paper", []),
    "linreg-paper/explicit/obs+grad": ("linreg-paper", ["regime.kind=explicit"]),
    # implicit: every query point is a token, so train and score on 16 query points per episode (not 100)
    "linreg-paper/implicit/obs": ("linreg-paper", ["regime.kind=implicit", "regime.signal=obs", "task.query_size=16"]),
    "linclass/parametric/obs+grad": ("linclass", []),
    "mlpreg/parametric/obs+grad": ("mlpreg", []),
}
# DESIGN.md reference figures (error % after mini-batches 1 / 5 / 10), for the linreg-paper rows.
REFERENCE = {
    "bayes-optimal limit": {1: 49.7, 2: 2.9, 5: 0.085, 10: 0.063},
    "paper, parametric obs": {1: 51.0, 10: 0.5},
    "naive refiner, H200 270 s, obs+grad": {1: 59.0, 5: 10.0, 10: 1.5},
    "naive refiner, 2-core CPU 19 min, obs+grad": {1: 65.0, 2: 44.0, 5: 13.0, 10: 2.2},
}


def write(out: Path, name: str, payload: dict, table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    payload["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cuda": gpu}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / f'{name}.json'} and {out / f'{name}.md'}")


def train_for(cfg: ExperimentConfig, minutes: float, label: str) -> tuple[Trainer, float]:
    """Train for a wall-clock budget. The number of learner steps is fixed up front from the measured
    step time, so warmup and cosine decay run their full course within the budget."""
    probe = Trainer(cfg)
    probe.train_step()
    t0, n = time.perf_counter(), 3
    for _ in range(n):
        probe.train_step()
    per_step = (time.perf_counter() - t0) / n
    steps = max(10, int(minutes * 60 / per_step))
    cfg = cfg.with_overrides({"train.max_steps": steps, "train.warmup_steps": min(cfg.train.warmup_steps, steps // 10)})
    trainer = Trainer(cfg)
    start, last = time.perf_counter(), time.perf_counter()
    while trainer.step < steps:
        stats = trainer.train_step()
        if time.perf_counter() - last > 30 or trainer.step == steps:
            last = time.perf_counter()
            errs = " ".join(f"{e:.3g}" for e in stats.step_errors)
            print(f"  [{label}] step {trainer.step}/{steps} {last - start:5.0f}s  query error by step: {errs}", flush=True)
    return trainer, time.perf_counter() - start


def quality(args) -> None:
    names = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"error: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    results, tables = {}, []
    for name in names:
        preset, overrides = SETTINGS[name]
        cfg = load_config(preset, overrides=[*overrides, f"eval.episodes={args.episodes}"])
        print(f"== {name}: training {args.minutes} min (+{args.one_step_minutes} min for the one-step model)", flush=True)
        trainer, seconds = train_for(cfg, args.minutes, name)
        one = None
        if args.one_step_minutes > 0:
            one = train_for(one_step_config(trainer.cfg), args.one_step_minutes, name + " one-step")[0].model
        summary = evaluate(trainer.model, trainer.cfg, one, trainer.device)
        k = cfg.task.steps
        fam = trainer.family
        target = summary["per_step"]["refiner"][k]
        ep = fam.sample(cfg.eval.seed, torch.arange(min(256, args.episodes)), device=trainer.device, split="test")
        fn = baselines.natural_fn(fam, cfg.regime.hidden)
        grid = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
        reach = baselines.steps_to_reach(fam, fn, ep, target, "adam", grid, args.adam_max_steps)
        summary["adam_steps_to_reach_refiner"] = {"target_error": target, "steps": reach and reach[0],
                                                  "lr": reach and reach[1], "max_steps": args.adam_max_steps}
        summary["train"] = {"seconds": seconds, "steps": trainer.step, "episodes": trainer.cursor}
        results[name] = summary
        adam_k = summary["per_step"]["adam"][k]
        tables.append(f"### {name}\ntrained {seconds / 60:.1f} min, {trainer.step} learner steps, "
                      f"{trainer.cursor} episodes\n\n{format_table(summary)}\n\n"
                      f"refiner at step {k}: {target:.3g}% vs Adam (best grid lr) at step {k}: {adam_k:.3g}% "
                      f"({adam_k / max(target, 1e-12):.1f}x); Adam cycling over the same {k} mini-batches reaches "
                      f"{target:.3g}% after {reach[0] if reach else f'more than {args.adam_max_steps}'} steps")
        print(tables[-1], flush=True)
    ref = "\n".join(f"| {k} | " + " | ".join(str(v.get(s, "")) for s in (1, 2, 5, 10)) + " |" for k, v in REFERENCE.items())
    table = ("\n\n".join(tables) + "\n\n### DESIGN.md reference (linreg-paper)\n| | step 1 | step 2 | step 5 | step 10 |\n"
             "|---|---|---|---|---|\n" + ref)
    write(Path(args.out), "quality", {"minutes": args.minutes, "settings": results, "reference": REFERENCE}, table)


def learner(args) -> None:
    """Learner steps on linreg-paper at --tasks tasks per step; eager vs torch.compile where asked."""
    device = resolve_device(args.device)
    rows = []
    for name in args.settings.split(","):
        preset, overrides = SETTINGS[name]
        for compiled in ([False, True] if args.compile else [False]):
            sets = [f"train.tasks_per_batch={args.tasks}", f"train.compile={compiled}", "train.max_steps=100000"]
            cfg = load_config(preset, overrides=[*overrides, *sets])
            trainer = Trainer(cfg, device)
            for _ in range(args.warmup):
                trainer.train_step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            _sync(device)
            sec = (time.perf_counter() - t0) / args.steps
            k = cfg.task.steps
            rows.append({"setting": name, "compile": compiled, "device": str(device), "tasks": args.tasks,
                         "learner_steps_per_s": 1 / sec, "episodes_per_s": args.tasks / sec,
                         "refinement_steps_per_s": args.tasks * k / sec})
    head = "| setting | device | compile | tasks/step | learner steps/s | episodes/s | refinement steps/s |\n|---|---|---|---|---|---|---|"
    lines = [f"| {r['setting']} | {r['device']} | {r['compile']} | {r['tasks']} | {r['learner_steps_per_s']:.2f} | "
             f"{r['episodes_per_s']:.0f} | {r['refinement_steps_per_s']:.0f} |" for r in rows]
    write(Path(args.out), f"learner-{device.type}", {"rows": rows}, "\n".join([head, *lines]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


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
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    refine(model, ep)
    _sync(dev)
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


# -- image tasks: cross-dataset transfer (the paper's MNIST -> FashionMNIST result) and the sampler's speed --
TRANSFER_REGIMES: dict[str, list[str]] = {
    "parametric obs+grad (softmax-linear)": [],
    "explicit obs+grad": ["regime.kind=explicit"],
    "implicit obs": ["regime.kind=implicit", "regime.signal=obs"],
}
PAPER_TRANSFER = ("paper: implicit regime trained on MNIST tasks, evaluated on FashionMNIST tasks: "
                  "31.9% error after 1 step, 24.2% after 10")


def retarget(model: IterativeModel, cfg: ExperimentConfig, family: str, device) -> tuple[IterativeModel, ExperimentConfig]:
    """The same weights on another task family (same features and N): what `evaluate --set task.family=` does."""
    cfg = cfg.with_overrides({"task.family": family})
    moved = IterativeModel(cfg, build_family(cfg.task))
    moved.load_state_dict(model.state_dict())
    return moved.to(device).eval(), cfg


def sampler_rate(family, tasks: int, seconds: float = 3.0, split: str = "train") -> float:
    """Episodes/s of family.sample alone (batches of `tasks` episodes, fresh indices every call)."""
    family.sample(0, torch.arange(tasks), split=split)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += 1
        family.sample(0, torch.arange(n * tasks, (n + 1) * tasks), split=split)
    return n * tasks / (time.perf_counter() - start)


def learner_rate(cfg: ExperimentConfig, steps: int) -> tuple[float, float]:
    """(episodes/s the learner consumes, the share of its step time spent sampling) over `steps` learner steps."""
    trainer = Trainer(cfg)
    trainer.train_step()
    sample, sampling = trainer.family.sample, [0.0]

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = sample(*a, **k)
        sampling[0] += time.perf_counter() - t0
        return out

    trainer.family.sample = timed
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    total = time.perf_counter() - start
    return steps * cfg.train.tasks_per_batch / total, sampling[0] / total


def transfer(args) -> None:
    """Per PRESET:FAMILY pair and regime: train on the preset's family, evaluate on its test split and on FAMILY's."""
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    names = list(TRANSFER_REGIMES) if args.regimes == "all" else args.regimes.split(",")
    regimes = [next((r for r in TRANSFER_REGIMES if r.split()[0] == n), n) for n in names]
    cfgs = {}
    try:  # every config and data set is checked before any training
        bad = [":".join(p) for p in pairs if len(p) != 2]
        if bad:
            raise ConfigError(f"--pairs: expected PRESET:FAMILY such as digits:fashion_mnist (got {bad[0]})")
        unknown = [r for r in regimes if r not in TRANSFER_REGIMES]
        if unknown:
            raise ConfigError(f"--regimes: unknown {', '.join(unknown)}; known: parametric, explicit, implicit")
        for preset, other in pairs:
            for regime in regimes:
                sets = [*TRANSFER_REGIMES[regime], f"eval.episodes={args.episodes}", *args.overrides]
                cfg = load_config(preset, overrides=sets)
                build_family(cfg.task)
                build_family(cfg.with_overrides({"task.family": other}).task)
                cfgs[preset, regime] = cfg
    except ConfigError as exc:
        sys.exit(f"error: {exc}")

    results, sections, consumed = {}, [], {}
    for preset, other in pairs:
        cfg0 = cfgs[preset, regimes[0]]
        own, k = cfg0.task.family, cfg0.task.steps
        rows, res = [], {}
        for regime in regimes:
            cfg, label = cfgs[preset, regime], f"{preset} {regime.split()[0]}"
            print(f"== {preset} -> {other}, {regime}: training {args.minutes} min "
                  f"(+{args.one_step_minutes} min for the one-step model)", flush=True)
            trainer, seconds = train_for(cfg, args.minutes, label)
            one = one_cfg = None
            if args.one_step_minutes > 0:
                one_trainer = train_for(one_step_config(trainer.cfg), args.one_step_minutes, label + " one-step")[0]
                one, one_cfg = one_trainer.model, one_trainer.cfg
            dev = trainer.device
            on_own = evaluate(trainer.model, trainer.cfg, one, dev)
            model_x, cfg_x = retarget(trainer.model, trainer.cfg, other, dev)
            one_x = None if one is None else retarget(one, one_cfg, other, dev)[0]
            on_other = evaluate(model_x, cfg_x, one_x, dev)
            rate = trainer.cursor / seconds
            consumed.setdefault(own, {})[regime] = rate
            res[regime] = {"own": on_own, "other": on_other, "train": {
                "seconds": seconds, "steps": trainer.step, "episodes": trainer.cursor, "episodes_per_s": rate}}
            rows.append((regime, on_own, on_other))
            print(_transfer_row(regime, on_own, on_other, "refiner"), flush=True)

        steps = " | ".join(f"step {s}" for s in _transfer_steps(k))
        table = [f"| method | {own} (own test): {steps} | all at once | {other}: {steps} | all at once |",
                 "|---" * (3 + 2 * len(_transfer_steps(k))) + "|"]
        table += [_transfer_row(regime, a, b, "refiner") for regime, a, b in rows]
        table += [_transfer_row(f"one-step model, {regime.split()[0]}", a, b, "one_step")
                  for regime, a, b in rows if "one_step" in a["at_once"]]
        _, a, b = rows[0]  # the baselines ran on the very same episodes for every regime
        table += [_transfer_row(f"adam, same steps (lr {a['lr']['adam']:g} / {b['lr']['adam']:g})", a, b, "adam"),
                  _transfer_row("full fit (L-BFGS on all K*B points)", a, b, "full_fit")]
        falls = [r for r, _, b in rows if b["per_step"]["refiner"][k] < b["per_step"]["refiner"][1]]
        best = min(rows, key=lambda r: r[2]["per_step"]["refiner"][k])[0]
        im = cfg0.task.image
        head = (f"### trained on {own} (preset {preset}), evaluated on {own} and on {other}\n"
                f"{cfg0.task.num_classes}-way, {im.size}x{im.size} images, K={k}, B={cfg0.task.batch_size}, "
                f"{args.episodes} held-out test-split episodes; {args.minutes} min of training per regime, "
                f"{args.one_step_minutes} min per one-step model; classification error %\n")
        note = (f"\nerror on {other} falls from step 1 to step {k} for: {', '.join(falls) or 'none'}; "
                f"lowest error on {other} after {k} steps: {best}")
        sections.append(head + "\n" + "\n".join(table) + note)
        results[f"{preset}:{other}"] = {"own": own, "other": other, "regimes": res,
                                        "falls_on_other": falls, "best_on_other": best}
        print(sections[-1], flush=True)

    alone = {}
    for preset, _ in pairs:
        cfg = cfgs[preset, regimes[0]]
        alone[cfg.task.family] = sampler_rate(build_family(cfg.task), cfg.train.tasks_per_batch, args.sampler_seconds)
    lines = ["| data set | image sampler alone | " + " | ".join(f"learner, {r.split()[0]}" for r in regimes) + " |",
             "|---" * (2 + len(regimes)) + "|"]
    for fam, rate in alone.items():
        lines.append(f"| {fam} | {rate:.0f} | "
                     + " | ".join(f"{consumed.get(fam, {}).get(r, float('nan')):.0f}" for r in regimes) + " |")
    table = ("\n\n".join(sections) + f"\n\n{PAPER_TRANSFER}\n\n### episodes/s: the image sampler alone vs what the "
             "learner consumed in the runs above (the same process, one after the other)\n" + "\n".join(lines))
    write(Path(args.out), "transfer", {"minutes": args.minutes, "one_step_minutes": args.one_step_minutes,
                                       "pairs": results, "sampler_episodes_per_s": alone,
                                       "learner_episodes_per_s": consumed, "paper": PAPER_TRANSFER}, table)


def _transfer_steps(k: int) -> list[int]:
    return sorted({s for s in (1, 5, k) if s <= k})


def _transfer_row(label: str, own: dict, other: dict, method: str) -> str:
    def cells(summary: dict) -> list[str]:
        steps = _transfer_steps(summary["K"])
        if method in summary["per_step"]:
            return [_fmt(summary["per_step"][method][s]) for s in steps] + [""]
        return [""] * len(steps) + [_fmt(summary["at_once"][method])]

    return f"| {label} | " + " | ".join(cells(own) + cells(other)) + " |"


def sampler(args) -> None:
    """Per image preset and regime: episodes/s of the sampler alone beside the learner's consumption."""
    rows = []
    for preset in args.presets.split(","):
        try:
            cfg = load_config(preset, overrides=args.overrides)
            fam = build_family(cfg.task)
        except ConfigError as exc:
            sys.exit(f"error: {exc}")
        alone = sampler_rate(fam, cfg.train.tasks_per_batch, args.seconds)
        for regime, sets in TRANSFER_REGIMES.items():
            regime_cfg = cfg.with_overrides(dict(s.split("=", 1) for s in sets))
            rate, share = learner_rate(regime_cfg, args.steps)
            rows.append({"preset": preset, "family": cfg.task.family, "regime": regime,
                         "tasks_per_batch": cfg.train.tasks_per_batch, "sampler_episodes_per_s": alone,
                         "learner_episodes_per_s": rate, "sampling_share_of_learner_step": share})
            print(rows[-1], flush=True)
    head = ("| preset | regime | image sampler alone (episodes/s) | learner consumes (episodes/s) | ratio | "
            "sampling's share of a learner step |\n|---|---|---|---|---|---|")
    lines = [f"| {r['preset']} | {r['regime']} | {r['sampler_episodes_per_s']:.0f} | {r['learner_episodes_per_s']:.0f} "
             f"| {r['sampler_episodes_per_s'] / r['learner_episodes_per_s']:.0f}x "
             f"| {100 * r['sampling_share_of_learner_step']:.1f}% |" for r in rows]
    write(Path(args.out), "sampler", {"rows": rows}, "\n".join([head, *lines]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iai_dist.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--minutes", type=float, default=2.0, help="training budget per setting (wall clock)")
    q.add_argument("--one-step-minutes", type=float, default=None, help="budget of the one-step model (default: --minutes)")
    q.add_argument("--settings", default="all", help=f"comma-separated, from: {', '.join(SETTINGS)}")
    q.add_argument("--episodes", type=int, default=1024)
    q.add_argument("--adam-max-steps", type=int, default=3000)
    t = sub.add_parser("learner")
    t.add_argument("--settings", default="linreg-paper/parametric/obs+grad")
    t.add_argument("--tasks", type=int, default=256)
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--device", default="auto")
    t.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    s = sub.add_parser("scaling")
    s.add_argument("--points", default="100,1000,10000")
    s.add_argument("--tasks", type=int, default=8)
    s.add_argument("--device", default="auto")
    tr = sub.add_parser("transfer")
    tr.add_argument("--minutes", type=float, default=3.0, help="training budget per regime (wall clock)")
    tr.add_argument("--one-step-minutes", type=float, default=None, help="per one-step model (default: --minutes / 2)")
    tr.add_argument("--pairs", default="digits:fashion_mnist,fashion-mnist-8x8:digits",
                    help="PRESET:FAMILY,...: train on the preset, evaluate on its test split and on FAMILY's")
    tr.add_argument("--regimes", default="all", help="comma-separated from parametric, explicit, implicit")
    tr.add_argument("--episodes", type=int, default=1024)
    tr.add_argument("--sampler-seconds", type=float, default=3.0, help="time the sampler alone this long")
    sa = sub.add_parser("sampler")
    sa.add_argument("--presets", default="digits,fashion-mnist-8x8,fashion-mnist")
    sa.add_argument("--steps", type=int, default=5, help="learner steps timed per regime")
    sa.add_argument("--seconds", type=float, default=3.0, help="time the sampler alone this long")
    for p in (tr, sa):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("throughput")
    r.add_argument("--preset", default="linreg-paper")
    r.add_argument("--steps", type=int, default=80, help="learner steps per mode for the rates")
    r.add_argument("--minutes", type=float, default=3.0, help="equal wall-clock budget of (a) and (c); 0 skips")
    r.add_argument("--episodes", type=int, default=1024, help="held-out episodes scoring (a) and (c)")
    m = sub.add_parser("memory")
    m.add_argument("--preset", default="default")
    m.add_argument("--at", default="5,30", help="minutes at which to report")
    m.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    for p in (q, t, s, tr, sa, r, m):
        p.add_argument("--out", default="bench_results")
    one = sub.add_parser("_scaling_one")
    one.add_argument("mode")
    one.add_argument("points", type=int)
    one.add_argument("tasks", type=int)
    one.add_argument("device")
    args = parser.parse_args(argv)
    if args.bench == "_scaling_one":
        print(json.dumps(scaling_one(args.mode, args.points, args.tasks, args.device)))
        return
    if args.bench == "quality" and args.one_step_minutes is None:
        args.one_step_minutes = args.minutes
    if args.bench == "transfer" and args.one_step_minutes is None:
        args.one_step_minutes = args.minutes / 2
    if args.bench in ("throughput", "memory"):
        from iai_dist.service import bench as service_bench  # Ray only where the benchmark needs it

        getattr(service_bench, args.bench)(args)
        return
    {"quality": quality, "learner": learner, "scaling": scaling, "transfer": transfer, "sampler": sampler}[args.bench](args)


if __name__ == "__main__":
    main()
