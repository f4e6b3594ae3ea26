"""The geometry of trained wind-tunnel models, read from the models a run saved (``--save-dir``),
beside the same model untrained and the controls.

For every saved seed, on the same ``sequences`` fresh sequences of the model's task
(:mod:`gradattn.probes` for each statistic's definition):

* **value manifold**, layer by layer (the normed input of every block, and the final
  representation after the last norm, which the companion paper PCAs): PC1's share of variance,
  the largest |r| of PC1..PC5 with the exact posterior's entropy, the linear R² of the entropy from
  all dimensions (80/20 split, held-out part); beside it the same statistics with the entropy
  shuffled across points, and the R² of a predictor that sees the position alone (without
  replacement the bijection's entropy is a function of the position);
* **key orthogonality**: the mean off-diagonal cosine of the keys each head of layer 0 gives the
  key tokens' raw embeddings (signed, and of the absolute values);
* **Q–K alignment** per layer: the mean cosine between the query at a supervised position and the
  keys at the earlier ones;
* **attention on values** (bijection): the attention each head puts, where the model predicts a
  value, on context positions holding a value token (without replacement those are all ruled
  out), and with replacement the KL of that attention, read as a distribution over values, from
  the exact posterior at keys seen before;
* **ablations** of the trained model: the change of KL(exact || model) when one head's output or
  one block's attention, feed-forward or whole output is removed.

The untrained model is the seed's own initial model (the key split the run used), so every
statistic has its value before training beside it. Means and standard deviations are over seeds.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradattn import probes
from gradattn.experiments._base import json_floats, seed_std
from gradattn.experiments.windtunnel import build_model, load_windtunnel_model
from gradattn.plotting import atomic_savefig
from gradattn.provenance import finish, provenance
from gradattn.sweeps import seed_key
from gradattn.tasks.bijection_tokens import BijectionTokens

FORMAT = "gradattn.windtunnel_probe/1"


def _model_stats(model, task, sample, split_key, shuffle_key) -> dict[str, Any]:
    """Every statistic of one model on ``sample`` (a batch of the task's sequences)."""
    positions = tuple(int(i) for i in task.supervised)
    out = probes.probe_batch(model, sample.tokens)
    pts = probes.supervised_points(out.normed, sample.posterior, positions)
    real = probes.manifold_stats(pts.z, pts.entropy_bits, split_key)
    shuffled = probes.shuffled_control(pts.z, pts.entropy_bits, split_key, shuffle_key)
    kl = probes.posterior_kl_bits(out.logits[:, jnp.asarray(positions)], sample.posterior[:, jnp.asarray(positions)])
    stats: dict[str, Any] = {
        "kl_bits": float(jnp.mean(kl)),
        "manifold": {k: np.asarray(v).tolist() for k, v in real._asdict().items()},
        "shuffled": {k: np.asarray(v).tolist() for k, v in shuffled._asdict().items()},
    }
    bijection = isinstance(task, BijectionTokens)
    keys = probes.key_orthogonality(model, jnp.arange(task.V) if bijection else None)
    stats["key_offdiag_mean"] = np.asarray(keys.offdiag_mean).tolist()  # (L, H)
    stats["key_offdiag_abs_mean"] = np.asarray(keys.offdiag_abs_mean).tolist()
    qk = jax.vmap(lambda q, k: probes.qk_alignment(q, k, positions).layer_mean)(out.queries, out.keys)
    stats["qk_alignment"] = np.asarray(jnp.nanmean(qk, axis=0)).tolist()  # (L,)
    if bijection:
        ap = jax.vmap(lambda a, t, p: probes.attention_posterior(a, t, p, positions, task.class_range))(
            out.alpha, sample.tokens, sample.posterior)
        stats["value_mass"] = np.asarray(jnp.mean(ap.value_mass, axis=(0, 3))).tolist()  # (L, H)
        stats["possible_mass"] = np.asarray(jnp.mean(ap.possible_mass, axis=(0, 3))).tolist()
        if task.with_replacement:
            # at a key shown before (the supervised positions hold the keys) the exact posterior is a
            # point mass on the value it revealed, and that value is in context
            k = sample.tokens[:, jnp.asarray(positions)]  # (B, S)
            earlier = jnp.tril(jnp.ones((len(positions), len(positions)), bool), -1)  # [s, s'] for s' < s
            seen = jnp.any((k[:, :, None] == k[:, None, :]) & earlier, axis=-1)  # (B, S)
            kl_seen = jnp.where(seen[:, None, None, :], ap.kl_bits, jnp.nan)
            stats["attention_kl_seen_bits"] = np.asarray(
                jnp.nanmedian(jnp.moveaxis(kl_seen, 0, -1).reshape(kl_seen.shape[1], kl_seen.shape[2], -1), axis=-1)
            ).tolist()  # (L, H), median over (sequence, repeated key)
    return stats


def probe_saved(directory: str, *, sequences: int = 256, ablation_sequences: int = 128, probe_seed: int = 0,
                progress=None) -> dict[str, Any]:
    """The probes of every seed's trained model saved under ``directory`` (by a wind-tunnel run's
    ``save_dir``) and of its untrained model, on ``sequences`` sequences drawn from
    ``jax.random.key(probe_seed)``; ablations on the first ``ablation_sequences`` of them. Returns
    the JSON-ready result (per seed, and means and stds over seeds)."""
    fn = "probe_saved"
    if not isinstance(directory, (str, os.PathLike)) or not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{fn}: directory must hold a saved wind-tunnel run (its config.json), got {directory!r}")
    for name, v, lo in (("sequences", sequences, 2), ("ablation_sequences", ablation_sequences, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 100_000:
            raise ValueError(f"{fn}: {name} must be an integer in [{lo}, 100000], got {v!r}")
    if ablation_sequences > sequences:
        raise ValueError(f"{fn}: ablation_sequences={ablation_sequences} must not exceed sequences={sequences}")
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    prov = provenance()
    t0 = time.perf_counter()
    per_seed = []
    config = None
    for seed in meta["seeds"]:
        model, config = load_windtunnel_model(os.fspath(directory), seed)
        if config.model != "gpt":
            raise ValueError(f"{fn}: the probes read attention; {directory!r} holds {config.model!r} models")
        task = config.task
        k_probe, k_split, k_shuffle = jax.random.split(jax.random.key(probe_seed), 3)
        sample = jax.vmap(task.sample)(jax.random.split(k_probe, sequences))
        untrained = build_model(config, jax.random.split(seed_key(seed), 3)[1])
        entry = {"seed": int(seed),
                 "trained": _model_stats(model, task, sample, k_split, k_shuffle),
                 "untrained": _model_stats(untrained, task, sample, k_split, k_shuffle)}
        positions = tuple(int(i) for i in task.supervised)
        pts = probes.supervised_points(jnp.zeros((sequences, task.seq_len, 1)), sample.posterior, positions)
        entry["position_only_r2_test"] = float(probes.position_r2(pts.position, pts.entropy_bits, k_split,
                                                                   len(positions)).test)
        a = jax.tree.map(lambda x: x[:ablation_sequences], sample)
        heads = probes.head_ablation(model, a.tokens, a.posterior, positions)
        layers = probes.layer_ablation(model, a.tokens, a.posterior, positions)
        entry["ablation"] = {"baseline_bits": float(heads.baseline_bits),
                             "head_delta_bits": np.asarray(heads.delta_bits).tolist(),
                             "layer_delta_bits": np.asarray(layers.delta_bits).tolist(),
                             "layer_ablations": list(probes.LAYER_ABLATIONS)}
        per_seed.append(entry)
        if progress is not None:
            progress(len(per_seed), len(meta["seeds"]))
    return {"format": FORMAT, "experiment": "windtunnel_probe", "models": os.path.abspath(directory),
            "config": meta["config"], "seeds": [int(s) for s in meta["seeds"]], "sequences": sequences,
            "ablation_sequences": ablation_sequences, "probe_seed": probe_seed,
            "summary": summarise_probe(per_seed), "per_seed": per_seed,
            "wall_time_s": time.perf_counter() - t0, "provenance": finish(prov)}


def _stack(per_seed: list[dict], *path) -> np.ndarray:
    out = []
    for e in per_seed:
        v = e
        for p in path:
            v = v[p]
        out.append(v)
    return np.asarray(out, np.float64)


def _ms(v: np.ndarray) -> dict[str, Any]:
    return {"mean": json_floats(np.nanmean(v, axis=0)), "std": json_floats(seed_std(v))}


def summarise_probe(per_seed: list[dict]) -> dict[str, Any]:
    """Means and stds over seeds of the headline statistics: per layer (rows: the normed input of
    each block, then the final representation) PC1's share, the largest |r| with the entropy and the
    held-out R², trained, untrained and shuffled; layer 0's key cosines (mean over heads); the Q–K
    alignment per layer; the ablations."""
    s: dict[str, Any] = {}
    for which in ("trained", "untrained"):
        part = {"kl_bits": _ms(_stack(per_seed, which, "kl_bits"))}
        for stat in ("pc1_share", "max_abs_corr", "r2_test"):
            part[stat] = _ms(_stack(per_seed, which, "manifold", stat))
            part[f"shuffled_{stat}"] = _ms(_stack(per_seed, which, "shuffled", stat))
        part["key_offdiag_mean_layer0"] = _ms(_stack(per_seed, which, "key_offdiag_mean")[:, 0].mean(axis=-1))
        part["key_offdiag_abs_mean_layer0"] = _ms(_stack(per_seed, which, "key_offdiag_abs_mean")[:, 0].mean(axis=-1))
        part["qk_alignment"] = _ms(_stack(per_seed, which, "qk_alignment"))
        if "value_mass" in per_seed[0][which]:
            part["value_mass"] = _ms(_stack(per_seed, which, "value_mass"))
        if "attention_kl_seen_bits" in per_seed[0][which]:
            part["attention_kl_seen_bits"] = _ms(_stack(per_seed, which, "attention_kl_seen_bits"))
        s[which] = part
    s["position_only_r2_test"] = _ms(_stack(per_seed, "position_only_r2_test"))
    s["ablation"] = {"baseline_bits": _ms(_stack(per_seed, "ablation", "baseline_bits")),
                     "head_delta_bits": _ms(_stack(per_seed, "ablation", "head_delta_bits")),
                     "layer_delta_bits": _ms(_stack(per_seed, "ablation", "layer_delta_bits"))}
    return s


def format_probe(r: dict) -> str:
    """The command line's summary of :func:`probe_saved`'s result."""
    s = r["summary"]
    cfg = r["config"]
    task = ", ".join(f"{k}={v}" for k, v in cfg["task"].items() if k != "name")
    n = len(r["seeds"])
    lines = [f"probes of {r['models']}: {cfg['task']['name']} ({task}), d {cfg['d_model']}, {cfg['n_layers']} layers x "
             f"{cfg['n_heads']} heads; {n} seed(s), {r['sequences']} sequences; mean ± sd over seeds"]

    def pm(v, i=None, f=".3f"):
        m, sd = (v["mean"], v["std"]) if i is None else (v["mean"][i], None if v["std"] is None else v["std"][i])
        return f"{m:{f}}" if sd is None or (isinstance(sd, float) and math.isnan(sd)) else f"{m:{f}} ± {sd:{f}}"

    t, u = s["trained"], s["untrained"]
    lines.append(f"  KL(exact||model): trained {pm(t['kl_bits'], f='.4f')}, untrained {pm(u['kl_bits'], f='.4f')} bits")
    n_rows = len(t["pc1_share"]["mean"])
    lines.append("  layer   PC1 share (untrained, shuffled)   max|r| PC1-5 (untr., shuf.)   R² held out (untr., shuf.)")
    for i in range(n_rows):
        name = "final" if i == n_rows - 1 else f"in {i}"
        lines.append(f"  {name:6s}  {pm(t['pc1_share'], i)} ({pm(u['pc1_share'], i)}, {pm(t['shuffled_pc1_share'], i)})"
                     f"   {pm(t['max_abs_corr'], i)} ({pm(u['max_abs_corr'], i)}, {pm(t['shuffled_max_abs_corr'], i)})"
                     f"   {pm(t['r2_test'], i)} ({pm(u['r2_test'], i)}, {pm(t['shuffled_r2_test'], i)})")
    lines.append(f"  position-only predictor of the entropy: R² held out {pm(s['position_only_r2_test'])}")
    lines.append(f"  layer-0 key cosines (mean over heads): signed {pm(t['key_offdiag_mean_layer0'])} (untrained "
                 f"{pm(u['key_offdiag_mean_layer0'])}), |cos| {pm(t['key_offdiag_abs_mean_layer0'])} (untrained "
                 f"{pm(u['key_offdiag_abs_mean_layer0'])})")
    lines.append("  Q-K alignment per layer: " + ", ".join(
        f"{pm(t['qk_alignment'], i)} (untr. {pm(u['qk_alignment'], i)})" for i in range(len(t["qk_alignment"]["mean"]))))
    a = s["ablation"]
    head = np.asarray(a["head_delta_bits"]["mean"], float)
    layer = np.asarray(a["layer_delta_bits"]["mean"], float)
    li, hi = np.unravel_index(np.argmax(head), head.shape)
    lines.append(f"  ablations (KL change, bits; baseline {pm(a['baseline_bits'], f='.4f')}): largest head L{li}H{hi} "
                 f"+{head[li, hi]:.3f}; per layer bypass {np.round(layer[0], 3).tolist()}, no attention "
                 f"{np.round(layer[1], 3).tolist()}, no feed-forward {np.round(layer[2], 3).tolist()}")
    return "\n".join(lines)


def plot_probe(r: dict, path=None, *, dpi: int = 150, directory: str | None = None):
    """Left: PCA of the final representation at the supervised positions, coloured by the exact
    entropy (the first seed's trained model; recomputed from the saved model); middle: the same for
    its untrained model; right: PC1's share and the held-out R² of the entropy per layer, trained
    against untrained and shuffled (mean over seeds)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    ax_t, ax_u, ax_l = fig.subplots(1, 3)
    directory = directory or r["models"]
    seed = r["seeds"][0]
    model, config = load_windtunnel_model(directory, seed)
    untrained = build_model(config, jax.random.split(seed_key(seed), 3)[1])
    task = config.task
    positions = tuple(int(i) for i in task.supervised)
    k_probe = jax.random.split(jax.random.key(r["probe_seed"]), 3)[0]
    sample = jax.vmap(task.sample)(jax.random.split(k_probe, r["sequences"]))
    for ax, m, title in ((ax_t, model, "trained"), (ax_u, untrained, "untrained")):
        out = probes.probe_batch(m, sample.tokens)  # type: ignore[arg-type]  # a saved GPT (checked when probed)
        pts = probes.supervised_points(out.normed[:, -1], sample.posterior, positions)
        z = np.asarray(pts.z, np.float64)
        z = z - z.mean(axis=0)
        _, sv, vt = np.linalg.svd(z, full_matrices=False)
        share = sv ** 2 / np.sum(sv ** 2)
        xy = z @ vt[:2].T
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(pts.entropy_bits), s=4, cmap="viridis")
        ax.set_xlabel(f"PC1 ({100 * share[0]:.0f} %)")
        ax.set_ylabel(f"PC2 ({100 * share[1]:.0f} %)")
        ax.set_title(f"final representation, {title} (seed {seed})", fontsize=9)
        fig.colorbar(sc, ax=ax, label="exact entropy (bits)")
    s = r["summary"]
    rows = np.arange(len(s["trained"]["pc1_share"]["mean"]))
    for key, style, label in (("pc1_share", "o-", "PC1 share"), ("r2_test", "s-", "R² of entropy (held out)")):
        ax_l.plot(rows, s["trained"][key]["mean"], style, color="C0" if key == "pc1_share" else "C1", label=f"{label}, trained")
        ax_l.plot(rows, s["untrained"][key]["mean"], style, color="C0" if key == "pc1_share" else "C1", alpha=0.4,
                  label=f"{label}, untrained")
    ax_l.plot(rows, s["trained"]["shuffled_r2_test"]["mean"], "x--", color="C1", alpha=0.6, label="R², entropy shuffled")
    ax_l.axhline(s["position_only_r2_test"]["mean"], color="k", ls=":", lw=1, label="R², position only")
    ax_l.set_xticks(rows, [f"in {i}" for i in rows[:-1]] + ["final"])
    ax_l.set_xlabel("layer (normed input of each block; final after the last norm)")
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=7, frameon=False)
    cfg = r["config"]
    fig.suptitle(f"Probes: {cfg['task']['name']} "
                 f"({', '.join(f'{k}={v}' for k, v in cfg['task'].items() if k != 'name')}), d {cfg['d_model']}, "
                 f"{cfg['n_layers']} x {cfg['n_heads']}, {len(r['seeds'])} seeds", fontsize=11)
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig
