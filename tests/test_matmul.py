"""The CPU fp32 matrix-multiply library of our Linear layers (mae_transfer.matmul): oneDNN's
product gives torch's values and gradients, the models route through it only where the rule
says, it passes through wherever it must not run, and the benchmark reports it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_MAE, TINY_VIT

from mae_transfer import matmul
from mae_transfer.mae import build_mae

pytestmark = pytest.mark.skipif(
    not matmul._onednn_available(), reason="this torch has no oneDNN linear kernel"
)


@pytest.fixture
def calls(monkeypatch):
    """Counts the products that ran on oneDNN (forward calls of the routed function)."""
    count = {"n": 0}
    apply = matmul._OneDNNLinear.apply

    def counted(*args):
        count["n"] += 1
        return apply(*args)

    monkeypatch.setattr(matmul._OneDNNLinear, "apply", counted)
    return count


@pytest.fixture
def anywhere(monkeypatch):
    """oneDNN for every fp32 product, however small (the tests' tiny models included)."""
    monkeypatch.setattr(matmul, "MIN_MACS", 0)
    with matmul.library("onednn"):
        yield


@pytest.mark.parametrize(
    "x_shape, bias, x_grad, transposed",
    [((6, 5), True, True, False), ((2, 7, 5), False, True, False), ((3, 4, 5), True, False, True)],
)
def test_linear_matches_torch_values_and_gradients(
    anywhere, calls, x_shape, bias, x_grad, transposed
):
    torch.manual_seed(0)
    x = (
        torch.randn(*x_shape[:-2], x_shape[-1], x_shape[-2]).transpose(-1, -2)
        if transposed
        else None
    )
    x = torch.randn(x_shape) if x is None else x  # transposed: a non-contiguous input
    w = torch.randn(9, 5, requires_grad=True)
    b = torch.randn(9, requires_grad=True) if bias else None
    x.requires_grad_(x_grad)
    y = matmul.linear(x, w, b)
    assert calls["n"] == 1
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None and t.requires_grad], grad)
    x2, w2 = x.detach().requires_grad_(x_grad), w.detach().requires_grad_()
    b2 = None if b is None else b.detach().requires_grad_()
    y2 = F.linear(x2, w2, b2)
    want = torch.autograd.grad(
        y2, [t for t in (x2, w2, b2) if t is not None and t.requires_grad], grad
    )
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    assert len(got) == len(want) == 1 + x_grad + bias
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, x):
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    loss = model(x, mask_ratio=0.75, loss_only=True)[0]
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_mae_on_onednn_gives_torchs_loss_and_gradients_and_repeats_bitwise(anywhere, calls):
    model = build_mae(img_size=32, patch_size=8, norm_pix_loss=True, **TINY_MAE)
    x = torch.randn(4, 3, 32, 32)
    loss, grads = _loss_and_grads(model, x)
    routed = calls["n"]
    # every product went through oneDNN: 4 per block (qkv, proj, fc1, fc2), 5 in the last
    # decoder block (its query and key-value products apart), the patch embedding, the
    # decoder's embedding and its head
    assert routed == 4 * len(model.blocks) + 4 * (len(model.decoder_blocks) - 1) + 5 + 3
    again, grads_again = _loss_and_grads(model, x)
    assert torch.equal(loss, again) and all(torch.equal(grads[n], grads_again[n]) for n in grads)
    with matmul.library("default"):
        ref, ref_grads = _loss_and_grads(model, x)
    assert calls["n"] == 2 * routed  # the default run routed nothing
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(ref_grads)  # every parameter still gets its gradient
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_routing_keeps_parameter_names_and_checkpoints():
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 2)))
    routed = matmul.route_linears(copy.deepcopy(plain))
    assert [type(m) for m in routed.modules() if isinstance(m, nn.Linear)] == [matmul.Linear] * 2
    assert routed.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(5, 4)
    torch.testing.assert_close(routed(x), plain(x))
    model = build_mae(img_size=32, patch_size=8, **TINY_MAE)  # the models route themselves
    assert (
        type(model.decoder_pred) is matmul.Linear and type(model.blocks[0].mlp.fc1) is matmul.Linear
    )
    from mae_transfer.classification.model import ViTClassifier

    clf = ViTClassifier(num_classes=3, img_size=32, patch_size=8, **TINY_VIT)
    assert type(clf.head) is matmul.Linear and type(clf.blocks[0].attn.qkv) is matmul.Linear


def test_routing_passes_through_where_onednn_must_not_run(anywhere, calls, monkeypatch):
    lin = matmul.route_linears(nn.Linear(8, 8))
    x = torch.randn(4, 8)
    with torch.autocast("cpu", torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # autocast's product, not ours
    lin64 = matmul.route_linears(nn.Linear(8, 8).double())
    lin64(x.double())
    traced = torch.jit.trace(lin, x, check_trace=False)  # its graph holds torch's linear
    assert "mkldnn" not in str(traced.graph)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        lin(x)
    with torch.backends.mkldnn.flags(enabled=False):  # the user turned oneDNN off
        lin(x)
    assert calls["n"] == 0
    monkeypatch.setattr(matmul, "MIN_MACS", 4 * 8 * 8 + 1)  # one multiply-add short
    lin(x)
    assert calls["n"] == 0
    monkeypatch.setattr(matmul, "MIN_MACS", 4 * 8 * 8)
    lin(x)
    assert calls["n"] == 1


def test_auto_rule_by_cpu_vendor_and_overrides(monkeypatch):
    monkeypatch.delenv(matmul.ENV_VAR, raising=False)
    cases = [  # machine, vendor, oneDNN?, what the reason names
        ("x86_64", "AuthenticAMD", True, "AuthenticAMD"),
        ("x86_64", "HygonGenuine", True, "HygonGenuine"),
        ("x86_64", "GenuineIntel", False, "GenuineIntel"),
        ("x86_64", None, False, "unknown"),
        ("aarch64", None, False, "aarch64"),
    ]
    try:
        for machine, vendor, want, named in cases:
            monkeypatch.setattr(matmul.platform, "machine", lambda m=machine: m)
            monkeypatch.setattr(matmul, "_cpu_vendor", lambda v=vendor: v)
            matmul._auto_choice.cache_clear()
            use, why = matmul.cpu_linear_check()
            assert use is want, (machine, vendor, why)
            assert named in why
        # the environment overrides the rule, library() overrides the environment
        monkeypatch.setenv(matmul.ENV_VAR, "onednn")
        assert matmul.cpu_linear_check() == (True, f"{matmul.ENV_VAR}=onednn")
        with matmul.library("default"):
            assert matmul.cpu_linear_check()[0] is False
        monkeypatch.setenv(matmul.ENV_VAR, "Default ")
        assert matmul.cpu_linear_check()[0] is False
        monkeypatch.setenv(matmul.ENV_VAR, "fastest")
        with pytest.raises(ValueError, match=f"{matmul.ENV_VAR} must be one of .*'fastest'"):
            matmul.cpu_linear_check()
        with pytest.raises(ValueError, match="'mkl'"), matmul.library("mkl"):
            pass
    finally:
        matmul._auto_choice.cache_clear()


def test_benchmark_reports_our_step_on_both_libraries(anywhere, monkeypatch):
    from mae_transfer.benchmark import measure
    from mae_transfer.benchmark.pretrain import _versus_official_case

    peak = measure.matmul_peak(torch.device("cpu"), torch.float32, n=64, repeats=1)
    assert peak["gflops"] > 0 and peak["library"] in ("torch", "oneDNN")
    row = _versus_official_case(
        "mae_vit_base_patch16", 2, 32, 0.75, "cpu", 0, 1, tiny=True, amp="fp32"
    )
    assert row["ours_cpu_matmul"] == "oneDNN"  # (MIN_MACS 0 here: every product routed)
    assert row["ours_default_matmul_img_s"] > 0 and row["speedup_vs_official_default_matmul"] > 0
    with monkeypatch.context() as m:  # none of the tiny model's products is large enough
        m.setattr(matmul, "MIN_MACS", 1 << 26)
        row = _versus_official_case(
            "mae_vit_base_patch16", 2, 32, 0.75, "cpu", 0, 1, tiny=True, amp="fp32"
        )
    assert row["ours_cpu_matmul"] == "torch's default" and "ours_default_matmul_img_s" not in row
    # the profiler's matrix-multiply FLOPs count oneDNN's product: x (M, K) by w (N, K)
    assert measure._gemm_flops("mkldnn::_linear_pointwise", [[6, 5], [9, 5], [9]]) == 2 * 6 * 5 * 9


def test_double_backward_through_onednn_matches_torch(anywhere, calls):
    # a gradient of a gradient (create_graph=True, e.g. a gradient penalty): oneDNN's product
    # has no derivative, so it must not be differentiated silently as a constant
    torch.manual_seed(0)
    x0, w0, b0 = torch.randn(3, 4, 5), torch.randn(9, 5), torch.randn(9)

    def second_order(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x, w, b).pow(2).sum(), x, create_graph=True)
        return [gx, *torch.autograd.grad(gx.pow(2).sum(), [x, w, b])]

    got = second_order(matmul.linear)
    assert calls["n"] == 1
    for g, h in zip(got, second_order(F.linear)):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4)


def test_a_check_while_onednn_is_disabled_does_not_stick(monkeypatch):
    # the vendor rule is cached for the process; oneDNN turned off for a while is not
    monkeypatch.delenv(matmul.ENV_VAR, raising=False)
    monkeypatch.setattr(matmul.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(matmul, "_cpu_vendor", lambda: "AuthenticAMD")
    matmul._auto_choice.cache_clear()
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            use, why = matmul.cpu_linear_check()
            assert not use and "disabled" in why
        assert matmul.cpu_linear_check()[0] is True
    finally:
        matmul._auto_choice.cache_clear()


@pytest.mark.parametrize("which", ["classifier", "probe", "windowed_checkpointed_vit"])
def test_the_other_routed_models_give_torchs_values_and_gradients(anywhere, calls, which):
    """The classifier (fine-tuning; a probe on cached features) and the transfer ViT (window
    attention, relative positions, activation checkpointing: its recompute takes the same
    library) train alike on either library."""
    from mae_transfer.classification.model import ViTClassifier
    from mae_transfer.vit import VisionTransformer

    torch.manual_seed(0)
    if which == "windowed_checkpointed_vit":
        model = VisionTransformer(
            img_size=32, patch_size=8, window_size=2, rel_pos="decomposed", class_token=False,
            use_checkpoint=True, **TINY_VIT,
        )  # fmt: skip
        run, x = model.forward_features, torch.randn(2, 3, 32, 40)
    else:
        probe = which == "probe"
        model = ViTClassifier(num_classes=5, img_size=32, patch_size=8, probe=probe, **TINY_VIT)
        run, x = model, torch.randn(6, 32) if probe else torch.randn(2, 3, 32, 32)
    model.train()

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = run(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    assert calls["n"] > 0
    with matmul.library("default"):
        ref, ref_grads = loss_and_grads()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
