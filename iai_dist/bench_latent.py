"""`bench latent`: the error floor of the explicit regime, whatever its refiner.

f_gamma is fitted by auto-decoding (a free latent per training episode, trained jointly with f_gamma, as
regime.pretrain_steps does), then frozen; each held-out episode gets the latent that fits its K*B context points
best. A refiner that infers z, with this f_gamma, cannot do better than that fit: it is the floor of the explicit
regime for a conditioning. Beside it, the family's parametric f fitted to the same points (`baselines.full_fit`),
the parametric regime's floor.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from iai_dist import baselines
from iai_dist.bench import write
from iai_dist.config import load_config
from iai_dist.regimes.explicit import LatentPredictor, auto_decode
from iai_dist.tasks import build_family


def best_latent_error(cfg, family, ep, conditioning: str, train_tasks: int, steps: int, lr: float) -> dict:
    """f_gamma auto-decoded on `train_tasks` training episodes (all their points), then frozen; on the held-out
    episodes `ep` only latents are fitted, to their context points. Error % on their context and query."""
    torch.manual_seed(0)
    f_gamma = LatentPredictor(family.x_dim, cfg.regime.latent_dim, cfg.regime.hidden, family.out_dim, conditioning)
    train = family.sample(cfg.train.seed, torch.arange(train_tasks))
    x, y = train.context()
    start = time.perf_counter()
    auto_decode(f_gamma, family, torch.cat([x, train.x_query], 1), torch.cat([y, train.y_query], 1), steps, lr)
    f_gamma.requires_grad_(False)
    x, y = ep.context()
    z, _ = auto_decode(f_gamma, family, x, y, steps, 10 * lr)  # the latents alone
    with torch.no_grad():
        return {"context": family.error(f_gamma(z, x), y), "query": family.error(f_gamma(z, ep.x_query), ep.y_query),
                "seconds": time.perf_counter() - start}


def latent(args) -> None:
    rows, lines = {}, []
    modes = args.conditioning.split(",")
    for preset in args.presets.split(","):
        cfg = load_config(preset, overrides=["regime.kind=explicit", *args.overrides])
        family = build_family(cfg.task)
        ep = family.sample(cfg.eval.seed, torch.arange(args.tasks), split="test")
        num, den = baselines.full_fit(family, baselines.natural_fn(family, cfg.regime.hidden), ep)
        full = 100.0 * float(num.sum() / den.sum())
        rows[preset] = {"full_fit": full}
        for mode in modes:
            rows[preset][mode] = best_latent_error(cfg, family, ep, mode, args.train_tasks, args.steps, args.lr)
            print(f"{preset} {mode}: {rows[preset][mode]}", flush=True)
        cells = " | ".join(f"{rows[preset][m]['query']:.3g} ({rows[preset][m]['context']:.3g})" for m in modes)
        lines.append(f"| {preset} | {cells} | {full:.3g} |")
    head = ("| preset | " + " | ".join(f"f_gamma {m}: query (context) %" for m in modes) + " | parametric f, full fit % |\n"
            "|---|" + "---|" * (len(modes) + 1))
    note = (f"\nf_gamma auto-decoded on {args.train_tasks} training episodes ({args.steps} Adam steps, lr {args.lr}, cosine, "
            f"on f_gamma and a latent per episode), then frozen; on {args.tasks} held-out episodes only the latents are fitted "
            f"({args.steps} steps, lr {10 * args.lr:g}) to the K*B context points. Query error % (context in brackets); the "
            "parametric column fits the family's f to the same context points.")
    write(Path(args.out), "latent", {"rows": rows, "train_tasks": args.train_tasks, "tasks": args.tasks, "steps": args.steps},
          "\n".join([head, *lines]) + note)
