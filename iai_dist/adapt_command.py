"""`python -m iai_dist.adapt`: a trained refiner adapts to a CSV file and predicts another (the estimators of
iai_dist/adapt.py on files with a header row; `--target` names the label column)."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from iai_dist.adapt import AmortizedClassifier, AmortizedRegressor, load_refiner
from iai_dist.checkpoint import CheckpointError
from iai_dist.config import ConfigError


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Numbers from a CSV file with a header row; `target` names the label column (None: no labels)."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path}: expected a header row and at least one data row")
    header, body = rows[0], rows[1:]
    if target is not None and target not in header:
        raise ValueError(f"{path}: no column {target!r} (columns: {', '.join(header)}); name it with --target")
    features = [c for c in header if c != target]
    try:
        data = np.array([[float(v) for v in row] for row in body], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: every value must be a number ({exc})") from None
    if data.ndim != 2 or data.shape[1] != len(header):
        raise ValueError(f"{path}: every row must have {len(header)} values, like the header")
    if target is None:
        return data, None, features
    col = header.index(target)
    return np.delete(data, col, axis=1), data[:, col], features


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iai_dist.adapt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run directory, checkpoint file or runs:/RUN_ID")
    p.add_argument("--train", required=True, type=Path, help="CSV with a header: feature columns and --target")
    p.add_argument("--predict", required=True, type=Path, help="CSV with the same feature columns")
    p.add_argument("--target", default="y", help="the label column of --train (default: y)")
    p.add_argument("--out", type=Path, help="write predictions here (CSV); default: standard output")
    p.add_argument("--max-steps", type=int, help="refinement steps (default: one pass over --train, at most the "
                   "refiner's horizon, K x max(train.horizon, eval.horizon))")
    p.add_argument("--seed", type=int, default=0, help="the mini-batch shuffle's seed")
    p.add_argument("--standardize", action="store_true", help="map --train onto the refiner's family's scale "
                   "(per feature and target: its mean and spread), and the predictions back")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args(argv)
    try:
        x, y, features = _read_csv(args.train, args.target)
        xq, _, query_features = _read_csv(args.predict, args.target if args.target in _header(args.predict) else None)
        if query_features != features:
            raise ValueError(f"{args.predict}: expected the feature columns of {args.train} ({', '.join(features)}), "
                             f"got {', '.join(query_features)}")
        refiner, _ = load_refiner(args.model, "cpu")
        cls = AmortizedClassifier if refiner.family.kind == "classification" else AmortizedRegressor
        est = cls(model=args.model, max_steps=args.max_steps, random_state=args.seed, device=args.device,
                  standardize=args.standardize)
        est.fit(x, y)
        pred = est.predict(xq)
    except (ValueError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = ["prediction", *map(str, pred.tolist())]
    if args.out is None:
        print("\n".join(lines))
    else:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"{len(pred)} predictions ({est.n_steps_} refinement steps on {len(x)} points) -> {args.out}",
              file=sys.stderr)
    return 0


def _header(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return next(csv.reader(f), [])
