"""train.compile: what torch.compile captures of a learner step and of a rollout.

- off: eager.
- refiner: the refiner's Transformer compiled in place (the regime, f and the greedy loss around it stay eager).
- step: the learner's whole greedy forward (every refinement step of the batch, the regime, f, the gradient signal
  and the query losses) as one graph, whose backward AOTAutograd compiles with it, and the rollout's K steps as one
  graph. What is left eager per learner step: gradient clipping and the fused AdamW, a few kernels each.
- graphs: step's graphs replayed as CUDA graphs (torch.compile's reduce-overhead): the host launches each graph
  once, not its hundreds of kernels one by one (what that buys on a GPU is not measured yet). A replay overwrites
  its previous outputs, so they are cloned (they are small: query losses, states). On a CPU there is nothing to
  capture and it runs as step.
Ray episode workers compile their rollout only on a GPU: on a CPU compiling would hold up every (re)start.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

TORCH_MODES = {"step": "default", "graphs": "reduce-overhead"}


def compiled(fn: Callable, mode: str) -> Callable:
    """`fn` (a function of tensors returning a tuple of tensors or None) as train.compile `mode` runs it."""
    if mode not in TORCH_MODES:
        return fn
    graph = torch.compile(fn, mode=TORCH_MODES[mode])
    if mode == "step":
        return graph

    @functools.wraps(fn)
    def replayed(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()  # outputs of earlier replays may be overwritten from here on
        return tuple(None if out is None else out.clone() for out in graph(*args, **kwargs))

    return replayed
