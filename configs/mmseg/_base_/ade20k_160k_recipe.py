# The MAE/BEiT ADE20K fine-tuning recipe: AdamW + layer decay, 1500 warmup iters then poly,
# 160k iterations of batch 16 (8 GPUs x 2), on mmseg's own ADE20K data pipeline and runtime.
_base_ = [
    "./upernet_mae_vit.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
optim_wrapper = dict(
    _delete_=True,
    type="AmpOptimWrapper",  # fp16 on GPU; tools/train_seg.py switches to fp32 on CPU
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="MAELayerDecayOptimizerConstructor",
    paramwise_cfg=dict(layer_decay_rate=0.65),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
vis_backends = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
