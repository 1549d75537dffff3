"""Image data on machines that cannot download: stage real files into the layout torchvision reads; check it.

    python -m iai_dist.data stage fashion_mnist [--from /usr/share/datasets/fashion-mnist] [--root ROOT]
    python -m iai_dist.data stage mnist|kmnist --from DIR [--root ROOT]        (the four IDX files, .gz or not)
    python -m iai_dist.data stage cifar10 --from cifar-10-python.tar.gz [--root ROOT]
    python -m iai_dist.data status [--root ROOT]                               (what loads, or why not)
    python -m iai_dist.data embed DATASET --backbone NAME --weights FILE --out DIR [--size 224] [--root ROOT]
        (a torchvision backbone's features of both splits: DIR/train.npz, DIR/test.npz for task.family=embeddings)

ROOT defaults to task.image.root's default; pass the same root to training with --set task.image.root=ROOT.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tarfile
import time
import zlib
from pathlib import Path

from iai_dist.config import ImageConfig, TaskConfig
from iai_dist.tasks import FAMILIES
from iai_dist.tasks.images import (
    CIFAR10, DEBIAN_FASHION, IDX_FILES, SPLITS, DataError, FashionMNIST, ImageClassification, IDXImages, one_line,
    check_cifar, idx_header,
)


def image_families() -> list[str]:
    return sorted(n for n, f in FAMILIES.items() if isinstance(f, type) and issubclass(f, ImageClassification))


def status(root: str) -> list[tuple[str, str]]:
    """(family, 'ok: ...' or the error) for every image family, loading each at its native settings."""
    rows = []
    for name in image_families():
        family = FAMILIES[name]
        size = {"digits": 8, "cifar10": 32}.get(name, 28)
        image = ImageConfig(root=root, size=size)
        try:
            fam = family(TaskConfig(family=name, dim=size * size, num_classes=family.classes, query_size=10,
                                    image=image))
            counts = {s: p.data.shape[0] for s, p in fam.pools.items()}
            rows.append((name, f"ok: {counts['train']} train / {counts['test']} test images"))
        except DataError as exc:
            rows.append((name, str(exc)))
    return rows


# -- embeddings: a backbone's features of an image data set, for the embeddings family --
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_backbone(name: str, weights: str | Path):
    """A torchvision classification model with local weights, its last Linear layer (the classifier) replaced by
    the identity, so it outputs the penultimate features. DataError for an unknown name or weights that do not fit."""
    import torch
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise DataError(f"--backbone {name!r}: not a torchvision classification model; known: {', '.join(known)}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise DataError(f"--weights {path}: no such file (no download is assumed: give a local state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"--weights {path} cannot be read ({one_line(exc)})") from None
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    model = torchvision.models.get_model(name, weights=None)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DataError(f"--weights {path} does not fit {name}: {str(exc).splitlines()[0]}") from None
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]  # e.g. fc, classifier.3
    if not linears:
        raise DataError(f"--backbone {name}: it has no Linear classifier layer to take the features before")
    parent, _, attr = linears[-1].rpartition(".")
    setattr(model.get_submodule(parent), attr, torch.nn.Identity())
    return model.eval()


def embed(name: str, backbone: str, weights: str | Path, out: str | Path, root: str, size: int = 224,
          batch: int = 256, device: str | None = None) -> dict[str, Path]:
    """Both splits of image family `name` through the backbone: images resized to size x size, three channels,
    ImageNet-normalised; DIR/{train,test}.npz with `features` (float32 [n, d]) and `labels` (int64 [n])."""
    import numpy as np
    import torch
    from torchvision.transforms.v2 import functional as TF

    if name not in image_families():
        raise DataError(f"embed {name!r}: expected an image data set, one of {', '.join(image_families())}")
    family = FAMILIES[name]
    native = {"digits": 8, "cifar10": 32}.get(name, 28)
    fam = family(TaskConfig(family=name, dim=native * native * family.channels, num_classes=family.classes,
                            query_size=10, image=ImageConfig(root=root, size=native, grayscale=False)))
    model = load_backbone(backbone, weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        pool = fam.pools[split]
        n, feats, start = pool.data.shape[0], [], time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, batch):
                x = pool.data[i : i + batch].to(device).float().div(255.0)
                x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
                x = TF.resize(x, [size, size], antialias=True)
                feats.append(model((x - mean) / std).flatten(1).float().cpu())
                done = min(i + batch, n)
                if done == n or (i // batch) % 10 == 9:
                    print(f"[embed] {name} {split}: {done}/{n} images | {done / (time.perf_counter() - start):.0f} "
                          f"images/s | {device}", flush=True)
        path = out / f"{split}.npz"
        tmp = out / f".{split}.tmp.npz"
        features = torch.cat(feats).numpy()
        np.savez(tmp, features=features, labels=pool.labels.numpy())
        os.replace(tmp, path)
        written[split] = path
    print(f"wrote {written['train']} and {written['test']} ({features.shape[1]} features); train on them with\n"
          f"  --set task.family=embeddings --set task.dim={features.shape[1]} --set task.embeddings.train="
          f"{written['train']} --set task.embeddings.test={written['test']}")
    return written


# -- staging: real files from wherever they are into the layout torchvision reads --
def stage(name: str, src: str | Path | None, root: str | Path) -> list[Path]:
    """Copy (and gunzip) a data set's files into root; check them; return what was written."""
    family = FAMILIES.get(name)
    root = Path(root).expanduser().resolve()
    if family is CIFAR10:
        if src is None:
            raise DataError("cifar10: --from cifar-10-python.tar.gz is needed")
        try:
            with tarfile.open(src) as tar:
                tar.extractall(root, filter="data")
        except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
            raise DataError(f"{src} cannot be extracted ({one_line(exc)})") from None
        check_cifar(root)
        return [root / "cifar-10-batches-py"]
    if family is None or not issubclass(family, IDXImages):
        idx = sorted(n for n, f in FAMILIES.items() if isinstance(f, type) and issubclass(f, IDXImages))
        raise DataError(f"cannot stage {name!r}: IDX data sets are {', '.join(idx)}, and cifar10 from its tarball")
    if src is None:
        if family is not FashionMNIST:
            raise DataError(f"{name}: --from DIR is needed (a folder with the four IDX files, .gz or not)")
        src = DEBIAN_FASHION
    src = Path(src)
    raw = root / family.folder / "raw"
    sources = {}
    for base in (f for s in SPLITS for f in IDX_FILES[s]):
        candidates = [src / f"{stem}{gz}" for stem in (base, base.replace("-idx", ".idx")) for gz in ("", ".gz")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            hint = " (Debian: apt-get install dataset-fashion-mnist)" if family is FashionMNIST else ""
            raise DataError(f"{name}: {src} has no {base} or {base}.gz{hint}")
        sources[base] = found
    raw.mkdir(parents=True, exist_ok=True)
    written = []
    for base, found in sources.items():
        tmp = raw / f".{base}.tmp"
        try:
            with (gzip.open(found) if found.suffix == ".gz" else open(found, "rb")) as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
            idx_header(tmp)
        except (OSError, EOFError, zlib.error, DataError) as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{found} is corrupt ({exc})") from None
        os.replace(tmp, raw / base)
        written.append(raw / base)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iai_dist.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stage", help="copy (and gunzip) real files into ROOT in torchvision's layout")
    st.add_argument("name", help="fashion_mnist, mnist, kmnist or cifar10")
    st.add_argument("--from", dest="src", help=f"folder or tarball to read (fashion_mnist: {DEBIAN_FASHION})")
    sub.add_parser("status", help="which image families load from ROOT, or why not")
    em = sub.add_parser("embed", help="a torchvision backbone's features of an image data set (both splits)")
    em.add_argument("name", help=f"the image data set: {', '.join(image_families())}")
    em.add_argument("--backbone", required=True, help="a torchvision model name, e.g. resnet18, vit_b_16")
    em.add_argument("--weights", required=True, help="its state dict, a local file (nothing is downloaded)")
    em.add_argument("--out", required=True, help="the folder for train.npz and test.npz")
    em.add_argument("--size", type=int, default=224, help="images are resized to SIZE x SIZE (default 224)")
    em.add_argument("--batch", type=int, default=256)
    em.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when there is one)")
    for p in (st, sub.choices["status"], em):
        p.add_argument("--root", default=ImageConfig().root)
    args = parser.parse_args(argv)
    if args.command == "status":
        for name, line in status(args.root):
            print(f"{name:14s} {line}")
        return 0
    if args.command == "embed":
        try:
            embed(args.name, args.backbone, args.weights, args.out, args.root, args.size, args.batch, args.device)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        written = stage(args.name, args.src, args.root)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
