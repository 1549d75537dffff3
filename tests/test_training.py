import math

import pytest
import torch

from iai_dist.learner import learner_step
from iai_dist.rollout import make_transitions, refine
from iai_dist.training import CheckpointError, Trainer, TrainingDiverged, read_checkpoint, train


def test_resume_is_exact(tiny_cfg, tmp_path):
    """2N steps in one go == N steps, checkpoint, a fresh process-like resume, N more steps."""
    cfg = tiny_cfg.with_overrides({"train.max_steps": 12, "train.checkpoint_every": 100})
    straight = train(cfg, tmp_path / "a.pt")
    first = train(cfg, tmp_path / "b.pt", stop_at=6)
    assert first.step == 6 and (tmp_path / "b.pt").exists()
    resumed = train(cfg, tmp_path / "b.pt")
    assert resumed.step == 12 and resumed.cursor == straight.cursor
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    # a differently seeded run ends elsewhere: the equality above is not vacuous
    other = train(cfg.with_overrides({"train.seed": 1}), tmp_path / "c.pt")
    assert any(not torch.equal(a, b) for a, b in zip(other.model.parameters(), straight.model.parameters()))


def test_resume_refuses_a_different_config(tiny_cfg, tmp_path):
    train(tiny_cfg.with_overrides({"train.max_steps": 2}), tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="train.lr"):
        train(tiny_cfg.with_overrides({"train.max_steps": 2, "train.lr": 0.5}), tmp_path / "ck.pt")


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(CheckpointError, match="not an iai_dist checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_cfg):
    trainer = Trainer(tiny_cfg.with_overrides({"train.max_nonfinite_in_row": 3}))
    tr = make_transitions(trainer.model, trainer.next_episodes())
    tr.state[-1, 0] = math.nan  # a step K-1 row (step-0 rows start from the live initial state)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = learner_step(trainer.objective, trainer.optimizer, trainer.scheduler, tr, trainer.cfg.train, trainer.cfg.task.steps)
    assert stats.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    poisoned = trainer.family.sample
    trainer.family.sample = lambda *a, **k: _with_nan(poisoned(*a, **k))
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(TrainingDiverged, match="3 learner steps in a row"):
        trainer.train_step()
    assert trainer.skipped == 3


def _with_nan(ep):
    ep.y_query[0, 0] = math.inf
    return ep


def test_a_tiny_model_learns_to_refine(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"task.steps": 5, "train.max_steps": 150, "train.lr": 3e-3})
    trainer = train(cfg, checkpoint_path=None)
    ep = trainer.family.sample(cfg.eval.seed, torch.arange(256))
    terms = refine(trainer.model, ep)
    err = [float(t[0].sum() / t[1].sum()) for t in terms]
    assert err[5] < err[1] < err[0]
    assert err[5] < 0.5 * err[1]


@pytest.mark.parametrize("kind,signal,param", [("parametric", "grad", "theta0"), ("explicit", "obs", "z0"),
                                               ("implicit", "obs", "y0")])
def test_the_learned_initial_state_is_trained(tiny_cfg, kind, signal, param):
    trainer = Trainer(tiny_cfg.with_overrides({"regime.kind": kind, "regime.signal": signal}))
    before = getattr(trainer.model.regime, param).detach().clone()
    for _ in range(3):
        trainer.train_step()
    assert not torch.equal(before, getattr(trainer.model.regime, param))
