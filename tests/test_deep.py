"""gradattn.experiments.deep and gradattn.deep: the deep experiment's protocol, its per-head laws and dynamics, one seed one result."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gradattn import laws
from gradattn.deep import HeadLaws, deep_law_errors, head_laws
from gradattn.dynamics import feedback_stats, step_feedback
from gradattn.experiments import compiled_run
from gradattn.experiments.deep import (
    DeepConfig,
    deep_experiment,
    deep_optimizer,
    format_deep,
    init_model,
    make_deep_run,
    plot_deep,
    value_labels,
)
from gradattn.grads.dense import dense_loss_and_grads
from gradattn.head import forward, init_head, token_losses
from gradattn.sweeps import seed_key, sweep
from gradattn.tasks import DirichletHMM, StickyMarkov, sticky_markov

TASK = StickyMarkov(seq_len=16)
# The experiment's config; its task is noisier than the default so that its Bayes losses tell the
# task's own filter from the filter at noise 1.
CFG = DeepConfig(steps=4, d_model=8, n_layers=1, n_heads=2, task=StickyMarkov(seq_len=16, noise_std=2.0),
                 n_checkpoints=2, settle_rows=4)


def test_every_head_obeys_the_laws_float64():
    errors = deep_law_errors()
    assert set(errors) == {"routing", "value", "compatibility", "masked", "row_sum", "worst_rel_error"}
    assert errors["worst_rel_error"] < 1e-9, errors
    assert errors["worst_rel_error"] == max(v for k, v in errors.items() if k != "worst_rel_error")


def test_head_laws_of_a_model():
    with jax.enable_x64(True):
        model = init_model(DeepConfig(d_model=8, n_layers=2, n_heads=2, task=TASK), jax.random.key(0), jnp.float64)
        x, y = TASK.sample(jax.random.key(1), jnp.float64)
        lw = head_laws(model, x, y)
        assert isinstance(lw, HeadLaws) and lw.alpha.shape == (2, 2, 15, 15) and lw.u.shape == (2, 2, 15, 4)
        np.testing.assert_allclose(lw.loss, jnp.mean(token_losses(model(x), y)), rtol=1e-12)
        one = lw.at(1, 0)
        np.testing.assert_array_equal(one.routing_grad, laws.routing_grad(one.alpha, laws.compatibility(one.u, one.values)))
        np.testing.assert_allclose(one.routing_grad.sum(-1), 0.0, atol=1e-15)
        assert float(jnp.max(jnp.abs(jnp.triu(one.routing_grad, 1)))) == 0.0
        np.testing.assert_allclose(one.routing_grad, -one.alpha * one.advantage, atol=1e-15)
        np.testing.assert_allclose(one.value_grad, one.alpha.T @ one.u, rtol=1e-12)
    with pytest.raises(TypeError, match=r"head_laws: model\b.*Transformer.*got object"):
        head_laws(object(), x, y)
    with pytest.raises(ValueError, match=r"head_laws: x\b.*shape.*\(15, 3\)"):
        head_laws(model, x[:, :3], y)


def test_dense_feedback_core_equals_the_blocked_statistics():
    """step_feedback (whole matrices, what every deep head uses) equals feedback_stats (blocks of
    rows, never N x N) on one head, and both see the feedback loop (agreement above chance)."""
    with jax.enable_x64(True):
        f64 = jnp.float64
        p0 = init_head(jax.random.key(2), 6, 3, 4, 3, scale=0.8, dtype=f64)
        x = jax.random.normal(jax.random.key(3), (17, 6), f64)
        y = jax.random.randint(jax.random.key(4), (17,), 0, 3)
        _, g = jax.jit(dense_loss_and_grads)(p0, x, y)
        p1 = jax.tree.map(lambda a, d: a - 0.5 * d, p0, g)

        @jax.jit  # both sides compiled once rather than dispatched op by op
        def both(p0, p1, x, y):
            o0, o1 = forward(p0, x), forward(p1, x)
            u = laws.upstream_grad(p0, o0, y)
            adv = laws.advantage(o0.alpha, laws.compatibility(u, o0.v))
            dense = step_feedback(o0.alpha, adv, o1.alpha, laws.value_grad(o0.alpha, u), o0.v, o1.v)
            return dense, feedback_stats(p0, p1, x, y, block_size=5)

        dense, ref = both(p0, p1, x, y)
        for a, b in ((dense.entropy_bits, ref.entropy_bits), (dense.sign_agreement, ref.sign_agreement),
                     (dense.sign_agreement_weighted, ref.sign_agreement_weighted),
                     (dense.value_alignment, ref.value_alignment),
                     (dense.value_alignment_weighted, ref.value_alignment_weighted)):
            np.testing.assert_allclose(a, b, rtol=1e-10)
        assert 0.5 < float(dense.sign_agreement) <= 1.0 and float(dense.value_alignment) > 0


def test_bayes_loss_is_the_tasks_own_at_its_noise_level():
    """At noise_std = 2 the run's Bayes losses are task.bayes_loss of its own sequences, not the
    filter at noise 1. The run is the deep experiment's own (same config, seeds and chunk), so its
    compiled sweep is shared with the experiment test below; the sequences and both filters are
    recomputed for all four (seed, split) keys in one compiled program."""
    task = CFG.task
    assert task.noise_std == 2.0
    seeds = [0, 1]
    out = sweep(make_deep_run(CFG), seeds, chunk_size=2)
    # keys in the run's order: k_data, k_init, k_dropout, k_test = split(seed_key(seed), 4)
    keys = jnp.stack([jax.random.split(seed_key(s), 4)[jnp.array([0, 3])] for s in seeds]).reshape(-1)
    transition = jnp.asarray(task.transition_matrix, jnp.float32)
    embeddings = jnp.asarray(task.embeddings, jnp.float32)

    @jax.jit
    @jax.vmap
    def both(k):
        x, y = task.sample(k, jnp.float32)
        return task.bayes_loss(x, y).mean, sticky_markov.bayes_loss(transition, embeddings, x, y).mean

    own, at_noise_1 = (np.asarray(a).reshape(len(seeds), 2) for a in both(keys))
    for j, name in enumerate(("train_bayes_loss", "heldout_bayes_loss")):
        np.testing.assert_allclose(out[name], own[:, j], rtol=1e-6, err_msg=name)
        assert (np.abs(at_noise_1[:, j] - own[:, j]) > 1e-4).all(), name  # far outside the rtol above


def test_any_task_through_the_protocol():
    task = DirichletHMM(seq_len=12)
    cfg = DeepConfig(steps=2, d_model=8, n_layers=1, n_heads=2, task=task, n_checkpoints=0)
    model = init_model(cfg, jax.random.key(0))
    assert (model.d_in, model.n_classes) == (task.d_in, task.n_classes)
    assert cfg.to_dict()["task"]["name"] == "DirichletHMM"


def test_one_seed_one_result_and_run_contents():
    run = compiled_run(deep_experiment, CFG)  # the one cache of runs: an equal config, the same run
    assert compiled_run(deep_experiment, DeepConfig(steps=4, d_model=8, n_layers=1, n_heads=2,
                                                    task=StickyMarkov(seq_len=16, noise_std=2.0),
                                                    n_checkpoints=2, settle_rows=4)) is run
    many = sweep(run, [1, 3, 5], chunk_size=2)
    alone = sweep(run, [3], chunk_size=2)
    for name in many:
        np.testing.assert_array_equal(many[name][1], alone[name][0], err_msg=name)
    assert not np.array_equal(many["curve"][0], many["curve"][1])
    assert many["curve"].shape == (3, 4) and many["dyn_sign_agreement"].shape == (3, 2, 1, 2)
    assert many["settle_attention"].shape == (3, 1, 2)
    assert set(np.unique(many["settle_values"])) <= {0.0, 2.0, 4.0}
    for name in ("dyn_sign_agreement", "dyn_sign_agreement_weighted"):
        assert ((many[name] >= 0) & (many[name] <= 1)).all()
    # A uniform-ish start: entropy below log2 of the sequence length, above 0.
    assert (many["dyn_entropy_bits"] > 0).all() and (many["dyn_entropy_bits"] < np.log2(15)).all()
    assert many["curve"].dtype == np.float32


def test_protocol_dropout_off_at_evaluation_and_fresh_data():
    """lr = 0 keeps the initial model: its evaluations must be the dropout-off losses of that model
    on the training and held-out sequences; the curve is the training loss (dropout 0 here), and
    with fresh_data the step-t sequence is task.sample(fold_in(data key, t))."""
    base = dict(steps=3, lr=0.0, dropout=0.0, d_model=8, n_layers=1, n_heads=2, task=TASK, n_checkpoints=0)
    key = jax.random.key(7)
    fixed = jax.jit(make_deep_run(DeepConfig(**base)))(key)
    fresh = jax.jit(make_deep_run(DeepConfig(**base, fresh_data=True)))(key)
    k_data, k_init, _, k_test = jax.random.split(key, 4)
    model = init_model(DeepConfig(**base), k_init)
    apply = nnx.jit(lambda m, x: m(x))
    loss = lambda x, y: float(jnp.mean(token_losses(apply(model, x), y)))  # noqa: E731
    x0, y0 = TASK.sample(k_data, jnp.float32)
    xt, yt = TASK.sample(k_test, jnp.float32)
    np.testing.assert_allclose(fixed["train_loss"], loss(x0, y0), rtol=1e-5)
    np.testing.assert_allclose(fixed["heldout_loss"], loss(xt, yt), rtol=1e-5)
    np.testing.assert_allclose(fixed["curve"], [loss(x0, y0)] * 3, rtol=1e-5)
    fresh_losses = [loss(*TASK.sample(jax.random.fold_in(k_data, t), jnp.float32)) for t in range(3)]
    np.testing.assert_allclose(fresh["curve"], fresh_losses, rtol=1e-5)
    assert len(set(np.round(fresh_losses, 5))) == 3
    assert 0 <= float(fixed["heldout_accuracy"]) <= 1 and float(fixed["heldout_entropy"]) > 0
    assert 1.0 < float(fixed["heldout_bayes_loss"]) < 3.0


def _torch_reference_steps(params, grads_fn, steps, lr, wd, clip):
    torch = pytest.importorskip("torch")
    ts = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ts.values()), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        opt.zero_grad()
        g = grads_fn({k: v.detach().numpy() for k, v in ts.items()})
        for k, v in ts.items():
            v.grad = torch.tensor(np.asarray(g[k]))
        torch.nn.utils.clip_grad_norm_(list(ts.values()), clip)
        opt.step()
        sched.step()
    return {k: v.detach().numpy() for k, v in ts.items()}


def test_optimizer_is_pytorch_adamw_with_cosine_annealing_and_clipping():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
        grads_fn = lambda p: {k: 3.0 * np.sin(v) + v ** 2 for k, v in p.items()}  # noqa: E731  (norm > clip)
        cfg = DeepConfig(steps=6, lr=0.05, weight_decay=0.1)
        tx = deep_optimizer(cfg)
        p = {k: jnp.asarray(v) for k, v in params.items()}
        state = tx.init(p)
        for _ in range(cfg.steps):
            g = {k: jnp.asarray(v) for k, v in grads_fn({k: np.asarray(v) for k, v in p.items()}).items()}
            upd, state = tx.update(g, state, p)
            p = optax.apply_updates(p, upd)
        ref = _torch_reference_steps(params, grads_fn, cfg.steps, cfg.lr, cfg.weight_decay, cfg.clip)
        for k in params:
            np.testing.assert_allclose(p[k], ref[k], rtol=1e-5, atol=1e-7)


def test_two_timescale_scales_every_value_projection():
    cfg = DeepConfig(d_model=8, n_layers=2, n_heads=2, task=TASK)
    two = DeepConfig(d_model=8, n_layers=2, n_heads=2, task=TASK, schedule="two_timescale", value_lr_multiplier=7.0)
    params = nnx.state(init_model(cfg, jax.random.key(0)), nnx.Param)
    labels = value_labels(params)
    flat = jax.tree_util.tree_leaves_with_path(labels)
    value_paths = [jax.tree_util.keystr(p) for p, lab in flat if lab == "value"]
    assert len(value_paths) == 4 and all("v_proj" in p for p in value_paths)  # 2 layers x (kernel, bias)
    grads = jax.tree.map(lambda a: jnp.cos(3 * a) * 0.01, params)
    u1, _ = deep_optimizer(cfg).update(grads, deep_optimizer(cfg).init(params), params)
    u2, _ = deep_optimizer(two).update(grads, deep_optimizer(two).init(params), params)
    for (path, a), b, lab in zip(jax.tree_util.tree_leaves_with_path(u1), jax.tree.leaves(u2), jax.tree.leaves(labels)):
        np.testing.assert_allclose(b, a * (7.0 if lab == "value" else 1.0), rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_deep_experiment_json_text_and_plot(tmp_path):
    res = deep_experiment([0, 1], CFG, chunk_size=2)
    text = json.dumps(res, allow_nan=False)
    back = json.loads(text)
    assert back["steps"] == 4 and back["seeds"] == [0, 1] and back["h_min"] == pytest.approx(CFG.task.h_min)
    ho = back["heldout"]
    for key in ("loss_mean", "loss_std", "entropy_mean", "accuracy_mean", "bayes_loss_mean", "gap_to_bayes_mean"):
        assert isinstance(ho[key], float), key
    assert ho["gap_to_bayes_mean"] == pytest.approx(np.mean(np.subtract(back["per_seed"]["heldout_loss"],
                                                                         back["per_seed"]["heldout_bayes_loss"])))
    assert len(back["per_seed"]["heldout_loss"]) == 2 and len(back["curve"]["mean"]) == 4
    assert back["law_check"]["worst_rel_error"] < 1e-9
    assert np.shape(back["dynamics"]["sign_agreement_mean"]) == (2, 1, 2)
    assert back["config"]["schedule"] == "adamw" and back["config"]["task"]["seq_len"] == 16
    out = format_deep(back)
    assert "held-out sequence" in out and "gap to Bayes" in out and "layer 0" in out and "head 1" in out
    plot_deep(back, tmp_path / "deep.png")
    assert (tmp_path / "deep.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="format_deep"):
        format_deep({"heldout": {}})
    with pytest.raises(ValueError, match="plot_deep"):
        plot_deep({})


def test_input_checks():
    with pytest.raises(ValueError, match=r"DeepConfig: n_checkpoints=3\b.*divide.*steps=4"):
        DeepConfig(steps=4, n_checkpoints=3)
    with pytest.raises(ValueError, match=r"DeepConfig: schedule\b.*'em'"):
        DeepConfig(schedule="em")
    with pytest.raises(TypeError, match=r"DeepConfig: task\b"):
        DeepConfig(task=None)
    with pytest.raises(TypeError, match=r"DeepConfig: steps\b.*integer"):
        DeepConfig(steps=2.0)
    with pytest.raises(ValueError, match=r"deep_experiment: seeds\b.*distinct"):
        deep_experiment([1, 1], CFG)
    with pytest.raises(TypeError, match=r"deep_experiment: config\b.*DeepConfig"):
        deep_experiment([1], {"steps": 4})
    assert DeepConfig(steps=np.int64(10), n_checkpoints=5).steps == 10
    assert DeepConfig(steps=7).n_checkpoints == 7 and DeepConfig(steps=33).n_checkpoints == 3
    # The bounds declared with the fields hold in the library as on the command line.
    with pytest.raises(ValueError, match=r"DeepConfig: n_layers\b.*\[1, 64\].*got 65"):
        DeepConfig(n_layers=65)
    with pytest.raises(ValueError, match=r"StickyMarkov: n_symbols\b.*\[2, 1024\]"):
        DeepConfig(task=StickyMarkov(n_symbols=2000))
