"""Sigmoid cross-entropy and the federated loss for the box classifier, as ViTDet trains on LVIS.

LVIS is a federated data set: each image is labelled exhaustively for a few of its 1203
categories only, so a category missing from an image's labels is no evidence that the image
lacks it. The federated loss (Zhou et al. 2021, "Probabilistic two-stage detection") scores
K independent binary classifiers (sigmoid cross-entropy instead of a softmax over K + 1), and
in each iteration only for the classes labelled in the batch plus a few negatives drawn by
frequency (image count ^ 0.5), FED_LOSS_NUM_CLASSES (50) in all; the other classes get no loss
and no gradient, so rare classes are not pushed down by images that were never checked for
them.

detectron2 added this after 0.6 (``FastRCNNOutputLayers(use_sigmoid_ce=, use_fed_loss=)``); here
it is a subclass of 0.6's output layers that reads the same config keys
(``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS / FED_LOSS_FREQ_WEIGHT_POWER /
FED_LOSS_NUM_CLASSES``), used by the ROI heads registered here: ``SigmoidROIHeads`` (detectron2's
StandardROIHeads) and ``SigmoidCascadeROIHeads`` (CascadeROIHeads, one predictor per stage).
The LazyConfigs build it directly, with the training sets to count class frequencies from
(``fed_loss_datasets``; ViTDet's LazyConfig passes a function for the same).

Background: the classifier keeps detectron2's K + 1 outputs (checkpoints and the inference code
stay as they are) but the last, background, column is never trained or read: a background
proposal is one whose K targets are all 0, and at test time each class score is the sigmoid of
its own logit.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNOutputLayers, StandardROIHeads
from detectron2.structures import Instances

from .lvis import training_class_counts

logger = logging.getLogger(__name__)

# the ROI heads whose box predictor reads USE_SIGMOID_CE / USE_FED_LOSS (MODEL.ROI_HEADS.NAME)
SIGMOID_ROI_HEADS = ("SigmoidROIHeads", "SigmoidCascadeROIHeads")
# a later detectron2's own FastRCNNOutputLayers arguments for these keys (not in 0.6)
_LATER_DETECTRON2_KEYS = ("use_sigmoid_ce", "use_fed_loss", "fed_loss_num_classes")


def sigmoid_ce_loss(
    logits: torch.Tensor, gt_classes: torch.Tensor, scored: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Binary cross-entropy of each class logit against "this proposal is of that class",
    summed over the scored classes and averaged over the proposals.

    Args:
        logits: (R, K + 1) class logits; the last (background) column is not used.
        gt_classes: (R,) labels in [0, K]; K is background (all K targets 0).
        scored: (K,) bool, the classes that get a loss; None: all K.

    Returns:
        a scalar; 0 (still attached to ``logits``) when R is 0.
    """
    num, k = logits.shape[0], logits.shape[1] - 1
    if num == 0:
        return logits.sum() * 0.0
    target = F.one_hot(gt_classes, k + 1)[:, :k].to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits[:, :k], target, reduction="none")
    if scored is not None:
        loss = loss * scored.to(loss.dtype)  # unscored classes: no loss, no gradient
    return loss.sum() / num


def fed_loss_classes(
    gt_classes: torch.Tensor,
    num_classes: int,
    freq_weights: torch.Tensor,
    max_classes: int,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The classes the federated loss scores in one batch: every label in it, then others
    drawn without replacement with probability proportional to ``freq_weights`` until
    ``max_classes`` are chosen (fewer when fewer classes have a weight > 0).

    As in detectron2's later implementation, the background label, when the batch has
    background proposals, counts towards ``max_classes`` though it is never scored.

    Args:
        gt_classes: (R,) labels in [0, K], K = background.
        num_classes: K.
        freq_weights: (K,) sampling weights, image count ^ FED_LOSS_FREQ_WEIGHT_POWER.
        max_classes: FED_LOSS_NUM_CLASSES.

    Returns:
        (K,) bool.
    """
    present = torch.unique(gt_classes)
    chosen = torch.zeros(num_classes + 1, dtype=torch.bool, device=gt_classes.device)
    chosen[present] = True
    wanted = max_classes - len(present)
    if wanted > 0:
        weights = freq_weights.to(gt_classes.device, torch.float32)
        weights = weights * ~chosen[:num_classes]  # labelled classes are not drawn again
        n = min(wanted, int((weights > 0).sum()))  # multinomial fails on too few candidates
        if n > 0:
            chosen[torch.multinomial(weights, n, replacement=False, generator=generator)] = True
    return chosen[:num_classes]


class SigmoidFastRCNNOutputLayers(FastRCNNOutputLayers):
    """detectron2 0.6's box predictor with sigmoid cross-entropy and the federated loss.

    With ``use_sigmoid_ce`` False it is detectron2's softmax predictor unchanged. The fed
    loss's sampling weights come from the training set's class frequencies: counted when it is
    built from the registered sets ``fed_loss_datasets`` names (the LazyConfigs name their
    training sets there), or given later by :func:`set_fed_loss_frequencies` (our Trainer does,
    from the training set it reads, for the YAML configs); a fed-loss step without them is an
    error naming that.
    """

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        use_sigmoid_ce: bool = False,
        use_fed_loss: bool = False,
        fed_loss_num_classes: int = 50,
        fed_loss_freq_weight_power: float = 0.5,
        fed_loss_datasets: Union[str, Sequence[str]] = (),
        **kwargs,
    ):
        """Args: detectron2's FastRCNNOutputLayers', those of the config keys of the same
        names (MODEL.ROI_BOX_HEAD.*), and ``fed_loss_datasets``: registered training sets whose
        images per class (:func:`.lvis.training_class_counts`, the YAML path's counting) give
        the fed loss's weights now; empty: later, by :func:`set_fed_loss_frequencies`."""
        super().__init__(input_shape, **kwargs)
        if use_fed_loss and not use_sigmoid_ce:
            raise ValueError(
                "the federated loss scores classes with sigmoid cross-entropy: set "
                "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE True with USE_FED_LOSS"
            )
        # Private names: a later detectron2's own FastRCNNOutputLayers reads use_sigmoid_ce /
        # use_fed_loss (built False here, from_config takes its keys away), and its losses()
        # and predict_probs(), which ours call, would take over with state we do not build.
        self._sigmoid_ce = use_sigmoid_ce
        self._fed_loss = use_fed_loss
        self._fed_loss_max_classes = fed_loss_num_classes
        self._fed_loss_power = fed_loss_freq_weight_power
        # (K,) sampling weights; a plain attribute, not a buffer: checkpoints stay detectron2's
        self.fed_loss_weights: Optional[torch.Tensor] = None
        if use_fed_loss and fed_loss_datasets:
            self.set_class_frequencies(training_class_counts(fed_loss_datasets, self.num_classes))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        for key in _LATER_DETECTRON2_KEYS + ("get_fed_loss_cls_weights",):
            ret.pop(key, None)  # a later detectron2's own handling of the same keys: ours instead
        head = cfg.MODEL.ROI_BOX_HEAD
        ret.update(
            use_sigmoid_ce=head.USE_SIGMOID_CE,
            use_fed_loss=head.USE_FED_LOSS,
            fed_loss_num_classes=head.FED_LOSS_NUM_CLASSES,
            fed_loss_freq_weight_power=head.FED_LOSS_FREQ_WEIGHT_POWER,
        )
        return ret

    def set_class_frequencies(self, image_counts: torch.Tensor) -> None:
        """(K,) training images per class -> the fed loss's sampling weights, count ^ power."""
        if len(image_counts) != self.num_classes:
            raise ValueError(
                f"{len(image_counts)} class frequencies for a classifier of {self.num_classes} "
                "classes (MODEL.ROI_HEADS.NUM_CLASSES)"
            )
        self.fed_loss_weights = image_counts.float() ** self._fed_loss_power

    def losses(self, predictions, proposals: List[Instances]):
        """detectron2's losses (box regression as there), ``loss_cls`` by sigmoid CE."""
        # detectron2 0.6's also computes a softmax loss_cls: replaced (a few flops per RoI)
        losses = super().losses(predictions, proposals)
        if not self._sigmoid_ce:
            return losses
        scores, _ = predictions
        gt_classes = (
            cat([p.gt_classes for p in proposals], dim=0)
            if len(proposals)
            else torch.empty(0, dtype=torch.long, device=scores.device)
        )
        scored = None
        if self._fed_loss:
            if self.fed_loss_weights is None:
                raise RuntimeError(
                    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS needs the training set's class frequencies: "
                    "call mae_transfer.detection.fed_loss.set_fed_loss_frequencies(model, counts) "
                    "before training (mae_transfer.detection.Trainer does), or, in a LazyConfig, "
                    "name them in model.roi_heads.box_predictor.fed_loss_datasets"
                )
            scored = fed_loss_classes(
                gt_classes, self.num_classes, self.fed_loss_weights, self._fed_loss_max_classes
            )
        loss = sigmoid_ce_loss(scores, gt_classes, scored)
        losses["loss_cls"] = loss * self.loss_weight.get("loss_cls", 1.0)
        return losses

    def predict_probs(self, predictions, proposals: List[Instances]):
        """Per image (Ri, K + 1): each class's own sigmoid (the last column is dropped by
        detectron2's inference); softmax without ``use_sigmoid_ce``."""
        if not self._sigmoid_ce:
            return super().predict_probs(predictions, proposals)
        scores, _ = predictions
        return scores.sigmoid().split([len(p) for p in proposals], dim=0)


def _softmax_cfg(cfg):
    """``cfg`` with the sigmoid / fed-loss keys off, for the parent heads' own predictor, which
    ours replace: a later detectron2's would read them and count the training set's class
    frequencies as it is built, before any data set is read (our LVIS sets have them once
    they load)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = False
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = False
    return cfg


@ROI_HEADS_REGISTRY.register()
class SigmoidROIHeads(StandardROIHeads):
    """detectron2's StandardROIHeads with :class:`SigmoidFastRCNNOutputLayers` (0.6's ignores
    MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS)."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(_softmax_cfg(cfg), input_shape)
        ret["box_predictor"] = SigmoidFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class SigmoidCascadeROIHeads(CascadeROIHeads):
    """detectron2's CascadeROIHeads with a :class:`SigmoidFastRCNNOutputLayers` per stage (each
    with its stage's box weights); the stages' sigmoid scores are averaged at test time."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(_softmax_cfg(cfg), input_shape)
        ret["box_predictors"] = [
            SigmoidFastRCNNOutputLayers(
                cfg, head.output_shape, box2box_transform=predictor.box2box_transform
            )
            for head, predictor in zip(ret["box_heads"], ret["box_predictors"])
        ]
        return ret


def set_fed_loss_frequencies(model: torch.nn.Module, image_counts: torch.Tensor) -> int:
    """Gives each fed-loss box predictor of ``model`` (DDP-wrapped or not) the training set's
    (K,) images per class; returns how many predictors took them."""
    predictors = [
        m for m in model.modules() if isinstance(m, SigmoidFastRCNNOutputLayers) and m._fed_loss
    ]
    for p in predictors:
        p.set_class_frequencies(image_counts)
    return len(predictors)
