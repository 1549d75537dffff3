"""Data parallelism is exact: two gloo ranks, each with half of a batch of transitions, accumulate the very
gradient that one process computes on the whole batch, in every regime and for both step weightings."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iai_dist.config import load_config
from iai_dist.learner import Learner
from iai_dist.objective import greedy_backward
from iai_dist.rollout import make_transitions

CASES = [(kind, signal, weighting) for kind, signal in [("parametric", "obs+grad"), ("explicit", "grad"),
                                                         ("implicit", "obs")]
         for weighting in ("relative", "uniform")]
TASKS = 16


def case_config(kind, signal, weighting):
    """In fp32: on a CPU with native bf16, `auto` would round a half batch's activations otherwise than a whole one's."""
    return load_config("tiny", overrides=[f"regime.kind={kind}", f"regime.signal={signal}",
                                          f"train.step_weighting={weighting}", f"train.tasks_per_batch={TASKS}",
                                          "train.autocast=off", "tracking.enabled=false"])


def gradient(learner: Learner, first: int, count: int) -> list[torch.Tensor]:
    """The greedy gradient on episodes first..first+count-1, rolled out by a refiner with non-trivial updates."""
    ep = learner.family.sample(0, torch.arange(first, first + count))
    tr = make_transitions(learner.model, ep, first_episode=first)
    learner.optimizer.zero_grad(set_to_none=True)
    greedy_backward(learner.objective, tr, learner.cfg.train, learner.cfg.task.steps)
    return [p.grad.detach().clone() for p in learner.model.parameters()]


def perturbed(learner: Learner) -> Learner:
    torch.manual_seed(1)
    torch.nn.init.normal_(learner.model.refiner.out.weight, std=0.2)  # rollouts that move the state
    return learner


def rank_main(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        grads = {}
        for case in CASES:
            learner = perturbed(Learner(case_config(*case)))
            assert isinstance(learner.objective, torch.nn.parallel.DistributedDataParallel)
            grads[case] = gradient(learner, rank * TASKS // 2, TASKS // 2)
        torch.save(grads, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(rank_main, args=(str(tmp / "store"), str(tmp)), nprocs=2)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", CASES, ids=["/".join(c) for c in CASES])
def test_two_rank_gradient_equals_the_single_process_gradient(ddp_grads, case):
    single = gradient(perturbed(Learner(case_config(*case))), 0, TASKS)
    for g0, g1, g in zip(ddp_grads[0][case], ddp_grads[1][case], single):
        assert torch.equal(g0, g1)  # DDP leaves the same averaged gradient on both ranks
        torch.testing.assert_close(g0, g, rtol=1e-4, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in single) > 0
    if case[2] == "relative":
        # what each rank taking the log of its own mean loss (DDP then averaging) would give: not the same
        halves = [gradient(perturbed(Learner(case_config(*case))), r * TASKS // 2, TASKS // 2) for r in range(2)]
        naive = [(a + b) / 2 for a, b in zip(*halves)]
        assert max(float((n - g).abs().max() / g.abs().max().clamp_min(1e-12)) for n, g in zip(naive, single)) > 1e-3
