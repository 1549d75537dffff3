"""Image-task benchmarks (python -m iai_dist.bench transfer | sampler): cross-dataset transfer, the paper's
MNIST -> FashionMNIST result, and whether the image sampler ever limits the learner."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from iai_dist.bench import steps_in_process, train_for, write
from iai_dist.config import ConfigError, ExperimentConfig, load_config
from iai_dist.evaluate import evaluate, format_error, one_step_config
from iai_dist.refiner import IterativeModel
from iai_dist.tasks import build_family
from iai_dist.learner import Learner

TRANSFER_REGIMES: dict[str, list[str]] = {
    "parametric obs+grad (softmax-linear)": [],
    "explicit obs+grad": ["regime.kind=explicit"],
    "implicit obs": ["regime.kind=implicit", "regime.signal=obs"],
}
PAPER_TRANSFER = ("paper: implicit regime trained on MNIST tasks, evaluated on FashionMNIST tasks: "
                  "31.9% error after 1 step, 24.2% after 10")


def other_overrides(other: str) -> dict[str, str]:
    """A transfer target: a family name, or one KEY=VALUE override (task.embeddings.test=FILE: another data set's
    embeddings from the same backbone)."""
    return dict([other.split("=", 1)]) if "=" in other else {"task.family": other}


def retarget(model: IterativeModel, cfg: ExperimentConfig, other: str, device) -> tuple[IterativeModel, ExperimentConfig]:
    """The same weights on another task family or data (same features and N): what `evaluate --set` does."""
    cfg = cfg.with_overrides(other_overrides(other))
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
    trainer = Learner(cfg.with_overrides({"train.max_steps": 10**9, "train.log_every": 10**9}))
    steps_in_process(trainer, 1)
    sample, sampling = trainer.family.sample, [0.0]

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = sample(*a, **k)
        sampling[0] += time.perf_counter() - t0
        return out

    trainer.family.sample = timed
    start = time.perf_counter()
    steps_in_process(trainer, steps)
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
            raise ConfigError(f"--pairs: expected PRESET:FAMILY such as digits:fashion_mnist, or PRESET:KEY=VALUE "
                              f"such as digits:task.embeddings.test=DIR/test.npz (got {bad[0]})")
        unknown = [r for r in regimes if r not in TRANSFER_REGIMES]
        if unknown:
            raise ConfigError(f"--regimes: unknown {', '.join(unknown)}; known: parametric, explicit, implicit")
        for preset, other in pairs:
            for regime in regimes:
                sets = [*TRANSFER_REGIMES[regime], f"eval.episodes={args.episodes}", *args.overrides]
                cfg = load_config(preset, overrides=sets)
                build_family(cfg.task)
                build_family(cfg.with_overrides(other_overrides(other)).task)
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
            episodes = trainer.step * cfg.train.tasks_per_batch
            rate = episodes / seconds
            consumed.setdefault(own, {})[regime] = rate
            res[regime] = {"own": on_own, "other": on_other, "train": {
                "seconds": seconds, "steps": trainer.step, "episodes": episodes, "episodes_per_s": rate}}
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
        inputs = f"{cfg0.task.dim} features" if own == "embeddings" else f"{im.size}x{im.size} images"
        head = (f"### trained on {own} (preset {preset}), evaluated on {own} and on {other}\n"
                f"{cfg0.task.num_classes}-way, {inputs}, K={k}, B={cfg0.task.batch_size}, "
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
            return [format_error(summary["per_step"][method][s]) for s in steps] + [""]
        return [""] * len(steps) + [format_error(summary["at_once"][method])]

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
