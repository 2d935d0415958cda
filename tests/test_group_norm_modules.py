"""``normkit.nn.GroupNorm`` (a drop-in for torch's), ``convert`` of torch.nn.GroupNorm (and
InstanceNorm left alone, with the reason), and ``watch`` reading GroupNorm's statistics from the
kernel, on a tiny conv model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_to_ref

import normkit
from normkit.kernels import reference
from normkit.nn import GroupNorm


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.gn = torch.nn.GroupNorm(4, 16)
        self.conv2 = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.gn_plain = torch.nn.GroupNorm(2, 8, affine=False)
        self.gn_nobias = torch.nn.GroupNorm(8, 8, bias=False)
        self.inorm = torch.nn.InstanceNorm2d(8, affine=True)

    def forward(self, x):
        h = self.gn_plain(self.conv2(torch.relu(self.gn(self.conv1(x)))))
        return self.inorm(self.gn_nobias(h))


def test_drop_in_for_torch_group_norm():
    ours, theirs = GroupNorm(4, 12, eps=1e-4), torch.nn.GroupNorm(4, 12, eps=1e-4)
    assert isinstance(ours, torch.nn.GroupNorm)
    assert repr(ours) == "normkit.nn." + repr(theirs)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(3, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    truth = reference.group_norm(x.double(), 4, theirs.weight.double(), theirs.bias.double(),
                                 1e-4)[0]
    assert_close_to_ref(y, theirs(x), truth, torch.float32)
    assert GroupNorm(2, 4, affine=False).weight is None


def test_convert_replaces_group_norm_keeps_parameters_and_leaves_instance_norm():
    torch.manual_seed(0)
    model = _Conv()
    before = copy.deepcopy(model)
    weight = model.gn.weight
    got, plan = normkit.convert(model, return_plan=True)
    assert type(got.gn) is GroupNorm and type(got.gn_plain) is GroupNorm
    assert got.gn.weight is weight and got.gn_plain.weight is None
    assert got.gn_nobias.bias is None and got.gn_nobias.weight is not None
    assert got.gn.num_groups == 4 and got.gn.eps == 1e-5
    assert [(n.name, n.becomes) for n in plan.replaced] == [
        ("gn", "GroupNorm"), ("gn_plain", "GroupNorm"), ("gn_nobias", "GroupNorm")]
    skipped = {n.name: n.reason for n in plan.skipped}
    assert skipped == {"inorm": "no normkit module computes instance norms"}
    assert list(got.state_dict()) == list(before.state_dict())
    x = torch.randn(2, 3, 9, 9)
    truth = copy.deepcopy(before).double()(x.double())
    assert_close_to_ref(got(x), before(x), truth, torch.float32)
    back = normkit.revert(got)
    assert type(back.gn) is torch.nn.GroupNorm and back.gn.weight is weight


def test_convert_leaves_a_group_norm_with_its_own_forward():
    class Mine(torch.nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 2

    _, plan = normkit.convert(Mine(2, 4), return_plan=True)
    assert plan.skipped[0].reason == "it subclasses torch.nn.GroupNorm but overrides forward"


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_watch_reads_group_statistics_from_the_kernel(fmt):
    """The converted model's GroupNorm reports the kernel's per-(sample, group) statistics:
    the same rows, mean and std as watch computes for torch's GroupNorm from its input."""
    torch.manual_seed(1)
    model = _Conv().to(memory_format=fmt)
    converted = normkit.convert(copy.deepcopy(model))
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=fmt)
    summaries = []
    for m in (model, converted):
        with normkit.watch(m, model_name="conv", model_version="1") as w:
            m(x)
        summaries.append(w.summary())
    plain, ours = summaries
    for name in ("gn", "gn_plain", "gn_nobias"):
        assert ours[name]["rows"] == plain[name]["rows"] == 4 * model.get_submodule(name).num_groups
        assert ours[name]["norm"] == "group" and ours[name]["kind"] == "ln"
        for key in ("batch_size", "seq_len"):  # (B, C, H, W) has no sequence dim
            assert ours[name][key] == plain[name][key]
        for key in ("input_mean", "input_std"):
            assert ours[name][key] == pytest.approx(plain[name][key], rel=1e-4, abs=1e-5)
