"""Evaluation: query error after each refinement step 1..horizon*K, beside baselines on the same episodes.

    python -m iai_dist.evaluate --checkpoint runs/NAME/checkpoint.pt [--set task.family=...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from iai_dist import baselines
from iai_dist.checkpoint import CheckpointError, read_checkpoint
from iai_dist.config import K_STEPS_ONLY, ConfigError, ExperimentConfig, parse_override
from iai_dist.devices import resolve_device
from iai_dist.generative import format_quality, sample_quality
from iai_dist.refiner import IterativeModel
from iai_dist.reporting import report_steps
from iai_dist.rollout import refine
from iai_dist.tasks import build_family

PER_STEP = ("refiner", "bayes_optimal", "adam", "sgd")
AT_ONCE = ("full_fit", "one_step", "true_field")


def evaluate(
    model: IterativeModel, cfg: ExperimentConfig, one_step: IterativeModel | None = None, device="cpu"
) -> dict:
    """The summary: errors per step for the refiner and per-step baselines, and the at-once baselines."""
    family, ec, k = model.family, cfg.eval, cfg.task.steps
    horizon = ec.horizon * k
    fn = baselines.natural_fn(family, cfg.regime.hidden)
    # learning rates are picked on training data (finite data sets: the train split), never on the test split
    select = family.sample(ec.seed + 1, torch.arange(ec.lr_select_episodes), num_batches=k, device=device, split="train")
    lrs = {opt: baselines.select_lr(family, fn, select, k, opt, ec.lr_grid) for opt in ("adam", "sgd")}

    sums: dict[str, torch.Tensor] = {}

    def add(name: str, terms) -> None:
        if terms is None:
            return
        t = torch.stack(terms) if isinstance(terms, list) else terms.unsqueeze(0)  # [steps, 2, T]
        sums[name] = sums.get(name, 0) + t.sum(-1).double().cpu()

    model.eval()
    if one_step is not None:
        one_step.eval()
    for start in range(0, ec.episodes, ec.batch_tasks):
        idx = torch.arange(start, min(start + ec.batch_tasks, ec.episodes))
        ep = family.sample(ec.seed, idx, num_batches=horizon, device=device, split="test")
        add("refiner", refine(model, ep, horizon))
        add("bayes_optimal", baselines.bayes_optimal(family, ep, horizon))
        for opt in ("adam", "sgd"):
            add(opt, baselines.gradient_descent(family, fn, ep, horizon, opt, lrs[opt]))
        add("full_fit", baselines.full_fit(family, fn, ep.first_batches(k)))
        if one_step is not None:
            add("one_step", refine(one_step, ep.first_batches(k).as_one_batch(), 1)[-1])
        if hasattr(family, "true_velocity"):  # the limit: the task's own velocity field
            add("true_field", torch.stack(family.error_terms(family.true_velocity(ep.truth, ep.x_query), ep.y_query)))

    errors = {name: (100.0 * s[:, 0] / s[:, 1]).tolist() for name, s in sums.items()}
    summary = {
        "task": cfg.task.model_dump(),
        "regime": cfg.regime.model_dump(),
        "metric": metric_name(family.kind),
        "episodes": ec.episodes,
        "K": k,
        "steps": list(range(horizon + 1)),  # index i: after i refinement steps (0 = the initial state)
        "per_step": {name: errors[name] for name in PER_STEP if name in errors},
        "at_once": {name: errors[name][0] for name in AT_ONCE if name in errors},
        "lr": lrs,
    }
    if family.kind == "generative" and ec.sample_tasks:
        summary["generative"] = sample_quality(model, one_step, cfg, lrs, device)
    return summary


def metric_name(kind: str) -> str:
    """DESIGN.md's metric for a family kind, as tables and plots label it."""
    return {"regression": "relative squared error %", "classification": "classification error %",
            "generative": "relative flow-matching loss %"}[kind]


def format_table(summary: dict) -> str:
    """A markdown table: one row per method, error % after selected steps, and the at-once baselines."""
    k, horizon = summary["K"], summary["steps"][-1]
    cols = report_steps(k, horizon)
    head = "| method | " + " | ".join(f"step {s}" for s in cols) + f" | all {k} mini-batches at once |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    lr = summary.get("lr", {})
    for name, errs in summary["per_step"].items():
        label = f"{name} (lr {lr[name]:g})" if name in lr else name
        lines.append(f"| {label} | " + " | ".join(format_error(errs[s]) for s in cols) + " | |")
    for name, err in summary["at_once"].items():
        lines.append(f"| {name} | " + " | ".join("" for _ in cols) + f" | {format_error(err)} |")
    if "generative" in summary:
        lines += ["", format_quality(summary["generative"])]
    return "\n".join(lines)


def format_error(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.1f}"


def load_for_eval(path: Path, overrides: list[str], device) -> tuple[IterativeModel, ExperimentConfig]:
    """A checkpoint's model, evaluated under its own config with --set overrides (e.g. another family)."""
    ckpt, cfg = read_checkpoint(path)
    cfg = cfg.with_overrides(dict(parse_override(o) for o in overrides))
    return model_from_state(cfg, ckpt["model"], device, str(path)), cfg


def model_from_state(cfg: ExperimentConfig, state: dict, device, source: str = "the checkpoint") -> IterativeModel:
    model = IterativeModel(cfg, build_family(cfg.task))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ConfigError(f"{source} does not fit task {cfg.task.family} with these settings: {first}") from None
    return model.to(device).eval()


def evaluate_trained(cfg: ExperimentConfig, state: dict, one_step_state: dict | None, device=None) -> dict:
    """The summary of a trained refiner (and one-step model) given their weights: what `train` evaluates,
    in process or as Ray work on a learner's resources (service/evaluation.py)."""
    device = resolve_device(cfg.train.device) if device is None else device
    model = model_from_state(cfg, state, device)
    one = None if one_step_state is None else model_from_state(one_step_config(cfg), one_step_state, device)
    return evaluate(model, cfg, one, device)


def one_step_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The one-step (K=1) amortized model: reads all K*B context points at once, same learner steps."""
    return cfg.with_overrides({"task.steps": 1, "task.batch_size": cfg.task.steps * cfg.task.batch_size,
                               **K_STEPS_ONLY})


def one_step_beside(checkpoint: Path) -> Path:
    return checkpoint.parent / "one_step" / "checkpoint.pt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iai_dist.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="directory for summary.json (default: the checkpoint's)")
    args = parser.parse_args(argv)

    try:
        model, cfg = load_for_eval(args.checkpoint, args.overrides, "cpu")
        one_path = one_step_beside(args.checkpoint)
        one_step = None
        if one_path.exists():
            overrides = [o for o in args.overrides if not o.startswith(("task.steps", "task.batch_size"))]
            one_step, _ = load_for_eval(one_path, overrides, "cpu")
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = resolve_device(cfg.train.device)
    summary = evaluate(model.to(device), cfg, None if one_step is None else one_step.to(device), device)
    out = args.out or args.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    summary.get("generative", {}).pop("pictures", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
