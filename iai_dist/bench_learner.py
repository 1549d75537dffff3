"""`bench learner`: in-process learner steps/s per tasks per step, precision, train.compile mode and unroll, and,
with --baseline, this tree against another revision side by side in alternating fresh processes."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from iai_dist.bench import SETTINGS, learner_rate, write
from iai_dist.config import load_config
from iai_dist.devices import resolve_device, uses_bf16


def learner(args) -> None:
    """Learner steps on linreg-paper at each --tasks tasks per step: fp32 and bf16 autocast (and which one
    train.autocast=auto picks here), under each train.compile mode asked for (x eager: the ratio to the 'off' row
    of the same setting, measured in this run); with --baseline REF, this tree (at the last --compile mode) and
    REF (eager) side by side, in alternating processes. --unroll 1,2,5,10: the cost of non-greedy training
    (train.unroll) per learner step, side by side. The rows are written before the baseline runs."""
    device = resolve_device(args.device)
    rows = []
    for name in args.settings.split(","):
        preset, overrides = SETTINGS[name]
        for tasks in [int(n) for n in args.tasks.split(",")]:
            for autocast in args.autocast.split(","):
                for unroll in [int(n) for n in args.unroll.split(",")]:
                    for mode in args.compile.split(","):
                        sets = [f"train.tasks_per_batch={tasks}", f"train.compile={mode}",
                                f"train.autocast={autocast}", f"train.unroll={unroll}"]
                        cfg = load_config(preset, overrides=[*overrides, *sets])
                        rate, peak, warmup_s = learner_rate(cfg, device, args.warmup, args.steps)
                        rows.append({"setting": name, "compile": mode, "device": str(device), "tasks": tasks,
                                     "autocast": autocast, "unroll": unroll,
                                     "auto_picks": autocast == ("bf16" if uses_bf16("auto", device) else "off"),
                                     "learner_steps_per_s": rate, "episodes_per_s": tasks * rate,
                                     "refinement_steps_per_s": tasks * cfg.task.steps * rate, "peak_gpu_mib": peak,
                                     "warmup_s": warmup_s})
                        print(f"   {name} tasks={tasks} {autocast} compile={mode} unroll={unroll}: {rate:.2f} learner "
                              f"steps/s (warmup {warmup_s:.1f}s)", flush=True)
    same = lambda r: (r["setting"], r["tasks"], r["autocast"], r["unroll"])  # noqa: E731
    eager = {same(r): r["learner_steps_per_s"] for r in rows if r["compile"] == "off"}
    for r in rows:
        r["x_eager"] = r["learner_steps_per_s"] / eager[same(r)] if r["compile"] != "off" and same(r) in eager else None
    head = ("| setting | device | compile | autocast | unroll | tasks/step | learner steps/s | episodes/s | "
            "refinement steps/s | x eager | warmup s | peak GPU MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['setting']} | {r['device']} | {r['compile']} | {r['autocast']}{' (auto)' if r['auto_picks'] else ''} "
             f"| {r['unroll']} | {r['tasks']} | {r['learner_steps_per_s']:.2f} | {r['episodes_per_s']:.0f} | "
             f"{r['refinement_steps_per_s']:.0f} | {_cell(r['x_eager'], '.2f')} | "
             f"{r['warmup_s']:.1f} | {_cell(r['peak_gpu_mib'], '.0f')} |" for r in rows]
    table = ("\n".join([head, *lines]) + "\n\n(auto): what train.autocast=auto runs on this device. warmup s: the first "
             f"{args.warmup} steps, where train.compile compiles.")
    payload = {"rows": rows}
    name = f"learner-{device.type}"
    write(Path(args.out), name, payload, table)
    if args.baseline:
        payload["baseline"] = b = side_by_side(args, device)
        table += (f"\n\nSide by side with {b['ref']} ({b['rounds']} alternating rounds, {b['autocast']} both, "
                  f"{b['tasks']} tasks, median learner steps/s): this tree (compile={b['compile']}) {b['this']:.3f}, "
                  f"{b['ref']} (eager) {b['base']:.3f}: ratio {b['ratio']:.3f}")
        write(Path(args.out), name, payload, table)


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def baseline_tree(ref: str, root: Path, into: Path) -> Path:
    """The tree holding REF's iai_dist/: REF itself where it is such a directory (exported beforehand, for a
    machine without the git history), else REF exported from git into `into`."""
    if (Path(ref) / "iai_dist" / "__init__.py").is_file():
        tree = into / "tree"
        shutil.copytree(Path(ref) / "iai_dist", tree / "iai_dist", ignore=shutil.ignore_patterns("__pycache__"))
        return tree
    archive = subprocess.run(["git", "-C", str(root), "archive", ref, "iai_dist"], capture_output=True)
    if archive.returncode:
        sys.exit(f"error: --baseline {ref}: neither a directory holding iai_dist/ nor a git revision here "
                 f"({archive.stderr.decode().strip() or 'git archive failed'})")
    (into / "tree").mkdir()
    subprocess.run(["tar", "-x", "-C", str(into / "tree")], input=archive.stdout, check=True)
    return into / "tree"


def side_by_side(args, device: torch.device) -> dict:
    """`bench learner` of this tree and of args.baseline, one setting, in alternating fresh processes (so
    neither gets a warmer machine), at the precision auto picks here for both."""
    root = Path(__file__).resolve().parent.parent
    autocast = "bf16" if uses_bf16("auto", device) else "off"
    scratch = Path(tempfile.mkdtemp(prefix="iai-baseline-"))
    try:
        export = baseline_tree(args.baseline, root, scratch)
        for preset in (export / "iai_dist" / "presets").glob("*.yaml"):  # older trees hard-code bf16 in presets
            preset.write_text(preset.read_text().replace("autocast: bf16", f"autocast: '{autocast}'"))
        setting = args.settings.split(",")[0]
        tasks, mode = args.tasks.split(",")[0], args.compile.split(",")[-1]
        common = ["--settings", setting, "--tasks", tasks, "--steps", str(args.steps),
                  "--warmup", str(args.warmup), "--device", args.device, "--autocast", autocast]
        rates: dict[str, list[float]] = {"this": [], "base": []}
        for r in range(args.rounds):
            for side, tree in (("base", export), ("this", root)):
                out = scratch / f"out-{side}-{r}"
                # the tree first, then what this process was given (on the GPU machine: its packages' folder)
                path = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
                env = {**os.environ, "PYTHONPATH": path}
                this_mode = ["--compile", mode] if side == "this" else []  # older trees know no modes: eager
                proc = subprocess.run([sys.executable, "-m", "iai_dist.bench", "learner", *common, *this_mode,
                                       "--out", str(out)],
                                      cwd=tree, env=env, capture_output=True, text=True)
                if proc.returncode:
                    last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                    sys.exit(f"error: bench learner of {side} failed: {last}")
                row = json.loads((out / f"learner-{device.type}.json").read_text())["rows"][0]
                rates[side].append(row["learner_steps_per_s"])
                print(f"   round {r + 1}: {side} {rates[side][-1]:.3f} learner steps/s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    this, base = statistics.median(rates["this"]), statistics.median(rates["base"])
    return {"ref": args.baseline, "setting": setting, "rounds": args.rounds, "autocast": autocast,
            "tasks": int(tasks), "compile": mode,
            "rates": rates, "this": this, "base": base, "ratio": this / base}
