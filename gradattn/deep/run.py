"""One deep run as a pure function of a PRNG key, its summary over seeds, and the experiment.

Evaluation is with dropout off, on a held-out sequence from another key: loss, mean predictive
entropy, accuracy, and the gaps to H_min and to the exact Bayes loss of that held-out sequence
(the task's own ``bayes_loss``, at its own noise level). Each x_t carries its own noise, so x_t
alone identifies y_t on the training sequence: the model can memorise it, and with one fixed
sequence it does. ``fresh_data=True`` samples a new training sequence at every step instead, so the
held-out gap to Bayes measures what was learnt.

Every run is one ``lax.scan`` over the steps (:func:`gradattn.training.scan_steps`); at
checkpoints inside it, per head: the attention entropy and the feedback-loop statistics
(:func:`gradattn.dynamics.step_feedback`: does sign(a_ij) predict sign(Delta alpha_ij)? does each
value move against its responsibility-weighted error?) and, after the run, when attention and
values settle. Seeds run through :func:`gradattn.experiments.run_experiment`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradattn.deep.config import DeepConfig, deep_optimizer, init_model
from gradattn.deep.laws import deep_law_errors, laws_of, mean_loss, pure_apply
from gradattn.dynamics import StepFeedback, settling_step, step_feedback
from gradattn.experiments import Experiment, json_floats, logit_metrics, run_experiment, seed_std
from gradattn.head import token_losses
from gradattn.training import optimizer_step, scan_steps


def make_deep_run(config: DeepConfig = DeepConfig()):
    """``run(key) -> dict`` of one deep run under ``config``; pure, one ``lax.scan``, vmappable.

    The key splits into the training data, the initial parameters, the dropout masks and the
    held-out sequence. Returned leaves (float32):

      curve (steps,): training loss before every update (dropout on, as the optimiser sees it).
      train_loss, train_bayes_loss: the final model's loss (dropout off) and the Bayes loss on the
        (first) training sequence.
      heldout_loss, heldout_entropy, heldout_accuracy, heldout_bayes_loss: on the held-out sequence.
      with checkpoints (K = n_checkpoints): dyn_<field> (K, L, H) for every
        :class:`gradattn.dynamics.StepFeedback` field, dyn_loss (K,) (dropout off, before the
        checkpoint's step), settle_attention and settle_values (L, H):
        :func:`gradattn.dynamics.settling_step` (scale "change", tolerance ``settle_tol``) of each
        head's attention rows and values on the training sequence over the checkpoints and the
        final state.

    Cached per config, so sweeping the same config twice compiles once.
    """
    if not isinstance(config, DeepConfig):
        raise TypeError(f"make_deep_run: config must be a DeepConfig, got {type(config).__name__}")
    return _make_deep_run(config)


@functools.lru_cache(maxsize=16)
def _make_deep_run(config: DeepConfig):
    task = config.task
    tx = deep_optimizer(config)
    n = task.n_positions
    shape = (config.n_layers, config.n_heads, n, config.d_model // config.n_heads)
    rows = jnp.linspace(0, n - 1, min(config.settle_rows, n)).astype(jnp.int32)
    k = config.steps // config.n_checkpoints if config.n_checkpoints else None
    per_head = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731  (over layers, then heads)

    def run(key):
        k_data, k_init, k_drop, k_test = jax.random.split(key, 4)
        graphdef, params = nnx.split(init_model(config, k_init), nnx.Param)
        apply = pure_apply(graphdef)
        x0, y0 = task.sample(k_data, jnp.float32)

        def data(t):
            return task.sample(jax.random.fold_in(k_data, t), jnp.float32) if config.fresh_data else (x0, y0)

        def loss(p, x, y, drop_key):
            return mean_loss(apply(p, x, dropout_key=drop_key), y, None)

        def step(carry, t):
            p, opt_state = carry
            x, y = data(t)
            value, grads = jax.value_and_grad(loss)(p, x, y, jax.random.fold_in(k_drop, t))
            return optimizer_step(tx, grads, opt_state, p), value

        def probe(before, after, t0):
            x, y = data(t0)
            lw = laws_of(apply, before[0], x, y, None, shape)
            _, taps1 = apply(after[0], x, return_taps=True)
            dyn = per_head(step_feedback)(lw.alpha, lw.advantage, taps1.alpha, lw.value_grad, lw.values, taps1.values)
            return dyn, lw.loss, before[0]

        (params, _), curve, records = scan_steps(step, (params, tx.init(params)), config.steps, k, probe)
        out = {"curve": curve}
        if records is not None:
            dyn, out["dyn_loss"], series = records
            out.update({f"dyn_{name}": val for name, val in dyn._asdict().items()})
            out.update(_settling(apply, series, params, x0, rows, config))

        out["train_loss"] = jnp.mean(token_losses(apply(params, x0), y0))
        out["train_bayes_loss"] = task.bayes_loss(x0, y0).mean
        x_test, y_test = task.sample(k_test, jnp.float32)
        for name, val in logit_metrics(apply(params, x_test), y_test).items():
            out[f"heldout_{name}"] = val
        out["heldout_bayes_loss"] = task.bayes_loss(x_test, y_test).mean
        return out

    return run


def _settling(apply, series, final, x, rows, config: DeepConfig) -> dict:
    """Settling steps per head of attention rows and values over the checkpoints and the final state."""

    def snapshot(p):
        _, taps = apply(p, x, return_taps=True)
        return taps.alpha[:, :, rows, :], taps.values

    a_end, v_end = snapshot(final)

    def distance(p):
        a, v = snapshot(p)
        return (jnp.sqrt(jnp.sum(jnp.square(a - a_end), axis=(-2, -1))), jnp.sqrt(jnp.sum(jnp.square(v - v_end), axis=(-2, -1))))

    d_a, d_v = jax.lax.map(distance, series)
    zero = jnp.zeros((1,) + d_a.shape[1:], d_a.dtype)
    d_a, d_v = jnp.concatenate([d_a, zero]), jnp.concatenate([d_v, zero])
    steps = jnp.asarray(config.checkpoint_steps, jnp.float32)
    settle = jax.vmap(jax.vmap(lambda d: settling_step(steps, d, config.settle_tol, "change"), in_axes=1), in_axes=1)
    return {"settle_attention": settle(d_a), "settle_values": settle(d_v)}


def summarise_deep(per_seed: dict[str, np.ndarray], seeds: list[int], config: DeepConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_deep_run` (std over seeds: the sample std, ddof 1);
    ``law_check`` is :func:`gradattn.deep.deep_law_errors` of a small float64 model."""
    h_min = config.task.h_min
    gap = per_seed["heldout_loss"] - per_seed["heldout_bayes_loss"]
    mean = lambda name: json_floats(np.mean(per_seed[name], axis=0))  # noqa: E731
    minus_h_min = lambda name: None if h_min is None else json_floats(np.mean(per_seed[name]) - h_min)  # noqa: E731
    out = {
        "experiment": "deep",
        "h_min": h_min,
        "steps": config.steps,
        "seeds": [int(s) for s in seeds],
        "heldout": {
            "loss_mean": mean("heldout_loss"),
            "loss_std": json_floats(seed_std(per_seed["heldout_loss"])),
            "entropy_mean": mean("heldout_entropy"),
            "accuracy_mean": mean("heldout_accuracy"),
            "bayes_loss_mean": mean("heldout_bayes_loss"),
            "gap_to_bayes_mean": json_floats(np.mean(gap)),
            "gap_to_h_min_mean": minus_h_min("heldout_loss"),
            # What the reference code prints as its "gap" (there in nats, labelled bits).
            "entropy_minus_h_min_mean": minus_h_min("heldout_entropy"),
        },
        "train": {
            "loss_mean": mean("train_loss"),
            "loss_std": json_floats(seed_std(per_seed["train_loss"])),
            "bayes_loss_mean": mean("train_bayes_loss"),
        },
        "per_seed": {
            "seed": [int(s) for s in seeds],
            **{name: json_floats(per_seed[name]) for name in ("train_loss", "train_bayes_loss", "heldout_loss",
                                                               "heldout_entropy", "heldout_accuracy", "heldout_bayes_loss")},
            "gap_to_bayes": json_floats(gap),
        },
        "curve": {"mean": mean("curve"), "std": json_floats(seed_std(per_seed["curve"]))},
        "law_check": deep_law_errors(),
        "config": config.to_dict(),
    }
    if config.n_checkpoints:
        dyn = {"checkpoint_steps": [int(s) for s in config.checkpoint_steps], "loss_mean": mean("dyn_loss")}
        for name in StepFeedback._fields:
            dyn[f"{name}_mean"] = mean(f"dyn_{name}")
        for name in ("settle_attention", "settle_values"):
            finite = np.isfinite(per_seed[name]).any()
            dyn[f"{name}_mean"] = json_floats(np.nanmean(per_seed[name], axis=0)) if finite else None
        out["dynamics"] = dyn
    return out


DEEP = Experiment("deep_experiment", DeepConfig, make_deep_run, summarise_deep)


def deep_experiment(seeds, config: DeepConfig | None = None, *, chunk_size: int | None = None, devices=None,
                    progress: bool = False, checkpoint_dir: str | os.PathLike | None = None,
                    per_seed_curves: bool = False) -> dict[str, Any]:
    """The deep experiment over ``seeds`` (an int n means seeds 0..n-1): JSON-ready results.

    :func:`gradattn.experiments.run_experiment` of :func:`make_deep_run` and
    :func:`summarise_deep`: the summary plus ``wall_time_s``, ``n_devices``, ``n_processes``,
    ``chunk_size`` and ``provenance``; ``chunk_size`` seeds vmapped per device per call (default:
    the backend's); ``devices``, ``progress`` and ``checkpoint_dir`` (resume a stopped sweep, over
    every process of a multi-process run) and ``per_seed_curves`` as there.
    """
    return run_experiment(DEEP, seeds, config, chunk_size=chunk_size, devices=devices, progress=progress,
                          checkpoint_dir=checkpoint_dir, per_seed_curves=per_seed_curves)
