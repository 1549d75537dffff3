"""Sample quality of generative families: integrate the refined vector field, compare with the task's samples.

After refinement step s a model's vector field v_s(x, t) generates samples by integrating dx/dt = v_s(x, t)
from x0 ~ N(0, I) at t = 0 to t = 1. They are compared with as many held-out true samples by the sliced
Wasserstein-2 distance and an MMD with a fixed kernel, beside the floor (two independent true sets of the
same size: what a perfect model scores), and by the negative log-likelihood of the true samples beside the
true density's: in closed form for the parametric 'mixture' and EM, for every other flow by the change of
variables along its ODE (flow_log_density). Baselines on the same tasks:
EM on the points seen (scikit-learn's GaussianMixture), a flow-matching MLP trained by Adam with one step per
mini-batch, and the one-step model reading all K*B points at once.

The implicit regime's state is the velocity at each query point [x_t, t], not a sample moved toward the
distribution: a velocity has a per-point target (u = x1 - x0), so the same greedy query loss trains it, where
a sample-as-state would need a set-level loss (a distance between the refined points and the query samples)
with no pairing of points. The price is at generation: a field evaluation refines afresh at the points it
is asked about, s refiner passes per evaluation after s steps (`refiner_fields`).
"""

from __future__ import annotations

import math

import torch

from iai_dist import baselines
from iai_dist.refiner import IterativeModel
from iai_dist.reporting import report_steps
from iai_dist.rollout import refined_states
from iai_dist.tasks import Episode

MMD_BANDWIDTHS = (0.1, 0.3, 1.0)  # a sum of Gaussian kernels at the scales of a glyph's stroke and of a task
PROJECTIONS = 256  # directions of the sliced Wasserstein distance (fixed: the same for every model and run)
IMPLICIT_CHUNK = 128  # query points per row when the implicit regime refines a field at generation points
TASKS_AT_ONCE = 16  # tasks scored together (an MMD holds [tasks, samples, samples] kernel matrices)


def _at(velocity, x: torch.Tensor, t: float) -> torch.Tensor:
    return velocity(torch.cat([x, torch.full_like(x[..., :1], t)], -1))


def integrate(velocity, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """The midpoint method for dx/dt = velocity([x, t]) from t = 0 to 1; x0 [T, n, d]."""
    x, h = x0, 1.0 / steps
    for i in range(steps):
        x = x + h * _at(velocity, x + 0.5 * h * _at(velocity, x, i * h), (i + 0.5) * h)
    return x


def flow_log_density(velocity, x1: torch.Tensor, steps: int) -> torch.Tensor:
    """log p(x1) [T, n] under the flow dx/dt = velocity([x, t]) from N(0, I) at t = 0, by the instantaneous change
    of variables: log p(x1) = log N(x0) - int_0^1 div v(x_t, t) dt, integrated back from t = 1 with the midpoint
    method (as `integrate` goes forward) and the exact divergence, one backward pass per dimension (generative
    tasks are low-dimensional). Each point's velocity must depend on that point alone, as every field here does."""
    x, h, d = x1, 1.0 / steps, x1.shape[-1]
    divergence = torch.zeros_like(x1[..., 0])
    for i in reversed(range(steps)):
        mid = x - 0.5 * h * _at(velocity, x, (i + 1) * h)
        with torch.enable_grad():
            mid = mid.detach().requires_grad_(True)
            v = _at(velocity, mid, (i + 0.5) * h)
            div = sum(torch.autograd.grad(v[..., j].sum(), mid, retain_graph=j + 1 < d)[0][..., j] for j in range(d))
        x = x - h * v.detach()
        divergence = divergence + h * div
    return -0.5 * x.pow(2).sum(-1) - 0.5 * d * math.log(2 * math.pi) - divergence


class SampleDistances:
    """Distances of sample sets [T, n, d] to fixed true samples, with what depends on the truth alone computed once.

    sliced W2: the root mean over PROJECTIONS fixed random directions of the squared W2 distance of the
    one-dimensional projections (sorted samples; sets of equal size). MMD: the root of the biased estimate with
    the kernel sum_s exp(-|x - y|^2 / (2 s^2)), s in MMD_BANDWIDTHS.
    """

    def __init__(self, truth: torch.Tensor):
        dirs = torch.randn(truth.shape[-1], PROJECTIONS, generator=torch.Generator().manual_seed(0)).to(truth)
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        self.truth, self.truth_sorted = truth, torch.sort(truth @ self.dirs, dim=1).values
        self.k_truth = self._kernel_mean(truth, truth)

    def sliced_w2(self, samples: torch.Tensor) -> torch.Tensor:
        return (torch.sort(samples @ self.dirs, dim=1).values - self.truth_sorted).pow(2).mean((1, 2)).sqrt()

    def mmd(self, samples: torch.Tensor) -> torch.Tensor:
        mmd2 = self._kernel_mean(samples, samples) + self.k_truth - 2 * self._kernel_mean(samples, self.truth)
        return mmd2.clamp_min(0).sqrt()

    @staticmethod
    def _kernel_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sq = torch.cdist(x, y).pow_(2)
        return sum(torch.exp(sq * (-0.5 / s**2)).mean((1, 2)) for s in MMD_BANDWIDTHS)


def context_samples(ep: Episode, num_batches: int) -> torch.Tensor:
    """The task samples x1 = x_t + (1 - t) u behind the first `num_batches` mini-batches' flow pairs: [T, k*B, d]."""
    x, u = ep.context(num_batches)
    return x[..., :-1] + (1 - x[..., -1:]) * u


@torch.no_grad()
def refiner_fields(model: IterativeModel, ep: Episode, steps: list[int]) -> tuple[dict, dict]:
    """({s: velocity function}, {s: state}) of the model after s refinement steps on ep, for every s in steps.

    Parametric and explicit: the state after s steps is a field that predicts anywhere. Implicit: the state is
    a prediction at given query points only, so a field evaluation refines afresh at the points asked for
    (each query reads only itself and the mini-batches, so chunking the points into rows changes nothing);
    it has no state to return.
    """
    if not model.regime.state_tokens_see_each_other:  # implicit

        def field(s: int):
            def v(points: torch.Tensor) -> torch.Tensor:
                t, n = points.shape[:2]
                rows = -(-n // IMPLICIT_CHUNK)
                pts = torch.nn.functional.pad(points, (0, 0, 0, rows * IMPLICIT_CHUNK - n))
                pts = pts.reshape(t * rows, IMPLICIT_CHUNK, -1)
                at_points = Episode(ep.x.repeat_interleave(rows, 0), ep.y.repeat_interleave(rows, 0), pts,
                                    pts.new_empty(t * rows, 0))  # the same mini-batches, queried at pts
                *_, state = refined_states(model, at_points, s)
                return model.predict(state, pts).reshape(t, rows * IMPLICIT_CHUNK, -1)[:, :n]
            return v

        return {s: field(s) for s in steps}, {}
    states = {i: state for i, state in enumerate(refined_states(model, ep, max(steps))) if i in steps}
    return {s: (lambda points, st=st: model.predict(st, points)) for s, st in states.items()}, states


def em_fit(samples: torch.Tensor, components: int):
    """scikit-learn's GaussianMixture (full covariances) per task on [T, n, d] points, at most one component
    per 5 points (EM with more components than that fits single points); a list of fitted models."""
    from sklearn.mixture import GaussianMixture

    c = max(1, min(components, samples.shape[1] // 5))
    return [GaussianMixture(c, covariance_type="full", random_state=0).fit(s) for s in samples.double().cpu().numpy()]


@torch.no_grad()
def quality(family, ep: Episode, true_a: torch.Tensor, true_b: torch.Tensor, refined: tuple[dict, dict],
            at_once: dict, adam_thetas: dict, fn, density, components: int, ode_steps: int, pictures: int = 0) -> dict:
    """Sliced W2, MMD and NLL per method (per step where it has steps) on one batch of tasks: [T] tensors.

    refined: refiner_fields' (fields, states); at_once: {name: field}; adam_thetas: {step: theta of fn};
    density: log p(state, x) of the refiner's states in closed form, or None: then, as for every other flow, the
    density its field carries N(0, I) to (flow_log_density, with the samples' ode_steps)."""
    t, n, d = true_a.shape
    g = torch.Generator().manual_seed(12345)
    x0 = torch.randn(t, n, d, generator=g).to(true_a)
    out: dict = {"sw2": {}, "mmd": {}, "nll": {}}
    distances = SampleDistances(true_a)

    def score(name: str, key, samples: torch.Tensor) -> None:
        out["sw2"].setdefault(name, {})[key] = distances.sliced_w2(samples)
        out["mmd"].setdefault(name, {})[key] = distances.mmd(samples)
        if pictures:
            out.setdefault("pictures", {}).setdefault(name, {})[key] = samples[:pictures, :500].cpu()

    def nll(velocity) -> torch.Tensor:
        return -flow_log_density(velocity, true_a, ode_steps).mean(1)

    fields, states = refined
    for s, v in fields.items():
        score("refiner", s, integrate(v, x0, ode_steps))
        out["nll"].setdefault("refiner", {})[s] = -density(states[s], true_a).mean(1) if density else nll(v)
    for s, theta in adam_thetas.items():
        adam = lambda p, th=theta: fn(th, p)  # noqa: E731
        score("adam", s, integrate(adam, x0, ode_steps))
        out["nll"].setdefault("adam", {})[s] = nll(adam)
    for name, v in at_once.items():
        score(name, "at_once", integrate(v, x0, ode_steps))
        out["nll"].setdefault(name, {})["at_once"] = nll(v)
    for s in fields:
        gms = em_fit(context_samples(ep, s), components)
        drawn = torch.stack([torch.from_numpy(gm.sample(n)[0]) for gm in gms]).to(true_a)
        score("em", s, drawn)
        nll = [-gm.score_samples(a) for gm, a in zip(gms, true_a.double().cpu().numpy())]
        out["nll"].setdefault("em", {})[s] = torch.tensor([x.mean() for x in nll])
    out["sw2"]["floor"] = {"at_once": distances.sliced_w2(true_b)}
    out["mmd"]["floor"] = {"at_once": distances.mmd(true_b)}
    true_log_p = family.log_density(ep.truth, true_a)
    if true_log_p is not None:
        out["nll"]["true density"] = {"at_once": -true_log_p.mean(1)}
    if pictures:
        out["pictures"]["truth"] = {"at_once": true_a[:pictures, :500].cpu()}
    return out


def sample_quality(model: IterativeModel, one_step: IterativeModel | None, cfg, lrs: dict, device) -> dict:
    """The summary's 'generative' section: per set of held-out tasks (for alphabet also fresh tasks of the
    training letters), metric -> method -> {step: mean over tasks} and a 'pictures' entry for the first 4 tasks."""
    family, ec, k = model.family, cfg.eval, cfg.task.steps
    steps = report_steps(k, ec.horizon * k)
    fn = baselines.natural_fn(family, cfg.regime.hidden)
    density = None
    if cfg.regime.kind == "parametric" and cfg.regime.model == "mixture":
        density = lambda state, x: model.regime.fn.log_density(model.regime.params(state), x)  # noqa: E731
    components, ode = cfg.task.generative.components, cfg.task.generative.ode_steps
    sets = {"test": ec.seed} | ({"train": ec.seed + 3} if family.heldout_split_differs else {})
    result = {"steps": steps, "tasks": ec.sample_tasks, "samples": ec.samples, "sets": {}}
    for split, seed in sets.items():
        totals: dict = {}
        for start in range(0, ec.sample_tasks, TASKS_AT_ONCE):
            idx = torch.arange(start, min(start + TASKS_AT_ONCE, ec.sample_tasks))
            ep = family.sample(seed, idx, num_batches=max(steps), device=device, split=split)
            true_a = family.true_samples(seed, idx, ec.samples, device, split)
            true_b = family.true_samples(seed, idx, ec.samples, device, split, stream="heldout_b")
            thetas: list = []
            baselines.gradient_descent(family, fn, ep, max(steps), "adam", lrs["adam"], thetas=thetas)
            at_once = {}
            if one_step is not None:
                at_once["one_step"] = refiner_fields(one_step, ep.first_batches(k).as_one_batch(), [1])[0][1]
            batch = quality(family, ep, true_a, true_b, refiner_fields(model, ep, steps), at_once,
                            {s: thetas[s] for s in steps}, fn, density, components, ode,
                            pictures=4 if start == 0 else 0)
            if "pictures" in batch:
                result.setdefault("pictures", {})[split] = batch.pop("pictures")
            for metric, methods in batch.items():
                for name, by_step in methods.items():
                    for key, values in by_step.items():
                        totals.setdefault(metric, {}).setdefault(name, {}).setdefault(key, []).append(values)
        result["sets"][split] = {metric: {name: {key: float(torch.cat(v).mean()) for key, v in by_step.items()}
                                          for name, by_step in methods.items()} for metric, methods in totals.items()}
    return result


def format_quality(section: dict) -> str:
    """Markdown tables per set and metric: methods by step, the at-once methods (one-step, floor, true density) last."""
    lines = []
    for split, metrics in section["sets"].items():
        where = "held-out tasks" if split == "test" else "fresh tasks of the training letters"
        for metric, methods in metrics.items():
            if not methods:
                continue
            cols = section["steps"]
            lines += [f"{metric} on {where} ({section['samples']} samples, {section['tasks']} tasks; lower is better)",
                      "| method | " + " | ".join(f"step {s}" for s in cols) + " | at once |", "|" + "---|" * (len(cols) + 2)]
            for name, by_step in methods.items():
                cells = [_num(by_step.get(s, by_step.get(str(s)))) for s in cols]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {_num(by_step.get('at_once'))} |")
            lines.append("")
    return "\n".join(lines)


def _num(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"
