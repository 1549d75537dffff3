"""Fixed prediction functions f(x; theta) with a flat parameter vector per task, batched over tasks."""

from __future__ import annotations

import math

import torch

from iai_dist.tasks.generative import mixture_log_density, mixture_velocity


class LinearFn:
    """f(x; theta) = x W + b: a linear model for regression, softmax-linear logits for classification."""

    def __init__(self, in_dim: int, out_dim: int):
        self.in_dim, self.out_dim = in_dim, out_dim
        self.num_params = (in_dim + 1) * out_dim

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """theta [T, P], x [T, N, d] -> [T, N, out]."""
        t, d, o = theta.shape[0], self.in_dim, self.out_dim
        w = theta[:, : d * o].view(t, d, o)
        b = theta[:, d * o :].view(t, 1, o)
        return torch.baddbmm(b, x, w)

    def init(self, generator: torch.Generator) -> torch.Tensor:
        return torch.zeros(self.num_params)


class MLPFn:
    """f(x; theta) = tanh(x W1 + b1) W2 + b2 with hidden width h."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden
        self._sizes = (in_dim * hidden, hidden, hidden * out_dim, out_dim)
        self.num_params = sum(self._sizes)

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t, d, h, o = theta.shape[0], self.in_dim, self.hidden, self.out_dim
        w1, b1, w2, b2 = torch.split(theta, self._sizes, dim=1)
        hid = torch.tanh(torch.baddbmm(b1.view(t, 1, h), x, w1.view(t, d, h)))
        return torch.baddbmm(b2.view(t, 1, o), hid, w2.view(t, h, o))

    def init(self, generator: torch.Generator) -> torch.Tensor:
        """LeCun-normal weights, zero biases: a non-symmetric start so every hidden unit gets a gradient."""
        d, h, o = self.in_dim, self.hidden, self.out_dim
        w1 = torch.randn(d * h, generator=generator) / math.sqrt(d)
        w2 = torch.randn(h * o, generator=generator) / math.sqrt(h)
        return torch.cat([w1, torch.zeros(h), w2, torch.zeros(o)])


class MixtureFieldFn:
    """f([x, t]; theta) = the exact flow-matching velocity of a mixture of C isotropic Gaussians in d dimensions,
    theta = [weight logits (C), means (C*d), log scales (C)]: a vector field with a density, log_density(theta, x)."""

    def __init__(self, data_dim: int, components: int):
        self.dim, self.components = data_dim, components
        self._sizes = (components, components * data_dim, components)
        self.num_params = sum(self._sizes)

    def parts(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, means, log_scales = torch.split(theta, self._sizes, dim=1)
        return logits.log_softmax(-1), means.view(-1, self.components, self.dim), log_scales

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return mixture_velocity(*self.parts(theta), x)

    def log_density(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return mixture_log_density(*self.parts(theta), x)

    def init(self, generator: torch.Generator) -> torch.Tensor:
        """Equal weights, unit scales, means ~ N(0, I): distinct components, so each gets its own gradient."""
        c, d = self.components, self.dim
        return torch.cat([torch.zeros(c), torch.randn(c * d, generator=generator), torch.zeros(c)])


def build_fn(model: str, in_dim: int, out_dim: int, hidden: int, components: int = 0) -> LinearFn | MLPFn | MixtureFieldFn:
    if model == "mixture":
        return MixtureFieldFn(out_dim, components)
    return LinearFn(in_dim, out_dim) if model == "linear" else MLPFn(in_dim, out_dim, hidden)


def fn_gradient(fn, family, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_theta of the inner loss on (x, y) for every task at once, as data (no graph to anything upstream).

    The per-task losses are independent, so the gradient of their sum w.r.t. the stacked [T, P] theta
    is exactly each task's own gradient: one backward pass, no loop over tasks. Under torch.compile it is
    torch.func.grad, which Dynamo traces into the step's one graph (train.compile=step); eager, autograd.grad,
    which costs half as much per call here.
    """
    def inner_loss(th: torch.Tensor) -> torch.Tensor:
        return family.loss(fn(th, x), y).sum()

    if torch.compiler.is_compiling():
        return torch.func.grad(inner_loss)(theta.detach()).detach()
    with torch.enable_grad():
        theta = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(inner_loss(theta), theta)
    return g
