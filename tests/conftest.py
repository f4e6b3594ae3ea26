"""Test configuration: float64 is enabled so laws can be compared to autodiff at 1e-9.

Library code must never rely on this: float32 tests pass float32 arrays explicitly and assert the
dtype of what comes back.

Two suites: ``make test`` runs ``-m "not slow"`` (the quick one, for every change) and
``make test-all`` runs everything, the ``slow`` end-to-end runs included (CI runs this one). A test
is slow either by its own ``@pytest.mark.slow`` or by being named in ``SLOW`` below (for files whose
tests are marked here rather than in place). Tests that compare with the PyTorch reference need the
``bench`` extra (``make test-all`` installs it); without torch they are skipped, saying so.
"""

import functools
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The command keeps compiled programs in a cache under the user's home; tests never write there
# (tests of the cache give it a directory of their own).
os.environ["GRADATTN_NO_COMPILATION_CACHE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

# file -> test functions (every parametrization of each) that are end-to-end runs: the deep
# protocol run end to end, the CLI training a deep model, float32 at the paper's length N = 1999.
SLOW = {
    "test_deep.py": (
        "test_head_laws_of_a_model",
        "test_one_seed_one_result_and_run_contents",
        "test_protocol_dropout_off_at_evaluation_and_fresh_data",
        "test_two_timescale_scales_every_value_projection",
    ),
    "test_cli.py": ("test_deep_writes_json_with_the_heldout_table",),
    "test_laws.py": ("test_float32_at_paper_size",),
    "test_blocked.py": ("test_float32_at_paper_length_stays_float32_and_close",),
}
# ... and, to keep `make test` under its time, the longest compiles of properties whose quicker
# neighbours stay in the quick suite (each still runs in `make test-all`):
SLOW.update({
    "test_deep.py": (*SLOW["test_deep.py"], "test_deep_experiment_json_text_and_plot",
                     "test_bayes_loss_is_the_tasks_own_at_its_noise_level"),
    "test_bijection_study.py": ("test_the_head_trains_on_the_laws_and_autodiff_is_the_batch_loss_differentiated",),
    "test_write_failures.py": ("test_cache_recovers_from_a_full_disk_and_says_so_in_one_line",),
    "test_windtunnel.py": ("test_trained_parameters_and_checkpoints_are_saved_and_load_back",
                           "test_hmm_is_measured_at_longer_lengths_on_the_same_draws",
                           "test_one_seed_one_result_whatever_its_neighbours",
                           "test_command_line_resumes_a_wind_tunnel_sweep_and_saves_the_resumed_seeds",
                           "test_geometric_checkpoints_are_denser_early_and_hold_the_parameters_of_their_steps",
                           "test_checkpoint_dynamics_json_recomputes_the_verdict"),
    "test_mechanism.py": ("test_the_runs_arms_start_together_and_move_by_their_own_rates",
                          "test_seed_s_is_em_vs_sgds_seed_s", "test_frozen_groups_do_not_move",
                          "test_frozen_groups_stay_put_at_every_checkpoint_and_freeze_output_freezes_w_o",
                          "test_uniform_attention_has_no_gain_and_no_correlation",
                          "test_a_seeds_mechanism_result_does_not_depend_on_its_neighbours",
                          "test_a_seeds_feedback_result_does_not_depend_on_its_neighbours",
                          "test_mechanism_verdict_is_recomputed_from_the_json", "test_feedback_verdict_is_recomputed_from_the_json",
                          "test_feedback_growth_at_the_peak_and_undecided_below_min_seeds", "test_reports_and_figures",
                          "test_tiny_runs_from_the_command_line", "test_loop_statistics_are_their_definitions"),
    "test_probes.py": ("test_ablations_of_the_deep_transformer_drop_the_output_bias_too",
                       "test_probe_forward_of_the_deep_transformer", "test_float32_models_probe_in_float32",
                       "test_manifold_statistics_against_numpy_layer_by_layer",
                       "test_layer_ablations_are_the_model_with_that_output_removed",
                       "test_shuffling_the_covariate_destroys_the_signal",
                       "test_qk_alignment_of_one_pass_is_that_of_each_prefix"),
    "test_windtunnel_probe.py": ("test_probe_command_json_summary_and_controls",
                                 "test_probe_command_refuses_bad_input"),
    "test_token_models.py": ("test_per_head_laws_hold_inside_the_token_gpt_float64",),
    "test_incontext_hmm.py": ("test_sampling_is_pure_and_batches",
                              "test_a_longer_task_draws_the_same_hmm_and_the_same_first_steps",
                              "test_paths_follow_the_given_rows", "test_discretisation_of_rows_where_the_walk_laps_the_row"),
    "test_bijection_tokens.py": ("test_sampled_posteriors_are_the_enumerated_ones", "test_sample_is_pure_jits_and_vmaps"),
    "test_cli.py": (*SLOW["test_cli.py"], "test_ctrl_c_stops_with_one_line_and_exit_130"),
    "test_bad_input_paths.py": ("test_the_file_lands_where_the_os_resolves_dot_dot",),
    "test_nn.py": ("test_taps_dropout_and_perturbation",),
    "test_training.py": ("test_batch_weights_shared_or_per_sequence_and_per_step",),
    "test_baselines.py": ("test_lstm_without_positions_takes_any_length", "test_mlp_architecture_detail_by_detail"),
    "test_bijection.py": ("test_em_vs_sgd_runs_on_the_task",),
    "test_tasks.py": ("test_larger_noise_leaves_the_posterior_uncertain", "test_sticky_chain_bayes_loss_near_h_min"),
    "test_blocked.py": (*SLOW["test_blocked.py"], "test_one_validation_per_eager_call"),
    "test_dynamics.py": ("test_probe_inside_training_scan_under_vmap",),
    "test_plateau_manifold.py": ("test_plateau_attention_entropy_recomputed",),
    "test_memory.py": ("test_estimate_is_above_xla_and_within_the_tested_factor",),
})
SLOW["test_bijection.py"] = (*SLOW["test_bijection.py"], "test_one_head_can_express_the_elimination")
# Long compiles whose neighbours in make test check the same property (the presets by the config
# tests, the rates by the arm table, the architecture by the parameter count, the names by the
# registry tests), moved to make test-all to keep make test within its budget.
for _file, _names in {
    "test_windtunnel.py": ("test_command_line_presets_and_flags",),
    "test_mechanism.py": ("test_one_step_is_the_hand_made_sgd_update_of_each_group",),
    "test_cli.py": ("test_seeds_beyond_2_to_the_32_do_not_collide",),
    "test_token_models.py": ("test_architecture_detail_by_detail",),
    "test_training.py": ("test_grad_source_names_and_auto",),
    "test_bad_input.py": ("test_self_prob_zero_has_no_numpy_warning",),
}.items():
    SLOW[_file] = (*SLOW.get(_file, ()), *_names)

# Tests that compare with the PyTorch reference (torch comes with the bench extra).
TORCH = {
    "test_deep.py": ("test_optimizer_is_pytorch_adamw_with_cosine_annealing_and_clipping",),
    "test_nn.py": ("test_same_model_as_pytorch",),
    "test_tasks.py": ("test_reference_means_are_torchs_seed_zero_draw",),
}
TORCH_SKIP_REASON = ("PyTorch is not installed: this comparison with the PyTorch reference needs the bench "
                     "extra (pip install -e '.[bench]'); `make test-all` installs it and runs it")


def _named(table, item):
    return getattr(item, "originalname", item.name) in table.get(item.path.name, ())


def pytest_collection_modifyitems(config, items):
    # A name in SLOW or TORCH that its (collected) module no longer defines is an error, so a
    # renamed test cannot silently move into the quick suite.
    modules = {item.path.name: item.module for item in items if getattr(item, "module", None) is not None}
    for table in (SLOW, TORCH):
        for file, names in table.items():
            if file in modules:
                missing = [n for n in names if not hasattr(modules[file], n)]
                if missing:
                    raise pytest.UsageError(f"tests/conftest.py names {missing} in {file}, which defines no such test")
    for item in items:
        if _named(SLOW, item):
            item.add_marker(pytest.mark.slow)
        if _named(TORCH, item) and not _has_torch():
            item.add_marker(pytest.mark.skip(reason=TORCH_SKIP_REASON))


@functools.cache
def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
