"""Image classification from real data sets: N-way tasks whose labels mean nothing across episodes
(episodes as in tasks/pooled.py).

Data: torchvision's loaders (MNIST, FashionMNIST, KMNIST, CIFAR10) read `task.image.root` and download
only when `task.image.download` is set; scikit-learn ships the 8x8 handwritten digits. A process loads a
(data set, split, size) once into uint8 tensors and every episode gathers from memory.
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import ClassVar

import torch

from iai_dist.config import TaskConfig
from iai_dist.tasks.base import register
from iai_dist.tasks.pooled import SPLITS, DataError, Pool, PooledClassification, group_by_class

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist: the four .gz files
DIGITS_TEST = 360  # scikit-learn's digits have no split: the last 360 of the 1,797 images are the test split
LOADS: Counter = Counter()  # (family, split) -> reads from disk in this process (tests: never per episode)


_POOLS: dict[tuple, Pool] = {}  # the process-wide cache behind "loads once"


class ImageClassification(PooledClassification):
    """Subclasses name the data set; `_read(split)` returns (uint8 images [n, c, h, w], int64 labels [n])."""

    classes: ClassVar[int] = 10
    channels: ClassVar[int] = 1
    needs_root: ClassVar[bool] = True  # false for data shipped inside a package (digits)

    @classmethod
    def check_config(cls, cfg: TaskConfig) -> None:
        im = cfg.image
        if cfg.num_classes > cls.classes:
            raise ValueError(f"task.num_classes={cfg.num_classes}: {cls.name} has {cls.classes} classes, "
                             f"so N-way tasks need N <= {cls.classes}")
        channels = 1 if im.grayscale else cls.channels
        pixels = im.size * im.size * channels
        if im.features == "flatten" and cfg.dim != pixels:
            raise ValueError(f"task.dim={cfg.dim} does not match {cls.name} images flattened at {im.size}x{im.size}"
                             f"x{channels} ({pixels} features); set task.dim={pixels}, or "
                             "task.image.features=projection to project them to task.dim")

    @classmethod
    def data_paths(cls, cfg: TaskConfig) -> dict[str, str]:
        return {"task.image.root": cfg.image.root} if cls.needs_root else {}

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self.root = Path(cfg.image.root).expanduser().resolve()
        self.pools = {split: self._pool(split) for split in SPLITS}
        self._check_query_size("images")
        self.affine = {split: self._affine(pool) for split, pool in self.pools.items()}
        self._projection: dict[str, torch.Tensor] = {}

    # -- loading: once per process for each (data set, root, split, size, grayscale) --
    def _pool(self, split: str) -> Pool:
        im = self.cfg.image
        key = (self.name, str(self.root) if self.needs_root else "", split, im.size, im.grayscale)
        if key not in _POOLS:
            if im.download and self.needs_root:
                self._download()
            self._check_files(split)
            images, labels = self._read(split)
            LOADS[(self.name, split)] += 1
            _POOLS[key] = _to_pool(images, labels, self.classes, im.size, im.grayscale, self._where(split))
        return _POOLS[key]

    def _read(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _check_files(self, split: str) -> None:
        """Raise DataError for missing or corrupt files before torchvision reads them."""

    def _download(self) -> None:
        raise NotImplementedError

    def _where(self, split: str) -> str:
        return f"{self.name} {split} split under {self.root}"

    # -- features of pool rows --
    def _features_of(self, split, rows, device):
        affine = self._on("affine", split, device, self.affine[split])
        return self._features(self._pool_on(split, device).data[rows], affine[rows], device)

    def _affine(self, pool: Pool) -> torch.Tensor:
        """[n, 2] per image (scale, shift) with features = pixel * scale + shift: the normalisation becomes one
        fused multiply-add when sampling (per-image statistics at sampling time cost 2/3 of a 28x28 episode)."""
        norm, n = self.cfg.image.normalize, pool.data.shape[0]
        if norm == "image":  # each image to zero mean and unit variance, statistics computed once, in chunks
            stats = [torch.std_mean(c.flatten(1).float().div(255.0), -1) for c in pool.data.split(8192)]
            std, mean = torch.cat([s for s, _ in stats]), torch.cat([m for _, m in stats])
            std = std.clamp_min(1e-3)
        elif norm == "dataset":  # the train split's pixel statistics, for both splits
            mean, std = torch.full((n,), self.pools["train"].mean), torch.full((n,), self.pools["train"].std)
        else:
            mean, std = torch.zeros(n), torch.ones(n)
        return torch.stack([1.0 / (255.0 * std), -mean / std], -1)

    def _features(self, images: torch.Tensor, affine: torch.Tensor, device) -> torch.Tensor:
        """uint8 [..., c, s, s] and their (scale, shift) -> float features [..., dim]: normalised pixels,
        flattened or projected."""
        x = torch.addcmul(affine[..., 1:], images.flatten(-3).to(torch.float32), affine[..., :1])
        if self.cfg.image.features == "projection":
            x = x @ self._projection_on(x.shape[-1], device)
        return x

    def _projection_on(self, pixels: int, device) -> torch.Tensor:
        """The fixed random map: N(0, 1/pixels) entries from projection_seed, so every data set of one image
        shape (and every process) gets the same one."""
        key = str(torch.device(device))
        if key not in self._projection:
            g = torch.Generator().manual_seed(self.cfg.image.projection_seed)
            self._projection[key] = (torch.randn(pixels, self.cfg.dim, generator=g) / pixels**0.5).to(device)
        return self._projection[key]


def one_line(exc: BaseException) -> str:
    """An exception as one line (torchvision's download errors span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _to_pool(images: torch.Tensor, labels: torch.Tensor, classes: int, size: int, grayscale: bool, where: str) -> Pool:
    """Group by class, convert to grayscale and resize once: sampling never touches pixels beyond a gather."""
    from torchvision.transforms.v2 import functional as TF

    if grayscale and images.shape[1] == 3:
        images = TF.rgb_to_grayscale(images)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = TF.resize(images, [size, size], antialias=True)
    images, labels, start, count = group_by_class(images, labels, classes, where)
    hist = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = float((hist * values).sum() / hist.sum())
    std = float(((hist * (values - mean) ** 2).sum() / hist.sum()).sqrt().clamp_min(1e-3))
    return Pool(images, labels, start, count, mean, std)


# -- IDX files (MNIST, FashionMNIST, KMNIST) --
def idx_header(path: Path) -> tuple[int, ...]:
    """The dims of an uncompressed IDX file of unsigned bytes; DataError if the header or the size is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] != 0x08 or not 1 <= head[3] <= 4:
            raise DataError(f"{path} is corrupt: not an uncompressed IDX file of unsigned bytes "
                            f"(it starts with {head.hex() or 'nothing'}, expected 0000080N)")
        raw = f.read(4 * head[3])
    if len(raw) < 4 * head[3]:
        raise DataError(f"{path} is corrupt: its header is cut short")
    dims = struct.unpack(f">{head[3]}I", raw)
    want = 4 + 4 * len(dims) + int(torch.tensor(dims).prod())
    if size != want:
        raise DataError(f"{path} is corrupt: its header announces {'x'.join(map(str, dims))} bytes of data "
                        f"({want} bytes in all) but the file has {size}")
    return dims


class IDXImages(ImageClassification):
    """torchvision's MNIST-style loaders: ROOT/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte."""

    folder: ClassVar[str]  # torchvision's class name, which is also its folder under root

    @property
    def raw(self) -> Path:
        return self.root / self.folder / "raw"

    @classmethod
    def provide_hint(cls, root: Path) -> str:
        return (f"stage them with `python -m iai_dist.data stage {cls.name} --from DIR --root {root}` (DIR: a folder "
                "with the four IDX files, .gz or not), or set task.image.download=true where the network is reachable")

    def _check_files(self, split: str) -> None:
        # torchvision insists on all four files whichever split it reads
        files = [self.raw / f for s in SPLITS for f in IDX_FILES[s]]
        missing = [f for f in files if not f.is_file()]
        if missing:
            gz = " (only .gz copies are there: stage them)" if all(f.with_name(f.name + ".gz").is_file() for f in missing) else ""
            raise DataError(
                f"{self.name}: no data under root {self.root}: expected {self.folder}/raw/"
                "{train,t10k}-{images-idx3,labels-idx1}-ubyte (uncompressed IDX), missing "
                f"{', '.join(f.name for f in missing)}{gz}; {self.provide_hint(self.root)}")
        for s in SPLITS:
            images, labels = (self.raw / f for f in IDX_FILES[s])
            di, dl = idx_header(images), idx_header(labels)
            if len(di) != 3 or len(dl) != 1 or di[0] != dl[0]:
                raise DataError(f"{images} and {labels} are corrupt or mismatched: shapes {list(di)} and {list(dl)} "
                                f"(expected [n, rows, cols] images and [n] labels); {self.provide_hint(self.root)}")

    def _read(self, split: str):
        import torchvision

        cls = getattr(torchvision.datasets, self.folder)
        try:
            ds = cls(str(self.root), train=split == "train", download=False)
        except Exception as exc:  # headers were checked: anything left is damage torchvision trips on
            raise DataError(f"{self._where(split)}: torchvision cannot read it ({one_line(exc)}); "
                            f"{self.provide_hint(self.root)}") from None
        return ds.data.unsqueeze(1), ds.targets.long()

    def _download(self) -> None:
        import torchvision

        try:
            getattr(torchvision.datasets, self.folder)(str(self.root), train=True, download=True)
        except Exception as exc:
            raise DataError(f"{self.name}: download into {self.root} failed ({one_line(exc)}); "
                            f"{self.provide_hint(self.root)}") from None


@register("mnist")
class MNIST(IDXImages):
    """Handwritten digits, 28x28 (60,000 train / 10,000 test)."""

    folder = "MNIST"


@register("fashion_mnist")
class FashionMNIST(IDXImages):
    """Zalando's clothing images, 28x28 (60,000 / 10,000); real copy offline in Debian's dataset-fashion-mnist."""

    folder = "FashionMNIST"

    @classmethod
    def provide_hint(cls, root: Path) -> str:
        return (f"stage them with `python -m iai_dist.data stage fashion_mnist --root {root}` (reads Debian's "
                f"dataset-fashion-mnist in {DEBIAN_FASHION}; `make fashion-mnist` installs and stages it)")


@register("kmnist")
class KMNIST(IDXImages):
    """Kuzushiji (cursive Japanese) characters, 28x28 (60,000 / 10,000)."""

    folder = "KMNIST"


@register("cifar10")
class CIFAR10(ImageClassification):
    """32x32 colour photographs (50,000 / 10,000); torchvision's pickled batches under ROOT/cifar-10-batches-py."""

    channels = 3

    @classmethod
    def provide_hint(cls, root: Path) -> str:
        return (f"stage them with `python -m iai_dist.data stage cifar10 --from cifar-10-python.tar.gz --root {root}`, "
                "or set task.image.download=true where the network is reachable")

    def _check_files(self, split: str) -> None:
        check_cifar(self.root)

    def _read(self, split: str):
        from torchvision.datasets import CIFAR10 as TV

        try:
            ds = TV(str(self.root), train=split == "train", download=False)
        except Exception as exc:
            raise DataError(f"{self._where(split)}: torchvision cannot read it ({one_line(exc)}); "
                            f"{self.provide_hint(self.root)}") from None
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    def _download(self) -> None:
        from torchvision.datasets import CIFAR10 as TV

        try:
            TV(str(self.root), train=True, download=True)
        except Exception as exc:
            raise DataError(f"{self.name}: download into {self.root} failed ({one_line(exc)}); "
                            f"{self.provide_hint(self.root)}") from None


@register("digits")
class Digits(ImageClassification):
    """scikit-learn's 8x8 handwritten digits (1,797 images shipped with the package: real data, always offline).
    The first 1,437 are the train split, the last 360 the test split."""

    needs_root = False

    def _where(self, split: str) -> str:
        return f"digits {split} split (scikit-learn)"

    def _read(self, split: str):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.from_numpy(d.images).mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
        labels = torch.from_numpy(d.target).long()
        cut = len(labels) - DIGITS_TEST
        return (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])


def check_cifar(root: Path) -> None:
    """All of torchvision's CIFAR-10 files under root, with the MD5 sums torchvision knows, else DataError."""
    from torchvision.datasets import CIFAR10 as TV
    from torchvision.datasets.utils import check_integrity

    folder = root / TV.base_folder
    files = [*TV.train_list, *TV.test_list, [TV.meta["filename"], TV.meta["md5"]]]
    missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        raise DataError(f"cifar10: no data under root {root}: expected {TV.base_folder}/"
                        f"{{data_batch_1..5,test_batch,batches.meta}}, missing {', '.join(missing)}; "
                        f"{CIFAR10.provide_hint(root)}")
    bad = [name for name, md5 in files if not check_integrity(str(folder / name), md5)]
    if bad:
        raise DataError(f"cifar10: {', '.join(str(folder / b) for b in bad)} corrupt (MD5 differs from "
                        f"torchvision's); {CIFAR10.provide_hint(root)}")
