"""The attention kernel rule (mae_transfer.attention): which path runs where, and that the
written-out path computes what torch's fused kernel computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MAE, TINY_VIT

from mae_transfer import attention as kernels
from mae_transfer import create_model


def test_written_out_only_on_a_cpu_computing_in_bf16_at_short_lengths():
    fp32 = torch.zeros(2, 50, 8)
    assert not kernels.explicit_attention_faster(fp32)
    assert kernels.explicit_attention_faster(fp32.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.explicit_attention_faster(fp32)  # the precision autocast computes in
        long = torch.zeros(1, 2, kernels.EXPLICIT_MAX_TOKENS + 1, 8)
        assert not kernels.explicit_attention_faster(long)  # scores of gigabytes: fused
    with torch.autocast("cpu", dtype=torch.float16):
        assert not kernels.explicit_attention_faster(fp32)  # measured for bf16 only
    assert not kernels.explicit_attention_faster(torch.zeros(2, 50, 8, device="meta"))


def test_written_out_attention_equals_the_fused_kernel_values_and_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(2, 1, 7, 7)
    mask[..., -2:] = float("-inf")  # padded keys
    for scale in (None, 0.3):
        out = kernels.explicit_attention(q, k, v, mask, scale=scale)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    # dropout acts on the attention weights: all of them dropped leaves nothing
    assert kernels.explicit_attention(q, k, v, dropout_p=1.0).abs().max() == 0


def _mae_loss(model, x):
    """(loss, pred) of ``model`` on ``x`` under bf16 autocast, with fixed masking noise."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(
            x, 0.75, noise=torch.rand(x.shape[0], 4, generator=GEN.manual_seed(1))
        )
    return loss, pred.float()


GEN = torch.Generator()


def test_the_mae_writes_attention_out_on_a_cpu_in_bf16_only_and_the_loss_agrees(monkeypatch):
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", img_size=32, norm_pix_loss=True, **TINY_MAE)
    x = torch.randn(4, 3, 32, 32)
    fp32, pred_fp32, _ = model(x, 0.75, noise=torch.rand(4, 4, generator=GEN.manual_seed(1)))
    assert all(blk.attn.fused_attn for blk in [*model.blocks, *model.decoder_blocks])
    written_out, pred_written_out = _mae_loss(model, x)
    assert not any(blk.attn.fused_attn for blk in [*model.blocks, *model.decoder_blocks])
    monkeypatch.setattr(kernels, "explicit_attention_faster", lambda x: False)
    fused, pred_fused = _mae_loss(model, x)
    assert all(blk.attn.fused_attn for blk in model.blocks)
    # bf16 rounding apart, one loss: the two paths and fp32
    assert abs(written_out.item() - fused.item()) <= 0.02 * fused.item()
    assert abs(written_out.item() - fp32.item()) <= 0.02 * fp32.item()
    # and one prediction (0.5% apart): the loss, a mean over many patches, hardly moves under
    # a wrong attention (uniform weights: 0.17%), the predicted pixels do (uniform: 16%)
    assert (pred_written_out - pred_fused).norm() <= 0.02 * pred_fused.norm()
    assert (pred_written_out - pred_fp32).norm() <= 0.02 * pred_fp32.norm()
    assert (pred_fused - pred_fp32).norm() <= 0.02 * pred_fp32.norm()


def test_the_transfer_vit_keeps_long_global_attention_on_the_fused_kernel(monkeypatch):
    """Under bf16 on a CPU the windows (4 tokens) are written out, the global block over
    40 x 40 = 1,600 tokens stays fused (the spy returns zeros: nothing is computed)."""
    fused = []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        fused.append(q.shape[-2])
        return q.new_zeros(*q.shape[:-1], v.shape[-1])

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = create_model(
        "vit_base_patch16",
        **{**TINY_VIT, "img_size": 640},
        class_token=False,
        window_size=2,
        global_blocks=(1,),
        rel_pos="decomposed",
    ).eval()
    explicit = []
    real = kernels.explicit_attention
    monkeypatch.setattr(
        kernels,
        "explicit_attention",
        lambda q, *a, **k: explicit.append(q.shape[-2]) or real(q, *a, **k),
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_intermediates(torch.zeros(1, 3, 640, 640), [1])
    assert fused == [1600] and explicit and set(explicit) == {4}


@pytest.mark.parametrize("loss_only", [False, True], ids=["full", "training"])
@pytest.mark.parametrize("amp", [False, True])
def test_the_kernel_switch_compiles_without_graph_breaks(amp, loss_only):
    """torch.compile traces the per-call choice (autocast state, device, length) into one
    graph: --compile keeps the written-out attention in bf16 and the fused one in fp32; also
    in training's forward (``loss_only``: the decoder's last block on the removed patches)."""
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch16", img_size=32, **TINY_MAE)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 4, generator=GEN.manual_seed(1))
    kw = dict(noise=noise, loss_only=loss_only)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        eager, _, _ = model(x, 0.75, **kw)
        explained = torch._dynamo.explain(model)(x, 0.75, **kw)
        torch._dynamo.reset()
        compiled, _, _ = torch.compile(model, backend="eager")(x, 0.75, **kw)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(compiled, eager)
    assert model.blocks[0].attn.fused_attn is not amp
