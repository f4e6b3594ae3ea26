"""The companion paper's "Bayesian wind tunnels": a small model trained on token sequences whose exact
posterior is known at every supervised position, and measured against it.

Two tunnels (:mod:`gradattn.tasks.bijection_tokens`, :mod:`gradattn.tasks.incontext_hmm`), three
models (``gpt``: :class:`gradattn.nn.TinyGPT`; ``mlp``: :class:`gradattn.baselines.TokenMLP`, which
sees no other position; ``lstm``: :class:`gradattn.baselines.TokenLSTM`). One seed's run is one
``lax.scan``: AdamW (decoupled weight decay on every parameter) with the rate rising linearly from 0
over ``warmup`` steps, then annealed to 0 along a cosine, the gradient clipped to global norm
``clip``, and ``batch`` fresh sequences drawn inside the step at every step. The loss is the mean over
the batch of each sequence's cross-entropy at its supervised positions (:func:`gradattn.losses.
cross_entropy`) against the sampled label (bijection) or the exact posterior (HMM: soft targets).

Measured on ``heldout`` other sequences, per supervised position (the same positions in every
sequence) and in bits:

* ``kl_bits``: KL(exact || model) over all of the model's classes (mass on a class the exact
  posterior rules out counts against the model);
* ``entropy_mae_bits``: the authors' entropy error, the mean over sequences and positions of
  |H(model) - H(exact)|, with the model's softmax read over the task's ``class_range`` only (the
  value tokens of the bijection, the states of the HMM), as the authors read it;
  ``entropy_curve_mae_bits``: the weaker form some of their scripts print, the mean over positions
  of |mean model entropy - mean exact entropy| (sequences averaged first; never larger);
* ``accuracy`` of the model's argmax on the sampled label, beside ``bayes_accuracy``, the expected
  accuracy of the exact posterior's argmax (mean over sequences of max_c p_c).

The HMM tunnel is also measured at longer sequences than it trained on (``length_factors``: 1.5x
and 2.5x by default, the authors' K = 30 and 50 for K = 20), on HMMs drawn the same way; the model's
position embedding covers the longest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from gradattn._checks import check_divides_steps
from gradattn._config import option
from gradattn._io import write_json
from gradattn.baselines import TokenLSTM, TokenMLP
from gradattn.deep.laws import pure_apply
from gradattn.experiments._base import Experiment, ExperimentConfig, config_from_dict, json_floats, seed_std
from gradattn.losses import cross_entropy
from gradattn.nn import TinyGPT
from gradattn.plotting import atomic_savefig, fmt_pm, integer_ticks, pm_phrase, std_array
from gradattn.tasks.bijection_tokens import BijectionTokens
from gradattn.tasks.incontext_hmm import InContextHMM
from gradattn.tasks.tokens import check_token_task
from gradattn.training import optimizer_step, scan_steps

MODELS = ("gpt", "mlp", "lstm")
METRICS = ("kl_bits", "model_entropy_bits", "exact_entropy_bits", "abs_entropy_error_bits", "accuracy",
           "bayes_accuracy")
"""Per supervised position, means over the held-out sequences (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class WindTunnelConfig(ExperimentConfig):
    """One wind-tunnel run per seed: the task, the model, its training and its held-out measurement.

    Attributes:
      task: the token task (the bijection by default; :class:`HMMTunnelConfig` holds the HMM).
      model: ``gpt``, ``mlp`` or ``lstm`` (see the module docstring).
      d_model, n_layers, n_heads: the model's sizes (``n_heads`` only for ``gpt``).
      steps, batch: training steps, fresh sequences per step.
      lr, warmup, weight_decay, clip: AdamW's peak rate, its linear warm-up (steps), decoupled
        weight decay, and the global-norm clipping threshold.
      heldout: sequences every metric is measured on.
      checkpoint_every: keep the parameters at steps 0, k, 2k, ... (k = ``checkpoint_every``, which
        must divide ``steps``; 0 keeps none); with the final ones they are written by ``save_dir``
        (:func:`save_windtunnel`).
      checkpoints: instead, keep the parameters at this many steps spaced geometrically, denser
        early (:attr:`checkpoint_steps`); 0 keeps none. At most one of the two is set.
      probe_batch, settle_tol, precision_factor, late_factor, frame_layer: with checkpoints, each
        kept checkpoint is measured on ``probe_batch`` held-out sequences and the frame-before-
        precision criterion is read with these thresholds, fixed before the run
        (:func:`checkpoint_dynamics`, :func:`frame_before_precision_verdict`).
    """

    task_check = staticmethod(check_token_task)  # the task is a token task

    task: Any = dataclasses.field(default_factory=lambda: BijectionTokens(V=10, L=9))
    model: str = option("gpt", help="the model: gpt, mlp (no mixing across positions) or lstm", choices=MODELS)
    d_model: int = option(64, help="model width", minimum=1, maximum=4096)
    n_layers: int = option(4, help="layers", minimum=1, maximum=64)
    n_heads: int = option(4, help="heads per layer (gpt)", minimum=1, maximum=256)
    steps: int = option(4000, help="training steps, each on a fresh batch", minimum=1, maximum=10_000_000)
    batch: int = option(64, help="fresh sequences per step", minimum=1, maximum=65_536)
    lr: float = option(3e-4, help="AdamW's peak learning rate", minimum=0.0, exclusive_minimum=True)
    warmup: int = option(400, help="steps of linear warm-up (then cosine decay to 0)", minimum=0, maximum=10_000_000)
    weight_decay: float = option(0.1, help="AdamW's decoupled weight decay", minimum=0.0)
    clip: float = option(1.0, help="global-norm gradient clipping", minimum=0.0, exclusive_minimum=True)
    heldout: int = option(512, help="held-out sequences every metric is measured on", minimum=1, maximum=1_000_000)
    checkpoint_every: int = option(0, help="keep the parameters every this many steps (0: none; must divide --steps)",
                                   minimum=0, maximum=10_000_000)
    checkpoints: int = option(0, help="keep the parameters at this many steps, spaced geometrically (denser early); "
                                      "0: none; not with --checkpoint-every", minimum=0, maximum=100_000)
    probe_batch: int = option(64, help="held-out sequences each kept checkpoint is measured on (attention, KL)",
                              minimum=1, maximum=100_000)
    settle_tol: float = option(0.1, help="attention has settled from the first checkpoint after which its distance to "
                                         "the final maps stays at or below this fraction of its distance at step 0",
                               minimum=0.0, exclusive_minimum=True, maximum=1.0)
    precision_factor: float = option(10.0, help="frame before precision: when attention has settled the KL to the exact "
                                                "posterior is still at least this many times its final value",
                                     minimum=1.0)
    late_factor: float = option(2.0, help="the late form: over the last third of training the KL falls by at least this "
                                          "factor while attention moves at most --settle-tol", minimum=1.0)
    frame_layer: int = option(0, help="the layer whose attention the frame-before-precision verdict reads", minimum=0,
                              maximum=63)

    def __post_init__(self):
        fn = type(self).__name__
        super().__post_init__()
        if self.model == "gpt" and self.d_model % self.n_heads:
            raise ValueError(f"{fn}: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.warmup >= self.steps:
            raise ValueError(f"{fn}: warmup={self.warmup} must be below steps={self.steps}")
        if self.checkpoint_every:
            check_divides_steps("checkpoint_every", self.checkpoint_every, self.steps, fn)
            if self.checkpoints:
                raise ValueError(f"{fn}: set checkpoint_every={self.checkpoint_every} or checkpoints="
                                 f"{self.checkpoints}, not both")
        if self.frame_layer >= self.n_layers:
            raise ValueError(f"{fn}: frame_layer={self.frame_layer} must be below n_layers={self.n_layers}")
        if self.checkpoints > self.steps:
            raise ValueError(f"{fn}: checkpoints={self.checkpoints} must not exceed steps={self.steps}")

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """The steps t whose parameters (before the update of step t) are kept, increasing: 0, k, 2k, ...
        with ``checkpoint_every = k``; with ``checkpoints = n``, n steps from 0 to ``steps - 1`` spaced
        geometrically, t_i = floor(steps^(i / (n - 1))) - 1 raised where needed to t_{i-1} + 1 (so
        the first ones are consecutive); none without checkpoints."""
        if self.checkpoint_every:
            return np.arange(0, self.steps, self.checkpoint_every)
        if not self.checkpoints:
            return np.zeros((0,), np.int64)
        n = self.checkpoints
        if n == 1:
            return np.zeros((1,), np.int64)
        t = np.floor(np.power(float(self.steps), np.arange(n) / (n - 1))).astype(np.int64) - 1
        t[-1] = self.steps - 1
        for i in range(1, n):
            t[i] = max(t[i], t[i - 1] + 1)
        return t

    @property
    def length_factors(self) -> tuple[float, ...]:
        """The longer lengths the model is measured at, as multiples of the training length (none here)."""
        return ()


@dataclasses.dataclass(frozen=True)
class HMMTunnelConfig(WindTunnelConfig):
    """:class:`WindTunnelConfig` on the in-context HMM, measured at the training length and at
    1.5x and 2.5x it."""

    task: Any = dataclasses.field(default_factory=lambda: InContextHMM(length=10))

    @property
    def length_factors(self) -> tuple[float, ...]:
        return (1.5, 2.5)


def eval_tasks(config: WindTunnelConfig) -> dict[str, Any]:
    """The tasks the model is measured on, by name: ``"train"`` (the training task) and, for the
    HMM, ``"x1.5"``, ``"x2.5"`` (longer sequences of HMMs drawn the same way)."""
    out = {"train": config.task}
    for f in config.length_factors:
        out[f"x{f:g}"] = dataclasses.replace(config.task, length=math.ceil(f * config.task.length))
    return out


def optimizer(config: WindTunnelConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (betas 0.9, 0.999, eps 1e-8, decoupled weight decay on every
    parameter) at a rate rising linearly from 0 over ``warmup`` steps, then annealed to 0 along a
    cosine over the rest."""
    WindTunnelConfig.require(config, "optimizer")
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup, config.steps, end_value=0.0)
    return optax.chain(optax.clip_by_global_norm(config.clip), optax.adamw(schedule, weight_decay=config.weight_decay))


def build_model(config: WindTunnelConfig, key: jax.Array, dtype=jnp.float32) -> nnx.Module:
    """The config's model for its task, drawn from ``key``: input ids in [0, vocab_size), outputs
    the task's ``n_classes``, positions up to the longest measured sequence."""
    WindTunnelConfig.require(config, "build_model")
    task = config.task
    max_len = max(t.seq_len for t in eval_tasks(config).values())
    n_out = task.n_classes
    rngs = nnx.Rngs(key)
    if config.model == "gpt":
        return TinyGPT(task.vocab_size, max_len, config.d_model, config.n_layers, config.n_heads, n_out,
                       rngs=rngs, dtype=dtype)
    if config.model == "mlp":
        return TokenMLP(task.vocab_size, max_len, config.d_model, config.n_layers, n_out, rngs=rngs, dtype=dtype)
    # With learned positions, as the authors' bijection LSTM (their HMM LSTM has none).
    return TokenLSTM(task.vocab_size, config.d_model, config.n_layers, n_out, rngs=rngs, dtype=dtype, max_len=max_len)


def position_metrics(logits, posterior, labels, class_range) -> dict[str, jax.Array]:
    """Per-position measurements at the supervised positions of a batch: ``logits (B, S, C)``, the
    exact ``posterior (B, S, C)``, the sampled ``labels (B, S)``; means over the batch, each (S,)
    (:data:`METRICS`). Pure, jit-able; shapes checked at trace time."""
    shape = tuple(np.shape(logits))
    if len(shape) != 3 or tuple(np.shape(posterior)) != shape or tuple(np.shape(labels)) != shape[:2]:
        raise ValueError(f"position_metrics: logits and posterior must be (B, S, C) and labels (B, S), got shapes "
                         f"{shape}, {tuple(np.shape(posterior))} and {tuple(np.shape(labels))}")
    lo, hi = class_range
    if not 0 <= lo < hi <= shape[2]:
        raise ValueError(f"position_metrics: class_range must satisfy 0 <= lo < hi <= C = {shape[2]}, got {class_range}")
    ln2 = jnp.log(2.0).astype(logits.dtype)
    logq = jax.nn.log_softmax(logits, axis=-1)
    support = posterior > 0
    safe_logp = jnp.log(jnp.where(support, posterior, 1.0))
    kl = jnp.sum(jnp.where(support, posterior * (safe_logp - logq), 0.0), axis=-1) / ln2
    logq_r = jax.nn.log_softmax(logits[..., lo:hi], axis=-1)
    h_model = -jnp.sum(jnp.exp(logq_r) * logq_r, axis=-1) / ln2
    h_exact = -jnp.sum(jnp.where(support, posterior * safe_logp, 0.0), axis=-1) / ln2
    per = {
        "kl_bits": kl,
        "model_entropy_bits": h_model,
        "exact_entropy_bits": h_exact,
        "abs_entropy_error_bits": jnp.abs(h_model - h_exact),
        "accuracy": (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype),
        "bayes_accuracy": jnp.max(posterior, axis=-1),
    }
    return {name: jnp.mean(v, axis=0) for name, v in per.items()}


def make_windtunnel_run(config: WindTunnelConfig):
    """``run(key) -> dict`` of one seed (pure, one ``lax.scan``, vmappable over keys).

    The key splits into the training data (step t draws from ``fold_in(data_key, t)``), the model's
    initial parameters and the held-out sequences. Returns ``curve`` (steps,), the training loss
    before each update, and for every measured task of :func:`eval_tasks` named ``e``:
    ``{e}_{metric}`` (S,) per supervised position for the metrics :data:`METRICS`; the trained
    parameters under ``params.<path>`` and, with checkpoints, the kept ones under
    ``checkpoints.<path>`` (a leading axis of checkpoints) (:func:`flat_params`).
    """
    WindTunnelConfig.require(config, "make_windtunnel_run")
    task = config.task
    tx = optimizer(config)
    targets_of = (lambda s: s.posterior) if task.soft_targets else (lambda s: s.labels)
    measured = eval_tasks(config)
    kept_at = config.checkpoint_steps

    def run(key):
        k_data, k_init, k_test = jax.random.split(key, 3)
        graphdef, params = nnx.split(build_model(config, k_init), nnx.Param)
        apply = pure_apply(graphdef)

        def batch_loss(p, b):
            logits = jax.vmap(lambda tokens: apply(p, tokens))(b.tokens)
            return jnp.mean(jax.vmap(cross_entropy)(logits, targets_of(b), b.mask))

        def step(carry, t):
            p, opt_state = carry
            b = jax.vmap(task.sample)(jax.random.split(jax.random.fold_in(k_data, t), config.batch))
            value, grads = jax.value_and_grad(batch_loss)(p, b)
            return optimizer_step(tx, grads, opt_state, p), value

        carry = (params, tx.init(params))
        if len(kept_at):
            (params, _), kept, curve = keeping(step, carry, kept_at, config.steps)
        else:
            (params, _), curve, _ = scan_steps(step, carry, config.steps)
        out = {"curve": curve, **flat_params(PARAMS, params)}
        if len(kept_at):
            out.update(flat_params(CHECKPOINTS, kept))
            probe = jax.vmap(task.sample)(jax.random.split(jax.random.fold_in(k_test, PROBE_STREAM), config.probe_batch))
            out.update(checkpoint_dynamics(apply, kept, params, probe, task, attention=config.model == "gpt"))
        for name, t in measured.items():
            s = jax.vmap(t.sample)(jax.random.split(k_test, config.heldout))
            idx = jnp.asarray(t.supervised)
            logits = jax.lax.map(lambda tokens: apply(params, tokens), s.tokens)
            m = position_metrics(logits[:, idx], s.posterior[:, idx], s.labels[:, idx], t.class_range)
            out.update({f"{name}_{metric}": v for metric, v in m.items()})
        return out

    return run


PARAMS = "params"
CHECKPOINTS = "checkpoints"
PROBE_STREAM = 7
"""The checkpoints' probe sequences are drawn from ``fold_in(held-out key, PROBE_STREAM)``: other
sequences than the held-out ones, and drawing them changes no other number of the run."""


def attention_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    """The distance between two sets of attention maps ``(B, L, H, T, T)`` per layer and head
    ``(L, H)``: the total-variation distance between the two rows of query i,
    1/2 sum_j |a_ij - b_ij| (in [0, 1]), averaged over the sequences and every query row."""
    return 0.5 * jnp.mean(jnp.sum(jnp.abs(a - b), axis=-1), axis=(0, 3))


def checkpoint_dynamics(apply, kept, final, probe, task, *, attention: bool) -> dict[str, jax.Array]:
    """Every kept checkpoint measured on the ``probe`` sequences (a batched TokenSample), beside the
    trained parameters ``final``:

    * ``ckpt_kl_bits`` (C,) and ``ckpt_entropy_mae_bits`` (C,): the mean over sequences and
      supervised positions of KL(exact || model) and of |H(model) - H(exact)| (as :data:`METRICS`);
      ``final_kl_bits`` and ``final_entropy_mae_bits`` the same for the trained model;
    * with ``attention`` (the GPT): ``ckpt_attention_to_final`` (C, L, H), the
      :func:`attention_distance` of each checkpoint's maps from the trained model's, and
      ``ckpt_attention_to_previous`` (C, L, H), from the previous checkpoint's (0 at the first).

    ``apply(params, tokens, return_taps=...)`` is the model as a pure function; ``kept`` the
    checkpoints' parameters with a leading axis. One checkpoint's maps are held at a time."""
    idx = jnp.asarray(task.supervised)

    def measure(p):
        if attention:
            logits, taps = jax.vmap(lambda tokens: apply(p, tokens, return_taps=True))(probe.tokens)
            alpha = taps.alpha
        else:
            logits, alpha = jax.vmap(lambda tokens: apply(p, tokens))(probe.tokens), None
        m = position_metrics(logits[:, idx], probe.posterior[:, idx], probe.labels[:, idx], task.class_range)
        return alpha, jnp.mean(m["kl_bits"]), jnp.mean(m["abs_entropy_error_bits"])

    a_final, kl_final, mae_final = measure(final)
    first = jax.tree.map(lambda a: a[0], kept)

    def one(previous, p):
        a, kl, mae = measure(p)
        row = {"ckpt_kl_bits": kl, "ckpt_entropy_mae_bits": mae}
        if attention:
            row.update(ckpt_attention_to_final=attention_distance(a, a_final),
                       ckpt_attention_to_previous=attention_distance(a, previous))
        return a, row

    _, rows = jax.lax.scan(one, measure(first)[0], kept)
    return {**rows, "final_kl_bits": kl_final, "final_entropy_mae_bits": mae_final}


def settled_index(series: np.ndarray, tol: float) -> int:
    """The first index from which ``series`` (a distance to the end state over checkpoints) stays
    at or below ``tol`` times its first value; ``len(series)`` if it never does."""
    ok = np.asarray(series) <= tol * np.asarray(series)[0]
    bad = np.flatnonzero(~ok)
    return 0 if bad.size == 0 else int(bad[-1]) + 1


def frame_before_precision_verdict(steps, to_final, kl, kl_final, *, settle_tol: float, precision_factor: float,
                                   late_factor: float, total_steps: int) -> dict[str, Any]:
    """One seed's frame-before-precision reading from its checkpoints (host side, numpy).

    Args:
      steps: (C,) the checkpoints' steps; to_final: (C,) the frame layer's attention distance to
        its final maps (mean over heads); kl: (C,) the KL at each checkpoint; kl_final: the trained
        model's KL; thresholds as in :class:`WindTunnelConfig`; total_steps: the run's length.
    Returns:
      ``settle_step`` (the step from which attention stays within ``settle_tol`` of its initial
      distance to the end; None if never), ``kl_ratio_at_settle`` (KL there / final KL), ``holds``
      (``kl_ratio_at_settle >= precision_factor``); the late form over the last third:
      ``late_step`` (the first checkpoint at or after 2/3 of the run), ``late_attention_fraction``
      (its attention distance to the end / the distance at step 0), ``late_kl_ratio`` (its KL /
      final KL), ``late_holds`` (fraction <= settle_tol and ratio >= late_factor).
    """
    steps, to_final, kl = (np.asarray(a, np.float64) for a in (steps, to_final, kl))
    i = settled_index(to_final, settle_tol)
    settle = None if i >= len(steps) else int(steps[i])
    ratio = None if settle is None else float(kl[i] / kl_final)
    late = int(np.searchsorted(steps, 2 * total_steps / 3))
    late = min(late, len(steps) - 1)
    fraction = float(to_final[late] / to_final[0])
    late_ratio = float(kl[late] / kl_final)
    return {"settle_step": settle, "kl_ratio_at_settle": ratio,
            "holds": bool(ratio is not None and ratio >= precision_factor),
            "late_step": int(steps[late]), "late_attention_fraction": fraction, "late_kl_ratio": late_ratio,
            "late_holds": bool(fraction <= settle_tol and late_ratio >= late_factor)}


def keeping(step, carry, kept_at: np.ndarray, steps: int):
    """:func:`gradattn.training.scan_steps` of ``step`` over ``(params, opt_state)`` that also keeps
    the parameters before each step of ``kept_at`` (increasing, in [0, steps)) in a buffer with a
    leading axis of checkpoints. At every step the buffer's current slot is rewritten, with the
    parameters where the step is the next one kept and with itself elsewhere (one slot of
    arithmetic per step; nothing else about the step changes). Returns ``(final carry, kept,
    outs)``."""
    schedule = jnp.asarray(kept_at, jnp.int32)
    last = len(kept_at) - 1

    def with_buffer(c, t):
        inner, kept, i = c
        slot = jnp.minimum(i, last)
        hit = t == schedule[slot]
        kept = jax.tree.map(lambda b, p: jax.lax.dynamic_update_index_in_dim(
            b, jnp.where(hit, p, jax.lax.dynamic_index_in_dim(b, slot, keepdims=False)), slot, 0), kept, inner[0])
        inner, out = step(inner, t)
        return (inner, kept, i + hit.astype(i.dtype)), out

    empty = jax.tree.map(lambda p: jnp.zeros((len(kept_at),) + p.shape, p.dtype), carry[0])
    (final, kept, _), outs, _ = scan_steps(with_buffer, (carry, empty, jnp.zeros((), jnp.int32)), steps)
    return final, kept, outs


def flat_params(prefix: str, params) -> dict[str, jax.Array]:
    """A model's parameters (an ``nnx.State`` or its pure dict) as flat outputs ``prefix.path.to.leaf``."""
    tree = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join([prefix, *(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)]): v for path, v in leaves}


def nested_params(prefix: str, flat: dict) -> dict:
    """The pure dict of parameters that :func:`flat_params` flattened under ``prefix`` (list indices
    as ints), from the outputs ``flat``."""
    out: dict = {}
    for name, v in flat.items():
        if not name.startswith(prefix + "."):
            continue
        *parts, leaf = name[len(prefix) + 1:].split(".")
        node = out
        for part in parts:
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[int(leaf) if leaf.isdigit() else leaf] = v
    return out


def save_windtunnel(per_seed: dict, seeds: list, config: WindTunnelConfig, directory: str) -> None:
    """Every seed's trained parameters (and kept checkpoints) with orbax, under ``directory``:
    ``seed_<s>/params`` and ``seed_<s>/checkpoints`` (a leading axis over :attr:`~WindTunnelConfig.
    checkpoint_steps`), beside ``config.json`` (the config, :func:`gradattn.experiments.config_dict`)
    that :func:`load_windtunnel_model` rebuilds the model from."""

    os.makedirs(directory, exist_ok=True)
    write_json({"config": config.to_dict(), "seeds": [int(s) for s in seeds],
                "checkpoint_steps": [int(s) for s in config.checkpoint_steps]}, os.path.join(directory, "config.json"))
    with ocp.StandardCheckpointer() as ckptr:
        for i, seed in enumerate(seeds):
            for prefix in (PARAMS, CHECKPOINTS):
                tree = nested_params(prefix, {k: np.asarray(v[i]) for k, v in per_seed.items()})
                if tree:
                    ckptr.save(os.path.abspath(os.path.join(directory, f"seed_{int(seed)}", prefix)), tree, force=True)


def load_windtunnel_model(directory: str, seed: int, checkpoint: int | None = None):
    """``(model, config)``: the model :func:`save_windtunnel` wrote for ``seed`` under ``directory``,
    with its trained parameters (or those kept at checkpoint index ``checkpoint``)."""

    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    config_type = HMMTunnelConfig if meta["config"]["task"]["name"] == "InContextHMM" else WindTunnelConfig
    config = config_from_dict(config_type, meta["config"])
    model = build_model(config, jax.random.key(0))
    with ocp.StandardCheckpointer() as ckptr:
        prefix = PARAMS if checkpoint is None else CHECKPOINTS
        tree = ckptr.restore(os.path.abspath(os.path.join(directory, f"seed_{int(seed)}", prefix)))
    if checkpoint is not None:
        tree = jax.tree.map(lambda a: a[checkpoint], tree)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, _int_keys(tree))
    nnx.update(model, state)
    return model, config


def _int_keys(tree):
    """A restored dict with the digit keys (layer indices) back as ints."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()}


def summarise_windtunnel(per_seed: dict[str, np.ndarray], seeds: list[int], config: WindTunnelConfig) -> dict[str, Any]:
    """The JSON-ready summary (std over seeds: the sample std, ddof 1): per measured task, every
    metric per position (mean, std over seeds) and its mean over positions (mean, std and per
    seed); ``entropy_mae_bits`` (the authors' per-sequence form) and ``entropy_curve_mae_bits`` (the
    curve form); ``curve`` the training loss's mean and std."""
    out: dict[str, Any] = {"task": type(config.task).__name__, "model": config.model, "measured": {}}
    for name, t in eval_tasks(config).items():
        entry: dict[str, Any] = {"seq_len": t.seq_len, "positions": [int(i) for i in t.supervised]}
        for metric in METRICS:
            v = np.asarray(per_seed[f"{name}_{metric}"], np.float64)
            overall = v.mean(axis=1)
            entry[metric] = {"mean": json_floats(v.mean(axis=0)), "std": json_floats(seed_std(v)),
                             "overall": {"mean": json_floats(overall.mean()), "std": json_floats(seed_std(overall)),
                                         "per_seed": json_floats(overall)}}
        curve_mae = np.mean(np.abs(np.asarray(per_seed[f"{name}_model_entropy_bits"], np.float64)
                                   - np.asarray(per_seed[f"{name}_exact_entropy_bits"], np.float64)), axis=1)
        entry["entropy_mae_bits"] = entry["abs_entropy_error_bits"]["overall"]
        entry["entropy_curve_mae_bits"] = {"mean": json_floats(curve_mae.mean()), "std": json_floats(seed_std(curve_mae)),
                                           "per_seed": json_floats(curve_mae)}
        out["measured"][name] = entry
    c = np.asarray(per_seed["curve"], np.float64)
    out["curve"] = {"mean": json_floats(c.mean(axis=0)), "std": json_floats(seed_std(c))}
    if "ckpt_kl_bits" in per_seed:
        out["dynamics"] = summarise_dynamics(per_seed, config)
    return out


def summarise_dynamics(per_seed: dict[str, np.ndarray], config: WindTunnelConfig) -> dict[str, Any]:
    """The kept checkpoints' measurements, per seed (so that every verdict can be recomputed from
    the JSON) and as mean and std over seeds, with the frame-before-precision reading of each seed
    (:func:`frame_before_precision_verdict` on the frame layer) and the count of seeds where it holds."""
    steps = config.checkpoint_steps
    d: dict[str, Any] = {"steps": [int(s) for s in steps], "probe_batch": config.probe_batch,
                         "thresholds": {k: getattr(config, k) for k in
                                        ("settle_tol", "precision_factor", "late_factor", "frame_layer")}}
    for key in ("ckpt_kl_bits", "ckpt_entropy_mae_bits", "final_kl_bits", "final_entropy_mae_bits",
                "ckpt_attention_to_final", "ckpt_attention_to_previous"):
        if key in per_seed:
            v = np.asarray(per_seed[key], np.float64)
            d[key.removeprefix("ckpt_")] = {"mean": json_floats(v.mean(axis=0)), "std": json_floats(seed_std(v)),
                                            "per_seed": json_floats(v)}
    if "ckpt_attention_to_final" in per_seed:
        frame = np.asarray(per_seed["ckpt_attention_to_final"], np.float64)[:, :, config.frame_layer].mean(axis=-1)
        kl = np.asarray(per_seed["ckpt_kl_bits"], np.float64)
        final = np.asarray(per_seed["final_kl_bits"], np.float64)
        seeds = [frame_before_precision_verdict(steps, frame[i], kl[i], final[i], settle_tol=config.settle_tol,
                                                precision_factor=config.precision_factor,
                                                late_factor=config.late_factor, total_steps=config.steps)
                 for i in range(len(final))]
        d["frame_before_precision"] = {"per_seed": seeds, "holds": sum(s["holds"] for s in seeds),
                                       "late_holds": sum(s["late_holds"] for s in seeds), "seeds": len(seeds)}
    return d


def format_windtunnel(results: dict) -> str:
    """The command line's summary: per measured task, the mean KL, the entropy errors and the
    accuracies (over positions; mean ± sd over seeds)."""
    n = len(results["seeds"])
    cfg = results["config"]
    lines = [f"wind tunnel {results['task']} ({', '.join(f'{k}={v}' for k, v in cfg['task'].items() if k != 'name')}), "
             f"model {results['model']} (d {cfg['d_model']}, {cfg['n_layers']} layers), {results['steps']} steps of "
             f"{cfg['batch']} sequences, {cfg['heldout']} held out; {pm_phrase(results, n)}; bits"]
    for name, e in results["measured"].items():
        def pm(key, e=e):
            v = e[key]["overall"] if "overall" in e[key] else e[key]
            return fmt_pm(v["mean"], v["std"], ".4f")
        lines.append(f"  {name:6s} (T {e['seq_len']}): KL(exact||model) {pm('kl_bits')}, entropy MAE {pm('entropy_mae_bits')} "
                     f"(curve form {pm('entropy_curve_mae_bits')}), accuracy {pm('accuracy')} vs Bayes {pm('bayes_accuracy')}")
    d = results.get("dynamics")
    if d:
        kl = d["kl_bits"]["mean"]
        lines.append(f"  checkpoints: {len(d['steps'])} (steps {d['steps'][0]} .. {d['steps'][-1]}), KL {kl[0]:.4f} -> "
                     f"{kl[-1]:.4f} -> {d['final_kl_bits']['mean']:.4f} (trained), on {d['probe_batch']} probe sequences")
        f = d.get("frame_before_precision")
        if f:
            t = d["thresholds"]
            settle = [s["settle_step"] for s in f["per_seed"]]
            ratio = [s["kl_ratio_at_settle"] for s in f["per_seed"]]
            lines.append(f"  frame before precision (layer {t['frame_layer']}, tol {t['settle_tol']:g}, factor "
                         f"{t['precision_factor']:g}): holds in {f['holds']}/{f['seeds']} seeds; attention settles at "
                         f"steps {settle}, KL then / final {[None if r is None else round(r, 1) for r in ratio]}; "
                         f"late form (last third, factor {t['late_factor']:g}) holds in {f['late_holds']}/{f['seeds']}")
    return "\n".join(lines)


def plot_windtunnel(results: dict, path=None, *, dpi: int = 150):
    """Per supervised position: the model's entropy against the exact entropy, and the KL (bits),
    mean ± 1 sd over seeds, one line per measured length. Saved atomically when ``path`` is given."""
    from matplotlib.figure import Figure  # matplotlib only when a figure is drawn

    d = results.get("dynamics")
    fig = Figure(figsize=(18 if d else 12, 4.8), layout="constrained")
    axes = fig.subplots(1, 3 if d else 2)
    ax_h, ax_kl = axes[:2]
    n = len(results["seeds"])
    if d:
        _plot_dynamics(axes[2], d)
    for i, (name, e) in enumerate(results["measured"].items()):
        t = np.arange(1, len(e["positions"]) + 1)
        color = f"C{i}"
        for ax, metric in ((ax_h, "model_entropy_bits"), (ax_kl, "kl_bits")):
            mean = np.asarray(e[metric]["mean"], float)
            std = std_array(e[metric].get("std"), mean)
            ax.plot(t, mean, "o-", ms=3, color=color, label=f"model, {name} (T {e['seq_len']})")
            if std is not None:
                ax.fill_between(t, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        ax_h.plot(t, np.asarray(e["exact_entropy_bits"]["mean"], float), "k--", lw=1, label=f"exact, {name}" if i == 0 else None)
    ax_h.set_ylabel("entropy at the supervised position (bits)")
    ax_kl.set_ylabel("KL(exact || model) (bits)")
    ax_kl.set_yscale("symlog", linthresh=1e-3)
    for ax in (ax_h, ax_kl):
        ax.set_xlabel("supervised position")
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    ax_h.legend(fontsize=8, frameon=False)
    fig.suptitle(f"Wind tunnel {results['task']}, model {results['model']}, {pm_phrase(results, n)}", fontsize=11)
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


def _plot_dynamics(ax, d: dict) -> None:
    """Over the kept checkpoints (step + 1, log scale): the KL to the exact posterior (left axis) and
    each layer's attention distance to its final maps (mean over heads; right axis), seeds' means."""
    x = np.asarray(d["steps"], float) + 1
    ax.plot(x, np.asarray(d["kl_bits"]["mean"], float), "k-", lw=2, label="KL(exact || model)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step + 1 (kept checkpoints)")
    ax.set_ylabel("KL(exact || model) (bits), probe sequences")
    ax.grid(alpha=0.3)
    if "attention_to_final" in d:
        dist = np.asarray(d["attention_to_final"]["mean"], float).mean(axis=-1)  # (C, L)
        twin = ax.twinx()
        for layer in range(dist.shape[1]):
            twin.plot(x, dist[:, layer], "o-", ms=2, color=f"C{layer}", label=f"attention, layer {layer}")
        twin.set_ylabel("attention distance to the final maps (TV)")
        twin.legend(fontsize=7, frameon=False, loc="upper right")
    ax.legend(fontsize=8, frameon=False, loc="lower left")


BIJECTION_PRESETS = {
    "small": WindTunnelConfig,
    "paper": lambda: WindTunnelConfig(task=BijectionTokens(V=20, L=19), d_model=192, n_layers=6, n_heads=6,
                                      steps=100_000, batch=128, warmup=2000),
}
"""``small``: the defaults (V 10, L 9; d 64, 4 layers of 4 heads; batch 64, 4000 steps), sized for a
2-core CPU. ``paper``: the companion paper's published sizes (V 20, L 19 without replacement; d 192,
6 layers of 6 heads; AdamW 3e-4, weight decay 0.1, warm-up 2000, clipping 1.0; batch 128, 100k
steps). The authors' own later retraining used batch 256 for 50k steps; their committed script's
defaults differ again (docs/theory.md)."""

HMM_PRESETS = {
    "small": lambda: HMMTunnelConfig(lr=1e-3, batch=32),
    "paper": lambda: HMMTunnelConfig(task=InContextHMM(length=20), d_model=256, n_layers=9, n_heads=8, steps=7850,
                                     batch=64, warmup=0, weight_decay=0.01),
}
"""``small``: K 10 observations; d 64, 4 layers of 4 heads; batch 32, rate 1e-3, 4000 steps (one
seed at batch 64 and 3000 steps reached 0.036 bits of KL on this CPU; a quarter of that rate
learned little in 1500 steps).
``paper``: the paper's sizes (S = O = 5, K 20; d 256, 9 layers of 8 heads; AdamW 3e-4 with weight
decay 0.01, no warm-up, cosine to 0, clipping 1.0; batch 64, 7850 steps: the authors' 50 epochs over
10,000 sequences, here fresh sequences at every step), on :class:`~gradattn.nn.TinyGPT` with an
untied head of 5 (the authors' HMM model uses LayerNorm, biases and dropout 0.1)."""


windtunnel_bijection = Experiment(
    "windtunnel_bijection", WindTunnelConfig, make_windtunnel_run, summarise_windtunnel, command="windtunnel-bijection",
    help="the companion paper's bijection wind tunnel: a token model against the exact posterior per position",
    format=format_windtunnel, plot=plot_windtunnel, curves=1, presets=BIJECTION_PRESETS, save=save_windtunnel)
"""The bijection wind tunnel over seeds (:func:`gradattn.experiments.run_experiment`)."""

windtunnel_hmm = Experiment(
    "windtunnel_hmm", HMMTunnelConfig, make_windtunnel_run, summarise_windtunnel, command="windtunnel-hmm",
    help="the companion paper's in-context HMM wind tunnel: filtering posteriors, and longer sequences",
    format=format_windtunnel, plot=plot_windtunnel, curves=1, presets=HMM_PRESETS, save=save_windtunnel)
"""The in-context HMM wind tunnel over seeds (:func:`gradattn.experiments.run_experiment`)."""
