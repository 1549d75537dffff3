"""Task families, by name. A new family is one module that subclasses TaskFamily and calls `register`."""

from iai_dist.tasks.base import FAMILIES, Episode, TaskFamily, build_family, register
from iai_dist.tasks import classification, embeddings, generative, images, regression  # noqa: F401  (registers the families)

__all__ = ["FAMILIES", "Episode", "TaskFamily", "build_family", "register"]
