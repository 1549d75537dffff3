"""The config sections particular to some task families (images, embeddings, generative); config.py nests them
in TaskConfig. Split out only to keep config.py readable: the same typed, frozen, self-validating sections."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class Section(BaseModel):
    """A config section: frozen, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageConfig(Section):
    """Image families only (digits, mnist, fashion_mnist, kmnist, cifar10): where the data lies and how an image
    becomes the feature vector x. Each process loads a data set once; episodes are drawn from memory."""

    # torchvision's layout under root: MNIST/raw/, FashionMNIST/raw/, KMNIST/raw/, cifar-10-batches-py/
    # (`python -m iai_dist.data stage ...` puts IDX files there); '~' is expanded; digits needs none
    root: str = "~/.cache/iai_dist/data"
    download: bool = False  # let torchvision fetch missing files (needs the network; never implied)
    size: PositiveInt = 28  # every image is resized to size x size at load, so data sets can be swapped
    grayscale: bool = True  # colour data sets (cifar10) become one channel
    # none: pixels in [0, 1]; dataset: standardised by the train split's pixel mean and std; image: each
    # image to zero mean and unit variance (puts data sets with different contrast on one scale)
    normalize: Literal["none", "dataset", "image"] = "dataset"
    # flatten: x is the size*size*channels pixels (task.dim must equal that); projection: a fixed random
    # Gaussian map of the flattened pixels to task.dim features, the same for every data set of that shape
    features: Literal["flatten", "projection"] = "flatten"
    projection_seed: int = Field(0, ge=0)


class EmbeddingsConfig(Section):
    """The embeddings family only: a user's feature arrays per split, e.g. written by `python -m iai_dist.data
    embed`. Each split is a .npz or .pt holding `features` [n, d] and `labels` [n] (integers 0..C-1), or a .npy
    of features whose labels are a second .npy named by *_labels. '~' is expanded."""

    train: str = ""
    test: str = ""
    train_labels: str = ""  # only when train is a .npy of features
    test_labels: str = ""
    standardize: bool = True  # each split's features to zero mean, unit variance per feature (its own statistics)


class GenerativeConfig(Section):
    """Generative families only (gaussian_mixture, alphabet): what a task's distribution is, and how samples are
    generated from a vector field."""

    components: PositiveInt = 4  # gaussian_mixture: a task has 1..components components; the 'mixture' model has this many
    # alphabet: the letters training tasks draw from, and the disjoint held-out letters evaluation draws from
    letters: str = "ACDEFHIJLMNOPRSTUVXY"
    heldout_letters: str = "BGKQWZ"
    ode_steps: PositiveInt = 10  # midpoint steps integrating dx/dt = v(x, t) from t = 0 to 1 (2 evaluations each)

    @model_validator(mode="after")
    def _letters(self) -> "GenerativeConfig":
        for name in ("letters", "heldout_letters"):
            text = getattr(self, name)
            if not text or not all("A" <= c <= "Z" for c in text) or len(set(text)) != len(text):
                raise ValueError(f"{name}: expected distinct capital letters A-Z, got {text!r}")
        if both := sorted(set(self.letters) & set(self.heldout_letters)):
            raise ValueError(f"letters and heldout_letters must be disjoint; both have {''.join(both)}")
        return self
