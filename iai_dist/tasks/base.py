"""The task-family contract: sample a batch of episodes from (seed, indices); score predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F

from iai_dist.config import TaskConfig
from iai_dist.tasks.rng import EpisodeRNG


@dataclass
class Episode:
    """A batch of T episodes. Context: K mini-batches of B points; query: Q points.

    x: [T, K, B, d]   y: [T, K, B] (float targets, or long class labels; generative: [T, K, B, d'] velocities)
    x_query: [T, Q, d]   y_query: [T, Q] (generative: [T, Q, d'])
    truth: the teacher's parameters, for tests and closed-form baselines.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    truth: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.x.shape[0]

    @property
    def num_batches(self) -> int:
        return self.x.shape[1]

    def minibatch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:, i], self.y[:, i]

    def context(self, num_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `num_batches` mini-batches as one set: [T, k*B, d], [T, k*B]."""
        k = self.num_batches if num_batches is None else num_batches
        return self.x[:, :k].flatten(1, 2), self.y[:, :k].flatten(1, 2)

    def first_batches(self, k: int) -> "Episode":
        return Episode(self.x[:, :k], self.y[:, :k], self.x_query, self.y_query, self.truth)

    def as_one_batch(self) -> "Episode":
        """All context points as a single mini-batch: what the one-step (K=1) model reads."""
        x, y = self.context()
        return Episode(x.unsqueeze(1), y.unsqueeze(1), self.x_query, self.y_query, self.truth)

    def tasks(self, sl: slice) -> "Episode":
        return Episode(self.x[sl], self.y[sl], self.x_query[sl], self.y_query[sl], {k: v[sl] for k, v in self.truth.items()})


class TaskFamily:
    """A distribution over tasks. Subclasses set `kind` and `natural_model` and implement `_sample`."""

    kind: ClassVar[Literal["regression", "classification", "generative"]]
    natural_model: ClassVar[Literal["linear", "mlp"]]  # the parametric f that fits it (for baselines)

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: TaskConfig) -> None:
        """Raise ValueError (one line for the user) for settings this family cannot run; called at config time."""

    @classmethod
    def data_paths(cls, cfg: TaskConfig) -> dict[str, str]:
        """The config fields naming files this family reads, with their values (synthetic families: none). On a
        cluster spanning machines every node reads them, so they must be absolute (check_shared_paths)."""
        return {}

    @property
    def x_dim(self) -> int:
        return self.cfg.dim

    @property
    def out_dim(self) -> int:
        """Width of a prediction: 1 for regression, the number of classes for classification."""
        return 1 if self.kind == "regression" else self.cfg.num_classes

    def sample(
        self,
        seed: int,
        indices: torch.Tensor,
        num_batches: int | None = None,
        device: torch.device | str = "cpu",
        split: Literal["train", "test"] = "train",
    ) -> Episode:
        """Episodes `indices` of the stream `seed`; `num_batches` defaults to K (evaluation asks for more).

        `split`: evaluation asks for 'test' (held-out data); families with a finite data set (images) draw
        from that split, synthetic families have fresh tasks for every seed and ignore it.
        """
        k = self.cfg.steps if num_batches is None else num_batches
        rng = EpisodeRNG(seed, indices, device)
        n, q, d = k * self.cfg.batch_size, self.cfg.query_size, self.cfg.dim
        x, xq = rng.normal("x", (n, d)), rng.normal("x_query", (q, d))
        y, yq, truth = self._sample(rng, x, xq)
        t = x.shape[0]
        return Episode(x.view(t, k, self.cfg.batch_size, d), y.view(t, k, self.cfg.batch_size), xq, yq, truth)

    def _sample(
        self, rng: EpisodeRNG, x: torch.Tensor, x_query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # -- scoring: `out` is a prediction of width out_dim, [..., N, out_dim]; y is [..., N] --
    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task inner loss, mean over points: MSE or cross-entropy. Returns [...]."""
        if self.kind == "regression":
            return (out[..., 0] - y).pow(2).mean(-1)
        return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="none").view(y.shape).mean(-1)

    def error_terms(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(numerator, denominator) summed over points, per task, so that errors pool over many tasks.

        regression: sum (y_hat - y)^2 and sum y^2; classification: misclassified points and points.
        """
        if self.kind == "regression":
            return (out[..., 0] - y).pow(2).sum(-1), y.pow(2).sum(-1)
        wrong = (out.argmax(-1) != y).to(out.dtype)
        return wrong.sum(-1), torch.full_like(wrong.sum(-1), y.shape[-1])

    def error(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """The DESIGN.md metric in %, pooled over all tasks and points."""
        num, den = self.error_terms(out, y)
        return 100.0 * float(num.sum() / den.sum())

    def encode_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Targets as token features: [..., 1] values or [..., C] one-hot."""
        if self.kind == "regression":
            return y.unsqueeze(-1)
        return F.one_hot(y, self.cfg.num_classes).to(torch.float32)


    def encode_predictions(self, out: torch.Tensor) -> torch.Tensor:
        """Predictions as token features, comparable with `encode_targets`: values or class probabilities."""
        return out if self.kind == "regression" else out.softmax(-1)


FAMILIES: dict[str, Callable[[TaskConfig], TaskFamily]] = {}


def register(name: str):
    """Class decorator: `@register("linear_regression")` makes the family available by name in configs."""

    def wrap(cls):
        if name in FAMILIES:
            raise ValueError(f"task family {name!r} is registered twice")
        FAMILIES[name] = cls
        cls.name = name
        return cls

    return wrap


def build_family(cfg: TaskConfig) -> TaskFamily:
    return FAMILIES[cfg.family](cfg)
