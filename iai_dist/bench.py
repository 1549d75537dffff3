"""Benchmarks: each prints a markdown table and writes JSON + markdown under --out (bench_results/).

    python -m iai_dist.bench quality    [--minutes M] [--settings a,b] : error vs baselines after M minutes of training
    python -m iai_dist.bench learner    [--tasks 256] [--device D]     : learner steps/s, episodes/s, refinement steps/s
    python -m iai_dist.bench scaling    [--points 100,1000,10000]      : K-step refinement vs the one-step model
    python -m iai_dist.bench transfer   [--minutes M] [--pairs digits:fashion_mnist,...] : image refiners on their
                                        own test split and on another data set, per regime, vs one-step and Adam
                                        (embeddings: --pairs PRESET:task.embeddings.test=OTHER.npz with --set ...)
    python -m iai_dist.bench sampler    [--presets digits,...]         : image episodes/s alone vs the learner's rate
    python -m iai_dist.bench throughput [--preset P] [--minutes M]     : Ray service: in process vs 1+1, 2+2, 1+3 workers
    python -m iai_dist.bench memory     [--at 5,30]                    : Ray service: RSS of driver and workers over a run
    python -m iai_dist.bench chaos      [--kills 6] [--minutes 3]      : Ray service: faults injected by PID on a loopback
                                        two-node cluster vs the same job undisturbed
    python -m iai_dist.bench adapt      [--model RUN] [--classifier-model RUN] : a trained refiner streaming 10^4..10^6
                                        points (points/s, peak memory, error) vs scikit-learn's partial_fit and batch fits
    python -m iai_dist.bench latent     [--presets linreg-paper,...]   : the explicit regime's floor: f_gamma with the
                                        best latent per task (fitted), per conditioning, vs the parametric full fit
quality, learner, scaling, transfer, sampler and latent need torch only (they run on the GPU machine without Ray);
the others run the Ray service.
Image benchmarks live in bench_images.py, the estimator's in bench_adapt.py, scaling in bench_scaling.py,
the explicit regime's floor in bench_latent.py, the learner's rates in bench_learner.py, the service's in
service/bench.py; this module parses for all.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from iai_dist import baselines
from iai_dist.config import K_STEPS_ONLY, ExperimentConfig, load_config
from iai_dist.devices import resolve_device
from iai_dist.evaluate import evaluate, format_table, one_step_config
from iai_dist.experience import EpisodeStream, LocalRollouts
from iai_dist.learner import FileSink, Learner, train_in_process, train_loop

# name -> (preset, overrides). The linreg-paper rows are the DESIGN.md reference setting.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "linreg-paper/parametric/obs": ("linreg-paper", ["regime.signal=obs"]),
    "linreg-paper/parametric/grad": ("linreg-paper", ["regime.signal=grad"]),
    "linreg-paper/parametric/obs+grad": ("linreg-paper", []),
    "linreg-paper/explicit/obs": ("linreg-paper", ["regime.kind=explicit", "regime.signal=obs"]),
    "linreg-paper/explicit/grad": ("linreg-paper", ["regime.kind=explicit", "regime.signal=grad"]),
    "linreg-paper/explicit/obs+grad": ("linreg-paper", ["regime.kind=explicit"]),
    # the paper's f_gamma(MLP([x, z])) beside the default FiLM-conditioned one
    "linreg-paper/explicit/obs+grad+concat": ("linreg-paper", ["regime.kind=explicit", "regime.conditioning=concat"]),
    # f_gamma auto-decoded before meta-training (regime.pretrain_steps)
    "linreg-paper/explicit/obs+grad+pretrain": ("linreg-paper", ["regime.kind=explicit", "regime.pretrain_steps=1000"]),
    "linreg-paper/explicit/obs+grad+pretrain+frozen": ("linreg-paper", ["regime.kind=explicit", "regime.pretrain_steps=1000",
                                                                        "regime.f_gamma_lr_scale=0"]),
    # implicit: every query point is a token, so train and score on 16 query points per episode (not 100)
    "linreg-paper/implicit/obs": ("linreg-paper", ["regime.kind=implicit", "regime.signal=obs", "task.query_size=16"]),
    "linclass/parametric/obs+grad": ("linclass", []),
    "mlpreg/parametric/obs+grad": ("mlpreg", []),
    # optimizer memory (regime.memory=moments): gradient moments carried in the state, beside each default
    "linreg-paper/parametric/obs+grad+moments": ("linreg-paper", ["regime.memory=moments"]),
    "linclass/parametric/obs+grad+moments": ("linclass", ["regime.memory=moments"]),
    "mlpreg/parametric/obs+grad+moments": ("mlpreg", ["regime.memory=moments"]),
    # observation statistics (regime.memory=observations): running means of [x,1][x,1]^T and [x,1] e(y)^T
    "linreg-paper/parametric/obs+grad+observations": ("linreg-paper", ["regime.memory=observations"]),
    "linclass/parametric/obs+grad+observations": ("linclass", ["regime.memory=observations"]),
    "mlpreg/parametric/obs+grad+observations": ("mlpreg", ["regime.memory=observations"]),
    # non-greedy: every query loss backpropagated through the whole episode (train.unroll = K)
    "linreg-paper/parametric/obs+grad+unroll": ("linreg-paper", ["train.unroll=10"]),
    "mlpreg/parametric/obs+grad+unroll": ("mlpreg", ["train.unroll=10"]),
    # trained past K: 2K-step rollouts on fresh mini-batches (train.horizon = 2)
    "linreg-paper/parametric/obs+grad+horizon2": ("linreg-paper", ["train.horizon=2"]),
    "mlpreg/parametric/obs+grad+horizon2": ("mlpreg", ["train.horizon=2"]),
    # a curriculum: K-step rollouts for the first 3/4 of the learner steps, 2K after
    "linreg-paper/parametric/obs+grad+late-horizon2": ("linreg-paper", ["train.horizon=2", "train.horizon_from=0.75"]),
    "mlpreg/parametric/obs+grad+late-horizon2": ("mlpreg", ["train.horizon=2", "train.horizon_from=0.75"]),
    # the curriculum with the steps past K at half weight in the objective
    "linreg-paper/parametric/obs+grad+late-horizon2+half-weight": (
        "linreg-paper", ["train.horizon=2", "train.horizon_from=0.75", "train.horizon_weight=0.5"]),
    "mlpreg/parametric/obs+grad+late-horizon2+half-weight": (
        "mlpreg", ["train.horizon=2", "train.horizon_from=0.75", "train.horizon_weight=0.5"]),
    # learned memory slots (regime.memory=learned), which only the unrolled objective can teach
    "linreg-paper/parametric/obs+grad+unroll+learned": ("linreg-paper", ["train.unroll=10", "regime.memory=learned"]),
    "mlpreg/parametric/obs+grad+unroll+learned": ("mlpreg", ["train.unroll=10", "regime.memory=learned"]),
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


def steps_in_process(learner: Learner, n: int) -> None:
    """n learner steps of the in-process path (the learner loop over local rollouts), without output."""
    source = LocalRollouts(learner, EpisodeStream(learner.cfg.train.tasks_per_batch, cursor=learner.step
                                                  * learner.cfg.train.tasks_per_batch))
    train_loop(learner, source, FileSink(None), stop_at=learner.step + n, progress=False)


def learner_rate(cfg: ExperimentConfig, device: torch.device, warmup: int, steps: int
                 ) -> tuple[float, float | None, float]:
    """Learner steps/s of the in-process path after `warmup` steps, the peak GPU memory (MiB) of those steps on
    CUDA (None elsewhere: a CPU process's peak RSS does not come down between settings) and the warmup's
    seconds (where train.compile compiles). No held-out monitoring: the timed steps are learner steps only."""
    torch._dynamo.reset()  # compile afresh: static shapes for this setting, no CUDA-graph pools of the last one
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    learner = Learner(cfg.with_overrides({"train.max_steps": 10**9, "train.log_every": 10**9,
                                          "eval.monitor_episodes": 0}), device)
    t0 = time.perf_counter()
    steps_in_process(learner, warmup)
    sync_device(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    steps_in_process(learner, steps)
    sync_device(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return steps / (time.perf_counter() - t0), peak, warmup_s


def budget_steps(cfg: ExperimentConfig, minutes: float) -> int:
    """The learner steps that fit a wall-clock budget at the measured step time."""
    device, late = resolve_device(cfg.train.device), cfg.train.horizon_from
    seconds_per_step = 1 / learner_rate(cfg.with_overrides({"train.horizon_from": 0}), device, warmup=2, steps=4)[0]
    if late:  # a curriculum: its first steps roll out K steps only, at their own rate
        k_only = cfg.with_overrides(K_STEPS_ONLY)
        seconds_per_step = late / learner_rate(k_only, device, warmup=2, steps=4)[0] + (1 - late) * seconds_per_step
    return max(10, int(minutes * 60 / seconds_per_step))


def train_for(cfg: ExperimentConfig, minutes: float, label: str, steps: int | None = None) -> tuple[Learner, float]:
    """Train for a wall-clock budget, or for `steps` learner steps where given. The steps are fixed up front
    (from the measured step time for a budget), so warmup and cosine decay run their full course."""
    steps = budget_steps(cfg, minutes) if steps is None else steps
    cfg = cfg.with_overrides({"train.max_steps": steps, "train.warmup_steps": min(cfg.train.warmup_steps, steps // 10),
                              "train.log_every": max(1, steps // 10)})
    start = time.perf_counter()
    learner, _ = train_in_process(cfg, None, label=label)
    return learner, time.perf_counter() - start


def quality(args) -> None:
    names = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"error: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    results, tables = {}, []
    for name in names:
        preset, overrides = SETTINGS[name]
        cfg = load_config(preset, overrides=[*overrides, *args.overrides, f"eval.episodes={args.episodes}"])
        budget = f"{args.steps} learner steps" if args.steps else f"{args.minutes} min"
        if args.one_step_minutes > 0:
            budget += f" (+ the one-step model: {args.steps or args.one_step_minutes} {'steps' if args.steps else 'min'})"
        print(f"== {name}: training {budget}", flush=True)
        trainer, seconds = train_for(cfg, args.minutes, name, args.steps)
        one = None
        if args.one_step_minutes > 0:
            one = train_for(one_step_config(trainer.cfg), args.one_step_minutes, name + " one-step", args.steps)[0].model
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
        episodes = trainer.step * cfg.train.tasks_per_batch
        summary["train"] = {"seconds": seconds, "steps": trainer.step, "episodes": episodes}
        results[name] = summary
        adam_k = summary["per_step"]["adam"][k]
        tables.append(f"### {name}\ntrained {seconds / 60:.1f} min, {trainer.step} learner steps, "
                      f"{episodes} episodes\n\n{format_table(summary)}\n\n"
                      f"refiner at step {k}: {target:.3g}% vs Adam (best grid lr) at step {k}: {adam_k:.3g}% "
                      f"({adam_k / max(target, 1e-12):.1f}x); Adam cycling over the same {k} mini-batches reaches "
                      f"{target:.3g}% after {reach[0] if reach else f'more than {args.adam_max_steps}'} steps")
        print(tables[-1], flush=True)
    ref = "\n".join(f"| {k} | " + " | ".join(str(v.get(s, "")) for s in (1, 2, 5, 10)) + " |" for k, v in REFERENCE.items())
    table = ("\n\n".join(tables) + "\n\n### DESIGN.md reference (linreg-paper)\n| | step 1 | step 2 | step 5 | step 10 |\n"
             "|---|---|---|---|---|\n" + ref)
    write(Path(args.out), "quality", {"minutes": args.minutes, "steps": args.steps, "settings": results,
                                      "reference": REFERENCE}, table)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iai_dist.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--minutes", type=float, default=2.0, help="training budget per setting (wall clock)")
    q.add_argument("--steps", type=int, help="train every model for this many learner steps instead of --minutes: "
                   "settings of the same step cost compared at equal steps (--one-step-minutes 0 still skips the "
                   "one-step model)")
    q.add_argument("--one-step-minutes", type=float, default=None, help="budget of the one-step model (default: --minutes)")
    q.add_argument("--settings", default="all", help=f"comma-separated, from: {', '.join(SETTINGS)}")
    q.add_argument("--episodes", type=int, default=1024)
    q.add_argument("--adam-max-steps", type=int, default=3000)
    t = sub.add_parser("learner")
    t.add_argument("--settings", default="linreg-paper/parametric/obs+grad")
    t.add_argument("--tasks", default="256", help="comma-separated tasks per learner step")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--device", default="auto")
    t.add_argument("--compile", default="off", help="comma-separated train.compile modes: off, refiner, step, graphs")
    t.add_argument("--autocast", default="off,bf16", help="comma-separated train.autocast values to measure")
    t.add_argument("--unroll", default="1", help="comma-separated train.unroll values to measure")
    t.add_argument("--baseline", metavar="REF", help="also time git revision REF (or a directory holding an "
                   "exported iai_dist/) side by side")
    t.add_argument("--rounds", type=int, default=3, help="alternating rounds of the --baseline comparison")
    s = sub.add_parser("scaling")
    s.add_argument("--points", default="100,1000,10000")
    s.add_argument("--tasks", type=int, default=8)
    s.add_argument("--device", default="auto")
    tr = sub.add_parser("transfer")
    tr.add_argument("--minutes", type=float, default=3.0, help="training budget per regime (wall clock)")
    tr.add_argument("--one-step-minutes", type=float, default=None, help="per one-step model (default: --minutes / 2)")
    tr.add_argument("--pairs", default="digits:fashion_mnist,fashion-mnist-8x8:digits",
                    help="PRESET:FAMILY,...: train on the preset, evaluate on its test split and on FAMILY's; "
                         "PRESET:KEY=VALUE evaluates under that override instead (task.embeddings.test=FILE)")
    tr.add_argument("--regimes", default="all", help="comma-separated from parametric, explicit, implicit")
    tr.add_argument("--episodes", type=int, default=1024)
    tr.add_argument("--sampler-seconds", type=float, default=3.0, help="time the sampler alone this long")
    sa = sub.add_parser("sampler")
    sa.add_argument("--presets", default="digits,fashion-mnist-8x8,fashion-mnist")
    sa.add_argument("--steps", type=int, default=5, help="learner steps timed per regime")
    sa.add_argument("--seconds", type=float, default=3.0, help="time the sampler alone this long")
    la = sub.add_parser("latent")
    la.add_argument("--presets", default="linreg-paper,mlpreg,linclass")
    la.add_argument("--conditioning", default="film,concat", help="comma-separated regime.conditioning values")
    la.add_argument("--train-tasks", type=int, default=512, help="episodes f_gamma is auto-decoded on")
    la.add_argument("--tasks", type=int, default=256, help="held-out episodes scored")
    la.add_argument("--steps", type=int, default=2000)
    la.add_argument("--lr", type=float, default=3e-3)
    for p in (q, tr, sa, la):
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("throughput")
    r.add_argument("--preset", default="linreg-paper")
    r.add_argument("--steps", type=int, default=80, help="learner steps per mode for the rates")
    r.add_argument("--minutes", type=float, default=3.0, help="equal wall-clock budget of every mode run; 0 skips")
    r.add_argument("--episodes", type=int, default=1024, help="held-out episodes scoring every mode")
    r.add_argument("--modes", default="abc", help="(a) in process, always; (b) 1+1, (c) 2+2, (d) 1+3 learners+workers")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    m = sub.add_parser("memory")
    m.add_argument("--preset", default="default")
    m.add_argument("--at", default="5,30", help="minutes at which to report")
    m.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ch = sub.add_parser("chaos")
    ch.add_argument("--preset", default="default")
    ch.add_argument("--kills", type=int, default=6, help="faults injected during the disturbed run")
    ch.add_argument("--minutes", type=float, default=3.0, help="training time of the undisturbed run")
    ch.add_argument("--node-down", type=float, default=10.0, help="seconds a killed node stays down")
    ch.add_argument("--seed", type=int, default=0, help="which faults, and at which learner steps")
    sw = sub.add_parser("sweep")
    sw.add_argument("--space", type=Path, default=Path("tune_spaces/steps.yaml"), help="a grid-only space file")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sw.add_argument("--max-concurrent", type=int, default=1, help="trials at once in the sweep (1: the same "
                    "hardware use as the one-after-another runs, so the difference is the sweep's overhead)")
    ad = sub.add_parser("adapt")
    ad.add_argument("--model", help="a trained regression refiner: run directory or checkpoint")
    ad.add_argument("--classifier-model", help="a trained classification refiner, for the classification rows")
    ad.add_argument("--points", default="10000,100000,1000000", help="stream lengths")
    ad.add_argument("--seed", type=int, default=0, help="the task and the mini-batch shuffle")
    for p in (q, t, s, tr, sa, r, m, sw, ch, ad, la):
        p.add_argument("--out", default="bench_results")
    one = sub.add_parser("_scaling_one")
    one.add_argument("mode")
    one.add_argument("points", type=int)
    one.add_argument("tasks", type=int)
    one.add_argument("device")
    one_adapt = sub.add_parser("_adapt_one")
    for name, kind in (("method", str), ("points", int), ("model", str), ("seed", int)):
        one_adapt.add_argument(name, type=kind)
    args = parser.parse_args(argv)
    if args.bench == "_adapt_one":
        from iai_dist.bench_adapt import run_one

        print(json.dumps(run_one(args.method, args.points, args.model, args.seed)))
        return
    if args.bench == "adapt":
        from iai_dist.bench_adapt import adapt

        adapt(args)
        return
    if args.bench in ("scaling", "_scaling_one"):
        from iai_dist import bench_scaling

        bench_scaling.main(args)
        return
    if args.bench == "latent":
        from iai_dist.bench_latent import latent

        latent(args)
        return
    if args.bench == "quality" and args.one_step_minutes is None:
        args.one_step_minutes = args.minutes
    if args.bench == "transfer" and args.one_step_minutes is None:
        args.one_step_minutes = args.minutes / 2
    if args.bench in ("throughput", "memory", "sweep", "chaos"):
        from iai_dist.service import bench as service_bench  # Ray only where the benchmark needs it

        getattr(service_bench, args.bench)(args)
        return
    if args.bench in ("transfer", "sampler"):
        from iai_dist import bench_images

        getattr(bench_images, args.bench)(args)
        return
    if args.bench == "learner":
        from iai_dist.bench_learner import learner

        learner(args)
        return
    quality(args)


if __name__ == "__main__":
    main()
