"""mae-transfer: Masked Autoencoder pretraining and transfer to dense prediction.

The core depends on torch and timm only; the detectron2 and mmseg adapters live in
``mae_transfer.detection`` and ``mae_transfer.segmentation`` and import their framework
themselves.
"""

from .checkpoint import CheckpointError, LoadReport, load_pretrained, save_atomic
from .mae import MaskedAutoencoderViT
from .models import VIT_SIZES
from .registry import create_model, list_models
from .vit import VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "LoadReport",
    "MaskedAutoencoderViT",
    "VIT_SIZES",
    "VisionTransformer",
    "create_model",
    "list_models",
    "load_pretrained",
    "save_atomic",
]
