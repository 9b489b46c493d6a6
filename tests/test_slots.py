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
