"""The weight board: the refiner weights the learner published, by version, in an actor of their own.

It imports Ray only: the weights reach it packed as bytes (episode_worker.pack_weights), so its process does not
load torch (about 0.6 GB resident and seconds of start-up on every run and restart).
"""

from __future__ import annotations

import os

import ray


class WeightBoard:
    """The published refiner weights by version (the learner step that produced them), owned by this actor
    so they outlive a restarted learner.

    Versions belong to a generation, one per learner attempt, increasing (the attempt's start time, or past the
    last one the board opened): a request of an older generation is answered "superseded", so a worker never
    waits for, nor rolls out with, weights of an attempt that was rolled back; one of a newer generation waits
    ("pending") until that attempt's rank 0 opens it, which may come after its other ranks' first requests. The
    board is restartable: after its own death it comes back empty and answers "pending" until a learner rank
    hands it the versions still needed again (`ensure`), which every rank does while it waits.
    """

    def __init__(self) -> None:
        self.generation: int | None = None
        self.versions: dict[int, list[ray.ObjectRef]] = {}

    def ensure(self, generation: int, window: dict[int, bytes]) -> None:
        """Open `generation` (dropping an older one) and hold every version of `window` it lacks."""
        if self.generation is not None and generation < self.generation:
            return  # a late call of an attempt that was rolled back
        if generation != self.generation:
            self.generation, self.versions = generation, {}
        for version, weights in window.items():
            if version not in self.versions:
                self.versions[version] = [ray.put(weights)]  # lists: callers get refs, not values

    def missing(self, generation: int, versions: list[int]) -> list[int]:
        """Which of `versions` the board does not hold for `generation` (all of them after a restart)."""
        if generation != self.generation:
            return list(versions)
        return [v for v in versions if v not in self.versions]

    def publish(self, generation: int, version: int, weights: bytes, keep_from: int) -> bool:
        """Add a version and forget those below keep_from; False if the board does not know the generation
        (it restarted): the version reaches it with the rest of the window when a rank that waits for a batch
        finds the board empty and refills it (`missing`, then `ensure`)."""
        if generation != self.generation:
            return False
        self.versions[version] = [ray.put(weights)]
        for old in [v for v in self.versions if v < keep_from]:
            del self.versions[old]
        return True

    def get(self, generation: int, version: int) -> tuple[str, list[ray.ObjectRef]]:
        """("ready", [weights]), ("pending", []) or ("superseded", [])."""
        if self.generation is not None and generation < self.generation:
            return "superseded", []
        if generation == self.generation and version in self.versions:
            return "ready", self.versions[version]
        return "pending", []

    def info(self) -> dict:
        """Its process and what it holds (the versions of the open generation)."""
        return {"pid": os.getpid(), "generation": self.generation, "versions": sorted(self.versions)}
