"""The in-process learner: the greedy objective, exact resume, the resume rules, skipped steps, checkpoints."""

import copy
import math

import pytest
import torch

from iai_dist import checkpoint
from iai_dist.checkpoint import CheckpointError, read_checkpoint
from iai_dist.evaluate import one_step_config
from iai_dist.experience import EpisodeStream, LocalRollouts
from iai_dist.learner import Learner, TrainingDiverged, lr_multiplier, param_groups, train_in_process
from iai_dist.objective import greedy_backward, greedy_terms
from iai_dist.regimes.explicit import auto_decode
from iai_dist.rollout import make_transitions, refine, refined_states


def quiet_train(cfg, path, **kw):
    return train_in_process(cfg, path, progress=False, **kw)


def test_horizon_rolls_out_past_k_on_fresh_minibatches_and_learns_from_every_step(tiny_cfg):
    """train.horizon=2: each training episode runs 2K refinement steps on 2K mini-batches. Its first K steps are
    the horizon-1 transitions exactly; the next K go on from there (the refiner on its last step embedding);
    the objective, the per-step errors and the monitored curve span all 2K; the one-step model keeps horizon 1."""
    k = tiny_cfg.task.steps
    deep = tiny_cfg.with_overrides({"train.horizon": 2, "eval.monitor_episodes": 16})
    learner = Learner(deep)
    source = LocalRollouts(learner, EpisodeStream(deep.train.tasks_per_batch))
    for step in range(3):  # past the zero-initialised update, so that states move
        learner.learn(source.next(step)[0])
    tr, _ = source.next(3)
    t, tasks = tr.num_tasks, torch.arange(tr.first_episode, tr.first_episode + tr.num_tasks)
    assert tr.num_steps == 2 * k and tr.step.tolist() == [i for i in range(2 * k) for _ in range(t)]
    shallow = make_transitions(learner.model, learner.family.sample(deep.train.seed, tasks))
    assert shallow.num_steps == k
    for field in ("state", "grad", "x", "y"):
        torch.testing.assert_close(getattr(tr, field)[:k * t], getattr(shallow, field), msg=field)
    episodes = learner.family.sample(deep.train.seed, tasks, num_batches=2 * k)
    torch.testing.assert_close(tr.x[k * t:], episodes.x[:, k:].transpose(0, 1).flatten(0, 1))
    with torch.no_grad():
        states = list(refined_states(learner.model, episodes, 2 * k - 1))
    torch.testing.assert_close(tr.state, torch.cat(states))
    assert not torch.equal(states[k], states[k - 1])
    stats = learner.learn(tr).read()
    assert len(stats.step_errors) == len(stats.step_losses) == 2 * k
    assert len(learner.heldout_errors()) == 2 * k
    assert one_step_config(deep).train.horizon == 1
    assert one_step_config(deep.with_overrides({"train.horizon_from": 0.5})).train.horizon_from == 0


@pytest.mark.parametrize("weighting", ["relative", "uniform"])
def test_steps_past_k_weigh_horizon_weight_in_the_objective(tiny_cfg, weighting):
    """train.horizon_weight=w: the objective is the mean over the 2K steps with weight 1 for steps 1..K and w
    after, as written out by hand here; w=1 is the plain mean, which has another gradient."""
    k, w = tiny_cfg.task.steps, 0.25
    cfg = tiny_cfg.with_overrides({"train.horizon": 2, "train.horizon_weight": w, "train.step_weighting": weighting,
                                   "train.autocast": "off"})
    learner = Learner(cfg)
    torch.nn.init.normal_(learner.model.refiner.out.weight, std=0.2)  # rollouts whose steps differ
    tr = LocalRollouts(learner, EpisodeStream(cfg.train.tasks_per_batch)).next(0)[0]

    def gradient(c):
        learner.optimizer.zero_grad(set_to_none=True)
        value = greedy_backward(learner.objective, tr, c.train, k)[0]
        return value, [p.grad.clone() for p in learner.model.parameters() if p.grad is not None]

    value, weighted = gradient(cfg)
    learner.optimizer.zero_grad(set_to_none=True)
    losses = greedy_terms(learner.model, tr)[0] / tr.num_tasks
    share = torch.tensor([1.0] * k + [w] * k)
    by_hand = (share * (losses.log() if weighting == "relative" else losses)).sum() / share.sum()
    by_hand.backward()
    assert value == pytest.approx(by_hand.item(), rel=1e-5)
    for ours, theirs in zip(weighted, [p.grad for p in learner.model.parameters() if p.grad is not None]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    _, plain = gradient(cfg.with_overrides({"train.horizon_weight": 1.0}))
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(plain, weighted))
    assert one_step_config(cfg).train.horizon_weight == 1


def test_a_horizon_curriculum_rolls_out_k_steps_first_and_a_resume_keeps_its_phases(tiny_cfg, tmp_path):
    """train.horizon_from=0.5: the learner steps before max_steps / 2 roll out K steps, the later ones 2K. The
    phase is a function of the step: a run stopped in the K-step phase and resumed crosses over where an
    unbroken run does, and ends with the same model."""
    k = tiny_cfg.task.steps
    cfg = tiny_cfg.with_overrides({"train.horizon": 2, "train.horizon_from": 0.5, "train.max_steps": 8,
                                   "train.checkpoint_every": 100})
    source = LocalRollouts(Learner(cfg), EpisodeStream(cfg.train.tasks_per_batch))
    assert [source.next(step)[0].num_steps for step in (0, 3, 4, 7)] == [k, k, 2 * k, 2 * k]
    straight, _ = quiet_train(cfg, tmp_path / "a.pt")
    quiet_train(cfg, tmp_path / "b.pt", stop_at=3)
    resumed, _ = quiet_train(cfg, tmp_path / "b.pt")
    assert len(resumed.heldout_errors()) == 2 * k  # the monitor follows the horizon from the start
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    # 2K steps from the start ends elsewhere: the curriculum changed what was learned
    always, _ = quiet_train(cfg.with_overrides({"train.horizon_from": 0}), tmp_path / "c.pt")
    assert any(not torch.equal(a, b) for a, b in zip(always.model.parameters(), straight.model.parameters()))


def test_resume_is_exact(tiny_cfg, tmp_path):
    """2N steps in one go == N steps, checkpoint, a fresh learner resuming, N more steps."""
    cfg = tiny_cfg.with_overrides({"train.max_steps": 12, "train.checkpoint_every": 100})
    straight, _ = quiet_train(cfg, tmp_path / "a.pt")
    first, _ = quiet_train(cfg, tmp_path / "b.pt", stop_at=6)
    assert first.step == 6 and read_checkpoint(tmp_path / "b.pt")[0]["episodes"] == 6 * 32
    resumed, totals = quiet_train(cfg, tmp_path / "b.pt")
    assert resumed.step == 12 and totals["episodes"] == 12 * 32 and totals["start_step"] == 6
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    # a differently seeded run ends elsewhere: the equality above is not vacuous
    other, _ = quiet_train(cfg.with_overrides({"train.seed": 1}), tmp_path / "c.pt")
    assert any(not torch.equal(a, b) for a, b in zip(other.model.parameters(), straight.model.parameters()))


def test_resume_rules(tiny_cfg, tmp_path):
    """What a user extends or re-sizes may change on resume; the rest is refused with one line naming the key."""
    path = tmp_path / "ck.pt"
    quiet_train(tiny_cfg.with_overrides({"train.max_steps": 4}), path)
    for key, value in [("train.lr", 0.5), ("task.dim", 5), ("regime.signal", "obs"), ("refiner.depth", 2),
                       ("train.tasks_per_batch", 16), ("train.autocast", "bf16")]:
        with pytest.raises(CheckpointError, match=f"written with {key}=.*cannot change on resume") as err:
            quiet_train(tiny_cfg.with_overrides({"train.max_steps": 4, key: value}), path)
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="past train.max_steps=3"):
        quiet_train(tiny_cfg.with_overrides({"train.max_steps": 3}), path)
    longer = tiny_cfg.with_overrides({"train.max_steps": 8, "eval.episodes": 32, "tracking.experiment": "x",
                                      "train.log_every": 2, "distributed.staleness": 3})
    learner, totals = quiet_train(longer, path)
    assert totals["start_step"] == 4 and learner.step == 8 and totals["episodes"] == 8 * 32
    assert read_checkpoint(path)[1].train.max_steps == 8  # the new config is what the checkpoint now carries


def test_a_longer_schedule_continues_as_if_it_had_been_set_from_the_start(tiny_cfg):
    """The learning rate is a function of (step, max_steps): resumed with a larger max_steps, every later step
    has the rate a run started with that max_steps has there."""
    short, long = tiny_cfg.with_overrides({"train.max_steps": 20}), tiny_cfg.with_overrides({"train.max_steps": 60})
    learner = Learner(short)
    learner.step = 20
    assert learner.lr == pytest.approx(short.train.lr * short.train.min_lr_ratio)  # the end of the short schedule
    learner.cfg = long
    tc = long.train
    assert learner.lr == pytest.approx(tc.lr * lr_multiplier(20, tc.warmup_steps, 60, tc.min_lr_ratio))


def test_checkpoints_load_weights_only_and_bad_ones_are_clear_errors(tiny_cfg, tmp_path):
    good = tmp_path / "good.pt"
    quiet_train(tiny_cfg.with_overrides({"train.max_steps": 2}), good)
    ckpt, cfg = read_checkpoint(good)  # weights_only=True inside
    assert ckpt["format"] == checkpoint.CHECKPOINT_FORMAT and cfg == tiny_cfg.with_overrides({"train.max_steps": 2})
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(bad)
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "payload": EpisodeStream(4)}, bad)  # an arbitrary object
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(bad)
    torch.save({"weights": 1}, bad)
    with pytest.raises(CheckpointError, match="not an iai_dist checkpoint"):
        read_checkpoint(bad)
    torch.save({**ckpt, "format": 1}, bad)
    with pytest.raises(CheckpointError, match="has format 1"):
        read_checkpoint(bad)
    torch.save({**ckpt, "episodes": 5}, bad)
    with pytest.raises(CheckpointError, match="inconsistent"):
        quiet_train(tiny_cfg.with_overrides({"train.max_steps": 4}), tmp_path / "out.pt", resume_from=bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_an_explicit_checkpoint_from_before_film_reads_as_concat_and_loads(tiny_cfg, tmp_path):
    """Configs written before regime.conditioning existed had the paper's concat f_gamma: reading one gives
    conditioning=concat, so its weights load into the model that config builds."""
    path = tmp_path / "old.pt"
    cfg = tiny_cfg.with_overrides({"train.max_steps": 2, "regime.kind": "explicit", "regime.conditioning": "concat"})
    quiet_train(cfg, path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["regime"]["conditioning"]
    torch.save(ckpt, path)
    ckpt, saved = read_checkpoint(path)
    assert saved.regime.conditioning == "concat"
    Learner(saved).model.load_state_dict(ckpt["model"])  # strict: every key matches
    with pytest.raises(RuntimeError, match="z_scale"):
        Learner(saved.with_overrides({"regime.conditioning": "film"})).model.load_state_dict(ckpt["model"])


def _poison(learner):
    sample = learner.family.sample

    def poisoned(*args, **kw):
        ep = sample(*args, **kw)
        ep.y_query[0, 0] = math.inf
        return ep

    learner.family.sample = poisoned


def test_nonfinite_steps_are_skipped_still_move_the_schedule_then_stop_the_run(tiny_cfg):
    learner = Learner(tiny_cfg.with_overrides({"train.max_nonfinite_in_row": 3, "train.warmup_steps": 0}))
    source = LocalRollouts(learner, EpisodeStream(32))
    tr, _ = source.next(0)
    tr.state[-1, 0] = math.nan  # a step K-1 row (step-0 rows start from the live initial state)
    before = [p.detach().clone() for p in learner.model.parameters()]
    stats = learner.learn(tr)
    assert stats.skipped and learner.step == 1 and learner.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    learner.learn(source.next(1)[0])  # a good step, at the rate of step 1, not of step 0
    tc = learner.cfg.train
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(
        tc.lr * lr_multiplier(1, 0, tc.max_steps, tc.min_lr_ratio))
    assert learner.nonfinite_in_row == 0

    _poison(learner)
    for step in range(2, 5):  # steps 3, 4, 5 fail: three in a row, read only at multiples of 3 (step 3: one)
        learner.learn(source.next(step)[0])
    with pytest.raises(TrainingDiverged, match="4 learner steps in a row"):
        learner.learn(source.next(5)[0])
    assert learner.skipped == 5 and learner.step == 6


def test_a_checkpoint_of_the_unfused_optimizer_resumes_on_the_fused_one(tiny_cfg):
    """Checkpoints written before the learner's AdamW was fused (the one that can skip a step on the device)
    carry fused=None in their groups; loading one keeps the fused step, which skips by found_inf."""
    old = Learner(tiny_cfg)
    old.optimizer = torch.optim.AdamW(param_groups(old.model, tiny_cfg), lr=tiny_cfg.train.lr)
    for p in old.model.parameters():
        p.grad = torch.randn_like(p)
    old.optimizer.step()  # moments and step counts, as an old learner step left them
    assert not old.optimizer.param_groups[0]["fused"]
    new = Learner(tiny_cfg)
    new.load_state_dict(old.state_dict())
    assert all(g["fused"] for g in new.optimizer.param_groups)
    tr = LocalRollouts(new, EpisodeStream(32)).next(1)[0]
    tr.state[-1, 0] = math.nan
    before = [p.detach().clone() for p in new.model.parameters()]
    assert new.learn(tr).skipped and new.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, new.model.parameters()))


@pytest.mark.parametrize("memory", ["none", "moments", "observations"])
def test_a_tiny_model_learns_to_refine(tiny_cfg, memory):
    cfg = tiny_cfg.with_overrides({"task.steps": 5, "train.max_steps": 150, "train.lr": 3e-3, "regime.memory": memory})
    learner, _ = quiet_train(cfg, None)
    ep = learner.family.sample(cfg.eval.seed, torch.arange(256))
    terms = refine(learner.model, ep)
    err = [float(t[0].sum() / t[1].sum()) for t in terms]
    assert err[5] < err[1] < err[0]
    assert err[5] < 0.5 * err[1]


@pytest.mark.parametrize("kind,signal,param", [("parametric", "grad", "theta0"), ("explicit", "obs", "z0"),
                                               ("implicit", "obs", "y0")])
def test_the_learned_initial_state_is_trained(tiny_cfg, kind, signal, param):
    learner = Learner(tiny_cfg.with_overrides({"regime.kind": kind, "regime.signal": signal}))
    before = getattr(learner.model.regime, param).detach().clone()
    source = LocalRollouts(learner, EpisodeStream(32))
    for step in range(3):
        learner.learn(source.next(step)[0])
    assert not torch.equal(before, getattr(learner.model.regime, param))


REGIMES = [("parametric", "obs+grad"), ("explicit", "obs+grad"), ("implicit", "obs")]


@pytest.mark.parametrize("kind,signal", REGIMES)
def test_transitions_hold_the_states_that_refine_produces(tiny_cfg, kind, signal):
    learner = Learner(tiny_cfg.with_overrides({"regime.kind": kind, "regime.signal": signal, "task.steps": 4}))
    torch.nn.init.normal_(learner.model.refiner.out.weight, std=0.2)  # non-trivial updates
    ep = learner.family.sample(0, torch.arange(6))
    tr = make_transitions(learner.model, ep)
    model, state = learner.model, learner.model.initial_state(ep.x_query)
    for i in range(4):
        rows = slice(i * 6, (i + 1) * 6)
        torch.testing.assert_close(tr.state[rows], state, rtol=0, atol=0)
        x, y = ep.minibatch(i)
        assert torch.equal(tr.x[rows], x) and torch.equal(tr.step[rows], torch.full((6,), i))
        state = model.step(state, x, y, model.signal(state, x, y), torch.full((6,), i), ep.x_query)
    assert not tr.state.requires_grad and tr.state.grad_fn is None


@pytest.mark.parametrize("kind,signal", REGIMES)
def test_the_loss_after_step_i_sends_no_gradient_into_earlier_steps(tiny_cfg, kind, signal):
    """Greedy: the loss after step i depends on the state it started from only as data; step-0 rows start
    from the live initial state instead, so only theta^(0)/z^(0)/y^(0) sees their loss through the state."""
    learner = Learner(tiny_cfg.with_overrides({"regime.kind": kind, "regime.signal": signal, "task.steps": 3}))
    torch.nn.init.normal_(learner.model.refiner.out.weight, std=0.2)
    tr = make_transitions(learner.model, learner.family.sample(0, torch.arange(5)))
    tr.state.requires_grad_(True)
    sums, _ = greedy_terms(learner.model, tr)
    for i in range(3):
        (g,) = torch.autograd.grad(sums[i], tr.state, retain_graph=True)
        per_row = g.flatten(1).abs().sum(1).view(3, 5)
        assert torch.all(per_row[i] > 0) if i > 0 else torch.all(per_row[0] == 0)
        assert torch.all(per_row[[j for j in range(3) if j != i]] == 0)


@pytest.mark.parametrize("kind,signal", REGIMES)
def test_unroll_backpropagates_through_each_block_of_steps(tiny_cfg, kind, signal):
    """train.unroll=2 over K=3: steps 0-1 run live from the initial state, step 2 from its stored state. The
    forward values are greedy's (the same weights rolled the states out); the losses after steps 1 and 2
    reach the refiner through one more step than greedy's, so the gradients differ."""
    learner = Learner(tiny_cfg.with_overrides({"regime.kind": kind, "regime.signal": signal, "task.steps": 3}))
    torch.nn.init.normal_(learner.model.refiner.out.weight, std=0.2)
    tr = make_transitions(learner.model, learner.family.sample(0, torch.arange(5)))
    tr.state.requires_grad_(True)
    greedy, unrolled = greedy_terms(learner.model, tr), greedy_terms(learner.model, tr, unroll=2)
    torch.testing.assert_close(unrolled[0], greedy[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(unrolled[1], greedy[1], rtol=1e-4, atol=1e-6)
    for i, sources in ((0, ()), (1, ()), (2, (2,))):  # the stored-state rows each loss reads
        (g,) = torch.autograd.grad(unrolled[0][i], tr.state, retain_graph=True)
        per_row = g.flatten(1).abs().sum(1).view(3, 5)
        assert [j for j in range(3) if torch.all(per_row[j] > 0)] == list(sources), i
        assert torch.all(per_row[[j for j in range(3) if j not in sources]] == 0)
    weights = [p for p in learner.model.refiner.parameters()]
    g_greedy = torch.autograd.grad(greedy[0][1], weights, retain_graph=True, allow_unused=True)
    g_unrolled = torch.autograd.grad(unrolled[0][1], weights, retain_graph=True, allow_unused=True)
    assert any(a is not None and not torch.allclose(a, b) for a, b in zip(g_greedy, g_unrolled))


@pytest.mark.parametrize("memory", ["none", "learned"])
def test_an_unrolled_model_learns_to_refine(tiny_cfg, memory):
    cfg = tiny_cfg.with_overrides({"task.steps": 5, "train.max_steps": 150, "train.lr": 3e-3, "train.unroll": 5,
                                   "regime.memory": memory})
    learner, _ = quiet_train(cfg, None)
    ep = learner.family.sample(cfg.eval.seed, torch.arange(256))
    err = [float(t[0].sum() / t[1].sum()) for t in refine(learner.model, ep)]
    assert err[5] < err[1] < err[0] and err[5] < 0.5 * err[1]


def test_step_zero_rows_learn_from_the_live_initial_state_and_its_own_gradient(tiny_cfg):
    """Transitions rolled out by older weights (an episode worker's) give step-0 rows the same loss as fresh
    ones: the learner takes the initial state and its gradient signal at its own current weights."""
    cfg = tiny_cfg.with_overrides({"regime.signal": "grad"})
    old, new = Learner(cfg), Learner(cfg)
    with torch.no_grad():
        new.model.regime.theta0.add_(0.5)  # the learner's initial state has moved on since the rollout
    ep = new.family.sample(0, torch.arange(8))
    stale, fresh = make_transitions(old.model, ep), make_transitions(new.model, ep)
    assert not torch.equal(stale.grad[:8], fresh.grad[:8])
    torch.testing.assert_close(greedy_terms(new.model, stale)[0][0], greedy_terms(new.model, fresh)[0][0])


def test_explicit_pretraining_fits_f_gamma_on_fresh_starts_only(tiny_cfg, tmp_path, capsys):
    """regime.pretrain_steps: f_gamma is auto-decoded before the first learner step, which gives it a latent
    space where new tasks fit far better than in an untrained one (z0 is the whitened latents' mean, zero); a
    resumed run keeps its checkpoint's weights."""
    cfg = tiny_cfg.with_overrides({"regime.kind": "explicit", "regime.pretrain_steps": 200, "train.max_steps": 2})
    learner = Learner(cfg)
    regime, family = learner.model.regime, learner.family
    untrained = copy.deepcopy(regime.f_gamma)
    learner.pretrain()
    assert "[pretrain] f_gamma auto-decoded for 200 steps" in capsys.readouterr().out
    assert torch.equal(regime.z0, torch.zeros_like(regime.z0))
    ep = family.sample(7, torch.arange(64))  # tasks pretraining never saw: fit latents only, 30 steps each way
    x, y = ep.context()
    losses = []
    for f_gamma in (untrained, regime.f_gamma):
        f_gamma = copy.deepcopy(f_gamma).requires_grad_(False)
        losses.append(auto_decode(f_gamma, family, x, y, 30, lr=0.1)[1])
    assert losses[1] < 0.5 * losses[0]
    path = tmp_path / "c.pt"
    quiet_train(cfg, path)
    assert "[pretrain]" in capsys.readouterr().out
    quiet_train(cfg.with_overrides({"train.max_steps": 4}), path)
    assert "[pretrain]" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="are about the explicit regime.s f_gamma"):
        tiny_cfg.with_overrides({"regime.pretrain_steps": 10})


def test_f_gamma_learns_at_its_own_rate_and_a_frozen_one_stays_put(tiny_cfg):
    cfg = tiny_cfg.with_overrides({"regime.kind": "explicit", "regime.f_gamma_lr_scale": 0.0})
    learner = Learner(cfg)
    f_gamma = [p for n, p in learner.model.named_parameters() if n.startswith("regime.f_gamma.")]
    groups = learner.optimizer.param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 0.0, 1.0, 0.0]
    assert {id(p) for g in groups if g["lr_scale"] == 0 for p in g["params"]} == {id(p) for p in f_gamma}
    before = [p.detach().clone() for p in learner.model.parameters()]
    source = LocalRollouts(learner, EpisodeStream(32))
    for step in range(2):
        learner.learn(source.next(step)[0])
    moved = {n for (n, p), b in zip(learner.model.named_parameters(), before) if not torch.equal(p, b)}
    assert moved and not any(n.startswith("regime.f_gamma.") for n in moved) and "regime.z0" in moved
    default = Learner(tiny_cfg).optimizer.param_groups  # the decay and no-decay groups of older checkpoints
    assert [(g["weight_decay"] > 0, g["lr_scale"]) for g in default] == [(True, 1.0), (False, 1.0)]


def test_progress_lines_show_the_time_left_at_the_windows_rate(tiny_cfg, capsys):
    from types import SimpleNamespace

    from iai_dist.reporting import Window, duration, progress_line

    learner = Learner(tiny_cfg.with_overrides({"train.max_steps": 1000}), torch.device("cpu"))
    stats = SimpleNamespace(loss=1.0, step_errors=[90.0, 80.0, 70.0])
    learner.step = 100
    window = Window(steps=10, seconds=4.0, transitions=0, waited_s=0, lag_sum=0, lag_max=0)  # 2.5 steps/s
    assert progress_line("refiner", learner, stats, window, [], 60.0).endswith("|     60s, 6m00s left")  # 900 / 2.5
    learner.step = 1000
    assert progress_line("refiner", learner, stats, window, [], 400.0).endswith(", 0s left")
    assert [duration(s) for s in (44.6, 432, 7260)] == ["45s", "7m12s", "2h01m"]
    train_in_process(tiny_cfg.with_overrides({"train.max_steps": 10, "train.log_every": 5}), None)  # what it prints
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[refiner] step")]
    assert len(lines) == 2 and all(line.endswith(" left") for line in lines) and lines[-1].endswith(", 0s left")
