# LazyConfig version of ../mask_rcnn_vit_huge_fpn_lvis_100ep.yaml: the LVIS recipe of
# ./mask_rcnn_vit_base_fpn_lvis_100ep.py (fed loss, repeat factor sampling, LVISEvaluator,
# 156250 iterations: 100 epochs) with the ViT-H backbone and layer decay of
# ./mask_rcnn_vit_huge_fpn_lsj_100ep.py, and ViTDet's LVIS H drop path and lr. Not reproduced:
# ViTDet's H decays every parameter's weights, ours not biases, norms and position tables. Run
# and give data as the ViT-B one says.
from .mask_rcnn_vit_base_fpn_lvis_100ep import dataloader, lr_multiplier, model, optimizer, train
from .mask_rcnn_vit_huge_fpn_lsj_100ep import model as _huge
from .mask_rcnn_vit_huge_fpn_lsj_100ep import optimizer as _huge_optimizer

model.backbone = _huge.backbone  # ViT-H/14 run as patch 16, in 4 equal stages
model.backbone.bottom_up.drop_path_rate = 0.4  # ViTDet's LVIS H: 0.4 (its COCO H: 0.5)
optimizer.params.layer_decay = _huge_optimizer.params.layer_decay  # 0.9
optimizer.lr = 1e-4  # ViTDet's LVIS H at batch 64 (its LVIS B / L: 2e-4)

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
