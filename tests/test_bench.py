"""The benchmarks run end to end at toy sizes and write what they print."""

import json
import math
import os
from pathlib import Path

import torch

from iai_dist import bench
from iai_dist.devices import uses_bf16
from iai_dist.learner import Learner

ROOT = Path(__file__).resolve().parent.parent


def test_quality_bench_writes_table_and_json(tmp_path, capsys):
    bench.main(["quality", "--minutes", "0.03", "--one-step-minutes", "0.01", "--episodes", "32",
                "--adam-max-steps", "50", "--settings", "linreg-paper/parametric/grad", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "quality.json").read_text())
    s = data["settings"]["linreg-paper/parametric/grad"]
    assert len(s["per_step"]["refiner"]) == 21 and "one_step" in s["at_once"]
    assert s["adam_steps_to_reach_refiner"]["max_steps"] == 50
    assert "| refiner |" in (tmp_path / "quality.md").read_text()
    assert "DESIGN.md reference" in capsys.readouterr().out
    # --steps: a fixed number of learner steps instead of the budget
    bench.main(["quality", "--steps", "7", "--one-step-minutes", "0", "--episodes", "16", "--adam-max-steps", "10",
                "--settings", "linreg-paper/parametric/grad", "--out", str(tmp_path / "steps")])
    data = json.loads((tmp_path / "steps" / "quality.json").read_text())
    assert data["steps"] == 7 and data["settings"]["linreg-paper/parametric/grad"]["train"]["steps"] == 7


def test_learner_and_scaling_benches(tmp_path, monkeypatch):
    heldout = Learner.heldout_errors
    monitored = []  # the timed steps are learner steps only: no held-out episodes are rolled out
    monkeypatch.setattr(Learner, "heldout_errors", lambda self: monitored.append(self.cfg.eval.monitor_episodes)
                        or heldout(self))
    bench.main(["learner", "--tasks", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "learner-cpu.json").read_text())["rows"]
    assert [r["autocast"] for r in rows] == ["off", "bf16"] and sum(r["auto_picks"] for r in rows) == 1
    assert all(0 < r["learner_steps_per_s"] < 1000 for r in rows)  # 2 tasks of linreg-paper, 2-thread CPU
    assert all(r["compile"] == "off" and r["x_eager"] is None and r["warmup_s"] > 0 for r in rows)
    assert monitored and set(monitored) == {0}
    bench.main(["learner", "--tasks", "8", "--steps", "1", "--warmup", "1", "--device", "cpu", "--autocast", "off",
                "--unroll", "1,10", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "learner-cpu.json").read_text())["rows"]
    assert [r["unroll"] for r in rows] == [1, 10] and all(r["peak_gpu_mib"] is None for r in rows)
    picked = "" if uses_bf16("auto", torch.device("cpu")) else " (auto)"  # bf16 on a CPU with AMX or AVX512-BF16
    assert f"| off | off{picked} | 10 | 8 |" in (tmp_path / "learner-cpu.md").read_text()
    bench.main(["scaling", "--points", "20", "--tasks", "2", "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [(r["mode"], r["steps"], r["batch"]) for r in rows] == [("k-step", 2, 10), ("one-step", 1, 20)]
    assert all(r["seconds"] > 0 for r in rows)


def test_learner_bench_side_by_side_with_an_exported_tree_keeps_the_callers_python_path(tmp_path, monkeypatch):
    """On the GPU machine the packages come from a folder on PYTHONPATH and the tree travels without its git
    history: --baseline takes an exported tree, and both sides' processes keep the caller's PYTHONPATH."""
    site, marks = tmp_path / "site", tmp_path / "marks"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"open({str(marks)!r}, 'a').write('started\\n')\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    bench.main(["learner", "--tasks", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--autocast", "off",
                "--baseline", str(ROOT), "--rounds", "1", "--out", str(tmp_path)])
    b = json.loads((tmp_path / "learner-cpu.json").read_text())["baseline"]
    assert b["ref"] == str(ROOT) and len(b["rates"]["this"]) == len(b["rates"]["base"]) == 1
    assert b["this"] > 0 and b["base"] > 0 and marks.read_text().count("started") >= 2
    assert "Side by side with" in (tmp_path / "learner-cpu.md").read_text()
    assert os.environ["PYTHONPATH"] == str(site)


def test_service_throughput_bench_compares_modes_at_equal_wall_clock(ray_local, tmp_path):
    bench.main(["throughput", "--preset", "tiny", "--steps", "8", "--minutes", "0.05", "--episodes", "32",
                "--modes", "b", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert list(data["rates"]) == ["(a) in process", "(b) 1 learner + 1 episode worker"]
    assert [r["staleness"] for r in data["rates"].values()] == [0, 1]
    assert all(0 <= r["learner_idle_pct"] <= 100 for r in data["rates"].values())
    for q in data["quality"].values():  # both trained: the held-out error falls with every step
        errors = q["error_by_step"]
        assert len(errors) == 4 and errors[3] < errors[2] < errors[1] < errors[0]
    assert "x (a) at step 3" in (tmp_path / "throughput.md").read_text()


def test_chaos_counts_the_steps_restarted_learners_redo_when_a_restarted_node_replays_old_lines():
    """A learner (pid 10) dies after step 3 and pid 11 resumes from step 1; pid 10's node comes back and Ray
    sends its old lines again; then pid 11 dies after step 6 and pid 12 resumes from step 4. Steps 2, 3, 5
    and 6 were redone, once each (in log order, the replay would hide the second restart's two)."""
    from iai_dist.service.bench import _steps_redone

    def lines(pid, steps, ip=", ip=127.0.0.2"):
        return [f"(RayTrainWorker pid={pid}{ip}) [refiner] step {s:>6}/8 | 9.1 it/s" for s in steps]

    def resumed(pid, step):
        return [f"(RayTrainWorker pid={pid}) [refiner] resumed at learner step {step} (episode {32 * step})"]

    first = lines(10, [1, 2, 3], ip="")
    log = [*first, *resumed(11, 1), *lines(11, range(2, 7)), *first, *resumed(12, 4), *lines(12, range(5, 9))]
    assert _steps_redone("\n".join(log)) == 4
    assert _steps_redone("\n".join(lines(10, range(1, 9)))) == 0


def test_latent_bench_fits_the_best_latent_per_task_for_each_conditioning(tmp_path):
    bench.main(["latent", "--presets", "tiny", "--train-tasks", "16", "--tasks", "8", "--steps", "200", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "latent.json").read_text())["rows"]["tiny"]
    assert set(rows) == {"film", "concat", "full_fit"}
    for mode in ("film", "concat"):  # fitted latents explain the context far better than predicting zero (100%)
        assert rows[mode]["context"] < 50 and math.isfinite(rows[mode]["query"])
    assert 0 < rows["full_fit"] < 10  # tiny: d=4, 12 points, noise 0.01: least squares is nearly exact
    assert "f_gamma film" in (tmp_path / "latent.md").read_text()
