# The MAE/BEiT ADE20K fine-tuning recipe: AdamW + layer decay, 1500 warmup iters then poly,
# 160k iterations of batch 16 (8 GPUs x 2), on mmseg's own ADE20K data pipeline and runtime.
_base_ = [
    "./upernet_mae_vit.py",
    "mmseg::_base_/datasets/ade20k.py",
    "mmseg::_base_/default_runtime.py",
    "mmseg::_base_/schedules/schedule_160k.py",
]
# Precision (tools/train_seg.py sets optim_wrapper from it; --amp overrides): "auto" = bf16
# autocast where this process's GPU has bf16 tensor cores (compute capability >= 8.0) or the CPU
# has AMX / AVX512-BF16, else fp32 - the rule pretraining and detection use. bf16 keeps fp32's
# exponent range (no loss scaling, no fp16 overflow at ViT-L/H scale) at 16-bit speed. "fp16"
# (dynamic loss scaling: mmseg's MAE config, "8xb2-amp", ran this) is the choice for V100 / T4,
# on request; "fp32" for reference runs.
amp = "auto"
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",  # fp32 as written, for tools that do not read `amp` above
    optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor="MAELayerDecayOptimizerConstructor",
    paramwise_cfg=dict(layer_decay_rate=0.65),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type="PolyLR", eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)  # x 8 GPUs = 16
# lr scaled linearly for another total batch (GPUs x batch_size): lr x total / 16, applied by
# mmengine's Runner before the schedulers are built (4 GPUs: 5e-5; 16 GPUs: 2e-4)
auto_scale_lr = dict(enable=True, base_batch_size=16)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
vis_backends = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
