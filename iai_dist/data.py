"""Image data on machines that cannot download: stage real files into the layout torchvision reads; check it.

    python -m iai_dist.data stage fashion_mnist [--from /usr/share/datasets/fashion-mnist] [--root ROOT]
    python -m iai_dist.data stage mnist|kmnist --from DIR [--root ROOT]        (the four IDX files, .gz or not)
    python -m iai_dist.data stage cifar10 --from cifar-10-python.tar.gz [--root ROOT]
    python -m iai_dist.data status [--root ROOT]                               (what loads, or why not)

ROOT defaults to task.image.root's default; pass the same root to training with --set task.image.root=ROOT.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tarfile
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
            counts = {s: p.images.shape[0] for s, p in fam.pools.items()}
            rows.append((name, f"ok: {counts['train']} train / {counts['test']} test images"))
        except DataError as exc:
            rows.append((name, str(exc)))
    return rows


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
    for p in (st, sub.choices["status"]):
        p.add_argument("--root", default=ImageConfig().root)
    args = parser.parse_args(argv)
    if args.command == "status":
        for name, line in status(args.root):
            print(f"{name:14s} {line}")
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
