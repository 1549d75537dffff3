"""Service benchmarks (python -m iai_dist.bench throughput | memory | sweep | chaos), side by side in one run.

throughput: the same model trained (a) in process, (b) 1 learner + 1 episode worker, (c) 2 + 2, (d) 1 + 3 on Ray:
transitions/s and learner idle % in the steady state, then each trained for the same wall-clock budget and
scored on the same held-out episodes (what staleness and the service's overheads cost).
memory: one long `python -m iai_dist.train` run, the resident memory of the driver and of each worker.
sweep: a grid space's trials as one Tune sweep vs the same trainings run one after another.
chaos: one job on a loopback two-node cluster, undisturbed and then with random kills of episode workers, the
weight board, learners and a whole node: faults survived, steps redone, time lost, final error vs undisturbed.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
import torch

from iai_dist.config import ExperimentConfig, load_config
from iai_dist.evaluate import load_for_eval
from iai_dist.learner import train_in_process
from iai_dist.rollout import refine
from iai_dist.service.fit import fit
from iai_dist.service.runtime import cpus_needed


def rate(cfg: ExperimentConfig, run_dir: Path) -> dict:
    """A training's steady-state figures (every log window after the first), in process or on Ray: the learner
    loop measures both the same way ('idle' in process is the time spent rolling out)."""
    if cfg.distributed.num_workers:
        totals = fit(cfg, run_dir).service
    else:
        totals = train_in_process(cfg, None, progress=False)[1]
    steps, seconds = totals["steps"] - totals["start_step"] - cfg.train.log_every, max(totals["seconds"], 1e-9)
    return {"transitions_per_s": totals["transitions"] / seconds, "steps_per_s": steps / seconds,
            "learner_idle_pct": totals["learner_idle_pct"], "staleness": cfg.distributed.staleness
            if cfg.distributed.num_workers else 0}


def heldout_error(checkpoint: Path, episodes: int) -> list[float]:
    model, cfg = load_for_eval(checkpoint, [], "cpu")
    ep = model.family.sample(cfg.eval.seed, torch.arange(episodes), split="test")
    terms = torch.stack(refine(model, ep)).sum(-1)
    return (100 * terms[:, 0] / terms[:, 1]).tolist()


def equal_wall_clock(base: ExperimentConfig, sets: dict, rate: dict, args, run_dir: Path) -> dict:
    """Train for --minutes at the mode's measured rate (the whole cosine schedule fits the budget), then
    score on held-out episodes shared by every mode."""
    steps = max(20, int(rate["steps_per_s"] * args.minutes * 60))
    cfg = base.with_overrides({**sets, "train.max_steps": steps,
                               "train.warmup_steps": min(base.train.warmup_steps, steps // 10)})
    print(f"   then {args.minutes} min of training = {steps} learner steps at that rate", flush=True)
    t0 = time.perf_counter()
    if sets:
        checkpoint = fit(cfg, run_dir).checkpoint
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = run_dir / "checkpoint.pt"
        train_in_process(cfg, checkpoint)
    seconds = time.perf_counter() - t0
    errors = heldout_error(checkpoint, args.episodes)
    print(f"   {seconds:.0f}s wall (start-up included); held-out error after step K: {errors[-1]:.3g}%", flush=True)
    return {"steps": steps, "seconds": seconds, "error_by_step": errors}


def throughput(args) -> None:
    from iai_dist.bench import write  # the shared table/JSON writer of the torch-only benchmarks

    base = load_config(args.preset, overrides=["tracking.enabled=false", "eval.monitor_episodes=0",
                                               f"train.log_every={args.steps // 4}", "train.checkpoint_every=100000",
                                               *args.overrides])
    share = {"distributed.learner_cpus": 1.0, "distributed.episode_worker_cpus": 1.0}
    modes = {"(a) in process": {}, "(b) 1 learner + 1 episode worker": {"distributed.num_workers": 1,
             "distributed.episode_workers": 1, **share},
             "(c) 2 learners + 2 episode workers": {"distributed.num_workers": 2, "distributed.episode_workers": 2, **share},
             "(d) 1 learner + 3 episode workers": {"distributed.num_workers": 1, "distributed.episode_workers": 3, **share}}
    modes = {name: sets for name, sets in modes.items() if name[1] in args.modes or name.startswith("(a)")}
    out = Path(args.out).resolve()
    runs = out / f"throughput-runs-{time.strftime('%Y%m%d-%H%M%S')}"
    needed = max(cpus_needed(base.with_overrides(m)) for m in modes.values() if m)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), log_to_driver=False)
    try:
        # (a) trains before any Ray fit has run in this process: afterwards, in-process torch here ran
        # several times slower (measured 0.31 vs 1.87 learner steps/s), which would flatter (c)
        rates, quality = {}, {}
        for name, sets in modes.items():
            cfg = base.with_overrides({**sets, "train.max_steps": args.steps})
            print(f"== {name}: {args.steps} learner steps", flush=True)
            rates[name] = rate(cfg, runs / f"rate-{len(rates)}")
            print(f"   {json.dumps({k: round(v, 2) for k, v in rates[name].items()})}", flush=True)
            if args.minutes > 0:
                quality[name] = equal_wall_clock(base, sets, rates[name], args, runs / f"quality-{len(quality)}")
    finally:
        if own_ray:
            ray.shutdown()

    k = base.task.steps
    a = rates["(a) in process"]
    head = ("| mode | transitions/s | learner steps/s | learner idle % | staleness | x (a) |\n"
            "|---|---|---|---|---|---|")
    lines = [f"| {n} | {r['transitions_per_s']:.0f} | {r['steps_per_s']:.2f} | {r['learner_idle_pct']:.1f} | "
             f"{r['staleness']} | {r['transitions_per_s'] / a['transitions_per_s']:.2f} |" for n, r in rates.items()]
    table = "\n".join([head, *lines])
    table += (f"\n\n(a) idle % is the share of time the single process spends rolling out. Preset {args.preset}, "
              f"{base.train.tasks_per_batch} tasks per learner step, {args.steps} steps per mode (steady state "
              f"after the first {args.steps // 4}); distributed.staleness={base.distributed.staleness}.")
    if quality:
        cols = sorted({1, 2, 5, k} & set(range(1, k + 1)))
        table += ("\n\n| equal wall clock | learner steps | seconds | " + " | ".join(f"step {s}" for s in cols)
                  + f" | x (a) at step {k} |\n|---|---|---|" + "---|" * (len(cols) + 1) + "\n")
        qa = quality["(a) in process"]["error_by_step"][k]
        table += "\n".join(f"| {n} | {q['steps']} | {q['seconds']:.0f} | "
                           + " | ".join(f"{q['error_by_step'][s]:.3g}" for s in cols)
                           + f" | {q['error_by_step'][k] / qa:.2f} |" for n, q in quality.items())
        table += (f"\n\n{args.minutes} min of training each at the mode's measured rate (seconds include start-up), "
                  f"{args.episodes} held-out episodes. Targets: error after step {k} within 1.10x of (a), "
                  f"transitions/s >= 1.2x (a).")
    write(out, "throughput", {"preset": args.preset, "steps": args.steps, "rates": rates, "quality": quality,
                               "minutes": args.minutes, "staleness": base.distributed.staleness}, table)


def memory(args) -> None:
    """Resident memory of a long main-job run: driver, learners, episode workers, at the asked minutes."""
    import psutil

    from iai_dist.bench import write

    out = Path(args.out).resolve()
    name = f"memory-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "iai_dist.train", "--preset", args.preset, "--set", f"tracking.runs_dir={out / 'memory-runs'}",
           "--set", f"tracking.run_name={name}", "--set", "train.max_steps=100000000", "--set", "eval.one_step=false"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    log = (out / f"{name}.log")
    out.mkdir(parents=True, exist_ok=True)
    marks = sorted(float(m) for m in args.at.split(","))
    samples, peaks = [], {}
    with log.open("w") as f:
        driver = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        start = time.monotonic()
        try:
            for mark in marks:
                while time.monotonic() - start < mark * 60:
                    time.sleep(args.every)
                    now = _rss_by_role(psutil.Process(driver.pid))
                    for role, rss in now.items():
                        peaks[role] = max(peaks.get(role, 0), rss)
                    if driver.poll() is not None:
                        raise RuntimeError(f"the training run ended early; see {log}")
                samples.append({"minutes": mark, "rss_mib": now, "peak_mib": dict(peaks)})
                print(f"{mark:5.1f} min: " + ", ".join(f"{r} {v:.0f} MiB (peak {peaks[r]:.0f})" for r, v in now.items()),
                      flush=True)
        finally:
            os.killpg(driver.pid, signal.SIGINT)  # the driver shuts its Ray down on the way out
            try:
                driver.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(driver.pid, signal.SIGKILL)
    roles = list(samples[0]["rss_mib"])
    head = "| minutes | " + " | ".join(f"{r} RSS / peak (MiB)" for r in roles) + " |\n|---|" + "---|" * len(roles)
    lines = [f"| {s['minutes']:g} | " + " | ".join(f"{s['rss_mib'].get(r, 0):.0f} / {s['peak_mib'].get(r, 0):.0f}"
                                                   for r in roles) + " |" for s in samples]
    write(out, "memory", {"preset": args.preset, "samples": samples, "log": str(log)},
          "\n".join([head, *lines]) + f"\n\npython -m iai_dist.train --preset {args.preset}; log: {log}")


def _rss_by_role(driver) -> dict[str, float]:
    """MiB per process role: the driver, then one learner (rank 0's process) and one episode worker."""
    roles = {"driver": driver.memory_info().rss}
    for proc in driver.children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            rss = proc.memory_info().rss
        except Exception:  # a process that just ended
            continue
        for role, tag in (("learner", "RayTrainWorker"), ("episode worker", "EpisodeWorker")):
            if tag in title and role not in roles:
                roles[role] = rss
    return {role: rss / 2**20 for role, rss in roles.items()}


def sweep(args) -> None:
    """Sweep overhead: a grid space's trials as one `python -m iai_dist.tune` sweep, and the same trainings
    one after another with `python -m iai_dist.train`; the wall clock of each whole command, side by side."""
    from iai_dist.bench import write
    from iai_dist.config import to_yaml
    from iai_dist.search_space import load_space, trial_overrides

    space, base = load_space(args.space, None, args.overrides)
    if space.num_samples != 1 or any(d.kind != "grid" for d in space.params.values()):
        raise SystemExit(f"{args.space}: bench sweep needs a grid-only space with num_samples 1")
    keys = list(space.params)
    trials = [trial_overrides(dict(zip(keys, combo)))
              for combo in itertools.product(*(space.params[k].values for k in keys))]
    out = Path(args.out).resolve()
    root = out / f"sweep-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True)
    (root / "base.yaml").write_text(to_yaml(base))
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    env.pop("MLFLOW_TRACKING_URI", None)

    def timed(cmd: list[str], log: Path) -> float:
        print(f"   $ {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        with log.open("w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            raise SystemExit(f"exit {code}; see {log}")
        return time.perf_counter() - t0

    sequential = []
    print(f"== {len(trials)} trainings one after another (python -m iai_dist.train)", flush=True)
    for i, sets in enumerate(trials):
        cmd = [sys.executable, "-m", "iai_dist.train", "--config", str(root / "base.yaml"),
               "--set", f"tracking.runs_dir={root / 'sequential'}", "--set", f"tracking.run_name=t{i}",
               *[arg for k, v in sets.items() for arg in ("--set", f"{k}={json.dumps(v)}")]]
        seconds = timed(cmd, root / f"sequential-{i}.log")
        summary = json.loads((root / "sequential" / f"t{i}" / "summary.json").read_text())
        sequential.append({"params": sets, "seconds": seconds,
                           "error_at_K": summary["per_step"]["refiner"][summary["K"]]})
        print(f"   {seconds:.0f} s; error after step K {sequential[-1]['error_at_K']:.3g}%", flush=True)
    print(f"== the same {len(trials)} as one sweep (python -m iai_dist.tune, {args.max_concurrent} at a time)",
          flush=True)
    cmd = [sys.executable, "-m", "iai_dist.tune", "--space", str(args.space), "--name", "sweep",
           "--max-concurrent", str(args.max_concurrent), "--set", f"tracking.runs_dir={root}",
           *[arg for o in args.overrides for arg in ("--set", o)]]
    sweep_s = timed(cmd, root / "sweep.log")
    with (root / "sweep" / "summary.csv").open() as f:  # the sweep's error after K, keyed by trial values
        swept = {json.dumps({k: _typed(row[k]) for k in trials[0]}): float(row["error_at_K"])
                 for row in csv.DictReader(f)}
    seq_s = sum(t["seconds"] for t in sequential)
    lines = ["| trial | sequential: seconds | sequential: error after K | sweep: error after K |",
             "|---|---|---|---|"]
    for t in sequential:
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in t["params"].items())
        in_sweep = swept.get(json.dumps(t["params"]), float("nan"))
        lines.append(f"| {label} | {t['seconds']:.0f} | {t['error_at_K']:.3g} | {in_sweep:.3g} |")
    table = "\n".join(lines) + (
        f"\n\n| | wall seconds | x sequential |\n|---|---|---|\n"
        f"| {len(trials)} x python -m iai_dist.train | {seq_s:.0f} | 1.00 |\n"
        f"| python -m iai_dist.tune ({args.max_concurrent} at a time) | {sweep_s:.0f} | {sweep_s / seq_s:.2f} |\n\n"
        f"space {args.space}, overrides {args.overrides or 'none'}; each command timed whole (Ray start-up, "
        f"training, evaluation, MLflow); logs in {root}")
    write(out, "sweep", {"space": str(args.space), "overrides": args.overrides, "max_concurrent": args.max_concurrent,
                         "sequential": sequential, "sequential_s": seq_s, "sweep_s": sweep_s, "runs": str(root)}, table)


def _typed(text: str):
    """A summary.csv cell back to the value the space gave (numbers, booleans, strings)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def chaos(args) -> None:
    """Faults during training on a loopback two-node cluster (token auth on), as users submit jobs: the same
    job once undisturbed, then with --kills random kills by PID (episode workers, the weight board, learners,
    and a whole node, which is started again after --node-down seconds) at seeded random learner steps."""
    import random

    from ray.job_submission import JobStatus

    from iai_dist.bench import write
    from iai_dist.service.loopback import KILLABLE, LoopbackCluster, follow_with_faults

    out = Path(args.out).resolve()
    root = out / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}"
    cluster = LoopbackCluster(root / "cluster", nodes=2, cpus_per_node=2, token=True).start()
    kinds = [*KILLABLE, "node"]
    base_tasks = load_config(args.preset).train.tasks_per_batch
    try:
        def job(name: str, steps: int) -> str:
            entry = ["python", "-m", "iai_dist.train", "--preset", args.preset, "--set", f"tracking.runs_dir={root}",
                     "--set", f"tracking.run_name={name}", "--set", "tracking.enabled=false", "--set",
                     f"train.max_steps={steps}", "--set", "train.log_every=1",  # every step: redone steps counted exactly
                     "--set", f"train.checkpoint_every={max(1, steps // 10)}", "--set", "eval.one_step=false",
                     "--set", "distributed.num_workers=2", "--set", "distributed.episode_workers=2",
                     "--set", "distributed.max_failures=-1", "--set", "distributed.worker_restarts=-1"]
            proc = cluster.submit(entry, working_dir=Path(__file__).resolve().parents[2], wait=False)
            return re.search(r"raysubmit_\w+", proc.stdout).group(0)

        def follow(name: str, steps: int, plan: dict[int, str], limit_s: float = 3600) -> dict:
            """Submit the job and wait for it, injecting `plan`'s faults; its whole log is kept as <name>.log."""
            run = follow_with_faults(cluster, job(name, steps), plan, node_down_s=args.node_down, limit_s=limit_s)
            (root / f"{name}.log").write_text(run["logs"])
            return {"ok": run["status"] == JobStatus.SUCCEEDED, "seconds": run["seconds"],
                    "faults": [plan[s] for s in run["done"]], "redone": _steps_redone(run["logs"])}

        print("== probe: learner steps/s of this job on the cluster", flush=True)
        probe = follow("probe", 20, {})
        rate = 20 / max(probe["seconds"] - 40, 5)  # less the start-up of a job (about 40 s here)
        steps = max(40, int(rate * args.minutes * 60))
        print(f"== undisturbed: {steps} learner steps", flush=True)
        calm = follow("calm", steps, {})
        rng = random.Random(args.seed)
        faults = [kinds[i % len(kinds)] for i in range(args.kills)]  # every kind, once --kills reaches 4
        rng.shuffle(faults)
        plan = dict(zip(sorted(rng.sample(range(steps // 20 + 1, int(steps * 0.9)), args.kills)), faults))
        print(f"== with {args.kills} faults at learner steps {sorted(plan)}: {[plan[s] for s in sorted(plan)]}", flush=True)
        chaotic = follow("chaos", steps, plan, limit_s=4 * calm["seconds"] + 600)
    finally:
        cluster.stop()
    rows = {}
    for name, run in (("undisturbed", calm), ("with faults", chaotic)):
        summary_file = root / ("calm" if run is calm else "chaos") / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        k = summary["K"] if summary else None
        rows[name] = {**{key: run[key] for key in ("ok", "seconds", "faults", "redone")},
                      "error_at_K": summary["per_step"]["refiner"][k] if summary else None,
                      "episodes": summary["train"]["episodes"] if summary else None}
    ok = rows["with faults"]
    counts = {kind: ok["faults"].count(kind) for kind in kinds}
    lines = ["| run | finished | wall seconds | faults injected | learner steps redone | error after step K | "
             "episodes learned (steps x tasks) |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        faults = ", ".join(f"{n} {k}" for k, n in counts.items() if n) if name == "with faults" else "-"
        error = "-" if r["error_at_K"] is None else f"{r['error_at_K']:.4g}"
        lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['seconds']:.0f} | {faults} | {r['redone']} | "
                     f"{error} | {r['episodes']} (of {steps} x {base_tasks}) |")
    write(out, "chaos", {"preset": args.preset, "steps": steps, "plan": plan, "runs": rows, "seed": args.seed},
          "\n".join(lines))
    print(f"the jobs' logs: {root}/{{probe,calm,chaos}}.log")


def _steps_redone(logs: str) -> int:
    """Learner steps taken twice: progress lines (the job logs every step) of distinct processes, by the Ray
    prefix's pid, beyond one per step. Counted by (pid, step), not in log order: a node that is started again
    has Ray's log monitor send its old worker logs once more, so a dead learner's lines can reappear late."""
    lines = set(re.findall(r"pid=(\d+)[^\n]*\[refiner\] step +(\d+)/", logs))
    return len(lines) - len({step for _, step in lines})
