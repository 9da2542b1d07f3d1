"""The encoder-only ViT for transfer: shapes, windows, relative position, gradients."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT

from mae_transfer import create_model, load_pretrained
from mae_transfer.pos_embed import resize_pos_embed
from mae_transfer.vit import window_partition, window_unpartition


def vit(**kw):
    return create_model("vit_base_patch16", **{**TINY_VIT, "img_size": 64, **kw})


@pytest.mark.parametrize("hw", [(64, 64), (50, 70), (33, 97)])
def test_forward_intermediates_any_size(hw):
    model = vit(class_token=False, window_size=2, global_blocks=(1, 3), rel_pos="decomposed")
    outs = model.forward_intermediates(torch.randn(2, 3, *hw), [0, 1, 2, 3])
    gh, gw = -(-hw[0] // 16), -(-hw[1] // 16)
    assert [tuple(o.shape) for o in outs] == [(2, 32, gh, gw)] * 4
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("indices,bad", [([0, 1, 2, 4], [4]), ([-5, 1, 9], [-5, 9])])
def test_forward_intermediates_refuses_indices_out_of_range(indices, bad):
    """Taken modulo the depth, block 4 of 4 used to come back as block 0's output."""
    model = vit()
    expected = f"block indices {bad} out of range for depth 4: give indices in [-4, 4)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices)
    with pytest.raises(ValueError, match="at least one block index"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), [])


def test_forward_intermediates_refuses_blocks_a_pyramid_removed():
    from mae_transfer.pyramid import ViTPyramid

    model = vit(depth=5, class_token=False)
    ViTPyramid(model, (0, 1, 2, 3))  # keeps blocks 0..3 of 5
    for indices in ([4], [-1]):
        with pytest.raises(ValueError, match=r"no longer has: it keeps blocks 0\.\.3 of 5"):
            model.forward_intermediates(torch.randn(1, 3, 32, 32), indices)


def test_forward_intermediates_in_any_order_and_from_the_end():
    model = vit().eval()
    x = torch.randn(1, 3, 32, 32)
    blocks = model.forward_intermediates(x, [0, 1, 2, 3])
    for indices in ([3, 1], [-1, -4, 2], [1, 1]):
        maps = model.forward_intermediates(x, indices)
        assert all(torch.equal(m, blocks[i]) for m, i in zip(maps, indices)), indices


def test_forward_features_with_class_token():
    model = vit()
    assert model.forward_features(torch.randn(1, 3, 48, 80)).shape == (1, 1 + 15, 32)


def test_window_partition_roundtrip_with_padding():
    x = torch.randn(2, 5, 7, 3)
    windows, padded = window_partition(x, 3)
    assert padded == (6, 9) and windows.shape == (2 * 2 * 3, 9, 3)
    assert torch.equal(window_unpartition(windows, 3, padded, (5, 7)), x)


@pytest.mark.parametrize("hw", [(64, 64), (80, 80)])
def test_one_window_that_is_the_grid_equals_global_attention(hw):
    """(A window with padding differs: the padding's keys take part, as in ViTDet.)"""
    glob = vit(class_token=False).eval()
    win = vit(class_token=False, window_size=hw[0] // 16).eval()  # the whole 4x4 / 5x5 grid
    win.load_state_dict(glob.state_dict())
    x = torch.randn(2, 3, *hw)
    assert torch.allclose(glob.forward_features(x), win.forward_features(x), atol=1e-5)
    padded = vit(class_token=False, window_size=hw[0] // 16 + 1).eval()
    padded.load_state_dict(glob.state_dict())
    assert not torch.allclose(glob.forward_features(x), padded.forward_features(x), atol=1e-3)


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (6, 6)])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_window_block_computes_what_vitdet_s_padded_windows_do(grid, qkv_bias):
    """ViTDet's window block: the normalised tokens zero-padded to whole windows, then qkv
    projected, attention over each whole window (the padding's keys included: its k and v are
    the qkv bias), proj, padding cropped. Ours projects the real tokens only and pads with the
    bias: the same numbers (a mask hiding the padding's keys gave up to 0.75 apart)."""
    from mae_transfer.vit import Block

    torch.manual_seed(0)
    blk = Block(32, 4, qkv_bias=qkv_bias, window_size=3, rel_pos="decomposed").eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.2)  # non-zero biases and relative tables
    x = torch.randn(2, grid[0] * grid[1], 32)
    y = blk.norm1(x).view(2, *grid, 32)
    windows, padded = window_partition(y, 3)  # zero tokens, projected like the real ones
    ref = blk.attn(windows, (3, 3))
    ref = x + window_unpartition(ref, 3, padded, grid).reshape_as(x)
    ref = ref + blk.mlp(blk.norm2(ref))
    out = blk(x, grid)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())


@pytest.mark.parametrize("rel_pos", ["decomposed", "bias"])
def test_relative_position_is_zero_initialised_and_trained(rel_pos):
    plain = vit(class_token=False).eval()
    rel = vit(class_token=False, rel_pos=rel_pos).eval()
    missing = rel.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("rel" in k for k in missing)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(plain.forward_features(x), rel.forward_features(x), atol=1e-6)
    rel.train()
    rel.forward_features(x).sum().backward()
    grads = [p.grad for n, p in rel.named_parameters() if "rel" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("rel_pos", ["decomposed", "bias"])
def test_relative_position_tables_resize_to_other_grids(rel_pos):
    model = vit(class_token=False, rel_pos=rel_pos)
    for p in model.parameters():
        if p.ndim == 2 and p.shape[0] in (7, 49):
            torch.nn.init.normal_(p)
    out = model.forward_intermediates(torch.randn(1, 3, 96, 48), [3])[0]
    assert out.shape == (1, 32, 6, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(4, 4), (3, 5), (16, 16)])
def test_a_table_held_at_the_pretraining_size_is_used_as_vitdet_uses_it(hw):
    """pos_embed_img_size: the table has ViTDet's shape (224 px: 14 x 14 + a class row), so a
    plain state-dict load takes a ViTDet table as is, and every forward interpolates it to
    the input's grid as ViTDet's get_abs_pos does (class row unused, bicubic)."""
    model = vit(class_token=False, pos_embed_img_size=224)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 32) and model.grid_size == (4, 4)
    table = torch.randn(1, 1 + 14 * 14, 32)
    model.load_state_dict({**model.state_dict(), "pos_embed": table})
    x = torch.zeros(1, 3, hw[0] * 16, hw[1] * 16)  # patch tokens: the conv's bias
    with torch.no_grad():
        term = model._embed(x)[0] - model.patch_embed(x)
    grid = table[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False)
    assert torch.allclose(term, want.flatten(2).transpose(1, 2), atol=1e-6)


def test_a_table_held_at_the_pretraining_size_takes_other_tables_resized():
    """An MAE table of another grid (ViT-H/14's 16 x 16 at 224) is resized to the held grid
    as it loads, its class row kept; the report says so."""
    source = vit(img_size=256).state_dict()  # a class token, a 16 x 16 sin-cos table
    model = vit(class_token=False, pos_embed_img_size=224)
    report = load_pretrained(model, source)
    assert report.resized == ["pos_embed (1, 257, 32)->(1, 197, 32)"] and report.ok
    src = source["pos_embed"]
    assert torch.equal(model.pos_embed[:, :1], src[:, :1])
    want = resize_pos_embed(src[:, 1:], (14, 14), num_prefix_tokens=0, old_grid=(16, 16))
    assert torch.allclose(model.pos_embed[:, 1:], want, atol=1e-6)
    with pytest.raises(ValueError, match="pos_embed_img_size 8 is smaller than a patch"):
        vit(pos_embed_img_size=8)


def test_gradient_on_every_parameter_with_all_options():
    model = vit(
        class_token=False,
        window_size=2,
        global_blocks=(3,),
        rel_pos="decomposed",
        drop_path_rate=0.1,
        init_values=0.1,
        use_checkpoint=True,
    )
    model.train()
    outs = model.forward_intermediates(torch.randn(2, 3, 40, 56), [1, 3])
    sum(o.sum() for o in outs).backward()
    # the final norm is not used by intermediates without norm=True
    missing = [
        n for n, p in model.named_parameters() if p.grad is None and not n.startswith("norm")
    ]
    assert not missing


PYRAMID_ONLY = "; None and 'none' are the pyramid builders' values"


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(class_token=True, window_size=4), "class_token=True cannot"),
        (dict(class_token=True, rel_pos="decomposed"), "class_token=True cannot"),
        (dict(class_token=False, global_blocks=(7,)), "out of range"),
        (dict(class_token=False, rel_pos="rope"), "rel_pos must be one of"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        # the pyramid builders' values, which the ViT (not knowing the stage ends) cannot take:
        # they were "'NoneType' object is not iterable" and "'<=' not supported" TypeErrors
        (dict(class_token=False, window_size=2, global_blocks=None), "got None" + PYRAMID_ONLY),
        (dict(class_token=False, window_size=2, global_blocks="none"), "got 'none'" + PYRAMID_ONLY),
        (dict(class_token=False, global_blocks=("2",)), r"got \('2',\)" + PYRAMID_ONLY),
    ],
)
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        vit(**kw)


def test_global_blocks_from_a_generator_are_kept():
    """The check read a generator to its end, and the ViT then had no global block."""
    model = vit(class_token=False, window_size=2, global_blocks=(i for i in (1,)))
    assert model.global_blocks == (1,)


@pytest.mark.parametrize("hw", [(3, 4), (5, 5)])
def test_class_token_bias_follows_beits_table_layout(hw):
    """With a class token the table has BEiT's 3 extra entries, indexed as BEiT (timm) does."""
    from timm.models.beit import gen_relative_position_index

    from mae_transfer.vit import relative_position_bias

    entries = (2 * hw[0] - 1) * (2 * hw[1] - 1) + 3
    table = torch.randn(entries, 2)
    bias = relative_position_bias(table, hw, hw, class_token=True)
    index = gen_relative_position_index(hw)
    assert bias.shape == (1, 2, 1 + hw[0] * hw[1], 1 + hw[0] * hw[1])
    assert torch.equal(bias[0], table[index.reshape(-1)].t().reshape_as(bias[0]))
    # the patch-to-patch part is the table without class token
    plain = relative_position_bias(table[:-3], hw, hw)
    assert torch.equal(bias[:, :, 1:, 1:], plain)
    # another grid resizes the offsets and keeps the class-token entries
    other = relative_position_bias(table, hw, (hw[0] + 2, hw[1]), class_token=True)
    assert torch.equal(other[0, :, 0, 1:], table[-3][:, None].expand(2, other.shape[-1] - 1))
    assert torch.equal(other[0, :, 1:, 0], table[-2][:, None].expand(2, other.shape[-1] - 1))
    assert torch.equal(other[0, :, 0, 0], table[-1])


def test_class_token_with_relative_position_bias_trains_and_ignores_nothing():
    model = vit(class_token=True, rel_pos="bias").train()
    table = model.blocks[0].attn.relative_position_bias_table
    assert table.shape == ((2 * 4 - 1) ** 2 + 3, 2)
    x = torch.randn(2, 3, 64, 80)  # another grid than the table's
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 4 * 5, 32)
    maps = model.forward_intermediates(x, [1, 3])
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 5)] * 2
    feats.sum().backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle
    # the class-token entries change what the patches see
    plain = vit(class_token=True, rel_pos="bias").eval()
    model.eval().load_state_dict(plain.state_dict())
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.relative_position_bias_table[-2].fill_(3.0)  # patch -> class
    assert not torch.allclose(model.forward_features(x), plain.forward_features(x), atol=1e-4)


@pytest.mark.parametrize("with_mask", [False, True])
def test_folded_decomposed_rel_pos_equals_the_explicit_bias(with_mask):
    """Relative position folded into q.k (fused attention) = the explicit (N x N) bias, values
    and gradients, also with a padded-key mask."""
    import torch.nn.functional as F

    from mae_transfer.vit import Attention, decomposed_rel_pos_bias

    torch.manual_seed(0)
    hw = (3, 5)
    attn = Attention(32, num_heads=2, rel_pos="decomposed", rel_pos_size=(4, 4))
    with torch.no_grad():  # zero-initialised in the model; random here so the bias matters
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(2, 15, 32)
    mask = None
    if with_mask:
        mask = torch.zeros(2, 1, 1, 15)
        mask[:, ..., -4:] = float("-inf")
    out = attn(x, hw, mask)
    grads = torch.autograd.grad(out.sum(), [attn.rel_pos_h, attn.qkv.weight])

    qkv = attn.qkv(x).reshape(2, 15, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, hw)
    if mask is not None:
        bias = bias + mask
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 15, 32))
    ref_grads = torch.autograd.grad(ref.sum(), [attn.rel_pos_h, attn.qkv.weight])
    assert torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)
    attn.fold_rel_pos = False  # the library's own explicit path (the benchmark's ViTDet case)
    assert torch.allclose(attn(x, hw, mask), ref, atol=1e-5)


@pytest.mark.parametrize("size", [1024, 1000])
def test_detection_attention_widths_stay_on_fused_kernels_in_bf16(
    size, monkeypatch, fused_attention
):
    """Every attention call of a ViTDet-style model (head_dim 64, window 14, decomposed relative
    position, global blocks) under bf16 autocast gets q, k, v of a width that is a multiple of 8:
    in 16-bit the memory-efficient and cuDNN kernels take nothing else (64 + 2 x 14 = 92 unpadded).
    The spy records shapes and returns zeros of the right shape, so no attention is computed."""
    import torch.nn.functional as F

    calls = []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype))
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = create_model(
        "vit_base_patch16",
        embed_dim=128,
        depth=2,
        num_heads=2,
        mlp_ratio=1.0,
        img_size=1024,
        class_token=False,
        window_size=14,
        global_blocks=(1,),
        rel_pos="decomposed",
    ).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_intermediates(torch.zeros(1, 3, size, size), [1])
    grid = -(-size // 16)
    window_width, global_width = 64 + 2 * 14, 64 + 2 * grid
    assert len(calls) == 2, calls
    assert {c[3] for c in calls} == {torch.bfloat16}  # autocast reached the attention
    assert calls[0][0][-1] >= window_width and calls[1][0][-1] >= global_width
    for q, k, v, _ in calls:
        assert q[-1] == k[-1] == v[-1] and q[-1] % 8 == 0, (q, k, v)


@pytest.mark.parametrize("hw", [(3, 4), (14, 14), (3, 5)])
def test_zero_padded_folded_width_equals_the_explicit_bias(hw):
    """The zero-padded folded q.k (width rounded up to 8) = the explicit (N x N) bias in fp32,
    values and gradients, with head_dim 64 as ViT-B/L (14 x 14 windows: 92 -> 96)."""
    from mae_transfer.vit import Attention, fold_decomposed_rel_pos

    torch.manual_seed(0)
    attn = Attention(128, num_heads=2, rel_pos="decomposed", rel_pos_size=hw)
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    n = hw[0] * hw[1]
    q = torch.randn(2, 2, n, 64)
    width = fold_decomposed_rel_pos(q, q, attn.rel_pos_h, attn.rel_pos_w, hw, 1.0)[0].shape[-1]
    assert width % 8 == 0 and width - (64 + sum(hw)) < 8
    x = torch.randn(2, n, 128, dtype=torch.float32)
    mask = torch.zeros(2, 1, 1, n)
    mask[..., -3:] = float("-inf")  # padded keys, as in a window at the image border
    params = [attn.rel_pos_h, attn.rel_pos_w, attn.qkv.weight]
    out = attn(x, hw, mask)
    grads = torch.autograd.grad(out.square().sum(), params)
    attn.fold_rel_pos = False
    ref = attn(x, hw, mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), (g - r).abs().max()


def _windowed(rel_pos, fold=True):
    """Window 3 on a 5 x 7 grid (padded windows) plus a global block, with relative position."""
    model = vit(class_token=False, window_size=3, global_blocks=(3,), rel_pos=rel_pos)
    for m in model.modules():
        if hasattr(m, "fold_rel_pos"):
            m.fold_rel_pos = fold
    return model, torch.randn(2, 3, 80, 112)


@pytest.mark.parametrize(
    "rel_pos, fold", [("decomposed", True), ("decomposed", False), ("bias", 0)]
)
def test_bf16_attention_gets_biases_in_its_dtype_and_contiguous(
    rel_pos, fold, monkeypatch, fused_attention
):
    """Under autocast the LayerNorm output is fp32 while the attention runs in bf16: an
    (N x N) bias made in fp32 would promote the attention; a permuted bias would be copied by
    the fused kernels (on a GPU: on a CPU in bf16 attention is written out)."""
    import torch.nn.functional as F

    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            seen.append((q.dtype, attn_mask.dtype, attn_mask.is_contiguous()))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model, x = _windowed(rel_pos, fold)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_intermediates(x, [3])
    if fold:  # folded: no mask anywhere (padded windows need none): fused kernels apply
        assert seen == []
        return
    assert len(seen) == 4, seen  # a bias in every block
    assert set(seen) == {(torch.bfloat16, torch.bfloat16, True)}, seen


def test_a_bf16_bias_table_is_cast_before_it_is_gathered(monkeypatch):
    """The BEiT table is cast before it is gathered: an fp32 (N x N) bias per head, and its
    gradient, would cost 768 MiB per global block of ViT-B at 1024 px."""
    import mae_transfer.vit as vit_module

    made, real = [], vit_module.relative_position_bias

    def spy(table, *args, **kwargs):
        out = real(table, *args, **kwargs)
        made.append((out.shape[-1], out.dtype))
        return out

    monkeypatch.setattr(vit_module, "relative_position_bias", spy)
    model, x = _windowed("bias")  # the global block attends over 5 x 7 = 35 tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_intermediates(x, [3])[-1].float().sum().backward()
    assert (35, torch.bfloat16) in made and {dtype for _, dtype in made} == {torch.bfloat16}
    assert model.blocks[0].attn.relative_position_bias_table.grad.dtype == torch.float32


def test_constant_tables_are_built_once_not_in_every_block_and_forward():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Builders(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("arange", "one_hot", "masked_fill", "meshgrid"):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for rel_pos in ("decomposed", "bias"):
        model, x = _windowed(rel_pos)
        model.forward_intermediates(x, [3])
        with Builders() as mode:
            model.forward_intermediates(x, [3])
        assert not mode.ops, (rel_pos, mode.ops)


def test_tables_first_built_in_inference_mode_serve_a_training_backward():
    from mae_transfer import vit as vit_module

    for builder in (
        "_relative_index",
        "_key_rows_and_columns",
        "_bias_table_index",
    ):
        getattr(vit_module, builder).cache_clear()
    for rel_pos in ("decomposed", "bias"):
        model, x = _windowed(rel_pos, fold=rel_pos == "decomposed")
        with torch.inference_mode():  # an evaluation first (mmengine, detectron2 hooks)
            model.eval().forward_intermediates(x, [3])
        model.train()
        sum(o.sum() for o in model.forward_intermediates(x, [3])).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "rel" in n)
