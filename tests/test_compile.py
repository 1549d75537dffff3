"""train.compile: the greedy forward and the rollout are one graph each in every regime, and the compiled learner
(CUDA-graph mode, which on a CPU compiles as 'step' and adds the output copies) learns exactly as the eager one."""

import pytest
import torch

from iai_dist.config import load_config, validate
from iai_dist.experience import EpisodeStream, LocalRollouts
from iai_dist.learner import Learner
from iai_dist.objective import greedy_terms
from iai_dist.rollout import make_transitions, rolled_out

REGIMES = {
    "parametric": [],
    "explicit": ["regime.kind=explicit"],
    "implicit": ["regime.kind=implicit", "regime.signal=obs"],
    "mlp+moments": ["regime.model=mlp", "regime.memory=moments"],
    "observations": ["regime.memory=observations"],
    "unroll+learned": ["train.unroll=2", "regime.memory=learned"],
    "bf16": ["train.autocast=bf16"],
    "auto": ["train.autocast=auto"],  # resolved when the model is placed, not probed inside the graph
}


@pytest.mark.parametrize("name", REGIMES)
def test_learner_step_and_rollout_trace_as_one_graph(name):
    """A graph break would split a compiled step into pieces with eager work (and host syncs) between them."""
    cfg = load_config("tiny", overrides=["train.device=cpu", "train.autocast=off", *REGIMES[name]])
    learner = Learner(cfg)
    ep = learner.family.sample(0, torch.arange(4))
    tr = make_transitions(learner.model, ep)
    torch._dynamo.reset()
    objective = torch._dynamo.explain(lambda t: greedy_terms(learner.model, t, cfg.train.unroll))(tr)
    rollout = torch._dynamo.explain(lambda e: rolled_out(learner.model, e))(ep)
    assert (objective.graph_count, objective.graph_break_count) == (1, 0), objective.break_reasons
    assert (rollout.graph_count, rollout.graph_break_count) == (1, 0), rollout.break_reasons


def _losses_and_weights(mode: str) -> tuple[list[float], list[torch.Tensor]]:
    cfg = load_config("tiny", overrides=["train.device=cpu", "train.autocast=off", f"train.compile={mode}",
                                         "train.tasks_per_batch=8", "task.steps=2"])
    learner = Learner(cfg)
    source = LocalRollouts(learner, EpisodeStream(cfg.train.tasks_per_batch))
    losses = []
    for step in range(3):
        tr, _ = source.next(step)
        losses.append(learner.learn(tr).read().loss)
    return losses, [p.detach().clone() for p in learner.model.parameters()]


@pytest.mark.slow
def test_compiled_learner_learns_as_the_eager_one():
    eager, eager_weights = _losses_and_weights("off")
    graphs, graphs_weights = _losses_and_weights("graphs")
    assert graphs == pytest.approx(eager, rel=1e-5) and len(set(eager)) == 3
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager_weights, graphs_weights))
    assert any(not torch.equal(a, p) for a, p in zip(eager_weights, Learner(load_config("tiny")).model.parameters()))


def test_configs_from_before_the_compile_modes_still_validate():
    data = load_config("tiny").model_dump(mode="json")
    for old, now in [(True, "refiner"), (False, "off")]:
        data["train"]["compile"] = old
        assert validate(data, "checkpoint config").train.compile == now
