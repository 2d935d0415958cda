"""Small models for the audit tests: healthy ones, and broken variants that each carry one
defect the audit must name.  Every factory takes no arguments (the CLI loads them as
``audit_models:NAME``) and seeds its own weights, so a run is reproducible."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D, H, VOCAB = 32, 2, 50


def _seed():
    torch.manual_seed(0)


class Block(nn.Module):
    """One transformer block: attention + MLP, pre-, post- or peri-norm."""

    def __init__(self, placement: str = "pre", norm=nn.LayerNorm):
        super().__init__()
        self.placement = placement
        self.ln1, self.ln2 = norm(D), norm(D)
        if placement == "peri":
            self.ln1_out, self.ln2_out = norm(D), norm(D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def _attn(self, x):
        return self.attn(x, x, x, need_weights=False)[0]

    def forward(self, x):
        if self.placement == "post":
            x = self.ln1(x + self._attn(x))
            return self.ln2(x + self.mlp(x))
        if self.placement == "peri":
            x = x + self.ln1_out(self._attn(self.ln1(x)))
            return x + self.ln2_out(self.mlp(self.ln2(x)))
        x = x + self._attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, placement: str = "pre", n_layers: int = 2, norm=nn.LayerNorm):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(placement, norm) for _ in range(n_layers))
        self.final = norm(D) if placement != "post" else nn.Identity()
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.final(x))


def _randomize(model):
    """Random γ/β (init gives 1/0), so a dropped γ or β shows in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm, NaiveFP16RMSNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn_like(m.bias) * 0.1)
    return model.eval()


def pre_ln():
    _seed()
    return _randomize(TinyTransformer("pre"))


def post_ln():
    _seed()
    return _randomize(TinyTransformer("post"))


def peri_ln():
    _seed()
    return _randomize(TinyTransformer("peri"))


class LSTMWithLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, D, batch_first=True)
        self.ln = nn.LayerNorm(D)
        self.out = nn.Linear(D, 4)

    def forward(self, x):
        return self.out(self.ln(self.lstm(x)[0]))


def lstm_ln():
    _seed()
    return _randomize(LSTMWithLN())


class CNN(nn.Module):
    def __init__(self, track_running_stats: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, track_running_stats=track_running_stats)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def cnn_bn():
    _seed()
    m = CNN()
    m.train()
    with torch.no_grad():  # a few batches so the running statistics are not the init ones
        for _ in range(3):
            m(torch.randn(8, 3, 16, 16))
    return m.eval()


# ----------------------------------------------------------------------------------------------
# Broken variants: each carries exactly one defect
# ----------------------------------------------------------------------------------------------


def nan_gamma():
    m = pre_ln()
    with torch.no_grad():
        m.blocks[1].ln2.weight[3] = float("nan")
    return m


def dead_gamma():
    m = pre_ln()
    with torch.no_grad():
        m.blocks[0].ln1.weight.zero_()
    return m


def frozen_gamma():
    m = pre_ln()
    m.final.weight.requires_grad_(False)
    m.final.bias.requires_grad_(False)
    return m


def keras_eps():
    """A port that kept Keras' default eps in one layer."""
    m = pre_ln()
    m.blocks[0].ln2.eps = 1e-3
    return m


def zero_eps():
    m = pre_ln()
    m.blocks[1].ln1.eps = 0.0
    return m


def big_eps():
    """An eps far above the variance of the activations it normalises."""
    m = pre_ln()
    m.final.eps = 50.0
    return m


def train_mode():
    m = pre_ln()
    m.blocks[0].mlp.insert(2, nn.Dropout(0.1))
    return m.train()


def cnn_batch_stats():
    """BatchNorm without running statistics: eval outputs depend on the batch."""
    _seed()
    return CNN(track_running_stats=False).eval()


class SeqBN(nn.Module):
    """A sequence model with BatchNorm over features (running stats: batch-independent in eval,
    but normalised with training-batch statistics)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.bn = nn.BatchNorm1d(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(self.bn(x.transpose(1, 2)).transpose(1, 2))


def seq_bn():
    _seed()
    m = SeqBN()
    with torch.no_grad():
        m.bn.running_mean.normal_(0, 0.1)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


class NaiveFP16RMSNorm(nn.Module):
    """An RMSNorm that squares in the input dtype: x² overflows float16 beyond |x| ≈ 256."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)  # no upcast: the defect
        return x * torch.rsqrt(var + self.eps) * self.weight


def fp16_naive_rms():
    _seed()
    return _randomize(TinyTransformer("pre", norm=NaiveFP16RMSNorm))


def rms_healthy():
    _seed()
    return _randomize(TinyTransformer("pre", norm=lambda n: nn.RMSNorm(n, eps=1e-5)))


class OutlierLN(nn.Module):
    """Massive activations: one channel 300× the others before a norm (as in LLMs)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, D)
        self.ln = nn.LayerNorm(D)
        self.out = nn.Linear(D, 4)
        with torch.no_grad():
            self.inp.weight[5] *= 300

    def forward(self, x):
        return self.out(self.ln(self.inp(x)))


def outlier_channel():
    _seed()
    return _randomize(OutlierLN())


class PlainTensorGammaLayerNorm(nn.Module):
    """γ kept as a plain tensor attribute: never in state_dict, lost by every checkpoint."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = torch.rand(n) + 0.5
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)


def unsaved_gamma():
    m = pre_ln()
    m.final = PlainTensorGammaLayerNorm(D)
    return m


class BiasDroppingLN(nn.LayerNorm):
    """A LayerNorm with a legacy key conversion that drops β when loading."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "bias", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # torch reports the popped key as missing; the converter "fixes" that by hiding it
        if prefix + "bias" in missing_keys:
            missing_keys.remove(prefix + "bias")


def bias_dropping_load():
    m = pre_ln()
    old = m.blocks[1].ln2
    new = BiasDroppingLN(D)
    new.load_state_dict(old.state_dict())
    m.blocks[1].ln2 = new
    return m.eval()


class ExportOnlyLN(nn.LayerNorm):
    """An "export-friendly" path that forgets the mean subtraction when exporting."""

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return F.rms_norm(x, self.normalized_shape, None, self.eps) * self.weight + self.bias
        return super().forward(x)


def export_divergent():
    m = pre_ln()
    old = m.blocks[1].ln1
    new = ExportOnlyLN(D)
    new.load_state_dict(old.state_dict())
    m.blocks[1].ln1 = new
    return m.eval()


class TinyEpsRMSNorm(nn.Module):
    """A hand-written RMSNorm with eps=1e-12: the dynamo exporter's optimizer drops the
    `+ eps` (the 'small eps exported as 0.0' pitfall)."""

    def __init__(self, n, eps=1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype) * self.weight


def tiny_eps_rms():
    _seed()
    m = TinyTransformer("pre")
    m.final = TinyEpsRMSNorm(D)
    return _randomize(m)


class StaleCacheLN(nn.LayerNorm):
    """Keeps a copy of γ made at construction and uses it in forward: loading new weights
    leaves the copy stale, so the export carries other values than the module's γ."""

    def __init__(self, n):
        super().__init__(n)
        self.register_buffer("_gamma_cache", self.weight.detach().clone(), persistent=False)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self._gamma_cache, self.bias, self.eps)


def stale_gamma():
    m = pre_ln()
    old = m.final
    new = StaleCacheLN(D)
    new.load_state_dict(old.state_dict())  # γ is random now, the cache still holds ones
    m.final = new
    return m.eval()


def pre_ln_with_inputs():
    """A factory that returns (model, example_inputs)."""
    return pre_ln(), (torch.randint(0, VOCAB, (2, 7)),)


class NaiveVarianceLayerNorm(nn.Module):
    """var = E[x²] - E[x]²: cancels catastrophically when the mean is large against the spread."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x * x).mean(-1, keepdim=True) - mean * mean
        return (x - mean) * torch.rsqrt(var.clamp_min(0) + self.eps) * self.weight + self.bias


class OffsetMLP(nn.Module):
    """Activations around +300 with unit spread before the norm."""

    def __init__(self, norm):
        super().__init__()
        self.inp = nn.Linear(16, D)
        self.ln = norm(D)
        self.out = nn.Linear(D, 4)
        with torch.no_grad():
            self.inp.bias.fill_(300.0)

    def forward(self, x):
        return self.out(self.ln(self.inp(x)))


def naive_variance():
    _seed()
    return OffsetMLP(NaiveVarianceLayerNorm).eval()


def offset_healthy():
    _seed()
    return OffsetMLP(nn.LayerNorm).eval()


class Unexportable(nn.Module):
    """An op neither ONNX exporter can translate (a Bessel function)."""

    def forward(self, x):
        return x + 1e-3 * torch.special.bessel_j0(x)


def unexportable():
    m = pre_ln()
    m.blocks[0].mlp.append(Unexportable())
    return m.eval()


class ExportOnlyHead(nn.Module):
    """An "export-friendly" activation swap after the last norm: the norms all agree with ONNX
    Runtime, the model output does not."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, VOCAB)

    def forward(self, x):
        act = F.relu if torch.onnx.is_in_onnx_export() else F.gelu
        return self.proj(act(x))


def export_divergent_head():
    m = pre_ln()
    m.head = ExportOnlyHead()
    _seed()
    return m.eval()


class DeadNormBranch(TinyTransformer):
    """Computes a norm whose result is never used: the exporter drops its nodes."""

    def __init__(self):
        super().__init__("pre")
        self.aux_norm = nn.LayerNorm(D)

    def forward(self, ids):
        x = self.embed(ids)
        self.aux_norm(x)  # dead code left over from an experiment
        for b in self.blocks:
            x = b(x)
        return self.head(self.final(x))


def dead_norm_branch():
    _seed()
    return _randomize(DeadNormBranch())


# ----------------------------------------------------------------------------------------------
# Norm shapes: a norm over one feature, a norm whose width its neighbours do not use, and
# healthy models with several widths, channel norms and per-head norms (no finding)
# ----------------------------------------------------------------------------------------------

SEQ = 8  # the sequence length the audit synthesises for token-id models


def _value_head(norm: nn.Module):
    m = pre_ln()
    m.head = nn.Sequential(nn.Linear(D, 1), norm)  # one scalar per token, then "normalised"
    return _randomize(m)


def single_feature_ln():
    """A scalar head normalised by LayerNorm(1): x − mean(x) = 0, so it outputs β."""
    return _value_head(nn.LayerNorm(1))


def single_feature_rms():
    """A scalar head normalised by RMSNorm(1): x/√(x²+eps)·γ, only the sign of x survives."""
    return _value_head(nn.RMSNorm(1, eps=1e-5))


class SeqAxisNorm(nn.Module):
    """LayerNorm over the sequence axis (a transpose too many): it runs, since the sequence is
    SEQ tokens long, but normalises each feature across tokens instead of each token's D
    features."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(SEQ)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.proj(self.embed(ids))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)


def seq_axis_norm():
    _seed()
    return _randomize(SeqAxisNorm())


class Funnel(nn.Module):
    """An MLP that narrows 64 → 32 → 16, a LayerNorm at each width."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(),
            nn.Linear(64, 32), nn.LayerNorm(32), nn.GELU(),
            nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 4))

    def forward(self, x):
        return self.layers(x)


def funnel():
    _seed()
    return _randomize(Funnel())


class ConvNeXtLike(nn.Module):
    """Norms over the channels of a conv net: LayerNorm on channels-last features (permute,
    LayerNorm(C), pointwise MLP, permute back), GroupNorm and BatchNorm on channels-first."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.pw = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
        self.gn = nn.GroupNorm(4, 16)
        self.down = nn.Conv2d(16, 24, 2, stride=2)
        self.bn = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.ln(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = self.bn(self.down(F.gelu(self.gn(x))))
        return self.fc(x.mean((2, 3)))


def convnext_like():
    _seed()
    return _randomize(ConvNeXtLike())


class HeadNormAttention(nn.Module):
    """Attention with per-head q/k norms over head_dim (as Qwen3 and OLMo do): the norm sees
    (batch, seq, heads, head_dim) from a Linear of width heads·head_dim."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.q_norm, self.k_norm = nn.RMSNorm(D // H, eps=1e-6), nn.RMSNorm(D // H, eps=1e-6)
        self.o = nn.Linear(D, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        b, t, _ = x.shape
        q = self.q_norm(self.q(x).view(b, t, H, D // H)).transpose(1, 2)
        k = self.k_norm(self.k(x).view(b, t, H, D // H)).transpose(1, 2)
        v = self.v(x).view(b, t, H, D // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, D))


def head_norm_attention():
    _seed()
    return _randomize(HeadNormAttention())


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar 2019): g·x/‖x‖ with one scalar g: a γ of shape (1,) over D
    features is not a norm over one feature."""

    def __init__(self, eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1) * D ** 0.5)
        self.eps = eps

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


def scale_norm():
    m = pre_ln()
    m.final = ScaleNorm()
    return m.eval()
