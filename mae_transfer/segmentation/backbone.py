"""``MAEViT``: the 4-stage ViT pyramid as an mmseg backbone returning 4 NCHW maps."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch
from mmengine.logging import print_log
from mmseg.registry import MODELS

from mae_transfer.checkpoint import LoadReport, load_pretrained
from mae_transfer.pyramid import ViTPyramid, build_pyramid_vit


@MODELS.register_module()
class MAEViT(ViTPyramid):
    """MAE ViT + x4/x2/x1/x0.5 rescaling; outputs strides 4, 8, 16, 32 (D channels each).

    Args:
        model: registered encoder name (``vit_base_patch16``, ``vit_large_patch16``,
            ``vit_huge_patch14``, ...); ``embed_dim``/``depth``/``num_heads`` may override it.
        img_size: size the absolute position table is built for (any input size works).
        out_indices: the block ending each stage; default B (3, 5, 7, 11), L (7, 11, 15, 23),
            H (7, 15, 23, 31) as in BEiT / mmseg.
        norm: norm in the x4 path: 'SyncBN' (recipe), 'BN', 'LN' or 'GN'.
        rel_pos: 'bias' (BEiT's per-head table, zero-initialised), 'decomposed' or None.
        class_token: run the checkpoint's class token with the patch tokens (BEiT / mmseg; with
            rel_pos 'bias' or None and no windows); the outputs are of the patches only.
        init_values: layer-scale initial value (BEiT uses 0.1); None = no layer scale.
        pretrained: an MAE/ViT checkpoint, a file or an http(s) URL: official, ours,
            OpenMMLab's (mmseg's ``beit2mmseg`` files, mmpretrain's MAE) or Hugging Face's
            (``ViTMAE*``), in torch or safetensors format; same as
            ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
    """

    def __init__(
        self,
        model: str = "vit_base_patch16",
        img_size=512,
        out_indices: Optional[Sequence[int]] = None,
        norm: str = "SyncBN",
        rel_pos: Optional[str] = "bias",
        class_token: bool = False,
        drop_path_rate: float = 0.1,
        init_values: Optional[float] = None,
        use_checkpoint: bool = False,
        window_size: int = 0,
        pretrained: Optional[str] = None,
        init_cfg: Optional[dict] = None,
        **vit_kwargs,
    ):
        vit, out_indices = build_pyramid_vit(
            model=model,
            img_size=img_size,
            out_indices=out_indices,
            stage_split="seg",
            window_size=window_size,
            rel_pos=rel_pos,
            class_token=class_token,
            drop_path_rate=drop_path_rate,
            init_values=init_values,
            use_checkpoint=use_checkpoint,
            **vit_kwargs,
        )
        super().__init__(vit, out_indices, norm)
        if pretrained and init_cfg:
            raise ValueError("give either pretrained= or init_cfg=, not both")
        if init_cfg is not None and init_cfg.get("type") != "Pretrained":
            raise ValueError(f"MAEViT supports init_cfg type 'Pretrained' only, got {init_cfg}")
        self.pretrained = pretrained or (init_cfg or {}).get("checkpoint")
        self.load_report: Optional[LoadReport] = None

    def init_weights(self) -> None:
        """Called by mmengine's runner: loads ``pretrained`` into the ViT with a key report."""
        if not self.pretrained:
            return
        self.load_report = load_pretrained(self.vit, self.pretrained, log=False)
        level = logging.INFO if self.load_report.ok else logging.WARNING
        print_log(f"MAEViT: {self.load_report.summary()}", logger="current", level=level)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(super().forward(x))
