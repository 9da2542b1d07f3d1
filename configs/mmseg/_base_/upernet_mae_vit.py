# UperNet + auxiliary FCN head on the MAE ViT pyramid (mae_transfer.segmentation.MAEViT).
# Shared by every configs/mmseg/*.py; sizes (B/L/H) are set by the files that use it.
custom_imports = dict(imports=["mae_transfer.segmentation"], allow_failed_imports=False)

norm_cfg = dict(type="SyncBN", requires_grad=True)  # BN on a single CPU process (train_seg.py)
data_preprocessor = dict(
    type="SegDataPreProcessor",
    # MAE was pretrained on RGB ImageNet-normalised images; mmcv loads BGR, hence bgr_to_rgb.
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512),  # pad to the crop size (the dataset config's crop_size)
)
model = dict(
    type="EncoderDecoder",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="MAEViT",
        model="vit_base_patch16",
        img_size=512,  # position table built for 512 (32 x 32 patches); other sizes interpolated
        out_indices=None,  # None = B (3, 5, 7, 11), L (7, 11, 15, 23), H (7, 15, 23, 31)
        norm="SyncBN",  # in the x4 upsampling path (ConvT -> norm -> GELU -> ConvT)
        rel_pos="bias",  # per-head relative position bias, zero-initialised (BEiT)
        # True: the checkpoint's class token runs with the patches, as BEiT / mmseg (not
        # measured here; False keeps segmentors trained before 2026-12-06 loadable)
        class_token=False,
        init_values=1.0,  # layer scale starting as identity, as mmseg's MAE config
        drop_path_rate=0.1,
        pretrained=None,
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    ),
    auxiliary_head=dict(
        type="FCNHead",
        in_channels=768,
        in_index=2,  # the stride-16 map
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4),
    ),
    train_cfg=dict(),
    # sliding-window test: 512 crops, stride 341 = 2/3 of the crop (1/3 overlap)
    test_cfg=dict(mode="slide", crop_size=(512, 512), stride=(341, 341)),
)
