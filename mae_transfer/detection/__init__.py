"""detectron2 glue: the MAE ViT as a registered backbone, its config keys, weights, training
(``Trainer``: detectron2's DefaultTrainer reading our keys; subclass it as you would that).

Importing this package applies the detectron2 compatibility fixes (a no-op on an official
build), then registers in detectron2's ``BACKBONE_REGISTRY`` ``build_mae_vit_fpn_backbone``
(the paper's 4-stage pyramid + FPN), ``build_mae_vit_backbone`` (that pyramid alone) and
``build_mae_vit_simple_fpn_backbone`` (ViTDet's simple feature pyramid), and in its
``ROI_HEADS_REGISTRY`` ``SigmoidROIHeads`` / ``SigmoidCascadeROIHeads`` (sigmoid cross-entropy
and the federated loss for LVIS, :mod:`.fed_loss`).
"""

from mae_transfer.compat import detectron2_compat  # noqa: F401  (before any detectron2 import)

from .backbone import MAEViTBackbone, build_mae_vit_backbone, build_mae_vit_fpn_backbone
from .checkpoint import MAECheckpointer, convert_to_detectron2
from .config import add_mae_vit_config, validate_config
from .fed_loss import SigmoidCascadeROIHeads, SigmoidROIHeads
from .simple_fpn import MAEViTSimpleFPN, build_mae_vit_simple_fpn_backbone
from .train import Trainer

__all__ = [
    "MAECheckpointer",
    "MAEViTBackbone",
    "MAEViTSimpleFPN",
    "SigmoidCascadeROIHeads",
    "SigmoidROIHeads",
    "Trainer",
    "add_mae_vit_config",
    "build_mae_vit_backbone",
    "build_mae_vit_fpn_backbone",
    "build_mae_vit_simple_fpn_backbone",
    "convert_to_detectron2",
    "validate_config",
]
