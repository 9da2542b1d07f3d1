# LazyConfig version of ../cascade_mask_rcnn_vit_base_fpn_lsj_100ep.yaml: the ViT-B Mask R-CNN
# LazyConfig (./mask_rcnn_vit_base_fpn_lsj_100ep.py) with detectron2's CascadeROIHeads. Three box
# stages, each its own copy of that config's 4conv1fc LN box head and a class-agnostic box
# predictor, trained on proposals matched at IoU 0.5, 0.6 and 0.7 (Cai & Vasconcelos 2018); the
# mask head is unchanged. detectron2's common/models/cascade_rcnn.py makes the same change to its
# R-50 model (with 2fc heads); ViTDet's cascades keep the 4conv1fc LN heads, as here.
# ViTDet's ViT-B cascade (its last-layer pyramid): APbox 54.0 / APmask 46.7 (100 epochs).
import copy

from detectron2.config import LazyCall as L
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads

from .mask_rcnn_vit_base_fpn_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

# box deltas scaled up stage by stage as the proposals tighten: (x, y, w, h) weights of
# detectron2's Box2BoxTransform, as ViTDet and the YAML's ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS
_STAGE_IOUS = (0.5, 0.6, 0.7)  # the first is the Mask R-CNN's own matching IoU
_STAGE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


def to_cascade(roi_heads, target=CascadeROIHeads) -> None:
    """Makes a Mask R-CNN LazyConfig's ROI heads (in place) ``target``'s three box stages: a copy
    of its box head and of its box predictor per stage (that stage's box weights, class-agnostic
    boxes), matched at the stage's IoU; its mask head kept. The LVIS cascades pass the sigmoid
    heads and keep their fed-loss predictor in every stage (as ViTDet's LVIS cascades)."""
    # arguments CascadeROIHeads takes one per stage instead
    box_head = roi_heads.pop("box_head")
    box_predictor = roi_heads.pop("box_predictor")
    roi_heads.pop("proposal_matcher")
    predictors = [copy.deepcopy(box_predictor) for _ in _STAGE_WEIGHTS]
    for predictor, weights in zip(predictors, _STAGE_WEIGHTS):
        predictor.box2box_transform.weights = weights
        predictor.cls_agnostic_bbox_reg = True  # one box per proposal and stage (the cascade's)
        predictor.num_classes = "${...num_classes}"  # (one level deeper: inside the list)
    roi_heads.update(
        _target_=target,
        box_heads=[copy.deepcopy(box_head) for _ in _STAGE_IOUS],
        box_predictors=predictors,
        proposal_matchers=[
            L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
            for iou in _STAGE_IOUS
        ],
    )


to_cascade(model.roi_heads)

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
