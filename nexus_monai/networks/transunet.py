"""3D TransUNet: a CNN encoder, a ViT bottleneck over its deepest feature map, and a U-Net decoder.

Re-implemented in 3D from the description in Chen et al. 2021, "TransUNet: Transformers Make Strong
Encoders for Medical Image Segmentation" (arXiv:2102.04306). No code was copied from the authors'
(2D) implementation or any other project; the network is assembled from MONAI building blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock, UnetOutBlock, UnetResBlock, UnetUpBlock
from monai.utils import optional_import
from torch import nn

_, _HAS_EINOPS = optional_import("einops")

__all__ = ["TransUNet"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TransUNet: {name} must be a positive int, got {value!r}.")
    return value


def _norm_type(norm_name: tuple | str) -> str:
    name = norm_name[0] if isinstance(norm_name, tuple) else norm_name
    return str(name).lower()


class TransUNet(nn.Module):
    """3D TransUNet (Chen et al. 2021), re-implemented in 3D from the paper's description.

    Hybrid CNN-Transformer encoder with a U-Net decoder, as in "TransUNet: Transformers Make Strong
    Encoders for Medical Image Segmentation" (Chen et al., 2021, arXiv:2102.04306). The paper is 2D
    (ResNet-50 + ViT-B/16, cascaded bilinear upsampler); this is an independent 3D re-implementation
    from its description, built from MONAI blocks, with no code copied from any project.

    Architecture (``f = feature_size``, ``d = depth``, ``C_i = f * 2**i``):

    * CNN encoder, ``d + 1`` stages of MONAI ``UnetResBlock`` (two 3x3x3 convs + residual,
      norm + LeakyReLU). Stage 0 keeps full resolution (``in_channels -> C_0``); stage ``i`` in
      ``1..d`` downsamples by stride 2 (``C_{i-1} -> C_i``), so the deepest map is
      ``(B, C_d, X / 2**d, Y / 2**d, Z / 2**d)``. Stages ``0..d-1`` feed the skip connections.
    * ViT bottleneck on the deepest map only: MONAI ``PatchEmbeddingBlock`` with patch size 1
      (a 1x1x1 conv ``C_d -> hidden_size``, one token per voxel of the deepest grid) plus a
      learnable positional embedding, ``num_layers`` pre-norm MONAI ``TransformerBlock`` s and a final
      ``LayerNorm``. The tokens are reshaped back to the grid and a ``UnetResBlock``
      (``hidden_size -> C_d``) maps them to decoder channels (the paper's "reshape + 3x3 conv").
      The deepest CNN features reach the decoder only through the transformer (no bypass), as in
      the paper. Because the positional embedding has one entry per token, the network has a fixed
      input size ``img_size``; use ``monai.inferers.SlidingWindowInferer(roi_size=img_size)`` for
      larger volumes.
    * U-Net decoder: ``d`` MONAI ``UnetUpBlock`` s (2x transposed conv, concatenation with the
      encoder skip of the same resolution, two 3x3x3 convs), ``C_i -> C_{i-1}`` for ``i = d..1``.
    * Output: MONAI ``UnetOutBlock``, a 1x1x1 conv ``C_0 -> out_channels`` giving logits (no
      activation; pair with e.g. ``DiceCELoss(sigmoid=True)`` or ``softmax=True``).

    For ``img_size=(96, 96, 64)``, ``depth=3``, ``feature_size=16`` the stages are
    16 @ 96x96x64, 32 @ 48x48x32, 64 @ 24x24x16, 128 @ 12x12x8, i.e. 12*12*8 = 1152 tokens of
    width ``hidden_size`` in the transformer.

    Shapes: ``(B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z)`` with ``(X, Y, Z) == img_size``
    (``(B, C, X, Y)`` when ``spatial_dims=2``).

    Args:
        in_channels (int): number of input channels (e.g. MRI contrasts). Default ``2``.
        out_channels (int): number of output channels (classes / label maps). Default ``3``.
        img_size (Sequence[int] | int): fixed spatial input size ``(X, Y, Z)``; an int is used for
            every axis. Each entry must be divisible by ``2**depth``. Default ``(64, 64, 64)``.
        feature_size (int): channels of the first CNN stage; stage ``i`` has
            ``feature_size * 2**i``. Default ``16``.
        depth (int): number of stride-2 downsamplings before the transformer (also the number of
            decoder up-blocks). Default ``3``.
        hidden_size (int): token width of the transformer; must be divisible by ``num_heads``.
            Default ``128``.
        num_layers (int): number of transformer blocks. Default ``4``.
        num_heads (int): attention heads per transformer block. Default ``4``.
        mlp_dim (int): hidden width of each transformer block's MLP. Default ``256``.
        dropout_rate (float): dropout in ``[0, 1]`` for the embedding, attention and MLP of the
            transformer (the CNN parts have none). Default ``0.0``.
        norm_name (tuple | str): normalisation of the conv blocks, any MONAI norm spec
            (``"instance"``, ``"batch"``, ``("group", {"num_groups": 4})``...). Default ``"instance"``.
        spatial_dims (int): 3 (volumes) or 2 (images). Default ``3``.

    Raises:
        ValueError: on invalid arguments (non-positive sizes, ``img_size`` not divisible by
            ``2**depth`` or of the wrong length, ``hidden_size`` not divisible by ``num_heads``,
            ``dropout_rate`` outside ``[0, 1]``, a single-voxel bottleneck with instance norm), and
            in ``forward`` on an input whose shape does not match ``in_channels`` / ``img_size``.
        ImportError: if ``einops`` (needed by MONAI's transformer blocks) is not installed.

    Example::

        net = TransUNet(in_channels=2, out_channels=3, img_size=(96, 96, 64))
        logits = net(torch.zeros(1, 2, 96, 96, 64))  # (1, 3, 96, 96, 64)
    """

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 3,
        img_size: Sequence[int] | int = (64, 64, 64),
        feature_size: int = 16,
        depth: int = 3,
        hidden_size: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_dim: int = 256,
        dropout_rate: float = 0.0,
        norm_name: tuple | str = "instance",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"TransUNet: spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("feature_size", feature_size),
            ("depth", depth),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
        ):
            _positive_int(name, value)
        if hidden_size % num_heads != 0:
            raise ValueError(
                f"TransUNet: hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})."
            )
        if not 0.0 <= float(dropout_rate) <= 1.0:
            raise ValueError(f"TransUNet: dropout_rate must be in [0, 1], got {dropout_rate!r}.")

        sizes = (img_size,) * spatial_dims if isinstance(img_size, int) else tuple(img_size)
        if len(sizes) != spatial_dims:
            raise ValueError(
                f"TransUNet: img_size {tuple(sizes)} must have {spatial_dims} entries (spatial_dims={spatial_dims})."
            )
        for s in sizes:
            _positive_int("each img_size entry", s)
        factor = 2**depth
        if any(s % factor for s in sizes):
            raise ValueError(
                f"TransUNet: every img_size entry must be divisible by 2**depth = {factor} "
                f"(depth={depth} stride-2 downsamplings), got img_size={sizes}."
            )
        grid = tuple(s // factor for s in sizes)
        if math.prod(grid) == 1 and _norm_type(norm_name).startswith("instance"):
            raise ValueError(
                f"TransUNet: img_size={sizes} with depth={depth} leaves a single-voxel bottleneck grid {grid}, "
                "which instance norm cannot normalise; use a smaller depth or a larger img_size."
            )
        if not _HAS_EINOPS:
            raise ImportError("TransUNet needs einops (MONAI's transformer blocks use it): pip install einops.")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = sizes
        self.depth = depth
        self.spatial_dims = spatial_dims
        self.hidden_size = hidden_size
        self.feature_grid = grid
        self.num_tokens = math.prod(grid)
        channels = [feature_size * 2**i for i in range(depth + 1)]
        self.channels = tuple(channels)

        # CNN encoder: stage 0 at full resolution, stages 1..depth downsample by 2.
        self.encoder = nn.ModuleList(
            [UnetResBlock(spatial_dims, in_channels, channels[0], kernel_size=3, stride=1, norm_name=norm_name)]
            + [
                UnetResBlock(spatial_dims, channels[i - 1], channels[i], kernel_size=3, stride=2, norm_name=norm_name)
                for i in range(1, depth + 1)
            ]
        )

        # ViT bottleneck: one token per voxel of the deepest map (patch size 1), learnable positions.
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=channels[depth],
            img_size=grid,
            patch_size=1,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        blocks = []
        for _ in range(num_layers):
            block = TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate=dropout_rate, qkv_bias=True)
            # MONAI always builds a LayerNorm for cross-attention; unused here, it would leave
            # parameters without gradients (DistributedDataParallel rejects those by default).
            block.norm_cross_attn = nn.Identity()
            blocks.append(block)
        self.transformer = nn.Sequential(*blocks)
        self.transformer_norm = nn.LayerNorm(hidden_size)
        # Tokens reshaped to the grid -> decoder channels (the paper's "reshape + conv").
        self.bottleneck = UnetResBlock(
            spatial_dims, hidden_size, channels[depth], kernel_size=3, stride=1, norm_name=norm_name
        )

        # U-Net decoder: decoder[j] goes from level depth-j to level depth-j-1 with that level's skip.
        self.decoder = nn.ModuleList(
            [
                UnetUpBlock(
                    spatial_dims,
                    channels[i],
                    channels[i - 1],
                    kernel_size=3,
                    stride=1,
                    upsample_kernel_size=2,
                    norm_name=norm_name,
                )
                for i in range(depth, 0, -1)
            ]
        )
        self.out = UnetOutBlock(spatial_dims, channels[0], out_channels)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"TransUNet expects a torch.Tensor, got {type(x).__name__}.")
        expected = (self.in_channels, *self.img_size)
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"TransUNet expects input of shape (B, {', '.join(map(str, expected))}) "
                f"(in_channels={self.in_channels}, img_size={self.img_size}; the learnable positional "
                f"embedding fixes {self.num_tokens} tokens on a {self.feature_grid} grid), got {tuple(x.shape)}. "
                "Crop/pad or resample to img_size, or run monai.inferers.SlidingWindowInferer(roi_size=img_size)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in_channels, *img_size)`` to logits ``(B, out_channels, *img_size)``."""
        self._check_input(x)
        skips = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        deepest = skips.pop()  # (B, C_depth, *feature_grid): goes only through the transformer

        tokens = self.patch_embedding(deepest)  # (B, num_tokens, hidden_size)
        tokens = self.transformer_norm(self.transformer(tokens))
        h = tokens.transpose(1, 2).reshape(tokens.shape[0], self.hidden_size, *self.feature_grid)
        h = self.bottleneck(h)

        for up, skip in zip(self.decoder, reversed(skips)):
            h = up(h, skip)
        return self.out(h)
