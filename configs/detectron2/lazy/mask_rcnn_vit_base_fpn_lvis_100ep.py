# LazyConfig version of ../mask_rcnn_vit_base_fpn_lvis_100ep.yaml: ViTDet's LVIS recipe (detectron2
# projects/ViTDet/configs/LVIS) on ./mask_rcnn_vit_base_fpn_lsj_100ep.py, of which everything not
# set here is kept (LSJ, AdamW with layer decay 0.7, drop path, 2-conv RPN, LN heads). Run as that
# file says. Data: detectron2's builtin lvis_v1_train / lvis_v1_val, or LVIS-format files of your
# own, registered before the config is instantiated (tools/lazyconfig_train_net.py registers
# nothing of ours):
#   from mae_transfer.detection.train import register_lvis
#   register_lvis("my_train", "train.json", "coco/")  # image root: folders of the coco_url names
# and named by `dataloader.train.dataset.names=my_train dataloader.test.dataset.names=my_val
# model.roi_heads.num_classes=K` (the fed loss and the evaluator follow these names).
from detectron2.config import LazyCall as L
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.evaluation import LVISEvaluator

from mae_transfer.detection.fed_loss import SigmoidFastRCNNOutputLayers, SigmoidROIHeads
from mae_transfer.detection.lvis import LVIS_MAX_DETS

from .mask_rcnn_vit_base_fpn_lsj_100ep import dataloader, lr_multiplier, model, optimizer, train

dataloader.train.dataset.names = "lvis_v1_train"
dataloader.test.dataset.names = "lvis_v1_val"
# repeat factor sampling (Gupta et al. 2019): an image whose rarest class is in a fraction
# f < t of the images is repeated max(1, sqrt(t / f)) times per epoch
dataloader.train.sampler = L(RepeatFactorTrainingSampler)(
    repeat_factors=L(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency)(
        dataset_dicts="${dataloader.train.dataset}", repeat_thresh=0.001
    )
)
# LVIS's evaluation (the `lvis` package): AP over up to 300 detections per image, APr/APc/APf
dataloader.evaluator = L(LVISEvaluator)(
    dataset_name="${..test.dataset.names}", max_dets_per_image=LVIS_MAX_DETS
)

# StandardROIHeads as detectron2 0.6 has it, with the box predictor of ../../fed_loss.py (0.6's
# is softmax only); SigmoidROIHeads is the class the YAML names (MODEL.ROI_HEADS.NAME)
model.roi_heads._target_ = SigmoidROIHeads
model.roi_heads.num_classes = 1203  # LVIS v1's categories
model.roi_heads.box_predictor._target_ = SigmoidFastRCNNOutputLayers
model.roi_heads.box_predictor.update(
    use_sigmoid_ce=True,  # an independent binary classifier per class (no softmax)
    # federated loss (Zhou et al. 2021): loss only on the classes in the batch + negatives drawn
    # with probability ~ image_count ^ 0.5, 50 classes in all per iteration
    use_fed_loss=True,
    fed_loss_freq_weight_power=0.5,
    fed_loss_num_classes=50,
    # the image counts, from the training sets named here when the model is built (an
    # interpolation, not ViTDet's lambda: a data set override reaches it, and the config saves
    # as YAML). Evaluating without the training set at hand: set it to [] (no counts needed)
    fed_loss_datasets="${dataloader.train.dataset.names}",
    # sigmoid scores are not spread over 1203 classes as a softmax's are: every detection
    # above 0.02 (detectron2's default 0.05) is kept, up to LVIS's 300 per image
    test_score_thresh=0.02,
    test_topk_per_image=LVIS_MAX_DETS,
)

# Schedule and lr: 100 ep = 156250 iters * 64 images/iter / 100000 images/ep (LVIS v1 train)
train.max_iter = 156250
train.eval_period = 30000  # ViTDet evaluates every 30k iterations
# lr x0.1 at 8/9 and x0.01 at 26/27 of training, as ViTDet
lr_multiplier.scheduler.milestones = [138889, 150463]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter  # 250 warmup iterations
optimizer.lr = 2e-4  # ViTDet's LVIS lr at batch 64 (COCO: 1e-4)
