"""Classification families: labels = argmax(teacher logits + label_noise * Gumbel)."""

from __future__ import annotations

import torch

from iai_dist.tasks.base import TaskFamily, register
from iai_dist.tasks.rng import EpisodeRNG


class _TeacherClassification(TaskFamily):
    kind = "classification"

    def _teacher(self, rng: EpisodeRNG):
        raise NotImplementedError

    def _sample(self, rng: EpisodeRNG, x: torch.Tensor, x_query: torch.Tensor):
        logits_of, truth = self._teacher(rng)
        c, tau = self.cfg.num_classes, self.cfg.label_noise

        def labels(xs: torch.Tensor, stream: str) -> torch.Tensor:
            logits = logits_of(xs)
            if tau > 0:
                logits = logits + tau * rng.gumbel(stream, (xs.shape[1], c))
            return logits.argmax(-1)

        return labels(x, "label_noise"), labels(x_query, "label_noise_query"), truth


@register("linear_classification")
class LinearClassification(_TeacherClassification):
    """A softmax-linear teacher: logits = x W, W ~ N(0, I)."""

    natural_model = "linear"

    def _teacher(self, rng: EpisodeRNG):
        w = rng.normal("w", (self.cfg.dim, self.cfg.num_classes))
        return (lambda xs: xs @ w), {"w": w}


@register("mlp_classification")
class MLPClassification(_TeacherClassification):
    """A one-hidden-layer tanh teacher: logits = tanh(x W1 + b1) W2."""

    natural_model = "mlp"

    def _teacher(self, rng: EpisodeRNG):
        d, h, c = self.cfg.dim, self.cfg.teacher_hidden, self.cfg.num_classes
        w1 = rng.normal("w1", (d, h)) / d**0.5
        b1 = rng.normal("b1", (h,)) * 0.5
        w2 = rng.normal("w2", (h, c)) * (4.0 / h) ** 0.5
        return (lambda xs: torch.tanh(xs @ w1 + b1[:, None]) @ w2), {"w1": w1, "b1": b1, "w2": w2}
