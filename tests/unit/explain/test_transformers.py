"""LRP on vision transformers (explain/canonize/transformers.py): cp_lrp and attnlrp against LXT 2.1.

LXT's efficient mode computes relevance as input x modified gradient: LayerNorm with its standard
deviation detached, GELU by the identity rule, and for CP-LRP the query and key of attention
detached. With eps -> 0 our rules on the canonized graph give the same relevance (float64, random
weights), and on bias-free copies (biases, LayerNorm shifts, class token and position embeddings
zeroed) the input relevance of cp_lrp sums to the target score. AttnLRP's softmax rule does not
conserve (its bias-like term absorbs relevance), so attnlrp is checked against LXT's AttnLRP.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from heatmapbench.explain import LRP, get_explainer
from heatmapbench.explain.base import explaining
from heatmapbench import testing
from heatmapbench.explain.canonize import canonize

from tests.helpers import assert_same_snapshot, snapshot

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lxt.efficient")

torch.set_num_threads(2)
TINY = 1e-40  # eps -> 0: far below any activation of these nets in float64


def small_torchvision_vit(classes: int = 5) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=classes)


def timm_vit(name: str = "vit_tiny_patch16_224") -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=5, img_size=32, patch_size=8, depth=2)


class Logits(nn.Module):
    """A Hugging Face image classifier returning its logits (its ``ModelOutput`` unwrapped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_vit(attention: str = "sdpa") -> nn.Module:
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                                    hidden_size=16, intermediate_size=32, num_labels=5,
                                    attn_implementation=attention)
    return Logits(transformers.ViTForImageClassification(config))


def prepared(model: nn.Module) -> nn.Module:
    """float64, eval, every head randomised (torchvision zero-initialises the ViT head: scores 0)."""
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head" in name or "classifier" in name:
                p.normal_(0, 0.5)
    return model


def bias_free(model: nn.Module) -> nn.Module:
    return testing.bias_free(copy.deepcopy(model))


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([1, 3, 0, 2][:batch])


def ours(model: nn.Module, x: torch.Tensor, target: torch.Tensor, gates: str) -> torch.Tensor:
    with explaining(model):
        return LRP(epsilon=TINY, stabilizer=TINY, gates=gates).attribute(model, x.clone(), target)  # (B, C, H, W)


def lxt_relevance(model: nn.Module, x: torch.Tensor, target: torch.Tensor, patch_map: dict) -> torch.Tensor:
    """LXT efficient mode: input x gradient of the patched model."""
    with testing.lxt_patched(patch_map):
        x = x.clone().requires_grad_(True)
        out = model(x)
        (grad,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), x)
    return (grad * x).detach()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def lxt_cp_map() -> dict:
    from lxt.efficient.models.vit_torch import cp_LRP

    return cp_LRP


def lxt_attnlrp_hf_map() -> dict:
    """LXT's AttnLRP pieces for Hugging Face ViT: its attention wrapper (q, k gradients / 4, v / 2),
    LayerNorm with detached std, GELU by the identity rule (as its BERT map does)."""
    from functools import partial

    from lxt.efficient import patches
    from transformers.activations import GELUActivation
    from transformers.models.vit import modeling_vit

    return {
        modeling_vit: patches.patch_attention,
        nn.LayerNorm: partial(patches.patch_method, patches.layer_norm_forward),
        GELUActivation: partial(patches.patch_method, patches.non_linear_forward, keep_original=True),
    }


# --------------------------------------------------------------------------------------------
# cp_lrp against LXT's CP-LRP on torchvision ViTs


def test_cp_lrp_equals_lxt_on_a_torchvision_vit():
    model = prepared(small_torchvision_vit())
    x, target = inputs()
    before = snapshot(model)
    relevance = ours(model, x, target, "constant")
    reference = lxt_relevance(model, x, target, lxt_cp_map())
    # LXT's identity rule on GELU divides by (input + 1e-10): ~1e-9 from the exact rule
    assert relative_error(relevance, reference) <= 1e-6, relative_error(relevance, reference)
    assert_same_snapshot(before, snapshot(model))
    with torch.no_grad():  # the canonized graph computes the model's outputs (attention recomputed in parts)
        torch.testing.assert_close(canonize(model, gates="constant")(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_cp_lrp_equals_lxt_on_vit_b_16():
    import torchvision

    model = prepared(torchvision.models.vit_b_16(num_classes=10))
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3])
    relevance = ours(model, x, target, "constant")
    reference = lxt_relevance(model, x, target, lxt_cp_map())
    assert relative_error(relevance, reference) <= 1e-6, relative_error(relevance, reference)


# --------------------------------------------------------------------------------------------
# conservation on bias-free copies: torchvision, timm ViT / DeiT, Hugging Face ViT


MODELS = {
    "torchvision_vit": small_torchvision_vit,
    "timm_vit": timm_vit,
    "timm_deit": lambda: timm_vit("deit_tiny_patch16_224"),
    "timm_vit_explicit_attention": lambda: _unfused(timm_vit()),
    "hf_vit_sdpa": hf_vit,
    "hf_vit_eager": lambda: hf_vit("eager"),
}


def _unfused(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # q @ k^T, softmax, @ v written out
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_cp_lrp_conserves_relevance_on_bias_free_vits(name):
    model = bias_free(prepared(MODELS[name]()))
    x, target = inputs()
    with torch.no_grad():
        score = model(x)[torch.arange(len(x)), target]
    relevance = ours(model, x, target, "constant").sum((1, 2, 3))
    # eager HF attention computes its softmax in float32: weights (held constant) carry 1e-7 rounding
    tolerance = 1e-5 if name == "hf_vit_eager" else 1e-9
    torch.testing.assert_close(relevance, score, rtol=tolerance, atol=0.0)
    rules = canonize(model, gates="constant", example=x).rules_used
    assert "attention weights (softmax factor of a matrix product) held constant" in rules


@pytest.mark.parametrize("name", ["timm_vit", "hf_vit_sdpa"])
def test_cp_lrp_equals_gradient_rules_of_lxt_on_timm_and_hf(name):
    """LXT's CP-LRP patches (torch LayerNorm, GELU) applied by hand to the same attention: q, k
    detached. The timm and HF graphs, expanded from fused attention, must give LXT's relevance."""
    model = prepared(MODELS[name]())
    x, target = inputs()
    relevance = ours(model, x, target, "constant")
    reference = _detached_attention_reference(model, x, target)
    assert relative_error(relevance, reference) <= 1e-6, relative_error(relevance, reference)


def _detached_attention_reference(model, x, target):
    """LXT's LayerNorm / GELU patches, and F.scaled_dot_product_attention with q and k detached."""
    import torch.nn.functional as F
    from lxt.efficient import patches

    sdpa = F.scaled_dot_product_attention

    def cp_sdpa(q, k, v, *args, **kwargs):
        return sdpa(q.detach(), k.detach(), v, *args, **kwargs)

    patch_map = {nn.LayerNorm: lambda c: patches.patch_method(patches.layer_norm_forward, c),
                 nn.GELU: lambda c: patches.patch_method(patches.non_linear_forward, c, keep_original=True)}
    from timm.layers.norm import LayerNorm as TimmLayerNorm  # its own forward (F.layer_norm)
    from transformers.activations import GELUActivation

    patch_map[TimmLayerNorm] = patch_map[nn.LayerNorm]
    patch_map[GELUActivation] = lambda c: patches.patch_method(patches.non_linear_forward, c, keep_original=True)
    F.scaled_dot_product_attention = cp_sdpa
    try:
        return lxt_relevance(model, x, target, patch_map)
    finally:
        F.scaled_dot_product_attention = sdpa


# --------------------------------------------------------------------------------------------
# attnlrp against LXT's AttnLRP


def test_attnlrp_equals_lxt_attnlrp_on_hf_vit():
    model = prepared(hf_vit("eager"))
    x, target = inputs()
    relevance = ours(model, x, target, "uniform")
    reference = lxt_relevance(model, x, target, lxt_attnlrp_hf_map())
    assert relative_error(relevance, reference) <= 1e-6, relative_error(relevance, reference)
    # and it is a different method: CP-LRP's relevance differs
    assert relative_error(ours(model, x, target, "constant"), reference) > 1e-3


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention in other layouts, upsampling, shape-specialised tracing, refusals


class CrossAttention(nn.Module):
    """Sequence-first ``nn.MultiheadAttention`` whose query differs from its keys and values."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.norm = nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2)
        self.act = nn.GELU()  # a module: LXT's patch reaches modules only
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)  # (N, B, E)
        keys = self.norm(tokens)
        out, _ = self.attention(tokens * 0.5, keys, keys, need_weights=False)
        return self.head(self.act(out).mean(0))


def test_cp_lrp_on_sequence_first_cross_attention_equals_lxt():
    model = prepared(CrossAttention())
    x, target = inputs()
    relevance = ours(model, x, target, "constant")
    reference = lxt_relevance(model, x, target, lxt_cp_map())
    assert relative_error(relevance, reference) <= 1e-6, relative_error(relevance, reference)
    free = bias_free(model)
    with torch.no_grad():
        score = free(x)[torch.arange(2), target]
    torch.testing.assert_close(ours(free, x, target, "constant").sum((1, 2, 3)), score, rtol=1e-9, atol=0.0)


class Upsampling(nn.Module):
    """A ReLU net with nearest (module) and bilinear (functional) upsampling and a shape check."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        if y.shape[-1] < 16:  # control flow on a shape: torch.fx alone cannot trace it
            y = torch.nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)
        y = torch.relu(self.conv2(self.up(y)))
        return self.fc(y.mean((2, 3)))


def test_upsampling_is_exact_and_shape_checks_are_traced_for_the_input_shape():
    model = prepared(Upsampling())
    x, target = inputs()
    x = x[:, :, :16, :16]
    relevance = ours(model, x, target, "refuse").sum(1)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[torch.arange(2), target].sum(), xg)
    assert relative_error(relevance, (grad * x).sum(1)) <= 1e-9  # LRP-0 = gradient x input on ReLU nets
    graph = canonize(model, example=x)
    assert graph.specialised_to == ((2, 3, 16, 16), torch.float64)
    assert any("bilinear upsampling" in rule for rule in graph.rules_used)
    assert any("nearest upsampling" in rule for rule in graph.rules_used)
    wide = torch.randn(2, 3, 40, 40, dtype=torch.float64)  # the other branch: traced again for this shape
    assert canonize(model, example=wide).specialised_to[0] == (2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(canonize(model, example=wide)(wide), model(wide))


class Refused(nn.Module):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, E)
        if self.what == "mask":
            mask = torch.zeros(tokens.shape[1], tokens.shape[1], dtype=torch.bool)
            tokens = self.attention(tokens, tokens, tokens, attn_mask=mask, need_weights=False)[0]
        elif self.what == "square":
            tokens = tokens * tokens
        elif self.what == "bicubic":
            tokens = torch.nn.functional.interpolate(tokens, scale_factor=2.0, mode="linear")
            tokens = torch.nn.functional.interpolate(tokens, scale_factor=0.5, mode="nearest")
            grid = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bicubic")
            tokens = tokens + grid.mean((1, 2, 3))[:, None, None]
        elif self.what == "data":
            if bool(tokens.sum() > 0):
                tokens = -tokens
        return self.head(tokens.mean(1))


@pytest.mark.parametrize("what, message", [
    ("mask", r"nn.MultiheadAttention with masks has no rule here"),
    ("square", r"_operator.mul at graph node 'mul' \(.*test_transformers.py:\d+: tokens = tokens \* tokens\): "
               r"gates='constant' needs exactly one factor"),
    ("bicubic", r'interpolate at graph node .*mode="bicubic".*negative weights'),
    ("data", r"cannot trace it at .*test_transformers.py:\d+: if bool\(tokens.sum\(\) > 0\):"),
])
def test_what_remains_unsupported_is_refused_naming_the_line(what, message):
    model = Refused(what).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        get_explainer("cp_lrp")(model, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert_same_snapshot(before, snapshot(model))


def test_cp_lrp_and_attnlrp_are_registered_with_eps_0_01():
    for name, gates in (("cp_lrp", "constant"), ("attnlrp", "uniform")):
        explainer = get_explainer(name)
        assert (explainer.epsilon, explainer.gates, explainer.pooling, explainer.gamma) == (0.01, gates, "sum", 0.0)
        assert get_explainer(name, gamma=0.25).gamma == 0.25
    model = prepared(small_torchvision_vit())
    x, target = inputs()
    heatmap = get_explainer("cp_lrp")(model, x.float().double(), target)
    assert heatmap.shape == (2, 32, 32) and heatmap.dtype == torch.float32 and bool(torch.isfinite(heatmap).all())



def test_a_batch_norm_with_an_activation_inside_is_not_folded_as_affine():
    """timm's BatchNormAct2d (norm, then SiLU, in one BatchNorm subclass) is traced through: its
    F.batch_norm is an affine layer and the SiLU keeps its rule, so cp_lrp conserves on a bias-free
    EfficientNet-B0 (folded as a BatchNorm, the SiLU inside made the sum 40% off)."""
    torch.manual_seed(0)
    model = testing.bias_free(testing.randomize_batch_norm(timm.create_model("efficientnet_b0", num_classes=5)))
    model = model.double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1])
    with torch.no_grad():
        score = model(x)[0, 1]
    relevance = ours(model, x, target, "constant").sum()
    torch.testing.assert_close(relevance, score, rtol=1e-9, atol=0.0)


# --------------------------------------------------------------------------------------------
# the optional gamma rule on the linear layers of cp_lrp and attnlrp


@pytest.mark.parametrize("name", ["torchvision_vit", "hf_vit_sdpa"])
def test_gamma_rule_equals_zennits_gamma_on_the_linear_layers_of_vits(name):
    """cp_lrp and attnlrp with gamma: our one-pass gamma rule against Zennit's Gamma hooks on the same
    linear layers (token inputs (B, T, D), the patch convolution), the other rules shared; float64."""
    model = prepared(MODELS[name]())
    x, target = inputs()
    for gates in ("constant", "uniform"):
        with explaining(model):
            ours = LRP(epsilon=0.01, gamma=0.25, gates=gates).attribute(model, x.clone(), target)
            theirs = LRP(epsilon=0.01, gamma=0.25, gates=gates, engine="zennit").attribute(model, x.clone(), target)
            plain = LRP(epsilon=0.01, gates=gates).attribute(model, x.clone(), target)
        assert relative_error(ours, theirs) <= 1e-12, (gates, relative_error(ours, theirs))
        assert relative_error(ours, plain) > 1e-2  # gamma changes the heatmap: the comparison has teeth


@pytest.mark.parametrize("name", ["torchvision_vit", "timm_vit", "hf_vit_sdpa"])
def test_cp_lrp_with_gamma_conserves_relevance_on_bias_free_vits(name):
    model = bias_free(prepared(MODELS[name]()))
    x, target = inputs()
    with torch.no_grad():
        score = model(x)[torch.arange(len(x)), target]
    with explaining(model):
        relevance = LRP(epsilon=TINY, stabilizer=TINY, gamma=0.25, gates="constant").attribute(model, x.clone(), target)
    torch.testing.assert_close(relevance.sum((1, 2, 3)), score, rtol=1e-9, atol=0.0)
