"""Every registered model (mae_transfer.models, mae_transfer.registry): its named size, and a
shrunk copy's output shapes on an odd grid, finite values and a gradient on every parameter."""

from __future__ import annotations

import pytest
import torch

from mae_transfer import VIT_SIZES, create_model, list_models
from mae_transfer.models import DECODER, size_of
from mae_transfer.registry import patch_size_of

SHRUNK = dict(embed_dim=32, depth=2, num_heads=2)
SHRUNK_DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
GRID = (3, 5)  # patches: odd, and not square


def is_mae(name: str) -> bool:
    return name.startswith("mae_")


def test_the_registry_holds_an_encoder_for_every_mae():
    names = list_models()
    assert len(names) == 2 * len(VIT_SIZES)
    assert all(name[len("mae_") :] in names for name in names if is_mae(name))


@pytest.mark.parametrize("name", list_models())
def test_the_factory_builds_the_size_it_is_named_after(name):
    with torch.device("meta"):  # (no memory, no init: a ViT-H in milliseconds)
        model = create_model(name)
    size, p = VIT_SIZES[size_of(name)], patch_size_of(name)
    assert model.patch_embed.proj.weight.shape == (size["embed_dim"], 3, p, p)
    assert len(model.blocks) == size["depth"]
    assert {blk.attn.num_heads for blk in model.blocks} == {size["num_heads"]}
    assert model.blocks[0].mlp.fc1.out_features == 4 * size["embed_dim"]
    if is_mae(name):  # the paper's decoder for every size
        assert model.decoder_embed.out_features == DECODER["decoder_embed_dim"]
        assert len(model.decoder_blocks) == DECODER["decoder_depth"]
        assert model.decoder_blocks[0].attn.num_heads == DECODER["decoder_num_heads"]
        assert model.decoder_pred.out_features == p * p * 3


@pytest.mark.parametrize("name", list_models())
def test_a_shrunk_model_gives_shapes_finite_values_and_a_gradient_everywhere(name):
    torch.manual_seed(0)
    p = patch_size_of(name)
    hw = (GRID[0] * p, GRID[1] * p)
    kwargs = {**SHRUNK, **(SHRUNK_DECODER if is_mae(name) else {})}
    model = create_model(name, img_size=hw, **kwargs).train()
    x = torch.randn(2, 3, *hw)
    n = GRID[0] * GRID[1]
    if is_mae(name):
        loss, pred, mask = model(x, mask_ratio=0.6)
        assert pred.shape == (2, n, p * p * 3) and mask.shape == (2, n)
        assert mask.sum(1).tolist() == [n - int(n * 0.4)] * 2  # 6 of 15 patches kept
        assert torch.isfinite(pred).all() and torch.isfinite(loss)
    else:
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + n, SHRUNK["embed_dim"])  # class token first
        maps = model.forward_intermediates(x, [0, 1])
        assert [m.shape for m in maps] == [(2, SHRUNK["embed_dim"], *GRID)] * 2
        assert torch.isfinite(feats).all() and all(torch.isfinite(m).all() for m in maps)
        loss = (feats * torch.randn_like(feats)).sum()  # (a random direction: nothing cancels)
    loss.backward()
    trainable = [(k, q) for k, q in model.named_parameters() if q.requires_grad]
    assert trainable
    idle = [k for k, q in trainable if q.grad is None or not q.grad.any()]
    assert not idle, f"no gradient on {idle}"
    assert all(torch.isfinite(q.grad).all() for _, q in trainable)
