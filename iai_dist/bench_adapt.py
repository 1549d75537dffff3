"""`python -m iai_dist.bench adapt`: a trained refiner used as a streaming estimator, beside scikit-learn's.

One synthetic task of the refiner's own family (linear regression or classification; its task config: d,
noise, classes) is streamed in chunks of CHUNK points, so no method but the batch ones (Ridge,
LogisticRegression: they need every point at once) ever holds the stream. Each (method, stream length) runs in
a fresh process that reports its wall clock, points/s, peak resident memory (and how far it rose above the
process once torch, scikit-learn and the refiner were loaded) and the DESIGN.md error on 10,000 held-out points
of the same task. The refiner's time includes reading its checkpoint (tens of ms).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

CHUNK = 10_000  # points per partial_fit call: what a stream hands over at a time
HELD_OUT = 10_000
METHODS = {
    "regression": ("refiner", "refiner, first K mini-batches", "SGDRegressor.partial_fit", "Ridge (all at once)"),
    "classification": ("refiner", "refiner, first K mini-batches", "SGDClassifier.partial_fit",
                       "LogisticRegression (all at once)"),
}


class Task:
    """One task of the family in `cfg.task`, drawn with numpy: chunk i of the stream is a pure function of i."""

    def __init__(self, cfg, kind: str, seed: int):
        t, rng = cfg.task, np.random.default_rng(seed)
        self.kind, self.dim, self.seed, self.noise, self.tau = kind, t.dim, seed, t.noise_var ** 0.5, t.label_noise
        self.classes = t.num_classes if kind == "classification" else 0
        self.w = rng.normal(size=(t.dim, self.classes)) if self.classes else rng.normal(size=t.dim)

    def chunk(self, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, i])
        x = rng.normal(size=(n, self.dim))
        if not self.classes:
            return x, x @ self.w + self.noise * rng.normal(size=n)
        logits = x @ self.w + (self.tau * rng.gumbel(size=(n, self.classes)) if self.tau else 0)
        return x, logits.argmax(1)

    def stream(self, n: int):
        for i, start in enumerate(range(0, n, CHUNK)):
            yield self.chunk(i + 1, min(CHUNK, n - start))

    def error(self, predict) -> float:
        """Relative squared error % (regression) or misclassified % on held-out points (chunk 0)."""
        x, y = self.chunk(0, HELD_OUT)
        pred = predict(x)
        if self.classes:
            return 100.0 * float((pred != y).mean())
        return 100.0 * float(((pred - y) ** 2).sum() / (y ** 2).sum())


def run_one(method: str, n: int, model: str, seed: int) -> dict:
    """One method on a stream of n points, in this (fresh) process."""
    import torch
    from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier, SGDRegressor

    from iai_dist.adapt import AmortizedClassifier, AmortizedRegressor, HorizonWarning, load_refiner

    torch.set_num_threads(1)  # one core each, as a serving process would get
    refiner, cfg = load_refiner(model)
    kind = refiner.family.kind
    task = Task(cfg, kind, seed)
    classes = np.arange(task.classes) if task.classes else None
    base_rss = _rss_mb()
    start = time.perf_counter()
    read = n
    if method.startswith("refiner"):
        cls = AmortizedClassifier if kind == "classification" else AmortizedRegressor
        est = cls(model=model, random_state=seed)
        if method == "refiner":
            # the whole stream, far past the refiner's horizon: what this row measures, so not warned about
            warnings.simplefilter("ignore", HorizonWarning)
            for x, y in task.stream(n):
                est.partial_fit(x, y, **({} if classes is None else {"classes": classes}))
        else:  # the trained horizon: K mini-batches of B, the first K*B points of the stream
            read = cfg.task.steps * cfg.task.batch_size
            x, y = task.chunk(1, read)
            est.set_params(max_steps=cfg.task.steps).fit(x, y)
    elif method.endswith("partial_fit"):
        est = SGDClassifier(loss="log_loss", random_state=seed) if classes is not None else SGDRegressor(random_state=seed)
        for x, y in task.stream(n):
            est.partial_fit(x, y, **({} if classes is None else {"classes": classes}))
    else:
        xs, ys = zip(*task.stream(n))
        est = LogisticRegression(max_iter=1000) if classes is not None else Ridge(alpha=1e-3)
        est.fit(np.concatenate(xs), np.concatenate(ys))
    seconds = time.perf_counter() - start
    return {"method": method, "points": n, "read": read, "seconds": seconds, "points_per_s": read / seconds,
            "peak_rss_mb": _rss_mb(), "rss_after_load_mb": base_rss, "error": task.error(est.predict)}


def _rss_mb() -> float:
    """The peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def adapt(args) -> None:
    from iai_dist.adapt import load_refiner
    from iai_dist.bench import write

    models = {"regression": args.model, "classification": args.classifier_model}
    if not any(models.values()):
        raise SystemExit("bench adapt: give --model (a regression refiner), --classifier-model, or both")
    for (kind, model), flag in zip(models.items(), ("--model", "--classifier-model")):
        if model is None:
            continue
        family = load_refiner(model)[1].task.family
        if family != f"linear_{kind}":  # the only families Task draws, and the ones the linear baselines fit
            raise SystemExit(f"bench adapt: {flag} {model} is a {family} refiner; expected a linear_{kind} one")
    points = [int(p) for p in args.points.split(",")]
    rows = []
    for kind, model in models.items():
        if model is None:
            continue
        for method in METHODS[kind]:
            for n in points[:1] if "first K" in method else points:
                cmd = [sys.executable, "-m", "iai_dist.bench", "_adapt_one", method, str(n), str(model), str(args.seed)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"bench adapt: {method} on {n} points failed:\n{proc.stderr[-3000:]}")
                row = {"kind": kind, **json.loads(proc.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"[adapt] {kind:14s} {method:34s} {n:>9,d} points: {row['points_per_s']:>10,.0f} points/s, "
                      f"peak {row['peak_rss_mb']:.0f} MB, error {row['error']:.3g}%", flush=True)
    lines = ["| task | method | stream (points) | points read | points/s | peak memory (MB) | peak above the loaded "
             "process (MB) | error % |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['method']} | {r['points']:,} | {r['read']:,} | {r['points_per_s']:,.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_after_load_mb']:.0f} | {r['error']:.3g} |")
    write(Path(args.out), "adapt", {"models": {k: str(v) for k, v in models.items()}, "seed": args.seed, "rows": rows},
          "\n".join(lines))
