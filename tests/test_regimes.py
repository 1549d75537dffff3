import pytest
import torch

from iai_dist.config import ConfigError, load_config
from iai_dist.devices import bf16_native
from iai_dist.refiner import Block, IterativeModel
from iai_dist.tasks import build_family

CASES = [
    ("linear_regression", "parametric", "obs+grad", "linear"),
    ("linear_regression", "parametric", "grad", "linear"),
    ("mlp_regression", "parametric", "obs", "mlp"),
    ("linear_classification", "parametric", "obs+grad", "linear"),
    ("mlp_classification", "parametric", "grad", "mlp"),
    ("linear_regression", "explicit", "obs+grad", "linear"),
    ("linear_classification", "explicit", "grad", "linear"),
    ("linear_regression", "implicit", "obs", "linear"),
    ("mlp_classification", "implicit", "obs", "linear"),
]


def build(family, kind, signal, model, **extra):
    sets = [f"task.family={family}", f"regime.kind={kind}", f"regime.signal={signal}", f"regime.model={model}",
            "task.num_classes=3", "regime.hidden=6", "regime.chunk_size=5", "regime.latent_dim=7"]
    cfg = load_config("tiny", overrides=sets + [f"{k}={v}" for k, v in extra.items()])
    fam = build_family(cfg.task)
    return cfg, fam, IterativeModel(cfg, fam)


@pytest.mark.parametrize("family,kind,signal,model", CASES)
def test_refinement_step_shapes_and_update(family, kind, signal, model):
    cfg, fam, m = build(family, kind, signal, model)
    ep = fam.sample(0, torch.arange(5))
    state = m.initial_state(ep.x_query)
    x, y = ep.minibatch(0)
    grad = m.signal(state, x, y)
    assert (grad is not None) == ("grad" in signal)
    if grad is not None:
        assert grad.shape == state.shape
    # the output layer starts at zero: the first refiner is the identity on the state
    step0 = torch.zeros(5, dtype=torch.long)
    assert torch.equal(m.step(state, x, y, grad, step0, ep.x_query), state)
    torch.nn.init.normal_(m.refiner.out.weight, std=0.1)
    new = m.step(state, x, y, grad, step0, ep.x_query)
    assert new.shape == state.shape and not torch.allclose(new, state)
    out = m.predict(new, ep.x_query)
    assert out.shape == (5, cfg.task.query_size, fam.out_dim)
    # step embeddings beyond K reuse the last one instead of failing (evaluation runs 2K steps)
    far = m.step(state, x, y, grad, torch.full((5,), 3 * cfg.task.steps), ep.x_query)
    assert torch.isfinite(far).all()


@pytest.mark.parametrize("family,kind,model", [
    ("linear_regression", "parametric", "linear"),
    ("mlp_regression", "parametric", "mlp"),
    ("linear_classification", "parametric", "linear"),
    ("mlp_classification", "parametric", "mlp"),
    ("mlp_regression", "explicit", "linear"),
])
def test_gradient_signal_matches_autograd_on_single_tasks(family, kind, model):
    _, fam, m = build(family, kind, "grad", model)
    ep = fam.sample(4, torch.arange(6))
    state = m.initial_state(ep.x_query) + 0.3 * torch.randn(6, m.regime.state_dim)
    x, y = ep.minibatch(1)
    batched = m.signal(state, x, y)
    for t in range(6):
        s = state[t : t + 1].clone().requires_grad_(True)
        loss = fam.loss(m.predict(s, x[t : t + 1]), y[t : t + 1]).sum()
        (want,) = torch.autograd.grad(loss, s)
        torch.testing.assert_close(batched[t : t + 1], want, rtol=1e-5, atol=1e-6)


def test_implicit_query_predictions_do_not_depend_on_other_queries():
    _, fam, m = build("linear_regression", "implicit", "obs", "linear")
    torch.nn.init.normal_(m.refiner.out.weight, std=0.1)
    ep = fam.sample(0, torch.arange(3))
    x, y = ep.minibatch(0)
    step = torch.zeros(3, dtype=torch.long)
    full = m.step(m.initial_state(ep.x_query), x, y, None, step, ep.x_query)
    part_q = ep.x_query[:, 2:5]
    part = m.step(m.initial_state(part_q), x, y, None, step, part_q)
    torch.testing.assert_close(full[:, 2:5], part, rtol=1e-5, atol=1e-6)


def test_independent_state_tokens_attend_exactly_as_under_the_masked_square():
    """The O(S * B) attention of independent state tokens is the masked (S + B)^2 attention it replaced."""
    torch.manual_seed(0)
    s, b, width, heads = 7, 5, 16, 2
    block, h = Block(width, heads, 2), torch.randn(3, s + b, width)
    q, k, v = block.qkv(block.norm1(h)).view(3, s + b, 3, heads, -1).permute(2, 0, 3, 1, 4)
    mask = torch.ones(s + b, s + b, dtype=torch.bool)
    mask[:s, :s] = torch.eye(s, dtype=torch.bool)
    mask[s:, :s] = False  # state tokens see themselves and the rest; the rest see only each other
    a = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    masked = h + block.proj(a.transpose(1, 2).reshape(3, s + b, width))
    masked = masked + block.mlp(block.norm2(masked))
    torch.testing.assert_close(block(h, independent=s), masked)
    assert not torch.allclose(block(h), masked, atol=1e-3)  # full attention is another function


def test_large_theta_is_cut_into_chunk_tokens():
    _, _, m = build("mlp_regression", "parametric", "obs+grad", "mlp")
    r = m.regime
    assert r.state_dim == (4 * 6 + 6 + 6 + 1) and r.num_state_tokens == -(-r.state_dim // 5)
    theta = torch.arange(2 * r.state_dim, dtype=torch.float32).view(2, -1)
    tokens = r.state_tokens(theta, torch.ones_like(theta), None)
    assert tokens.shape == (2, r.num_state_tokens, 3 * 5)
    assert torch.equal(r.apply_update(theta, torch.zeros(2, r.num_state_tokens, 5)), theta)


def test_bf16_autocast_runs_only_the_refiner_in_bf16():
    _, fam, m = build("linear_regression", "parametric", "obs+grad", "linear")
    torch.nn.init.normal_(m.refiner.out.weight, std=0.1)
    ep = fam.sample(0, torch.arange(4))
    x, y = ep.minibatch(0)
    state = m.initial_state(ep.x_query)
    args = (state, x, y, m.signal(state, x, y), torch.zeros(4, dtype=torch.long), ep.x_query)
    m.bf16 = False
    full = m.step(*args)
    m.bf16 = True
    half = m.step(*args)
    assert half.dtype == torch.float32
    assert not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.02)


def test_train_autocast_is_resolved_where_the_model_is_placed():
    """auto takes bf16 only where the device runs it natively; decided at each move, not inside a (compiled) step."""
    for setting in ("off", "bf16", "auto"):
        _, _, m = build("linear_regression", "parametric", "obs+grad", "linear", **{"train.autocast": setting})
        expected = {"off": False, "bf16": True, "auto": bf16_native(torch.device("cpu"))}[setting]
        assert m.bf16 is expected and m.to("cpu").bf16 is expected
        assert m.to("meta").bf16 is (setting == "bf16")  # no native bf16 known for the meta device


@pytest.mark.parametrize("kind", ["parametric", "explicit"])
def test_optimizer_memory_carries_adams_bias_corrected_moments(kind):
    """memory=moments: the state carries running gradient moments, updated by formula each step; what f reads
    (theta or z) and the gradient are the same as without memory, and m_j / w_j is Adam's corrected mean."""
    decays = (0.5, 0.9)
    _, fam, m = build("linear_regression", kind, "obs+grad", "linear", **{"regime.memory": "moments",
                                                                           "regime.memory_decays": list(decays)})
    r, n = m.regime, 4
    ep = fam.sample(0, torch.arange(n))
    state = m.initial_state(ep.x_query)
    p = r.state_dim
    assert state.shape == (n, p + 3 * (p + 1)) and torch.equal(state[:, p:], torch.zeros(n, 3 * (p + 1)))
    grads = [torch.randn(n, p) for _ in range(3)]
    for g in grads:
        state = r.remember(state, g, *ep.minibatch(0))
    means, weights = r._memory(state)
    for j, b in enumerate([*decays, max(decays)]):
        adam = torch.zeros(n, p)
        for g in grads:
            adam = b * adam + (1 - b) * (g if j < len(decays) else g * g)
        torch.testing.assert_close(weights[:, j], torch.full((n,), 1 - b ** 3))
        torch.testing.assert_close(means[:, j] / weights[:, j : j + 1], adam / (1 - b ** 3))
    x, y = ep.minibatch(0)
    grad = m.signal(state, x, y)
    assert grad.shape == (n, p)
    torch.testing.assert_close(m.predict(state, ep.x_query), m.predict(r.with_memory(r.params(state)), ep.x_query))
    tokens = r.state_tokens(state, grad, ep.x_query)
    assert tokens.shape == (n, r.num_state_tokens, r.chunk * (3 + 2 * len(decays) + 1)) and torch.isfinite(tokens).all()
    # a step: the zero-initialised refiner leaves theta/z alone; the memory takes in this step's gradient
    new = m.step(state, x, y, grad, torch.zeros(n, dtype=torch.long), ep.x_query)
    assert torch.equal(new[:, :p], state[:, :p]) and torch.equal(new, r.remember(state, grad, x, y))


def test_memory_needs_the_gradient_signal():
    with pytest.raises(ConfigError, match="memory 'moments' accumulates gradients: it needs signal grad or obs"):
        load_config("tiny", overrides=["regime.memory=moments", "regime.signal=obs"])
    with pytest.raises(ConfigError, match="memory_decays: expected decays strictly between 0 and 1"):
        load_config("tiny", overrides=["regime.memory=moments", "regime.memory_decays=[0.9, 1.0]"])


def test_film_f_gamma_starts_as_the_papers_concat_and_scales_hidden_layers_by_z():
    """conditioning=film: at initialisation f_gamma computes exactly concat's function; once its scales move,
    z multiplies hidden activations (the output is no longer a function of x_in(x) + z_in(z) alone)."""
    from iai_dist.regimes.explicit import LatentPredictor

    torch.manual_seed(0)
    concat, film = LatentPredictor(3, 4, 8, 2, "concat"), LatentPredictor(3, 4, 8, 2, "film")
    assert concat.z_scale is None
    missing = film.load_state_dict(concat.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["z_scale.bias", "z_scale.weight"]
    z, x = torch.randn(5, 4), torch.randn(5, 6, 3)
    torch.testing.assert_close(film(z, x), concat(z, x))
    torch.nn.init.normal_(film.z_scale.weight)
    assert not torch.allclose(film(z, x), concat(z, x), atol=1e-3)
    cfg, _, m = build("linear_regression", "explicit", "obs+grad", "linear")
    assert cfg.regime.conditioning == "film" and m.regime.f_gamma.z_scale is not None


@pytest.mark.parametrize("family,kind", [("linear_regression", "parametric"), ("linear_classification", "explicit")])
def test_observation_memory_carries_the_running_statistics_of_every_point_seen(family, kind):
    """memory=observations: the state carries the means of [x,1][x,1]^T and [x,1] e(y)^T over all points so far
    (exact running means), shown to the refiner as d + 1 memory tokens; theta/z and predictions are unchanged."""
    cfg, fam, m = build(family, kind, "obs+grad", "linear", **{"regime.memory": "observations"})
    r, n, a, o = m.regime, 4, fam.x_dim + 1, fam.out_dim
    ep = fam.sample(0, torch.arange(n))
    state = m.initial_state(ep.x_query)
    assert state.shape == (n, r.state_dim + a * (a + o) + 1)
    for i in range(2):
        x, y = ep.minibatch(i)
        state = m.step(state, x, y, m.signal(state, x, y), torch.full((n,), i), ep.x_query)
    x, y = ep.context(2)
    xa = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    xx, xy, count = r._statistics(state)
    torch.testing.assert_close(xx, xa.transpose(1, 2) @ xa / x.shape[1])
    torch.testing.assert_close(xy, xa.transpose(1, 2) @ fam.encode_targets(y) / x.shape[1])
    assert torch.equal(count, torch.full((n, 1), 2.0 * cfg.task.batch_size))
    torch.testing.assert_close(m.predict(state, ep.x_query), m.predict(r.with_memory(r.params(state)), ep.x_query))
    tokens = r.memory_tokens(state)
    assert tokens.shape == (n, a, a + o + 1) and r.num_memory_tokens == a
    # the refiner reads them: other statistics, another update (once its output layer is not zero)
    torch.nn.init.normal_(m.refiner.out.weight)
    grad = m.signal(state, *ep.minibatch(2))
    step = torch.full((n,), 2)
    other = torch.cat([state[:, : r.state_dim], 2 * state[:, r.state_dim : -1], state[:, -1:]], 1)
    assert not torch.allclose(m.step(state, *ep.minibatch(2), grad, step, ep.x_query)[:, : r.state_dim],
                              m.step(other, *ep.minibatch(2), grad, step, ep.x_query)[:, : r.state_dim])


@pytest.mark.parametrize("kind", ["parametric", "explicit"])
def test_learned_memory_slots_are_written_by_the_refiner_and_never_read_by_f(kind):
    """memory=learned: M slot tokens after v's chunk tokens, starting from a learned (distinct) value; the refiner
    reads and updates them like v's chunks, f's predictions and the gradient never see them."""
    cfg, fam, m = build("linear_regression", kind, "obs+grad", "linear", **{"regime.memory": "learned",
                                                                             "regime.memory_slots": 3, "train.unroll": 2})
    r, n, c = m.regime, 4, 5
    ep = fam.sample(0, torch.arange(n))
    state = m.initial_state(ep.x_query)
    p = r.state_dim
    assert r.num_state_tokens == -(-p // c) + 3 and state.shape == (n, p + 3 * c)
    slots = state[0, p:].view(3, c)
    assert torch.equal(state[:, p:], r.slots0.expand(n, -1)) and not torch.allclose(slots[0], slots[1])
    x, y = ep.minibatch(0)
    grad = m.signal(state, x, y)
    assert grad.shape == (n, p)
    tokens = r.state_tokens(state, grad, ep.x_query)
    assert tokens.shape == (n, r.num_state_tokens, 3 * c)
    assert torch.equal(tokens[:, -3:, :c], state[:, p:].view(n, 3, c)) and torch.all(tokens[:, -3:, c:] == 0)
    other = torch.cat([state[:, :p], state[:, p:] + 1], 1)
    torch.testing.assert_close(m.predict(other, ep.x_query), m.predict(state, ep.x_query))
    torch.testing.assert_close(m.signal(other, x, y), grad)
    torch.nn.init.normal_(m.refiner.out.weight)
    step = torch.zeros(n, dtype=torch.long)
    new, new_other = m.step(state, x, y, grad, step, ep.x_query), m.step(other, x, y, grad, step, ep.x_query)
    assert not torch.allclose(new[:, p:], state[:, p:])  # the refiner writes the slots
    assert not torch.allclose(new[:, :p], new_other[:, :p])  # and reads them


def test_learned_memory_is_refused_where_it_cannot_learn():
    with pytest.raises(ConfigError, match="set train.unroll >= 2"):
        load_config("tiny", overrides=["regime.memory=learned"])
    with pytest.raises(ConfigError, match="parametric and explicit"):
        load_config("tiny", overrides=["regime.kind=implicit", "regime.signal=obs", "regime.memory=learned",
                                       "train.unroll=2"])


def test_observation_memory_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="parametric and explicit"):
        load_config("tiny", overrides=["regime.kind=implicit", "regime.signal=obs", "regime.memory=observations"])
    with pytest.raises(ConfigError, match="task.dim 200 is over 128"):
        load_config("tiny", overrides=["task.dim=200", "regime.memory=observations"])


@pytest.mark.parametrize("conditioning", ["film", "concat"])
def test_whitening_f_gamma_keeps_its_function_in_standardised_latents(conditioning):
    from iai_dist.regimes.explicit import LatentPredictor

    torch.manual_seed(0)
    f = LatentPredictor(3, 4, 8, 1, conditioning)
    if f.z_scale is not None:
        torch.nn.init.normal_(f.z_scale.weight)
    z = torch.randn(50, 4) @ torch.randn(4, 4) + 3.0  # correlated, off-centre latents
    x = torch.randn(50, 6, 3)
    before = f(z, x)
    f.whiten(z)
    evals, evecs = torch.linalg.eigh(torch.cov(z.T))
    z_white = (z - z.mean(0)) @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # S^-1/2 (z - mean)
    torch.testing.assert_close(torch.cov(z_white.T), torch.eye(4), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f(z_white, x), before, rtol=1e-4, atol=1e-4)  # the same function
