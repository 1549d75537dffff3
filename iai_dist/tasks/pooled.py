"""N-way classification episodes drawn from a finite pool of labelled rows (images, or a user's embeddings).

An episode picks N of the pool's classes at random and gives them the labels 0..N-1 in a random order, then
draws K mini-batches of B rows and a query set of Q rows from one split (the training stream reads 'train',
evaluation 'test'). Every mini-batch and the query set hold each label floor or ceil(B/N) times, in random
order. Within an episode rows are drawn without replacement: a query row is never in the context, and a
context row repeats only once its class has no unused row left. As for the synthetic families, an episode is
a pure function of (seed, index): class choice, label order and row choice all come from the EpisodeRNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iai_dist.config import ConfigError
from iai_dist.tasks.base import Episode, TaskFamily
from iai_dist.tasks.rng import EpisodeRNG, permute

SPLITS = ("train", "test")


class DataError(ConfigError):
    """Data that is missing or broken: one line naming the files and what fixes them."""


@dataclass
class Pool:
    """One split in memory, grouped by class (class c is rows start[c]:start[c]+count[c])."""

    data: torch.Tensor  # [n, ...]: uint8 images, or float feature rows
    labels: torch.Tensor  # [n] int64, non-decreasing
    start: torch.Tensor  # [classes]
    count: torch.Tensor  # [classes]
    mean: float = 0.0  # images: pixel mean and std in [0, 1] units
    std: float = 1.0

    def to(self, device) -> "Pool":
        move = lambda t: t.to(device)  # noqa: E731
        return Pool(move(self.data), move(self.labels), move(self.start), move(self.count), self.mean, self.std)


def group_by_class(data: torch.Tensor, labels: torch.Tensor, classes: int, where: str, what: str = "images"):
    """(data, labels) sorted by label, with each class's start and count; DataError for a mismatch, a label
    outside 0..classes-1 or an empty class."""
    if labels.ndim != 1 or labels.numel() != data.shape[0]:
        raise DataError(f"{where}: {data.shape[0]} {what} but {labels.numel()} labels; the files do not belong together")
    bad = (labels < 0) | (labels >= classes)
    if bool(bad.any()):
        raise DataError(f"{where}: label {int(labels[bad][0])} is outside 0..{classes - 1}: the labels are corrupt")
    order = torch.argsort(labels, stable=True)
    data, labels = data[order].contiguous(), labels[order].contiguous()
    count = torch.bincount(labels, minlength=classes)
    if bool((count == 0).any()):
        raise DataError(f"{where}: class {int((count == 0).nonzero()[0])} has no {what}")
    return data, labels, torch.cumsum(count, 0) - count, count


class PooledClassification(TaskFamily):
    """Subclasses fill `self.pools` (split -> Pool) and turn pool rows into features (`_features_of`)."""

    kind = "classification"
    natural_model = "linear"  # softmax-linear on the features, for the baselines
    pools: dict[str, Pool]  # a split's classes: its pool's

    def _check_query_size(self, what: str) -> None:
        per_class_query = -(-self.cfg.query_size // self.cfg.num_classes)
        for split, pool in self.pools.items():
            smallest = int(pool.count.min())
            if smallest <= per_class_query:
                raise DataError(
                    f"{self.name}: task.query_size={self.cfg.query_size} puts {per_class_query} {what} of each class in "
                    f"the query set, but the {split} split's smallest class has {smallest} {what} (and the context "
                    "needs at least one more); lower task.query_size")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._device_copies: dict[tuple, object] = {}

    def __reduce__(self):
        """Pickled as its config: a worker process (a Ray actor) rebuilds the family and loads the data once
        there, instead of receiving it inside every message."""
        return type(self), (self.cfg,)

    def _on(self, what: str, split: str, device, value):
        """`value` (a Pool or tensor of `split`) on device, moved there once per process."""
        key = (what, split, str(torch.device(device)))
        if key not in self._device_copies:
            self._device_copies[key] = value.to(device)
        return self._device_copies[key]

    def _pool_on(self, split: str, device) -> Pool:
        return self._on("pool", split, device, self.pools[split])

    def _features_of(self, split: str, rows: torch.Tensor, device) -> torch.Tensor:
        """Pool rows [...] of `split` -> float features [..., task.dim] on device."""
        raise NotImplementedError

    def sample(self, seed, indices, num_batches=None, device="cpu", split="train") -> Episode:
        """As TaskFamily.sample, from `split`'s rows; truth holds the pool classes behind the labels ([T, N])
        and the pool rows drawn (for tests)."""
        k = self.cfg.steps if num_batches is None else num_batches
        b, q, n = self.cfg.batch_size, self.cfg.query_size, self.cfg.num_classes
        pool = self._pool_on(split, device)
        rng = EpisodeRNG(seed, indices, device)
        # label l of this episode stands for pool class classes[:, l]: N classes, in random order
        classes = rng.bits("classes", pool.count.shape[0]).argsort(dim=-1, stable=True)[:, :n]
        # a mini-batch is (a random permutation of 0..B-1, plus a random offset) mod N: balanced, shuffled
        order = rng.bits("label_order", k * b).view(-1, k, b).argsort(dim=-1, stable=True)
        y = (order + rng.bits("label_offset", k).unsqueeze(-1)) % n  # [T, k, B]
        yq = (torch.arange(q, device=rng.device) + rng.bits("query_offset", 1)) % n  # [T, Q]
        # one pseudo-random order of each class's rows per episode: the context reads it from the front,
        # wrapping before the last ceil(Q/N) rows, which the query set reads from the back
        keys = rng.bits("image_order", n)  # [T, N]
        reserved = -(-q // n)
        y_flat = y.flatten(1)

        def pick(labels: torch.Tensor, query: bool) -> torch.Tensor:
            cls = classes.gather(1, labels)
            count = pool.count[cls]
            rank = _ranks(labels, n)
            slot = count - 1 - rank if query else rank % (count - reserved)
            return pool.start[cls] + permute(slot, keys.gather(1, labels), count)

        idx, idx_q = pick(y_flat, False), pick(yq, True)
        x = self._features_of(split, idx, device).view(-1, k, b, self.cfg.dim)
        xq = self._features_of(split, idx_q, device)
        truth = {"classes": classes, "image": idx.view(-1, k, b), "image_query": idx_q}
        return Episode(x, y, xq, yq, truth)


def _ranks(labels: torch.Tensor, n: int) -> torch.Tensor:
    """[T, P] labels -> how many earlier points of the episode share each point's label."""
    onehot = torch.nn.functional.one_hot(labels, n)
    return (onehot.cumsum(1) - onehot).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
