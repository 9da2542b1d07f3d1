"""Reconstruction pictures: original | masked | reconstruction | reconstruction + visible."""

from __future__ import annotations

import argparse
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from mae_transfer.checkpoint import CheckpointError, find_state_dict, load_file, strip_to_vit
from mae_transfer.data import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from mae_transfer.data.transforms import ResizeToCover
from mae_transfer.mae import MaskedAutoencoderViT
from mae_transfer.models import DECODER, VIT_SIZES
from mae_transfer.registry import create_model

logger = logging.getLogger(__name__)


def load_mae_for_visualization(path: str, model_name: Optional[str] = None, input_size=None):
    """Builds the MAE of a checkpoint (ours, the official full/visualize one, or another
    codebase's whole MAE: Hugging Face's ViTMAEForPreTraining, mmpretrain's) and loads it.

    Our checkpoints carry their config; for official ones the size is read from the weights.
    Raises a clear error for encoder-only files, which cannot reconstruct anything.
    """
    ckpt = load_file(path)
    state, _ = strip_to_vit(find_state_dict(ckpt))  # in our names, the prefix (DDP's) off
    if "decoder_pred.weight" not in state:
        raise CheckpointError(
            f"{path} has no MAE decoder (an encoder-only checkpoint such as "
            "mae_pretrain_vit_*.pth or encoder.pth, or a fine-tuned, detection or segmentation "
            "model), so it cannot reconstruct images. Use a full pretraining checkpoint: our "
            "checkpoint-last.pth, or the official mae_visualize_vit_*.pth."
        )
    args = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    if isinstance(args, argparse.Namespace):  # the official training loop's checkpoints
        args = vars(args)
    if not isinstance(args, dict):
        args = {}
    recorded = args.get("model")
    if model_name and recorded and (model_name != recorded or args.get("model_kwargs")):
        logger.warning(
            "--model %s ignored: the checkpoint records the model it trained (%s%s)",
            model_name,
            recorded,
            f" with {args['model_kwargs']}" if args.get("model_kwargs") else "",
        )
        model_name = None
    name = model_name or recorded or infer_mae_name(state)
    kwargs = dict(args.get("model_kwargs") or {})
    if input_size is None:
        input_size = args.get("input_size", 224)
    size = tuple(input_size) if isinstance(input_size, (list, tuple)) else (input_size,) * 2
    kwargs.update(img_size=size, norm_pix_loss=bool(args.get("norm_pix_loss", False)))
    if "norm_pix_loss" not in args:
        logger.info("the checkpoint does not say whether it used norm_pix_loss; assuming not")
    try:
        model = create_model(name, **kwargs)
    except (KeyError, ValueError) as e:  # an unknown name; a size that is no whole patch grid
        raise CheckpointError(f"cannot build {name} at input size {size}: {e}") from e
    if size[0] % model.patch_size or size[1] % model.patch_size:
        raise CheckpointError(
            f"input size {size[0]}x{size[1]} is not a multiple of {name}'s patch size "
            f"{model.patch_size}"
        )
    try:
        model.load_state_dict(_resize_for(model, state))
    except RuntimeError as e:  # missing / unexpected keys, other shapes
        detail = " ".join(str(e).split())
        detail = detail if len(detail) < 300 else detail[:300] + " ..."
        raise CheckpointError(
            f"{path} does not fit {name} ({detail}); pass the --model it was trained as"
        ) from e
    return model.eval()


def infer_mae_name(state: Dict[str, torch.Tensor]) -> str:
    """Registered MAE name whose encoder width, depth and patch match an official state dict."""
    w = state["patch_embed.proj.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    dec = state["decoder_embed.weight"].shape[0]
    for size, dims in VIT_SIZES.items():
        if dims["embed_dim"] == w.shape[0] and dims["depth"] == depth:
            if dec != DECODER["decoder_embed_dim"]:
                break
            return f"mae_vit_{size}_patch{w.shape[-1]}"
    raise CheckpointError(
        f"cannot tell the model of a checkpoint with width {w.shape[0]}, depth {depth}, "
        f"decoder width {dec}; pass --model"
    )


def _resize_for(model: MaskedAutoencoderViT, state: Dict[str, torch.Tensor]) -> Dict:
    """The checkpoint with the model's own fixed sin-cos tables (any input size)."""
    out = dict(state)
    own = model.state_dict()
    for k in ("pos_embed", "decoder_pos_embed"):
        if k in out and out[k].shape != own[k].shape:
            out[k] = own[k]
    return out


def prepare_image(path_or_array, size: Tuple[int, int]) -> torch.Tensor:
    """Resize (shorter side) + center crop to ``size`` (H, W), normalised: (3, H, W)."""
    img = (
        load_rgb(path_or_array)
        if isinstance(path_or_array, str)
        else Image.fromarray(path_or_array)
    )
    h, w = size
    img = ResizeToCover((h, w), crop_pct=1.0)(img)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    x = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
    x = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float, seed: int = 0):
    """Returns (masked, reconstruction, pasted) images in [0, 1], each (N, H, W, 3)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(imgs.shape[0], model.patch_embed.num_patches, generator=g)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    target = model.patchify(imgs)
    if model.norm_pix_loss:  # predictions are per-patch normalised: use the true patch stats
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1)
    masked = model.unpatchify(target * (1 - m))
    recon = model.unpatchify(pred)
    pasted = model.unpatchify(target * (1 - m) + pred * m)
    return tuple(_to_display(t, keep_black=(t is masked)) for t in (masked, recon, pasted))


def _to_display(x: torch.Tensor, keep_black: bool = False) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = (x * std + mean).clamp(0, 1)
    if keep_black:  # masked patches are exactly 0 before de-normalisation: show them grey
        out = torch.where(x == 0, torch.full_like(out, 0.5), out)
    return out.permute(0, 2, 3, 1).numpy()


def picture_suffixes() -> set:
    """The file suffixes matplotlib's ``savefig`` writes ('.png', '.pdf', '.svg', ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return {"." + k for k in FigureCanvasBase.get_supported_filetypes()}


def save_grid(
    originals: np.ndarray, columns: Sequence[np.ndarray], path: str, title: str = ""
) -> str:
    """One row per image: original then each column; writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["original", "masked", "reconstruction", "reconstruction + visible"]
    rows = len(originals)
    aspect = originals.shape[1] / originals.shape[2]  # a row as high as its images (H / W)
    fig, axes = plt.subplots(
        rows, 4, figsize=(10, (2.3 * aspect + 0.3) * rows + 0.3), dpi=110, squeeze=False
    )
    for r in range(rows):
        for c, img in enumerate([originals[r]] + [col[r] for col in columns]):
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[c], fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def visualize(
    model: MaskedAutoencoderViT,
    images: List,
    path: str,
    mask_ratio: float = 0.75,
    seed: int = 0,
    title: str = "",
) -> str:
    """Reconstruction grid of ``images`` (paths or HxWx3 uint8 arrays) written to ``path``."""
    imgs = torch.stack([prepare_image(im, model.img_size) for im in images])
    masked, recon, pasted = reconstruct(model, imgs, mask_ratio, seed)
    originals = _to_display(imgs)
    return save_grid(originals, [masked, recon, pasted], path, title)
