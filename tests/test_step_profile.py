"""benchmarks/step_profile.py puts each op of a profiled AdaMatch step in the group it belongs to."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import step_profile  # noqa: E402


@pytest.mark.parametrize("norm, forward_op, backward_op", [
    ("bn", "aten::native_batch_norm", "aten::native_batch_norm_backward"),
    ("uan", "adamatch_uan::mixture_forward", "adamatch_uan::mixture_backward"),
])
def test_the_norm_layers_ops_fall_in_the_norm_groups_and_the_rest_outside(norm, forward_op, backward_op):
    row = step_profile.profile("shallow_cnn", norm, "fp32-nchw", batch=2, uratio=1, steps=1, top=None)
    ops = {group: set(by_name) for group, by_name in row["top_ops_ms"].items()}
    every = {name for group in ops for name in ops[group]}
    assert row["groups_ms"]["norm forward"] > 0 and row["groups_ms"]["norm backward"] > 0
    assert forward_op in every and backward_op in every  # the profile saw the norm's own ops at all
    assert forward_op not in ops["rest"] | ops["norm backward"] and backward_op not in ops["rest"] | ops["norm forward"]
    assert "aten::convolution_backward" in ops["convolution"]
    assert not any("norm" in name for name in ops["convolution"] | ops["pool, ReLU"])
    assert row["step_ms"] == pytest.approx(sum(row["groups_ms"].values()))


def test_the_gradient_sums_at_a_residual_input_are_not_the_norms():
    """WRN's blocks feed their input to the norm and to the shortcut: the engine adds the two gradients
    after the norm's node, for BatchNorm as for UAN (whose last node is a view's); neither norm owns the add."""
    row = step_profile.profile("wide_resnet", "bn", "fp32-nchw", batch=2, uratio=1, steps=1, top=None)
    assert "aten::add_" in row["top_ops_ms"]["rest"]
    assert "aten::add_" not in row["top_ops_ms"]["norm backward"]


def test_the_budget_is_what_uan_layers_may_cost_for_the_target():
    rows = {"bn": {"step_ms": 190.0, "groups_ms": {"norm forward": 10.0, "norm backward": 20.0}},
            "uan": {"step_ms": 250.0, "groups_ms": {"norm forward": 40.0, "norm backward": 50.0}}}
    text = step_profile.markdown({k: {**v, "groups_ms": {g: v["groups_ms"].get(g, 0.0) for g in step_profile.GROUPS}}
                                  for k, v in rows.items()}, target=0.95)
    # 190 / 0.95 = 200 ms for UAN's step, of which 250 − 90 = 160 is not its norm layers: 40 ms left for them.
    assert "may cost 40.0 ms per step, against 90.0 ms measured (BatchNorm's: 30.0 ms)" in text
    assert "UAN/BN 0.76" in text


def test_a_compiled_mode_is_refused_rather_than_profiled_uncompiled():
    with pytest.raises(ValueError, match="bf16-nhwc-compiled"):
        step_profile.profile("shallow_cnn", "bn", "bf16-nhwc-compiled", batch=2, uratio=1, steps=1)
