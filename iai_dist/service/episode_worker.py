"""Episode workers: Ray actors that sample episodes, roll out K refinement states with the newest refiner
snapshot they hold, compute the inner-loss gradients, and ship the transitions.

Task-sharded: worker w owns the episode indices [w * SLICE, (w + 1) * SLICE). The learner asks for batch
number n of a worker's slice, so a worker keeps no cursor of its own: a crashed worker that Ray restarts
re-runs the request it died in and continues its slice exactly, and no two workers ever draw one episode.
"""

from __future__ import annotations

import os
import time
import warnings

import ray
import torch

from iai_dist.config import validate
from iai_dist.refiner import IterativeModel
from iai_dist.rollout import Transitions, make_transitions
from iai_dist.tasks import build_family

SLICE = 1 << 40  # episode indices per worker: room for 10^12 episodes each


class WeightBoard:
    """Holds the newest published refiner weights (version = learner step), owned by this actor so they
    outlive a restarted learner. Episode workers poll it before each rollout."""

    def __init__(self) -> None:
        self.version = -1
        self.weights: list[ray.ObjectRef] = []

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        self.version, self.weights = version, [ray.put(weights)]  # a list: callers get the ref, not the value

    def latest(self) -> tuple[int, list[ray.ObjectRef]]:
        return self.version, self.weights


class EpisodeWorker:
    def __init__(self, cfg_data: dict, index: int, board_name: str, use_gpu: bool):
        cfg = validate(cfg_data, "episode worker config")
        # by name, not handle: constructor arguments stay inline, so a restart never depends on the caller
        self.index, self.board, self.seed = index, ray.get_actor(board_name), cfg.train.seed
        self.tasks = cfg.train.tasks_per_batch // cfg.distributed.num_workers  # one learner rank's share
        self.device = torch.device("cuda" if use_gpu else "cpu")
        torch.manual_seed(cfg.train.seed)
        self.family = build_family(cfg.task)
        self.model = IterativeModel(cfg, self.family).to(self.device).eval()
        self.version = -1
        self.batches = 0  # produced by this incarnation

    def rollout(self, batch: int) -> tuple[int, Transitions]:
        """Batch number `batch` of this worker's slice, rolled out with the newest weights on the board."""
        self._refresh()
        start = self.index * SLICE + batch * self.tasks
        episodes = self.family.sample(self.seed, torch.arange(start, start + self.tasks), device=self.device)
        transitions = make_transitions(self.model, episodes, version=self.version)
        self.batches += 1
        return batch, transitions.to("cpu")

    def _refresh(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            version, refs = ray.get(self.board.latest.remote())
            if version >= 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"episode worker {self.index}: no refiner weights published in {timeout_s:.0f}s")
            time.sleep(0.02)
        # != rather than >: after a learner restart the board goes back to the checkpoint's version
        if version != self.version:
            self.model.load_state_dict(ray.get(refs[0]))
            self.version = version

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # the property still reads a deprecated field inside Ray 2.60
            warnings.simplefilter("ignore")
            restarted = ctx.was_current_actor_reconstructed
        return {"index": self.index, "pid": os.getpid(), "node": ctx.get_node_id(), "version": self.version,
                "batches_this_incarnation": self.batches, "restarted": restarted}
