"""Vision Transformer (Dosovitskiy et al. 2021): pre-norm blocks, CLS token, learned position embeddings.

Written with plain nn.Linear layers (not nn.MultiheadAttention, whose fused in_proj parameter would hide the
weights from masks). Module names are a contract with the pruning code:

- `patch_embed` (Conv2d, role "patch_embed") is the ViT's input layer: rules that treat the stem specially must
  treat "patch_embed" the same way;
- `blocks.<i>.attn.qkv` ("attn_qkv") and `blocks.<i>.attn.proj` ("attn_out");
- `blocks.<i>.mlp.fc1` ("mlp_fc1"), `blocks.<i>.mlp.act` (an nn.Module, so Synaptic Stripping can hook each
  neuron's activation), `blocks.<i>.mlp.fc2` ("mlp_fc2");
- `head` ("classifier") reads the final CLS token.

`vit_strip` is the ViT of the Synaptic Stripping experiments, with its own module names (see its docstring):
`patch_embed` (a Linear on flattened patches), `blocks.<i>.attn.{q,k,v,o}`, `blocks.<i>.mlp.{fc1,act1,fc2,act2}`
(both MLP linears feed a ReLU module), `norm` and `head`.
"""

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import ModelConfigError, require_positive, set_role
from models.registry import preset, register_model

Activation = Literal["relu", "gelu"]


class Attention(nn.Module):
    """Multi-head self-attention with separate qkv and output projections, via scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = set_role(nn.Linear(dim, 3 * dim), "attn_qkv")
        self.proj = set_role(nn.Linear(dim, dim), "attn_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=drop)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return F.dropout(self.proj(out), p=self.dropout, training=self.training)


class MLP(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout; `act` is a module so its per-neuron outputs can be hooked."""

    def __init__(self, dim: int, hidden: int, activation: Activation, dropout: float) -> None:
        super().__init__()
        self.fc1 = set_role(nn.Linear(dim, hidden), "mlp_fc1")
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = set_role(nn.Linear(hidden, dim), "mlp_fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, activation: Activation, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, hidden, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding + CLS token + position embedding -> blocks -> LayerNorm -> linear head on the CLS token."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        activation: Activation,
        dropout: float,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = set_role(nn.Conv2d(in_channels, dim, patch_size, stride=patch_size), "patch_embed")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        hidden = max(1, int(dim * mlp_ratio))
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden, activation, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = set_role(nn.Linear(dim, num_classes), "classifier")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears and patch embedding, small normal embeddings (the JAX ViT recipe).

        The head is Xavier too rather than zero (the fine-tuning habit): magnitude- and flow-based pruning scores of
        an all-zero layer would be meaningless at initialisation.
        """
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(self.pos_drop(x + self.pos_embed)))
        return self.head(x[:, 0])


@register_model("vit")
def vit(
    in_channels: int,
    image_size: int,
    num_classes: int,
    *,
    patch_size: int = 16,
    dim: int = 768,
    depth: int = 12,
    heads: int = 12,
    mlp_ratio: float = 4.0,
    activation: Activation = "gelu",
    dropout: float = 0.0,
) -> nn.Module:
    """Generic ViT; defaults are ViT-B/16. `dropout` applies to embeddings, attention, projections and MLPs."""
    require_positive(patch_size=patch_size, dim=dim, depth=depth, heads=heads)
    if image_size % patch_size != 0:
        raise ModelConfigError(
            f"image_size {image_size} is not divisible by patch_size {patch_size}; "
            f"set data.image_size to a multiple of {patch_size}"
        )
    if dim % heads != 0:
        raise ModelConfigError(f"dim {dim} is not divisible by heads {heads}; set dim to a multiple of {heads}")
    if mlp_ratio <= 0:
        raise ModelConfigError(f"option mlp_ratio must be > 0, got {mlp_ratio}")
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"option dropout must be in [0, 1), got {dropout}")
    return VisionTransformer(
        in_channels, image_size, num_classes, patch_size, dim, depth, heads, float(mlp_ratio), activation, dropout
    )


# Synaptic Stripping's CIFAR ViT: 32 px images in 4 px patches (8x8 = 64 tokens), ReLU MLPs to strip.
register_model("vit_cifar")(preset(vit, patch_size=4, dim=384, depth=7, heads=8, mlp_ratio=4.0, activation="relu"))
register_model("vit_s16")(preset(vit, patch_size=16, dim=384, depth=12, heads=6, mlp_ratio=4.0, activation="gelu"))
register_model("vit_b16")(preset(vit, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0, activation="gelu"))


# ---------------------------------------------------------------------------------------------------------------
# The ViT of the Synaptic Stripping experiments
# ---------------------------------------------------------------------------------------------------------------

AttentionScaling = Literal["post_softmax", "scaled"]
PatchEmbedding = Literal["linear", "conv"]


class StripAttention(nn.Module):
    """Self-attention with separate q, k, v and output linears, as in the stripping work's code.

    ``post_softmax`` (faithful default): softmax(q k^T) / sqrt(dim), i.e. unscaled logits, and the probabilities
    divided after the softmax by the square root of the whole width (not the head width). ``scaled``: the standard
    softmax(q k^T / sqrt(head_dim)).
    """

    def __init__(self, dim: int, heads: int, dropout: float, scaling: AttentionScaling) -> None:
        super().__init__()
        self.heads = heads
        self.scaling = scaling
        self.q = set_role(nn.Linear(dim, dim), "attn_qkv")
        self.k = set_role(nn.Linear(dim, dim), "attn_qkv")
        self.v = set_role(nn.Linear(dim, dim), "attn_qkv")
        self.o = set_role(nn.Linear(dim, dim), "attn_out")
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.scaling == "scaled":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (torch.softmax(q @ k.transpose(-2, -1), dim=-1) / math.sqrt(dim)) @ v
        return self.drop(self.o(out.transpose(1, 2).reshape(batch, tokens, dim)))


class StripMLP(nn.Module):
    """fc1 -> act1 -> drop1 -> fc2 -> act2 -> drop2: the original's second ReLU lets fc2's neurons die too."""

    def __init__(self, dim: int, hidden: int, dropout: float, out_relu: bool) -> None:
        super().__init__()
        self.fc1 = set_role(nn.Linear(dim, hidden), "mlp_fc1")
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = set_role(nn.Linear(hidden, dim), "mlp_fc2")
        self.act2 = nn.ReLU() if out_relu else nn.Identity()
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.act2(self.fc2(self.drop1(self.act1(self.fc1(x))))))


class StripBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, scaling: AttentionScaling,
                 out_relu: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = StripAttention(dim, heads, dropout, scaling)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = StripMLP(dim, hidden, dropout, out_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class StrippingViT(nn.Module):
    """Patches -> linear embedding, CLS token and position embeddings drawn from N(0, 1) -> blocks -> the CLS
    token through LayerNorm + Linear. Linears and norms keep PyTorch's default initialisation, as the original."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, patch_size: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float, dropout: float, attention: AttentionScaling, mlp_out_relu: bool,
                 patch_embed: PatchEmbedding) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_features = in_channels * patch_size * patch_size
        if patch_embed == "linear":
            self.patch_embed = set_role(nn.Linear(patch_features, dim), "patch_embed")
        else:
            self.patch_embed = set_role(nn.Conv2d(in_channels, dim, patch_size, stride=patch_size), "patch_embed")
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, dim))
        hidden = max(1, int(dim * mlp_ratio))
        self.blocks = nn.Sequential(*[StripBlock(dim, heads, hidden, dropout, attention, mlp_out_relu)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = set_role(nn.Linear(dim, num_classes), "classifier")

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, patches, dim): each p x p patch flattened in (row, column, channel) order."""
        if isinstance(self.patch_embed, nn.Conv2d):
            return self.patch_embed(x).flatten(2).transpose(1, 2)
        p = self.patch_size
        batch, channels, height, width = x.shape
        patches = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.patch_embed(patches.reshape(batch, (height // p) * (width // p), p * p * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))


@register_model("vit_strip")
def vit_strip(
    in_channels: int,
    image_size: int,
    num_classes: int,
    *,
    patch_size: int = 4,
    dim: int = 384,
    depth: int = 7,
    heads: int = 8,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
    attention: AttentionScaling = "post_softmax",
    mlp_out_relu: bool = True,
    patch_embed: PatchEmbedding = "linear",
) -> nn.Module:
    """The ViT of the Synaptic Stripping work (defaults: 32 px images in 4 px patches, hidden 384, 7 layers, 8 heads,
    MLP ratio 4), faithful by default and each quirk switchable:

    - ``attention: post_softmax`` divides the softmax output by sqrt(dim), the whole width, after the softmax (the
      original code); ``scaled`` is standard attention, softmax(q k^T / sqrt(dim / heads));
    - ``mlp_out_relu: true``: Linear -> ReLU -> Dropout -> Linear -> ReLU -> Dropout, so both MLP linears have
      neurons that can die (false: no ReLU after fc2, the usual transformer MLP);
    - ``patch_embed: linear``: a Linear on flattened patches (``conv``: the equivalent strided Conv2d).
    """
    require_positive(patch_size=patch_size, dim=dim, depth=depth, heads=heads)
    if image_size % patch_size != 0:
        raise ModelConfigError(
            f"image_size {image_size} is not divisible by patch_size {patch_size}; "
            f"set data.image_size to a multiple of {patch_size}"
        )
    if dim % heads != 0:
        raise ModelConfigError(f"dim {dim} is not divisible by heads {heads}; set dim to a multiple of {heads}")
    if mlp_ratio <= 0:
        raise ModelConfigError(f"option mlp_ratio must be > 0, got {mlp_ratio}")
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"option dropout must be in [0, 1), got {dropout}")
    return StrippingViT(in_channels, image_size, num_classes, patch_size, dim, depth, heads, float(mlp_ratio),
                        dropout, attention, mlp_out_relu, patch_embed)
