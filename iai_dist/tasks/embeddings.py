"""Classification of a user's embeddings: N-way episodes (tasks/pooled.py) over feature arrays, e.g. a pretrained
backbone's features of an image data set (`python -m iai_dist.data embed`), as the paper classifies DINOv2
embeddings of MNIST, Fashion-MNIST and ImageNet. Evaluation on another data set's embeddings (the same backbone)
is the out-of-distribution test: set task.embeddings.test to its file."""

from __future__ import annotations

from pathlib import Path

import torch

from iai_dist.config import TaskConfig
from iai_dist.tasks.base import register
from iai_dist.tasks.pooled import SPLITS, DataError, Pool, PooledClassification, group_by_class

_LOADED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (paths, mtimes) -> (features, labels): once per process


def read_split(features: str, labels: str = "", field: str = "task.embeddings.train") -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 features [n, d], int64 labels [n]) from a .npz/.pt with both, or a .npy of features plus a labels
    file; DataError naming the file for anything missing, mismatched, non-finite or of the wrong kind."""
    if not features:
        raise DataError(f"{field}: no file set; expected a .npz or .pt with 'features' and 'labels' "
                        "(`python -m iai_dist.data embed` writes them)")
    path = Path(features).expanduser()
    label_path = Path(labels).expanduser() if labels else None
    for p, name in ((path, field), (label_path, f"{field}_labels")):
        if p is not None and not p.is_file():
            raise DataError(f"{name}: {p} does not exist")
    key = tuple((str(p.resolve()), p.stat().st_mtime_ns) for p in (path, label_path) if p is not None)
    if key not in _LOADED:
        _LOADED[key] = _check(*_read(path, label_path, field), path)
    return _LOADED[key]


def _read(path: Path, label_path: Path | None, field: str):
    import numpy as np

    def load(p: Path) -> dict:
        try:
            if p.suffix == ".pt":
                obj = torch.load(p, map_location="cpu", weights_only=True)
                return obj if isinstance(obj, dict) else {"array": obj}
            obj = np.load(p, allow_pickle=False)
            return dict(obj) if p.suffix == ".npz" else {"array": obj}
        except Exception as exc:  # a damaged or foreign file: say which, in one line
            raise DataError(f"{p} cannot be read as {p.suffix or 'an array file'} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:200]})") from None

    data = load(path)
    if label_path is not None:
        labels = load(label_path)
        return data.get("features", data.get("array")), labels.get("labels", labels.get("array"))
    missing = [k for k in ("features", "labels") if k not in data]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(m) for m in missing)} array in it (it has "
                        f"{', '.join(sorted(data)) or 'none'}); a .npy of features needs {field}_labels")
    return data["features"], data["labels"]


def _check(features, labels, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(features), torch.as_tensor(labels)
    if x.ndim != 2 or not x.is_floating_point():
        raise DataError(f"{path}: features must be a float array [n, d], got {x.dtype} of shape {list(x.shape)}")
    if y.ndim != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{path}: labels must be an integer array [n], got {y.dtype} of shape {list(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} feature rows but {len(y)} labels")
    if not bool(torch.isfinite(x).all()):
        row = int((~torch.isfinite(x)).any(1).nonzero()[0])
        raise DataError(f"{path}: features have NaN or infinite values (first in row {row})")
    return x.to(torch.float32), y.to(torch.int64)


@register("embeddings")
class Embeddings(PooledClassification):
    """N-way episodes over task.embeddings' files; x is a row of features (task.dim = their width)."""

    @classmethod
    def check_config(cls, cfg: TaskConfig) -> None:
        for split in SPLITS:
            if not getattr(cfg.embeddings, split):
                raise ValueError(f"task.embeddings.{split}: set the {split} split's file (a .npz or .pt with "
                                 "'features' and 'labels'; `python -m iai_dist.data embed` writes them)")

    @classmethod
    def data_paths(cls, cfg: TaskConfig) -> dict[str, str]:
        e = cfg.embeddings
        return {f"task.embeddings.{key}": path for key in ("train", "test", "train_labels", "test_labels")
                if (path := getattr(e, key))}

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        e = cfg.embeddings
        self.pools = {}
        for split in SPLITS:
            field = f"task.embeddings.{split}"
            x, y = read_split(getattr(e, split), getattr(e, f"{split}_labels"), field)
            where = f"{field} ({getattr(e, split)})"
            if x.shape[1] != cfg.dim:
                raise DataError(f"task.dim={cfg.dim} but {where} has {x.shape[1]} features; set task.dim={x.shape[1]}")
            if int(y.min()) < 0:
                raise DataError(f"{where}: label {int(y.min())} is negative; expected classes 0..C-1")
            classes = int(y.max()) + 1
            if classes < cfg.num_classes:
                raise DataError(f"{where} has {classes} classes, fewer than task.num_classes={cfg.num_classes} (N-way tasks)")
            if e.standardize:
                std, mean = torch.std_mean(x, 0)
                x = (x - mean) / std.clamp_min(1e-6)
            self.pools[split] = Pool(*group_by_class(x, y, classes, where, what="rows"))
        self._check_query_size("rows")

    def _features_of(self, split, rows, device):
        return self._pool_on(split, device).data[rows]
