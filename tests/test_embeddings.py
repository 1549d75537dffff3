"""The embeddings family on real features: a torchvision backbone's features of the digits (`data embed`), and
N-way episodes over them; bad files are refused naming the file."""

import re

import numpy as np
import pytest
import torch

from iai_dist import data
from iai_dist.config import ConfigError, load_config
from iai_dist.evaluate import evaluate
from iai_dist.learner import train_in_process
from iai_dist.tasks import build_family


@pytest.fixture(scope="module")
def digit_embeddings(tmp_path_factory):
    """The digits through a randomly initialised MobileNetV3-small (weights written to a local file, as a user's
    would be) at 32x32: real images, a real backbone, no download."""
    import torchvision

    tmp = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict(), tmp / "backbone.pt")
    written = data.embed("digits", "mobilenet_v3_small", tmp / "backbone.pt", tmp / "digits", root=str(tmp), size=32)
    return tmp, written


def embeddings_cfg(written, *sets):
    return load_config("digits", overrides=[
        "task.family=embeddings", "task.dim=1024", f"task.embeddings.train={written['train']}",
        f"task.embeddings.test={written['test']}", "regime.chunk_size=256", "refiner.width=32", "refiner.depth=1",
        "tracking.enabled=false", "eval.one_step=false", *sets])


def test_embed_writes_the_backbones_features_of_both_splits(digit_embeddings, capsys):
    tmp, written = digit_embeddings
    train, test = (np.load(written[s]) for s in ("train", "test"))
    assert train["features"].shape == (1437, 1024) and test["features"].shape == (360, 1024)
    assert train["features"].dtype == np.float32 and np.isfinite(train["features"]).all()
    digits = build_family(load_config("digits").task)
    assert np.bincount(train["labels"]).tolist() == digits.pools["train"].count.tolist()
    # a row is the backbone's penultimate output for that image (ImageNet-normalised, 3 channels, 32x32)
    model = data.load_backbone("mobilenet_v3_small", tmp / "backbone.pt")
    img = digits.pools["test"].data[5:6]  # uint8 [1, 1, 8, 8]
    x = torch.nn.functional.interpolate(img.float().div(255).expand(-1, 3, -1, -1), size=32, mode="bilinear",
                                        antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    with torch.no_grad():
        np.testing.assert_allclose(model((x - mean) / std)[0].numpy(), test["features"][5], rtol=1e-4, atol=1e-4)
    for argv, message in [
        (["embed", "digits", "--backbone", "no_such_net", "--weights", "w.pt", "--out", str(tmp)], "not a torchvision"),
        (["embed", "digits", "--backbone", "resnet18", "--weights", str(tmp / "nope.pt"), "--out", str(tmp)], "no such file"),
        (["embed", "digits", "--backbone", "resnet18", "--weights", str(tmp / "backbone.pt"), "--out", str(tmp)],
         "does not fit resnet18"),
    ]:
        assert data.main(argv) == 2
        assert message in capsys.readouterr().err


def test_episodes_over_embeddings_are_balanced_reproducible_and_of_the_right_class(digit_embeddings):
    _, written = digit_embeddings
    fam = build_family(embeddings_cfg(written).task)
    ep = fam.sample(3, torch.arange(8))
    assert ep.x.shape == (8, 10, 10, 1024) and ep.x_query.shape == (8, 20, 1024)
    assert torch.equal(fam.sample(3, torch.tensor([4, 6])).x, ep.x[[4, 6]])
    pool = fam.pools["train"]
    # each drawn row belongs to the class its episode label stands for, and its features are that row's
    cls = ep.truth["classes"].gather(1, ep.y.flatten(1))
    assert torch.equal(pool.labels[ep.truth["image"].flatten(1)], cls)
    assert torch.equal(ep.x.flatten(1, 2), pool.data[ep.truth["image"].flatten(1)])
    assert (torch.bincount(ep.y[0, 0], minlength=5) == 2).all()  # B=10 over 5 classes: 2 each
    torch.testing.assert_close(pool.data.mean(0), torch.zeros(1024), atol=1e-4, rtol=0)  # standardised


def test_a_refiner_trains_on_embeddings_and_the_features_carry_the_classes(digit_embeddings):
    _, written = digit_embeddings
    cfg = embeddings_cfg(written, "train.max_steps=30", "train.log_every=15", "train.tasks_per_batch=16",
                         "task.steps=5", "eval.episodes=32", "eval.lr_select_episodes=16", "eval.lr_grid=[0.1,1.0]",
                         "eval.horizon=1", "eval.monitor_episodes=32")
    learner, _ = train_in_process(cfg, None, progress=False)
    summary = evaluate(learner.model, cfg)
    assert summary["metric"] == "classification error %"
    assert summary["at_once"]["full_fit"] < 60  # 5-way chance is 80%: the random backbone's features separate digits
    assert len(summary["per_step"]["refiner"]) == 6


def test_bad_embedding_files_are_refused_naming_the_file(tmp_path, digit_embeddings):
    _, written = digit_embeddings
    x = np.random.default_rng(0).normal(size=(100, 6)).astype(np.float32)
    y = np.arange(100) % 5
    nan = x.copy()
    nan[7, 2] = np.nan
    cases = {
        "short.npz": (dict(features=x, labels=y[:90]), "100 feature rows but 90 labels"),
        "nan.npz": (dict(features=nan, labels=y), "NaN or infinite values (first in row 7)"),
        "three.npz": (dict(features=x, labels=y % 3), "has 3 classes, fewer than task.num_classes=5"),
        "nolabels.npz": (dict(features=x), "no 'labels' array in it"),
        "good.npz": (dict(features=x, labels=y), "task.dim=6 but task.embeddings.test"),  # the digits' test split
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_family(embeddings_cfg(written, "task.dim=6", f"task.embeddings.train={tmp_path / name}").task)
    with pytest.raises(ConfigError, match="task.embeddings.train: .*missing.npz does not exist"):
        build_family(embeddings_cfg(written, f"task.embeddings.train={tmp_path / 'missing.npz'}").task)
    with pytest.raises(ConfigError, match="task.embeddings.test: set the test split's file"):
        load_config("digits", overrides=["task.family=embeddings", f"task.embeddings.train={written['train']}"])
    # a .npy of features with its labels in a second .npy reads the same as the .npz
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "l.npy", y)
    fam = build_family(embeddings_cfg(written, "task.dim=6", f"task.embeddings.train={tmp_path / 'f.npy'}",
                                      f"task.embeddings.train_labels={tmp_path / 'l.npy'}",
                                      f"task.embeddings.test={tmp_path / 'good.npz'}", "task.query_size=10").task)
    assert fam.pools["train"].data.shape == (100, 6)
