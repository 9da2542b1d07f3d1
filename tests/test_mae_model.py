"""The MAE model: official names/shapes, shapes for odd sizes, masking invariants, gradients."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
from conftest import TINY_MAE
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mae_transfer import create_model, list_models
from mae_transfer.mae import MaskedAutoencoderViT, patchify, random_masking, unpatchify
from mae_transfer.models import VIT_SIZES
from mae_transfer.pos_embed import get_2d_sincos_pos_embed


def tiny(**kw) -> MaskedAutoencoderViT:
    return create_model("mae_vit_base_patch16", **{**TINY_MAE, **kw})


BLOCK_KEYS = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]


def official_shapes(size: str, patch: int, img: int = 224) -> dict:
    """The state-dict layout of the official mae_vit_*_dec512d8b models, from the paper's sizes."""
    d, depth = VIT_SIZES[size]["embed_dim"], VIT_SIZES[size]["depth"]
    L, dd = (img // patch) ** 2, 512
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, L + 1, d),
        "mask_token": (1, 1, dd),
        "decoder_pos_embed": (1, L + 1, dd),
        "patch_embed.proj.weight": (d, 3, patch, patch),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "decoder_embed.weight": (dd, d),
        "decoder_embed.bias": (dd,),
        "decoder_norm.weight": (dd,),
        "decoder_norm.bias": (dd,),
        "decoder_pred.weight": (patch * patch * 3, dd),
        "decoder_pred.bias": (patch * patch * 3,),
    }
    for prefix, n, w in (("blocks", depth, d), ("decoder_blocks", 8, dd)):
        block = [(w,), (w,), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,), (4 * w, w), (4 * w,)]
        block += [(w, 4 * w), (w,)]
        for i in range(n):
            for k, s in zip(BLOCK_KEYS, block):
                shapes[f"{prefix}.{i}.{k}"] = s
    return shapes


@pytest.mark.parametrize(
    "name,size,patch",
    [
        ("mae_vit_base_patch16", "base", 16),
        ("mae_vit_large_patch16", "large", 16),
        ("mae_vit_huge_patch14", "huge", 14),
    ],
)
def test_official_key_names_and_shapes(name, size, patch):
    with torch.device("meta"):
        model = create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(size, patch)
    assert model.norm.eps == 1e-6 and model.decoder_norm.eps == 1e-6


def test_registry_has_official_aliases():
    names = list_models(include_aliases=True)
    for n in (
        "mae_vit_base_patch16_dec512d8b",
        "mae_vit_large_patch16_dec512d8b",
        "mae_vit_huge_patch14_dec512d8b",
        "mae_vit_tiny_patch16",
        "mae_vit_small_patch16",
    ):
        assert n in names
    with pytest.raises(KeyError, match="unknown model 'mae_vit_giant'"):
        create_model("mae_vit_giant")


@pytest.mark.parametrize("img_size,patch", [((48, 80), 16), ((40, 24), 8), (32, 16)])
def test_forward_shapes_odd_sizes(img_size, patch):
    model = tiny(img_size=img_size, patch_size=patch)
    h, w = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    x = torch.randn(2, 3, h, w)
    loss, pred, mask = model(x, mask_ratio=0.75)
    L = (h // patch) * (w // patch)
    assert pred.shape == (2, L, patch * patch * 3)
    assert mask.shape == (2, L)
    assert torch.isfinite(loss)
    assert model.unpatchify(model.patchify(x)).equal(x)


def test_input_size_other_than_built_regenerates_sincos():
    model = tiny(img_size=32)
    x = torch.randn(1, 3, 48, 64)
    loss, pred, mask = model(x)
    assert pred.shape == (1, 12, 768) and torch.isfinite(loss)
    table = model._pos_embed(model.pos_embed, (3, 4))
    ref = torch.from_numpy(get_2d_sincos_pos_embed(32, (3, 4), cls_token=True)).float()
    assert torch.allclose(table[0], ref)
    model.to(torch.bfloat16)  # e.g. for inference: the regenerated table follows the weights
    loss, pred, _ = model(x.to(torch.bfloat16))
    assert pred.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_gradient_on_every_trainable_parameter():
    model = tiny(img_size=32, norm_pix_loss=True)
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0
    ]
    assert not no_grad and not zero
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"pos_embed", "decoder_pos_embed"}


def test_masking_noise_and_sincos_width_are_checked():
    """A noise of the wrong shape would be sorted into another mask without a word; a width
    the four sin-cos quarters do not divide would build a table of another width."""
    model = tiny(img_size=32)
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 4\), got \(2, 5\)"):
        model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"needs embed_dim % 4 == 0, got 30"):
        get_2d_sincos_pos_embed(30, 4)


def test_masking_invariants():
    x = torch.randn(3, 20, 5)
    x_masked, mask, ids_restore = random_masking(x, 0.75)
    assert x_masked.shape == (3, 5, 5)  # int(20 * 0.25) kept
    assert mask.sum(1).tolist() == [15.0, 15.0, 15.0]
    # ids_restore undoes the shuffle: kept tokens go back to their unmasked positions.
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(20).expand(3, 20))
    for b in range(3):
        kept = (mask[b] == 0).nonzero().flatten()
        assert torch.equal(torch.sort(ids_shuffle[b, :5]).values, kept)
        assert torch.equal(x[b, ids_shuffle[b, :5]], x_masked[b])


def test_same_seed_same_mask_as_official_draw():
    """The official code draws torch.rand(N, L) right after the patch embedding."""
    model = tiny(img_size=32)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(123)
    loss_a, _, mask_a = model(x)
    torch.manual_seed(123)
    noise = torch.rand(2, 4)
    loss_b, _, mask_b = model(x, noise=noise)
    assert torch.equal(mask_a, mask_b) and torch.equal(loss_a, loss_b)
    expected = torch.ones(2, 4)
    expected.scatter_(1, torch.argsort(noise, 1)[:, :1], 0)
    assert torch.equal(mask_a, expected)


def test_loss_only_on_masked_patches():
    model = tiny(img_size=32, norm_pix_loss=True)
    x = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 4, 768)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    base = model.forward_loss(x, pred, mask)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible patches do not count
    assert torch.equal(model.forward_loss(x, changed, mask), base)
    changed[0, 0] += 1.0  # a masked one does
    assert not torch.equal(model.forward_loss(x, changed, mask), base)
    target = model.patchify(x)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    manual = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(base, manual)


def test_encoder_equals_timm_vit_with_copied_weights():
    model = tiny(img_size=(32, 48)).eval()
    ref = TimmViT(
        img_size=(32, 48),
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask"))}
    ref.load_state_dict(encoder)
    x = torch.randn(2, 3, 32, 48)
    keep_order = torch.arange(6.0).expand(2, 6)
    latent, _, _ = model.forward_encoder(x, 0.0, noise=keep_order)
    # fp32 rounding differs with the kernels' blocking (AVX512 vs AVX2): 2e-6 on values ~3
    torch.testing.assert_close(latent, ref.forward_features(x), rtol=1e-5, atol=1e-5)
    # the unmasked encoder (k-NN / probes) is the same computation, and draws no random numbers
    state = torch.get_rng_state()
    torch.testing.assert_close(model.forward_features(x), latent, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.get_rng_state(), state)


def test_unpatchify_non_square_needs_grid():
    x = torch.randn(1, 3, 16, 32)
    p = patchify(x, 8)
    assert unpatchify(p, 8, (2, 4)).equal(x)
    with pytest.raises(ValueError, match="do not form"):
        unpatchify(p, 8, (3, 3))


def test_official_init_statistics():
    model = create_model("mae_vit_base_patch16", depth=1, decoder_depth=1)
    # 768 samples: the std is within 2.6% (one sigma) of 0.02; 0.15 is six sigmas
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.15)
    w = model.blocks[0].attn.qkv.weight
    bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    ref = torch.from_numpy(get_2d_sincos_pos_embed(768, 14, cls_token=True)).float()
    assert torch.allclose(model.pos_embed[0], ref)


@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "written_out"])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_only_forward_gives_the_loss_and_gradients_of_the_full_one(
    monkeypatch, explicit, norm_pix_loss
):
    """Training's ``loss_only`` forward predicts the removed patches alone: the same loss and
    the same gradient on every parameter as the full forward (fp32, odd grid, given noise),
    with either attention kernel (the written-out one is what bf16 on a CPU runs)."""
    from mae_transfer import attention

    monkeypatch.setattr(attention, "explicit_attention_faster", lambda x: explicit)
    model = tiny(img_size=(24, 40), patch_size=8, norm_pix_loss=norm_pix_loss)  # 3 x 5 patches
    x, noise = torch.randn(3, 3, 24, 40), torch.rand(3, 15)
    results = []
    for loss_only in (False, True):
        model.zero_grad(set_to_none=True)
        loss, pred, mask = model(x, mask_ratio=0.6, noise=noise, loss_only=loss_only)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, pred, mask, grads))
    (loss_a, pred_a, mask_a, grads_a), (loss_b, pred_b, mask_b, grads_b) = results
    assert pred_a.shape == (3, 15, 8 * 8 * 3) and pred_b is None
    assert torch.equal(mask_a, mask_b) and mask_a.sum() == 3 * 9
    assert torch.allclose(loss_a, loss_b, rtol=1e-6, atol=1e-7)
    for name, g in grads_a.items():
        assert g is not None and grads_b[name] is not None, name
        assert torch.allclose(g, grads_b[name], rtol=1e-5, atol=1e-7), name


def test_loss_only_forward_skips_the_kept_patches_in_the_decoder_tail():
    """The last decoder block's queries, projection and MLP, the norm and the head see the
    removed patches only (the work it saves); the blocks before it, every token."""
    model = tiny(img_size=32, patch_size=8, decoder_depth=2)  # 16 patches, 4 kept
    seen = {}

    def record(name):
        return lambda module, args: seen.__setitem__(name, args[0].shape[1])

    for name in ("decoder_blocks.0.mlp.fc1", "decoder_blocks.1.mlp.fc1", "decoder_pred"):
        model.get_submodule(name).register_forward_pre_hook(record(name))
    model(torch.randn(2, 3, 32, 32), mask_ratio=0.75, loss_only=True)
    assert seen == {
        "decoder_blocks.0.mlp.fc1": 17,
        "decoder_blocks.1.mlp.fc1": 12,
        "decoder_pred": 12,
    }
    model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)
    assert seen == {
        "decoder_blocks.0.mlp.fc1": 17,
        "decoder_blocks.1.mlp.fc1": 17,
        "decoder_pred": 17,
    }


def test_loss_only_forward_without_decoder_blocks_and_under_bf16():
    model = tiny(img_size=32, patch_size=8, decoder_depth=0)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    full, _, _ = model(x, noise=noise)
    assert torch.allclose(model(x, noise=noise, loss_only=True)[0], full, rtol=1e-6)
    model = tiny(img_size=32, patch_size=8)
    with torch.autocast("cpu", torch.bfloat16):
        full, _, _ = model(x, noise=noise)
        loss, _, _ = model(x, noise=noise, loss_only=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss, full, rtol=2e-2)  # bf16 rounding only
