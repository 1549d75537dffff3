"""Episode workers: Ray actors that sample the episodes a learner asks for, roll out K refinement states with
the weight version it names (from the weight board, packed by `pack_weights`), compute the inner-loss gradients,
and ship the transitions.

A request names everything: the learner attempt (generation), the weight version and the episode indices. A
worker keeps no cursor and makes no choice, so a crashed worker that Ray restarts re-runs the request it died
in and returns the very same transitions, and training is reproducible however requests are spread.
"""

from __future__ import annotations

import io
import os
import time
import warnings

import ray
import torch

from iai_dist.compiling import compiled
from iai_dist.config import validate
from iai_dist.experience import training_episodes
from iai_dist.refiner import IterativeModel
from iai_dist.rollout import Transitions, make_transitions, rolled_out
from iai_dist.tasks import build_family

WEIGHTS_TIMEOUT_S = 600.0  # a version that is not published in this long means the learner is gone


def pack_weights(weights: dict[str, torch.Tensor]) -> bytes:
    """Weights as the board holds them: bytes, which the board stores without importing torch."""
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()


def unpack_weights(payload: bytes, device: torch.device) -> dict[str, torch.Tensor]:
    """A board version's weights, onto `device` (tensors only: weights_only)."""
    return torch.load(io.BytesIO(payload), map_location=device, weights_only=True)


class EpisodeWorker:
    def __init__(self, cfg_data: dict, index: int, board_name: str, use_gpu: bool):
        cfg = validate(cfg_data, "episode worker config")
        # by name, not handle: constructor arguments stay inline, so a restart never depends on the caller
        self.index, self.board, self.cfg = index, ray.get_actor(board_name), cfg
        self.device = torch.device("cuda" if use_gpu else "cpu")
        torch.manual_seed(cfg.train.seed)
        self.family = build_family(cfg.task)
        self.model = IterativeModel(cfg, self.family).to(self.device).eval()
        # a GPU worker rolls out as train.compile says; on a CPU compiling would take minutes of every (re)start
        self.roll = compiled(rolled_out, cfg.train.compile if use_gpu else "off")
        self.loaded: tuple[int, int] | None = None  # (generation, version) of the weights in self.model
        self.batches = 0  # produced by this incarnation

    def rollout(self, generation: int, version: int, first: int, count: int) -> Transitions | None:
        """Episodes first..first+count-1 rolled out with weight version `version`; None if superseded."""
        if not self._load(generation, version):
            return None
        episodes = training_episodes(self.family, self.cfg, first, count, self.device)
        transitions = make_transitions(self.model, episodes, version=version, first_episode=first, roll=self.roll)
        self.batches += 1
        return transitions.to("cpu")

    def _load(self, generation: int, version: int) -> bool:
        if self.loaded == (generation, version):
            return True
        deadline = time.monotonic() + WEIGHTS_TIMEOUT_S
        while True:  # the learner publishes the version right after the step that makes it
            status, refs = ray.get(self.board.get.remote(generation, version))
            if status == "superseded":
                return False
            if status == "ready":
                try:
                    weights = unpack_weights(ray.get(refs[0]), self.device)
                    break
                except ray.exceptions.ObjectLostError:
                    pass  # the board died after answering: it is restarted and refilled; ask again
            if time.monotonic() > deadline:
                raise TimeoutError(f"episode worker {self.index}: weight version {version} was not published "
                                   f"in {WEIGHTS_TIMEOUT_S:.0f}s")
            time.sleep(0.002)
        self.model.load_state_dict(weights)
        self.loaded = (generation, version)
        return True

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # the property still reads a deprecated field inside Ray 2.60
            warnings.simplefilter("ignore")
            restarted = ctx.was_current_actor_reconstructed
        return {"index": self.index, "pid": os.getpid(), "node": ctx.get_node_id(),
                "version": None if self.loaded is None else self.loaded[1],
                "batches_this_incarnation": self.batches, "restarted": restarted}
