"""Masked Autoencoder with a ViT backbone, a drop-in for the official ``models_mae.py``.

Same constructor keywords, same ``forward(imgs, mask_ratio) -> (loss, pred, mask)``, same
parameter names and shapes (official checkpoints load with a plain ``load_state_dict``), same
initialisation and the same draw of masking noise, so that one seed gives one mask in both.
Beyond the official code: any ``(H, W)`` input size, an optional ``noise=`` argument, and an
encoder that accepts a different input size than it was built for (sin-cos tables regenerated).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from . import attention, matmul
from .pos_embed import Size2, sincos_pos_embed, to_2tuple
from .weight_init import init_linear_and_norm, init_patch_embed

__all__ = [
    "MaskedAutoencoderViT",
    "block_rows",
    "gather_patches",
    "masking_indices",
    "patchify",
    "random_masking",
    "unpatchify",
]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs: (N, C, H, W) -> (N, L, p*p*C), patches row-major, pixels ordered (p, p, C)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: Size2 | None = None) -> torch.Tensor:
    """x: (N, L, p*p*C) -> (N, C, H, W); ``grid_size`` (gh, gw) defaults to a square grid."""
    n, length, dim = x.shape
    p = patch_size
    if grid_size is None:
        side = int(length**0.5)
        grid_size = (side, side)
    gh, gw = to_2tuple(grid_size)
    if gh * gw != length:
        raise ValueError(f"{length} patches do not form a {gh}x{gw} grid; pass grid_size")
    c = dim // (p * p)
    x = x.reshape(n, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, gh * p, gw * p)


def kept_patches(length: int, mask_ratio: float) -> int:
    """How many of ``length`` patches the masking keeps visible (the official ``len_keep``)."""
    return int(length * (1 - mask_ratio))


def masking_indices(
    n: int, length: int, mask_ratio: float, noise: Optional[torch.Tensor] = None, device=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise, as in the official code.

    Args:
        n, length: batch size and patches per image (L).
        mask_ratio: fraction of patches removed; ``int(L * (1 - mask_ratio))`` are kept.
        noise: (N, L) sort keys; drawn as ``torch.rand(N, L)`` when omitted.

    Returns:
        ids_keep: (N, len_keep) the kept patches, in shuffled order.
        mask: (N, L), 0 is keep, 1 is remove, in the original patch order.
        ids_restore: (N, L) indices that undo the shuffle.
    """
    len_keep = kept_patches(length, mask_ratio)
    if noise is None:
        noise = torch.rand(n, length, device=device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length, device=noise.device)  # fp32 even under autocast
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle[:, :len_keep], mask, ids_restore


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks patch tokens x: (N, L, D) -> x_masked (N, len_keep, D) in shuffled order, mask
    (N, L) and ids_restore (N, L); see :func:`masking_indices`."""
    n, length, dim = x.shape
    ids_keep, mask, ids_restore = masking_indices(n, length, mask_ratio, noise, x.device)
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    return x_masked, mask, ids_restore


def gather_patches(imgs: torch.Tensor, patch_size: int, ids: torch.Tensor) -> torch.Tensor:
    """The patches ``ids`` of each image: (N, C, H, W), (N, K) -> (N, K, C*p*p), pixels
    ordered (C, p, p) as a patch-embedding kernel (D, C, p, p) flattens; a remainder of H or
    W beyond whole patches is ignored, as by the strided convolution."""
    n, c, h, w = imgs.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = imgs[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)
    rows, cols = ids // gw, ids % gw  # (N, K)
    x = x[torch.arange(n, device=ids.device)[:, None], :, rows, :, cols, :]  # (N, K, C, p, p)
    return x.reshape(n, ids.shape[1], c * p * p)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block``s in turn, each attention on the faster kernel for ``x``: fused, or
    written out (bf16 on CPU; :mod:`mae_transfer.attention`), through timm's own switch."""
    fused = not attention.explicit_attention_faster(x)
    for blk in blocks:
        blk.attn.fused_attn = fused
        x = blk(x)
    return x


def block_rows(blk: Block, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """What timm ``Block`` ``blk`` outputs at the tokens ``rows`` only: (N, T, D), (N, K) ->
    (N, K, D). Keys and values come from every token; the queries, the output projection and
    the MLP run on the K rows (the per-token work a block's other outputs would cost)."""
    attn = blk.attn
    n, t, d = x.shape
    h = blk.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    split = attn.num_heads * attn.head_dim
    idx = rows.unsqueeze(-1)
    h_rows = torch.gather(h, 1, idx.expand(-1, -1, d))
    q = matmul.linear(h_rows, w[:split], None if b is None else b[:split])
    kv = matmul.linear(h, w[split:], None if b is None else b[split:])
    q = attn.q_norm(q.reshape(n, -1, attn.num_heads, attn.head_dim).transpose(1, 2))
    k, v = kv.reshape(n, t, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    k = attn.k_norm(k)
    dropout = attn.attn_drop.p if attn.training else 0.0
    y = attention.attention(q, k, v, dropout_p=dropout, scale=attn.scale)
    y = attn.norm(y.transpose(1, 2).reshape(n, -1, split))
    if getattr(attn, "gate", None) is not None:
        y = y * attn.gate(h_rows).sigmoid()
    y = attn.proj_drop(attn.proj(y))
    x = torch.gather(x, 1, idx.expand(-1, -1, d)) + blk.drop_path1(blk.ls1(y))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone (He et al. 2021)."""

    def __init__(
        self,
        img_size: Size2 = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # Encoder. strict_img_size=False: other input sizes are allowed, see _pos_embed().
        self.patch_embed = PatchEmbed(
            self.img_size, patch_size, in_chans, embed_dim, strict_img_size=False
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos table; a frozen Parameter (not a buffer) to keep the official key type.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)

        # Decoder.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    decoder_embed_dim,
                    decoder_num_heads,
                    mlp_ratio,
                    qkv_bias=True,
                    norm_layer=norm_layer,
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self._sincos_cache: Dict[tuple, torch.Tensor] = {}
        self.initialize_weights()
        matmul.route_linears(self)  # fp32 products on the CPU's faster library (same names)

    @property
    def grid_size(self) -> Tuple[int, int]:
        return self.patch_embed.grid_size

    def initialize_weights(self) -> None:
        """Official init: sin-cos tables, xavier-uniform Linear/patch conv, normal(0.02) tokens."""
        grid = self.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid))
        init_patch_embed(self.patch_embed.proj)
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_norm)

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    # -- helpers ---------------------------------------------------------------------------
    def _pos_embed(self, table: nn.Parameter, grid: Tuple[int, int]) -> torch.Tensor:
        """The (1, 1 + gh*gw, D) sin-cos table for ``grid``: the stored one at the built size."""
        if grid == self.grid_size:
            return table
        key = (*grid, table.shape[-1], str(table.device), table.dtype)
        if key not in self._sincos_cache:
            emb = sincos_pos_embed(table.shape[-1], grid, device=table.device)
            self._sincos_cache[key] = emb.to(table.dtype)
        return self._sincos_cache[key]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, H, W) -> (N, L, p*p*C)."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid_size: Size2 | None = None) -> torch.Tensor:
        """x: (N, L, p*p*C) -> (N, C, H, W); the grid defaults to the model's when L matches."""
        if grid_size is None and x.shape[1] == self.grid_size[0] * self.grid_size[1]:
            grid_size = self.grid_size
        return unpatchify(x, self.patch_size, grid_size)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise=None):
        """x: (N, L, D) -> (x_masked, mask, ids_restore); see :func:`random_masking`."""
        return random_masking(x, mask_ratio, noise)

    # -- the three steps -------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise=None):
        """imgs: (N, C, H, W) -> latent (N, 1 + len_keep, D), mask (N, L), ids_restore (N, L).

        Only the kept patches are embedded: the patch embedding (a convolution of kernel =
        stride = p) maps each patch on its own, so embedding the kept quarter and embedding
        all patches then dropping three quarters (the official order) give the same tokens,
        for a quarter of its FLOPs forward and backward. The noise is drawn as officially
        (``torch.rand(N, L)``; the embedding draws nothing), so one seed gives one mask.
        """
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        pos = self._pos_embed(self.pos_embed, grid)
        n, length = imgs.shape[0], grid[0] * grid[1]
        ids_keep, mask, ids_restore = masking_indices(n, length, mask_ratio, noise, imgs.device)
        x = self.embed_patches(imgs, ids_keep)
        x = x + torch.gather(
            pos[:, 1:, :].expand(n, -1, -1), 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        )
        cls_token = self.cls_token + pos[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.norm(run_blocks(self.blocks, x))
        return x, mask, ids_restore

    def embed_patches(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The patch embedding of the patches ``ids`` only: (N, C, H, W), (N, K) -> (N, K, D)."""
        proj = self.patch_embed.proj
        patches = gather_patches(imgs, self.patch_size, ids)
        return self.patch_embed.norm(matmul.linear(patches, proj.weight.flatten(1), proj.bias))

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch, no masking: (N, C, H, W) -> (N, 1 + L, D) normalised
        tokens, class token first (what a k-NN or linear probe of the encoder reads)."""
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        pos = self._pos_embed(self.pos_embed, grid)
        x = self.patch_embed(imgs) + pos[:, 1:, :]
        cls_token = (self.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        return self.norm(run_blocks(self.blocks, x))

    def forward_decoder(
        self,
        x: torch.Tensor,
        ids_restore: torch.Tensor,
        grid: Tuple[int, int] | None = None,
        patches: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, 1 + len_keep, D) latent -> (N, L, p*p*C) predicted pixels of every patch, or
        with ``patches`` (N, K) patch indices, (N, K, p*p*C) of those patches only: the last
        block (past its keys and values), the norm and the head then run on them alone."""
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self._pos_embed(self.decoder_pos_embed, grid or self.grid_size)
        return self.decode(x, patches)

    def decode(self, x: torch.Tensor, patches: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's blocks, norm and head on its input tokens (N, 1 + L, D), class token
        first, positions added -> (N, L, p*p*C), or (N, K, p*p*C) at ``patches`` (N, K)."""
        if patches is None:
            x = self.decoder_norm(run_blocks(self.decoder_blocks, x))
            return self.decoder_pred(x)[:, 1:, :]
        rows = patches + 1  # the class token is row 0
        if len(self.decoder_blocks) == 0:
            x = torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        else:
            x = run_blocks(self.decoder_blocks[:-1], x)
            x = block_rows(self.decoder_blocks[-1], x, rows)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
        """Mean squared error per patch, averaged over the removed patches only.

        imgs: (N, C, H, W); pred: (N, L, p*p*C); mask: (N, L), 0 is keep, 1 is remove.
        """
        loss = self.patch_loss(pred, self.patchify(imgs))  # (N, L), loss per patch
        return (loss * mask).sum() / mask.sum()

    def patch_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean squared error of each patch, (N, K, p*p*C) twice -> (N, K), in fp32; the target
        normalised per patch first with ``norm_pix_loss``."""
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return (pred.float() - target.float()).pow(2).mean(dim=-1)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise=None, loss_only: bool = False
    ):
        """imgs: (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L)).

        ``loss_only``: pred is None, and the decoder predicts the removed patches only (what
        the loss reads): its last block's queries, output projection and MLP, the norm and the
        head skip the kept patches and the class token, ~1/4 of that block and of the head
        at mask 0.75 (~1.5% of a ViT-B step's FLOPs). The loss and every gradient are the same
        (up to rounding); training runs this way.
        """
        grid = (imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if not loss_only:
            pred = self.forward_decoder(latent, ids_restore, grid)
            return self.forward_loss(imgs, pred, mask), pred, mask
        # The removed patches: the last ones of the shuffle (kept first, then removed).
        removed = torch.argsort(ids_restore, dim=1)[:, latent.shape[1] - 1 :]
        pred = self.forward_decoder(latent, ids_restore, grid, removed)
        return self.removed_loss(imgs, pred, removed), None, mask

    def removed_loss(self, imgs: torch.Tensor, pred: torch.Tensor, removed: torch.Tensor):
        """The loss from the predictions (N, K, p*p*C) of the removed patches ``removed``
        (N, K) alone: what :meth:`forward_loss` gives from every patch's prediction."""
        index = removed.unsqueeze(-1).expand(-1, -1, pred.shape[-1])
        target = torch.gather(self.patchify(imgs), 1, index)
        return self.patch_loss(pred, target).mean()


def build_mae(norm_eps: float = 1e-6, **kwargs) -> MaskedAutoencoderViT:
    """MaskedAutoencoderViT with LayerNorm(eps=norm_eps), as all official factories use."""
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=norm_eps))
    return MaskedAutoencoderViT(**kwargs)
