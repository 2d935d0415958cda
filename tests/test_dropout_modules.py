"""``normkit.nn.FusedDropoutAddLayerNorm`` / ``FusedDropoutAddRMSNorm``, and ``convert`` fusing
Hugging Face BERT-style output blocks (dense → dropout → LayerNorm(h + input_tensor))."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import bits

import normkit
from normkit import _dropout
from normkit.nn import (
    FusedAddLayerNorm,
    FusedAddRMSNorm,
    FusedDropoutAddLayerNorm,
    FusedDropoutAddRMSNorm,
)

CASES = [(FusedDropoutAddLayerNorm, FusedAddLayerNorm, torch.nn.LayerNorm, normkit.layer_norm),
         (FusedDropoutAddRMSNorm, FusedAddRMSNorm, torch.nn.RMSNorm, normkit.rms_norm)]


@pytest.mark.parametrize("cls,plain,torch_cls,fn", CASES)
def test_state_dict_is_the_norms(cls, plain, torch_cls, fn):
    m = cls(16, p=0.2)
    ref = torch_cls(16)
    assert m.state_dict().keys() == ref.state_dict().keys()
    m.load_state_dict(ref.state_dict(), strict=True)
    assert "p=0.2" in repr(m)
    assert copy.deepcopy(m).p == 0.2


@pytest.mark.parametrize("cls,plain,torch_cls,fn", CASES)
def test_eval_mode_has_no_dropout(cls, plain, torch_cls, fn):
    m, ref = cls(16, p=0.5).eval(), plain(16).eval()
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    for a, b in zip(m(x, r), ref(x, r), strict=True):
        assert torch.equal(bits(a), bits(b))
    y, h = m(x)
    assert h is x


@pytest.mark.parametrize("cls,plain,torch_cls,fn", CASES)
def test_training_mode_drops_as_the_functional(cls, plain, torch_cls, fn):
    m = cls(16, p=0.3)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    y, h = m(x, r, seed=5)
    extra = (m.bias,) if cls is FusedDropoutAddLayerNorm else ()
    want = fn(x, 16, m.weight, *extra, m.eps, residual=r, dropout_p=0.3, seed=5,
              return_residual=True)
    assert torch.equal(y, want[0]) and torch.equal(h, want[1])
    # no seed: one per call from torch's generator
    torch.manual_seed(3)
    a = m(x, r)[0]
    b = m(x, r)[0]
    torch.manual_seed(3)
    assert torch.equal(m(x, r)[0], a) and not torch.equal(a, b)


@pytest.mark.parametrize("p,exc", [(1.5, ValueError), (-0.1, ValueError), ("0.1", TypeError)])
def test_bad_p_is_named(p, exc):
    for cls in (FusedDropoutAddLayerNorm, FusedDropoutAddRMSNorm):
        with pytest.raises(exc, match="dropout_p"):
            cls(8, p=p)


# ----------------------------------------------------------------------------------------------
# convert: BERT-style output blocks
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def _blocks(model):
    return [m for layer in model.encoder.layer
            for m in (layer.attention.output, layer.output)]


def test_convert_fuses_bert_output_blocks_exactly(bert):
    ids = torch.randint(0, 50, (2, 7))
    want = bert(ids).last_hidden_state
    fused, plan = normkit.convert(bert, inplace=False, return_plan=True)
    assert sum("fused with the dropout (p=0.1)" in p.note for p in plan.norms) == 4
    assert all(isinstance(b.LayerNorm, FusedDropoutAddLayerNorm) for b in _blocks(fused))
    assert fused.state_dict().keys() == bert.state_dict().keys()
    got = fused(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # eval: bit for bit the unfused conversion (the fused add is x + residual, rounded once)
    unfused = normkit.convert(bert, inplace=False)
    assert torch.equal(bits(unfused(ids).last_hidden_state), bits(got))
    # revert: the original blocks and norms back, sharing the parameters
    back = normkit.revert(fused)
    assert all(type(b.LayerNorm) is torch.nn.LayerNorm and "forward" not in vars(b)
               for b in _blocks(back))
    assert torch.equal(back(ids).last_hidden_state, want)


def test_convert_fused_block_in_training_mode(bert):
    fused = normkit.convert(bert, inplace=False).train()
    block = fused.encoder.layer[0].output
    x, inp = torch.randn(2, 5, 48), torch.randn(2, 5, 32)
    torch.manual_seed(11)
    got = block(x, inp)
    torch.manual_seed(11)
    seed = _dropout._draw_seed()
    ln = block.LayerNorm
    want = normkit.layer_norm(block.dense(x), 32, ln.weight, ln.bias, ln.eps, residual=inp,
                              dropout_p=0.1, seed=seed)
    assert torch.equal(got, want)


def test_convert_leaves_blocks_it_cannot_fuse(bert):
    model = copy.deepcopy(bert)
    model.encoder.layer[0].output.dropout.register_forward_hook(lambda *a: None)
    _, plan = normkit.convert(model, dry_run=True, return_plan=True)
    notes = {p.name: p.note for p in plan.norms}
    assert "fused" not in notes["encoder.layer.0.output.LayerNorm"]
    assert "fused" in notes["encoder.layer.0.attention.output.LayerNorm"]
    assert "forward" not in vars(model.encoder.layer[0].attention.output)  # a dry run
