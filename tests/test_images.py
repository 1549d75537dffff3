"""Image task families on IDX files the tests write (and scikit-learn's digits, and real Fashion-MNIST where
Debian's package is installed): episodes, label permutation, balance, reproducibility, loading once, errors."""

import gzip
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from iai_dist import bench, data, evaluate, train
from iai_dist.config import ConfigError, load_config
from iai_dist.tasks import build_family, images
from iai_dist.tasks.images import DEBIAN_FASHION, IDX_FILES, DataError
from iai_dist.tasks.rng import permute

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}


def write_idx(folder: Path, split: str, counts: list[int], size: int = 28, gz: bool = False) -> None:
    """Images whose first pixels spell (label, index // 256, index % 256, split) so tests can read them back."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.uint8) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(len(labels)))]
    n = len(labels)
    pix = torch.randint(0, 256, (n, size * size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    pix[:, 0], pix[:, 1], pix[:, 2] = labels, torch.arange(n) // 256, torch.arange(n) % 256
    pix[:, 3] = 1 if split == "test" else 0
    folder.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    img_name, lbl_name = (f + (".gz" if gz else "") for f in IDX_FILES[split])
    with opener(folder / img_name, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, size, size) + pix.numpy().tobytes())
    with opener(folder / lbl_name, "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.numpy().tobytes())


TRAIN_COUNTS = [14, 15, 16, 17, 18, 19, 20, 21, 22, 23]  # unequal classes, like the real data sets
TEST_COUNTS = [9] * 10


@pytest.fixture
def idx_root(tmp_path):
    for folder in FOLDERS.values():
        write_idx(tmp_path / folder / "raw", "train", TRAIN_COUNTS)
        write_idx(tmp_path / folder / "raw", "test", TEST_COUNTS)
    return tmp_path


def image_cfg(root, family="mnist", **task):
    sets = {"task.family": family, "task.dim": 784, "task.num_classes": 3, "task.steps": 2, "task.batch_size": 5,
            "task.query_size": 6, "task.image.size": 28, "task.image.normalize": "none", "task.image.root": str(root)}
    sets.update({f"task.{k}": v for k, v in task.items()})
    return load_config("tiny", overrides=[f"{k}={v}" for k, v in sets.items()])


def decode(x):
    """features (normalize=none, 28x28) -> (data-set label, image number, split) per point."""
    b = (x[..., :4] * 255).round().long()
    return b[..., 0], b[..., 1] * 256 + b[..., 2], b[..., 3]


@pytest.mark.parametrize("family", sorted(FOLDERS))
def test_episode_shapes_labels_permuted_and_balanced(idx_root, family):
    fam = build_family(image_cfg(idx_root, family).task)
    ep = fam.sample(0, torch.arange(200))
    assert ep.x.shape == (200, 2, 5, 784) and ep.x_query.shape == (200, 6, 784)
    assert ep.y.dtype == torch.long and ep.y.shape == (200, 2, 5) and ep.y_query.shape == (200, 6)
    classes = ep.truth["classes"]  # [T, N]: label l of episode t is data-set class classes[t, l]
    assert all(len(set(row)) == 3 for row in classes.tolist())
    true_ctx, _, split = decode(ep.x)
    true_q, _, split_q = decode(ep.x_query)
    assert torch.equal(true_ctx, classes.gather(1, ep.y.flatten(1)).view_as(ep.y))
    assert torch.equal(true_q, classes.gather(1, ep.y_query))
    assert int(split.sum() + split_q.sum()) == 0  # training stream: the train split only
    # labels mean nothing across episodes: every class shows up under label 0, and classes are used evenly
    assert set(classes[:, 0].tolist()) == set(range(10))
    assert torch.bincount(classes.flatten(), minlength=10).min() > 30
    # every mini-batch holds each label floor or ceil(B/N) times; the query set exactly Q/N times
    per_batch = torch.nn.functional.one_hot(ep.y, 3).sum(2)
    assert per_batch.min() >= 1 and per_batch.max() <= 2
    assert (torch.nn.functional.one_hot(ep.y_query, 3).sum(1) == 2).all()
    # ... in random order
    assert len({tuple(r) for r in ep.y[:, 0].tolist()}) > 20


def test_no_image_twice_in_an_episode_and_the_query_is_held_out(idx_root):
    fam = build_family(image_cfg(idx_root, steps=3, batch_size=4, query_size=9).task)
    ep = fam.sample(3, torch.arange(100))
    _, num, _ = decode(ep.x.flatten(1, 2))
    _, num_q, _ = decode(ep.x_query)
    for ctx, q in zip(num.tolist(), num_q.tolist()):
        assert len(set(ctx)) == len(ctx) and len(set(q)) == len(q) and not set(ctx) & set(q)
    # beyond the class's images the context repeats, but never reaches a query image
    long = fam.sample(3, torch.arange(20), num_batches=30)  # 120 context points from ~3 x 15 images
    _, num, _ = decode(long.x.flatten(1, 2))
    _, num_q, _ = decode(long.x_query)
    for ctx, q in zip(num.tolist(), num_q.tolist()):
        assert len(set(ctx)) < len(ctx) and not set(ctx) & set(q)


def test_evaluation_reads_the_test_split(idx_root):
    fam = build_family(image_cfg(idx_root).task)
    ep = fam.sample(0, torch.arange(50), split="test")
    assert bool((decode(ep.x)[2] == 1).all()) and bool((decode(ep.x_query)[2] == 1).all())
    assert int(decode(ep.x)[1].max()) < sum(TEST_COUNTS)


def test_episode_depends_only_on_seed_and_index(idx_root):
    fam = build_family(image_cfg(idx_root).task)
    big = fam.sample(7, torch.arange(10, 18))
    small = fam.sample(7, torch.tensor([13, 15]))
    for a, b in [(big.x, small.x), (big.y, small.y), (big.x_query, small.x_query), (big.y_query, small.y_query)]:
        assert torch.equal(a[[3, 5]], b)
    assert not torch.equal(fam.sample(8, torch.tensor([13])).x[0], small.x[0])
    again = build_family(image_cfg(idx_root).task).sample(7, torch.tensor([13, 15]))
    assert torch.equal(again.x, small.x) and torch.equal(again.y_query, small.y_query)
    longer = fam.sample(7, torch.tensor([13, 15]), num_batches=4)  # more mini-batches extend the same episode
    assert torch.equal(longer.x[:, :2], small.x) and torch.equal(longer.y[:, :2], small.y)
    assert torch.equal(longer.x_query, small.x_query)


def test_data_is_loaded_once_per_process(idx_root):
    cfg = image_cfg(idx_root, "kmnist")
    before = images.LOADS.copy()
    fam = build_family(cfg.task)
    assert images.LOADS - before == {("kmnist", "train"): 1, ("kmnist", "test"): 1}
    after_build = images.LOADS.copy()
    for i in range(20):
        fam.sample(i, torch.arange(64), split="train" if i % 2 else "test")
    build_family(cfg.task).sample(0, torch.arange(4))  # a second family (another regime, evaluation, ...)
    build_family(cfg.with_overrides({"task.num_classes": 5}).task)
    assert images.LOADS == after_build
    assert fam.pools["train"].data.dtype == torch.uint8


def test_a_family_pickles_as_its_config(idx_root):
    """Workers in other processes rebuild it (and load the data there once) instead of receiving the images."""
    fam = build_family(image_cfg(idx_root).task)
    blob = pickle.dumps(fam)
    assert len(blob) < 20_000
    again = pickle.loads(blob)
    assert torch.equal(again.sample(1, torch.arange(3)).x, fam.sample(1, torch.arange(3)).x)


def test_preprocessing_resize_normalize_project(idx_root):
    small = build_family(image_cfg(idx_root, dim=64, **{"image.size": 8, "image.normalize": "dataset"}).task)
    x = small.sample(0, torch.arange(400)).x
    assert x.shape[-1] == 64 and abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
    per_image = build_family(image_cfg(idx_root, dim=64, **{"image.size": 8, "image.normalize": "image"}).task)
    x = per_image.sample(0, torch.arange(10)).x
    torch.testing.assert_close(x.mean(-1), torch.zeros(x.shape[:-1]), atol=1e-5, rtol=0)
    proj = {"image.size": 8, "image.features": "projection"}
    a = build_family(image_cfg(idx_root, "mnist", dim=16, **proj).task).sample(0, torch.arange(5))
    b = build_family(image_cfg(idx_root, "mnist", dim=16, **proj).task).sample(0, torch.arange(5))
    assert a.x.shape[-1] == 16 and torch.equal(a.x, b.x)  # a fixed projection, not a fresh one per build


def test_scikit_learn_digits_are_real_and_offline():
    fam = build_family(load_config("digits").task)
    assert fam.pools["train"].data.shape == (1437, 1, 8, 8) and fam.pools["test"].data.shape[0] == 360
    assert fam.pools["train"].count.tolist() == torch.bincount(fam.pools["train"].labels).tolist()
    ep = fam.sample(0, torch.arange(32), split="test")
    assert ep.x.shape == (32, 10, 10, 64) and ep.x_query.shape == (32, 20, 64)
    assert not hasattr(fam, "posterior_mean")  # no Bayes-optimal baseline for images


def test_permute_is_a_bijection():
    for size in (1, 2, 7, 64, 65, 1000):
        for key in (0, 12345):
            out = permute(torch.arange(size), torch.tensor(key), torch.tensor(size))
            assert sorted(out.tolist()) == list(range(size))
    with pytest.raises(ValueError):
        permute(torch.tensor([5]), torch.tensor(0), torch.tensor(5))


# -- clear errors --
def test_missing_data_names_root_files_and_command(tmp_path):
    with pytest.raises(DataError) as err:
        build_family(image_cfg(tmp_path / "nowhere", "fashion_mnist").task)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "python -m iai_dist.data stage fashion_mnist" in msg and "\n" not in msg
    with pytest.raises(DataError, match="task.image.download=true"):
        build_family(image_cfg(tmp_path, "mnist").task)
    with pytest.raises(DataError, match="cifar-10-batches-py.*stage cifar10"):
        build_family(image_cfg(tmp_path, "cifar10", dim=1024, **{"image.size": 32}).task)
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"):
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"junk")
    with pytest.raises(DataError, match="corrupt"):
        build_family(image_cfg(tmp_path, "cifar10", dim=1024, **{"image.size": 32}).task)


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror/, got:\nno network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataError, match="download into .* failed .*got: no network") as err:
        build_family(image_cfg(tmp_path, "mnist", **{"image.download": "true"}).task)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage,message", [
    ("truncate", "is corrupt: its header announces 90x28x28"),
    ("magic", "is corrupt: not an uncompressed IDX file"),
    ("label", "label 200 is outside 0..9"),
    ("count", "are corrupt or mismatched"),
])
def test_corrupt_files_are_reported_not_crashed_on(idx_root, damage, message):
    raw = idx_root / "MNIST" / "raw"
    images_file, labels_file = raw / IDX_FILES["test"][0], raw / IDX_FILES["test"][1]
    if damage == "truncate":
        images_file.write_bytes(images_file.read_bytes()[:5000])
    elif damage == "magic":
        images_file.write_bytes(gzip.compress(images_file.read_bytes()))
    elif damage == "label":
        body = bytearray(labels_file.read_bytes())
        body[-1] = 200
        labels_file.write_bytes(bytes(body))
    else:
        labels_file.write_bytes(struct.pack(">II", 0x801, 3) + bytes(3))
    with pytest.raises(DataError, match=message):
        build_family(image_cfg(idx_root).task)


def test_commands_stop_with_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "fashion-mnist-8x8", "--set", f"task.image.root={tmp_path / 'empty'}"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: fashion_mnist: no data under root") and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no run directory
    assert train.main(["--preset", "digits", "--set", "task.dim=20"]) == 2
    assert "task.dim=20 does not match digits images flattened at 8x8x1 (64 features)" in capsys.readouterr().err
    for bad, message in [(["task.num_classes=11"], "digits has 10 classes"),
                         (["task.image.normalise=none"], "task.image.normalise: unknown key"),
                         (["task.image.size=0"], "task.image.size: Input should be greater than 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config("digits", overrides=bad)


# -- staging real files --
def test_stage_gzipped_idx_into_torchvision_layout(tmp_path):
    src = tmp_path / "debian"
    write_idx(src, "train", TRAIN_COUNTS, gz=True)
    write_idx(src, "test", TEST_COUNTS, gz=True)
    root = tmp_path / "root"
    assert data.main(["stage", "fashion_mnist", "--from", str(src), "--root", str(root)]) == 0
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(
        f for s in ("train", "test") for f in IDX_FILES[s])
    fam = build_family(image_cfg(root, "fashion_mnist").task)
    assert fam.pools["train"].count.tolist() == TRAIN_COUNTS
    # a damaged archive is reported and leaves nothing half-written
    bad = tmp_path / "bad"
    write_idx(bad, "train", TRAIN_COUNTS, gz=True)
    write_idx(bad, "test", TEST_COUNTS, gz=True)
    blob = (bad / "train-images-idx3-ubyte.gz").read_bytes()
    (bad / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is corrupt"):
        data.stage("mnist", bad, tmp_path / "r2")
    assert not any(p.is_file() for p in (tmp_path / "r2").rglob("*"))
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte"):
        data.stage("mnist", bad, tmp_path / "r2")


@pytest.mark.skipif(not Path(DEBIAN_FASHION).is_dir(), reason=f"real Fashion-MNIST absent ({DEBIAN_FASHION}; "
                    "apt-get install dataset-fashion-mnist, which `make test` does where it can)")
def test_real_fashion_mnist_from_debian(tmp_path):
    assert data.main(["stage", "fashion_mnist", "--root", str(tmp_path)]) == 0
    fam = build_family(load_config("fashion-mnist-8x8", overrides=[f"task.image.root={tmp_path}"]).task)
    assert fam.pools["train"].count.tolist() == [6000] * 10 and fam.pools["test"].count.tolist() == [1000] * 10
    ep = fam.sample(0, torch.arange(16), split="test")
    assert ep.x.shape == (16, 10, 10, 64) and torch.isfinite(ep.x).all()


# -- cross-dataset evaluation and the image benchmarks, at toy sizes --
SMALL = ["task.steps=2", "task.query_size=10", "refiner.width=16", "refiner.depth=1", "eval.episodes=16",
         "eval.lr_select_episodes=8", "eval.lr_grid=[0.1]", "train.tasks_per_batch=16"]


def test_digits_refiner_evaluated_on_another_data_set(idx_root, tmp_path):
    root = tmp_path / "runs"
    argv = ["--preset", "digits", "--set", "tracking.enabled=false", "--set", f"tracking.runs_dir={root}",
            "--set", "tracking.run_name=d", "--set", "train.max_steps=3", "--set", "eval.one_step=false"]
    argv += [a for s in SMALL for a in ("--set", s)]
    assert train.main(argv) == 0
    ckpt = root / "d" / "checkpoint.pt"
    out = tmp_path / "cross"
    assert evaluate.main(["--checkpoint", str(ckpt), "--set", "task.family=fashion_mnist", "--set",
                          f"task.image.root={idx_root}", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"]["family"] == "fashion_mnist" and "bayes_optimal" not in summary["per_step"]
    assert len(summary["per_step"]["refiner"]) == 5 and {"adam", "sgd"} <= set(summary["per_step"])
    assert evaluate.main(["--checkpoint", str(ckpt), "--set", "task.family=mnist", "--set",
                          f"task.image.root={tmp_path / 'none'}"]) == 2


def test_transfer_and_sampler_benches(idx_root, tmp_path):
    sets = [a for s in [*SMALL, f"task.image.root={idx_root}"] for a in ("--set", s)]
    bench.main(["transfer", "--minutes", "0.002", "--one-step-minutes", "0.001", "--episodes", "16", "--regimes",
                "parametric,implicit", "--pairs", "digits:fashion_mnist", "--sampler-seconds", "0.1", "--out", str(tmp_path), *sets])
    res = json.loads((tmp_path / "transfer.json").read_text())
    pair = res["pairs"]["digits:fashion_mnist"]
    assert set(pair["regimes"]) == {"parametric obs+grad (softmax-linear)", "implicit obs"}
    run = pair["regimes"]["implicit obs"]
    assert run["own"]["task"]["family"] == "digits" and run["other"]["task"]["family"] == "fashion_mnist"
    assert "one_step" in run["other"]["at_once"] and res["sampler_episodes_per_s"]["digits"] > 0
    assert "| adam, same steps" in (tmp_path / "transfer.md").read_text()
    bench.main(["sampler", "--presets", "digits", "--steps", "1", "--seconds", "0.1", "--out", str(tmp_path), *sets])
    rows = json.loads((tmp_path / "sampler.json").read_text())["rows"]
    assert len(rows) == 3 and all(r["sampler_episodes_per_s"] > 0 and r["learner_episodes_per_s"] > 0 for r in rows)
