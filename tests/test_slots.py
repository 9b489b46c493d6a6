import pytest
import torch
from torch import nn

from adamatch_uan.models.slots import NormSlot, SlotBuilder
from adamatch_uan.norm import UAN, BatchNorm

SLOTS = ("input", "a", "b")


@pytest.mark.parametrize("norm_at, chosen", [("all", {"a", "b"}), ("input", {"input"}), ("none", set()),
                                              (["input", "b"], {"input", "b"})])
def test_norm_at_picks_slots(norm_at, chosen):
    slot = SlotBuilder(SLOTS, "bn", norm_at, {})
    built = {name: slot(name, 4).layer for name in SLOTS}
    assert {name for name, layer in built.items() if isinstance(layer, BatchNorm)} == chosen
    assert all(isinstance(layer, nn.Identity) for name, layer in built.items() if name not in chosen)


def test_unknown_slots_and_bad_norm_are_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown norm slots \['c'\].*'input', 'a', 'b'"):
        SlotBuilder(SLOTS, "bn", ["c"], {})
    with pytest.raises(ValueError, match="norm_at"):
        SlotBuilder(SLOTS, "bn", "everywhere", {})
    with pytest.raises(ValueError, match="--norm"):
        SlotBuilder(SLOTS, "groupnorm", "all", {})


def test_context_reaches_only_context_aware_layers():
    seen = []

    class Spy(nn.Module):
        uses_context = True

        def forward(self, x, context=None):
            seen.append(context)
            return x

    context = torch.tensor([0, 1])
    assert NormSlot(Spy())(torch.randn(2, 3), context) is not None and seen == [context]
    plain = NormSlot(nn.BatchNorm1d(3))
    assert not plain.takes_context
    plain(torch.randn(2, 3), context)  # BatchNorm1d would fail if it got the context
    assert NormSlot(UAN(3, num_contexts=2)).takes_context


def test_a_norm_per_slot_with_a_default_and_slot_options():
    slot = SlotBuilder(SLOTS, {"input": {"norm": "uan_ctx", "num_components": 2}, "default": "bn"}, "all", {})
    built = {name: slot(name, 4).layer for name in SLOTS}
    assert isinstance(built["input"], UAN) and built["input"].num_components == 2 and built["input"].num_contexts == 2
    assert isinstance(built["a"], BatchNorm) and isinstance(built["b"], BatchNorm)
    only = SlotBuilder(SLOTS, {"b": "uan"}, "all", {})  # no default: unnamed slots stay empty
    assert isinstance(only("b", 4).layer, UAN) and isinstance(only("a", 4).layer, nn.Identity)
    where = SlotBuilder(SLOTS, {"input": "uan", "default": "bn"}, ["a"], {})  # the default goes where norm_at says
    assert isinstance(where("a", 4).layer, BatchNorm) and isinstance(where("b", 4).layer, nn.Identity)


def test_bad_norm_mappings_name_the_slot_and_the_choices():
    with pytest.raises(ValueError, match=r"Unknown norm slots \['c'\].*'default', 'input', 'a', 'b'"):
        SlotBuilder(SLOTS, {"c": "bn"}, "all", {})
    with pytest.raises(ValueError, match=r"slot 'input'.*'groupnorm'.*--norm"):
        SlotBuilder(SLOTS, {"input": "groupnorm", "default": "bn"}, "all", {})
    with pytest.raises(ValueError, match=r"'bn' accepts in slot 'a'.*num_components"):
        SlotBuilder(SLOTS, {"input": "uan", "default": "bn"}, "all", {"num_components": 2})


def test_backbones_take_a_norm_per_slot():
    from adamatch_uan.models import make_backbone

    for backbone in ("shallow_cnn", "wide_resnet"):
        model = make_backbone(backbone, 10, norm={"input": {"norm": "uan_ctx", "num_components": 2}, "default": "bn"})
        uans = [m for m in model.modules() if isinstance(m, UAN)]
        assert len(uans) == 1 and model.input.layer is uans[0] and model.input.takes_context
        assert sum(isinstance(m, BatchNorm) for m in model.modules()) > 3
        y = model(torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]))
        y.sum().backward()
        assert uans[0].prior_logits.grad is not None


def test_describe_names_a_norm_choice():
    from adamatch_uan.models.slots import describe

    assert describe("uan") == "uan"
    assert describe({"input": {"norm": "uan_ctx", "num_components": 2}, "default": "bn"}) == "input=uan_ctx,default=bn"
