"""The public surface: every name in __all__ exists, moved names say where they went."""

import types

import pytest

import gradattn as ga


def test_all_names_resolve_and_are_unique():
    assert len(ga.__all__) == len(set(ga.__all__))
    for name in ga.__all__:
        assert getattr(ga, name) is not None, name
    assert callable(ga.sweep) and isinstance(ga.dynamics, types.ModuleType)


def test_no_private_names_exported():
    assert not [n for n in ga.__all__ if n.startswith("_")]


@pytest.mark.parametrize("name, module", [("feedback_stats", "dynamics"), ("pca_spectrum", "geometry"),
                                          ("bayes_loss", "bayes"), ("blocked_pass", "blocked")])
def test_moved_diagnostics_name_their_new_home(name, module):
    with pytest.raises(AttributeError, match=f"gradattn.{module}.{name}"):
        getattr(ga, name)
    assert callable(getattr(getattr(ga, module) if module != "blocked" else __import__("gradattn.blocked").blocked, name))


def test_unknown_name_is_a_plain_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        ga.nonsense
