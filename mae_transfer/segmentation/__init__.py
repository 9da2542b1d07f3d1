"""mmsegmentation glue: the MAE ViT as a registered backbone, the layer-decay optimizer
constructor, the image loading and label check transforms, the random-state hook for exact
resumes, and the toy data set. Reach it from a config with

    custom_imports = dict(imports=["mae_transfer.segmentation"], allow_failed_imports=False)
"""

from mae_transfer.compat import mmengine_compat  # noqa: F401  (safe resume with torch>=2.6)

from .backbone import MAEViT
from .dataset import ToyADEDataset
from .hooks import TorchRNGStateHook
from .optim import MAELayerDecayOptimizerConstructor
from .transforms import CheckSegLabels, LoadImageAnyDepth

__all__ = [
    "CheckSegLabels",
    "LoadImageAnyDepth",
    "MAELayerDecayOptimizerConstructor",
    "MAEViT",
    "ToyADEDataset",
    "TorchRNGStateHook",
]
