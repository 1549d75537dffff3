"""Checkpoints: one file format for the in-process path and every Ray Train rank, and the rules for resuming.

A checkpoint holds the learner state (model, optimizer, step, skip counters, RNG), the position of the episode
stream, what the experience source needs to go on exactly (on Ray: the weight versions still to be rolled out
with) and the config it was written under. It loads with `torch.load(weights_only=True)`: plain tensors,
numbers, strings and containers only.

Resuming may change what a user extends or re-sizes (RESUMABLE) and nothing else: the task, regime, refiner
and the rest of the optimisation stay as they were, or the command stops with one line naming the key.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from iai_dist.config import ExperimentConfig, flatten, validate

CHECKPOINT_FORMAT = 2
# What may change on resume. train.max_steps: train longer (or stop earlier, not before the checkpoint's step);
# the learning-rate schedule is a function of (step, max_steps), so from the resumed step on the run follows
# the schedule of a run started with the new max_steps. distributed.*: more or fewer learners and episode
# workers; episodes are addressed by learner step, so none is drawn twice or skipped. train.device, train.compile:
# where and how the same computation runs.
RESUMABLE = ("train.max_steps", "train.log_every", "train.checkpoint_every", "train.device", "train.compile",
             "eval.", "tracking.", "distributed.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or resumed; the message is one line meant for the user."""


def save(state: dict, path: str | Path) -> Path:
    """Atomic: a crash mid-write never leaves a half-written checkpoint in place of a good one."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict, ExperimentConfig]:
    """Load a checkpoint file and its config, with a clear error for anything that is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"checkpoint {str(path)!r} is not an iai_dist checkpoint")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {ckpt['format']}; this version reads format "
                              f"{CHECKPOINT_FORMAT} (episodes and schedules changed): train it again under another run name")
    config = ckpt["config"]
    if isinstance(config.get("regime"), dict) and "conditioning" not in config["regime"]:
        config["regime"]["conditioning"] = "concat"  # written before f_gamma had FiLM: the paper's concat
    return ckpt, validate(config, f"config in {path}")


def check_resumable(path: str | Path, cfg: ExperimentConfig) -> dict:
    """The checkpoint, if `cfg` may resume it: only RESUMABLE keys changed, and max_steps not below its step."""
    ckpt, saved = read_checkpoint(path)
    old, new = flatten(saved), flatten(cfg)
    for key in new:
        if not key.startswith(RESUMABLE) and old.get(key) != new[key]:
            raise CheckpointError(
                f"{path} was written with {key}={old.get(key)!r}, and {key} cannot change on resume (now "
                f"{new[key]!r}; what may: {', '.join(k.rstrip('.') + ('*' if k.endswith('.') else '') for k in RESUMABLE)}); "
                "use another run name"
            )
    if cfg.train.max_steps < ckpt["step"]:
        raise CheckpointError(f"{path} is at learner step {ckpt['step']}, past train.max_steps={cfg.train.max_steps}; "
                              "set train.max_steps to at least that to resume it")
    return ckpt


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def newest(run_dir: Path) -> Path | None:
    """The checkpoint of a run directory with the most learner steps: the in-process `checkpoint.pt` or one
    of Ray Train's `checkpoint_*/checkpoint.pt` (a run may switch between the two paths on resume). One that
    cannot be read is an error, never silently passed over for an older one, except a Ray Train directory that
    Ray never registered: a copy cut off when its learner's node was lost (Ray copies into the directory in
    place, and goes on from the checkpoint before)."""
    candidates = [p for p in (run_dir / "checkpoint.pt", *run_dir.glob("checkpoint_*/checkpoint.pt")) if p.is_file()]
    registered = _registered_by_ray(run_dir)
    steps = {}
    for path in candidates:
        try:
            steps[path] = step_of(path)
        except CheckpointError:
            if path.parent == run_dir or registered is None or path.parent.name in registered:
                raise
            print(f"[checkpoint] passing over {path}: it cannot be read and Ray Train never registered it (a copy "
                  "cut off)", file=sys.stderr, flush=True)
    return max(steps, key=steps.get, default=None)


def _registered_by_ray(run_dir: Path) -> set[str] | None:
    """The checkpoint directories Ray Train registered for this run (none before its first); None if its record
    cannot be read, so that nothing is passed over on a guess."""
    path = run_dir / RAY_SNAPSHOT
    if not path.exists():
        return set()
    try:
        return {r["checkpoint_dir_name"] for r in json.loads(path.read_text())["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_of(path: Path) -> int:
    """The learner step a checkpoint file was written at."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        read_checkpoint(path)  # says what is wrong with it
        raise
