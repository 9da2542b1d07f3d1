"""The benchmark runs end to end on tiny models and writes well-formed JSON (no timings are
asserted: they belong to the machine, not to the code); the official step's re-implementation
computes what our model computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_MAE

from mae_transfer import create_model
from mae_transfer.benchmark import measure
from mae_transfer.benchmark.official import OfficialMAE
from mae_transfer.benchmark.pretrain import official_update, our_update


@pytest.fixture(autouse=True)
def _measure_settings(monkeypatch):
    """--tiny sets measure.IN_PROCESS and PEAK_N for the process: back after each test."""
    monkeypatch.setattr(measure, "IN_PROCESS", measure.IN_PROCESS)
    monkeypatch.setattr(measure, "PEAK_N", measure.PEAK_N)


def test_benchmark_all_tiny_writes_json(tmp_path):
    pytest.importorskip("detectron2")  # the transfer section times Mask R-CNN and UperNet
    pytest.importorskip("mmseg")
    out = tmp_path / "new" / "bench.json"  # (its folder made before the timing)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "all", "--tiny"]
    cmd += ["--warmup", "0", "--repeats", "1", "--feed_rates", "500,2000", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["matmul"]["fp32"]["gflops"] > 0
    assert {"pretrain", "official", "table2", "maskratio", "data", "transfer"} <= set(data)
    cls = {r["what"]: r for r in data["classification"]}
    assert set(cls) == {"finetune_step", "linprobe_features"}
    assert all(r["img_s"] > 0 and r["ratio_to_peak"] > 0 for r in cls.values())
    pre = data["pretrain"][0]
    # the rows say they are not the named model's figures
    assert pre["model"] == "mae_vit_base_patch16 (tiny)"
    assert all(r["model"].endswith(" (tiny)") for r in data["classification"])
    for key in ("img_s", "gmac_fwd_per_img", "achieved_gflops", "ratio_to_peak"):
        assert isinstance(pre[key], float) and pre[key] > 0, key
    on_cpu = data["machine"]["device"] == "cpu"  # (cases in the tool's process: not measured)
    assert pre["peak_mem_mb"] is None if on_cpu else pre["peak_mem_mb"] > 0
    assert data["table2"][1]["mask_tokens_in_encoder"] is True
    assert data["table2"][0]["flop_ratio"] > 1  # all tokens through the encoder cost more
    assert [r["mask_ratio"] for r in data["maskratio"]] == [0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
    assert 0 < pre["gemm_ratio_to_peak"] < 10 and 0 < pre["share_gemm"] < 1
    # ours vs the official step, side by side
    vs = data["official"][0]
    assert vs["precision"] == pre["precision"]
    assert vs["ours_img_s"] > 0 and vs["official_img_s"] > 0 and vs["speedup_vs_official"] > 0
    assert vs["official_model_img_s"] > 0 and vs["speedup_model_only"] > 0
    assert vs["official_written_out_img_s"] > 0 and vs["speedup_vs_official_written_out"] > 0
    # input pipeline: per core, through the loader, workers for the asked step rates
    per_core = [r for r in data["data"] if "images" in r]
    assert [r["images"] for r in per_core] == ["500x375 q90 JPEG", "2048x1536 q90 JPEG"]
    assert all(r["official_img_s"] > 0 and r["ours_speedup"] > 0 for r in per_core)
    loaders = [r for r in data["data"] if "loader_img_s" in r]
    assert [r["workers"] for r in loaders][:2] == [0, 1]
    feed = [r for r in data["data"] if "feed_img_s" in r]
    assert [r["feed_img_s"] for r in feed] == [500.0, 2000.0]
    assert feed[0]["workers_ours"] <= feed[1]["workers_ours"]
    # transfer, in the precision users train in
    kinds = {r.get("backbone") or r.get("iteration") for r in data["transfer"]}
    assert kinds == {"det", "seg", "maskrcnn", "upernet"}
    assert {r["precision"] for r in data["transfer"]} == {pre["precision"]}
    det = [r for r in data["transfer"] if r.get("backbone") == "det" and r["input"] == 128]
    assert len(det) == 3 and any("ViTDet" in r["attention"] for r in det)
    window = next(r for r in det if r["attention"].startswith("window"))
    assert window["time_vs_vitdet"] > 0
    assert window["mem_vs_vitdet"] is None if on_cpu else window["mem_vs_vitdet"] > 0
    paths = [(r["where"], r["path"]) for r in data["attention"]]
    assert paths == [
        (w, p) for w in ("encoder", "decoder") for p in ("sdpa", "ours", "sdpa_math", "explicit")
    ]
    assert all(
        r["time_vs_sdpa"] > 0 and r["precision"] == pre["precision"] for r in data["attention"]
    )
    assert "| img_s" in r.stdout or "img_s |" in r.stdout
    assert "| feed_img_s | workers_ours" in r.stdout  # a table of its own


def _pair(norm_pix_loss: bool):
    ours = create_model(
        "mae_vit_base_patch16", img_size=32, norm_pix_loss=norm_pix_loss, **TINY_MAE
    )
    official = OfficialMAE(
        img_size=32,
        embed_dim=32,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        norm_pix_loss=norm_pix_loss,
    )
    official.load_state_dict(ours.state_dict())  # the same official parameter names
    return ours, official


def test_official_reimplementation_equals_our_model():
    for norm_pix_loss in (True, False):
        ours, official = _pair(norm_pix_loss)
        x = torch.randn(3, 3, 32, 32)
        torch.manual_seed(7)
        loss_a, pred_a, mask_a = ours(x, mask_ratio=0.5)
        torch.manual_seed(7)  # the same noise draw, right after the patch embedding
        loss_b, pred_b, mask_b = official(x, mask_ratio=0.5)
        assert torch.equal(mask_a, mask_b) and mask_a.sum() == 6
        assert torch.allclose(pred_a, pred_b, atol=1e-6)
        assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=1e-6)
        loss_a.backward()
        loss_b.backward()
        grads_b = dict(official.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad, grads_b[name].grad, atol=1e-5), name


def test_official_reimplementation_masks_with_argsort_of_noise():
    _, official = _pair(True)
    x = torch.randn(2, 4, 8)
    torch.manual_seed(3)
    kept, mask, ids_restore = official.random_masking(x, 0.75)
    torch.manual_seed(3)
    order = torch.argsort(torch.rand(2, 4), dim=1)
    assert torch.equal(kept[:, 0], x[torch.arange(2), order[:, 0]])
    assert torch.equal(mask.sum(1), torch.tensor([3.0, 3.0]))
    assert torch.equal(torch.argsort(order, 1), ids_restore)


def test_both_updates_train_alike_and_the_official_one_is_torch_s_default():
    """The side-by-side steps differ in how they update, not in what: the official update
    (default AdamW, grad-norm, host-side loss check) and ours (fused where torch has it, the
    scale-1 guard) move the same weights the same way; the official one stops on NaN."""
    ours, official = _pair(True)
    cpu = torch.device("cpu")
    ours_step, official_step = our_update(ours, cpu), official_update(official, cpu)
    impl = official_step.optimizer.defaults
    assert not impl["fused"] and impl["foreach"] is None  # torch picks, as the official code
    assert ours_step.optimizer.defaults["fused"] or ours_step.optimizer.defaults["foreach"]
    x = torch.randn(3, 3, 32, 32)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for step in range(2):
        torch.manual_seed(step)
        ours_step(ours(x, mask_ratio=0.5)[0])
        torch.manual_seed(step)
        official_step(official(x, mask_ratio=0.5)[0])
    theirs = dict(official.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p, theirs[name], atol=2e-5), name  # lr 1e-4: steps of ~1e-4
        assert p.grad is None and theirs[name].grad is None  # both free the gradients
    moved = [n for n, p in ours.named_parameters() if not torch.equal(p, before[n])]
    assert "blocks.0.attn.qkv.weight" in moved and "pos_embed" not in moved
    loss = official(x)[0] * float("nan")
    try:
        official_step(loss)
    except FloatingPointError as e:
        assert "nan" in str(e)
    else:
        raise AssertionError("the official update took a NaN loss")


def test_bad_arguments_stop_before_any_timing(tmp_path, capsys, monkeypatch):
    """What would fail after minutes of timing is refused at once (argparse's exit code 2)."""
    import pytest

    from mae_transfer.benchmark import cli

    (tmp_path / "afile").write_text("x")
    for bad, text in (
        (["--json", str(tmp_path / "afile" / "x.json")], "afile is a file"),  # (missing: made)
        (["--json", str(tmp_path)], "names a folder: name the file (e.g. bench.json)"),
        (["--json", str(tmp_path / "new") + "/"], "names a folder"),  # (one still to make)
        (["--feed_rates", "abc"], "expected positive numbers"),
        (["--feed_rates", "1000,-5"], "expected positive numbers"),
        (["--device", "cuda"], "no CUDA device"),
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 runs on CUDA only"),
        (["--model", "mae_vit_gigantic"], "--model"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ):
        if bad[1] == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as e:
            cli.main(["matmul", "--tiny", *bad])
        assert e.value.code == 2 and text in capsys.readouterr().err, bad


def test_json_is_strict_and_written_after_each_section(tmp_path, monkeypatch):
    import pytest

    from mae_transfer.benchmark import cli

    out = tmp_path / "bench.json"

    def failing(args):
        raise RuntimeError("a later section fails")

    monkeypatch.setitem(cli.SECTIONS, "pretrain", lambda args: [{"x": float("nan"), "y": 1.0}])
    monkeypatch.setitem(cli.SECTIONS, "official", failing)
    monkeypatch.setattr(cli, "SECTIONS", {k: cli.SECTIONS[k] for k in ("pretrain", "official")})
    with pytest.raises(RuntimeError, match="a later section fails"):
        cli.main(["all", "--tiny", "--json", str(out)])
    data = json.loads(out.read_text())  # strict: no NaN
    assert data["pretrain"] == [{"x": None, "y": 1.0}] and "official" not in data
    assert data["matmul"]["fp32"]["gflops"] > 0


def test_tiny_runs_take_a_whole_number_of_patches(monkeypatch):
    from mae_transfer.benchmark import cli

    seen = {}
    size_of = lambda args: [{"input": seen.setdefault("size", args.input_size)}]  # noqa: E731
    monkeypatch.setitem(cli.SECTIONS, "pretrain", size_of)
    monkeypatch.setattr(cli.measure, "matmul_peak", lambda *a, **k: {"gflops": 1.0})
    cli.main(["pretrain", "--tiny", "--model", "mae_vit_huge_patch14"])
    assert seen["size"] == 56  # 64 is not a multiple of 14


def test_the_data_rivals_time_the_same_crop_of_each_image(tmp_path, monkeypatch):
    """Every try of an image, in both rivals, is the same crop (before, each try drew a new
    one and the best of N timed the cheapest)."""
    from mae_transfer.benchmark import data
    from mae_transfer.data import transforms

    paths = data.make_jpegs(str(tmp_path), 3, (120, 160))
    crops = {"ours": [], "official": []}
    real_apply = transforms.RandomResizedCropFlip.apply

    def spy_apply(self, enc, crop, flip):
        crops["ours"].append((enc.path, tuple(crop), flip))
        return real_apply(self, enc, crop, flip)

    monkeypatch.setattr(transforms.RandomResizedCropFlip, "apply", spy_apply)
    import torchvision.transforms as T

    real_get = T.RandomResizedCrop.get_params

    def spy_get(img, scale, ratio):
        crops["official"].append(tuple(real_get(img, scale, ratio)))
        return crops["official"][-1]

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(spy_get))
    ours, official = data._ours_item(paths, 32), data._official_item(paths, 32)
    for _ in range(2):
        for i in range(3):
            ours(i)
            official(i)
    assert crops["ours"][:3] == crops["ours"][3:]  # the same crop on every try
    assert [c[1] for c in crops["ours"][:3]] == crops["official"][:3] == crops["official"][3:]
    assert len(set(crops["official"][:3])) == 3


def test_attention_section_at_the_models_shapes_in_bf16(tmp_path, monkeypatch):
    from mae_transfer.attention import explicit_attention
    from mae_transfer.benchmark import cli
    from mae_transfer.benchmark.attention import attention_shapes

    shapes = attention_shapes(create_model("mae_vit_base_patch16"))
    got = [(s["where"], s["tokens"], s["heads"], s["head_dim"], s["blocks"]) for s in shapes]
    assert got == [("encoder", 50, 12, 64, 12), ("decoder", 197, 16, 32, 8)]
    q, k, v = torch.randn(3, 2, 4, 9, 16).unbind(0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(explicit_attention(q, k, v), sdpa, atol=1e-6)
    out = tmp_path / "attn.json"
    args = ["attention", "--tiny", "--amp", "bf16", "--warmup", "0", "--repeats", "1"]
    assert cli.main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["attention"]
    assert {r["precision"] for r in rows} == {"bfloat16"} and len(rows) == 8
    by = {(r["where"], r["path"]): r for r in rows}
    assert by["encoder", "ours"]["kernel"] == "matmul + softmax"  # a CPU in bf16 writes it out
    assert by["encoder", "sdpa"]["time_vs_sdpa"] == 1.0 and by["decoder", "explicit"]["gflops"] > 0
    assert by["encoder", "sdpa_math"]["kernel"] == "attention_math"
    assert by["encoder", "explicit"]["kernel"] == "matmul + softmax"
    assert all(r["ms_per_step"] > r["ms_fwd_bwd_per_block"] > 0 for r in rows)


def test_gpu_cases_run_on_the_asked_gpu(monkeypatch):
    """--device cuda:1 built the Mask R-CNN case on the current GPU (0) while its timer and
    memory counter read GPU 1."""
    pytest.importorskip("detectron2")
    from mae_transfer.benchmark import transfer

    asked = []

    def build_model(cfg):
        asked.append(cfg.MODEL.DEVICE)
        raise StopIteration

    monkeypatch.setattr("detectron2.modeling.build_model", build_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else the config says cpu
    with pytest.raises(StopIteration):
        transfer._tiny_maskrcnn(torch.device("cuda", 1))
    assert asked == ["cuda:1"]


def test_the_gpu_peak_times_many_products_per_sync(monkeypatch):
    """The GPU peak timed one ~30 us product per launch and sync."""
    products = []
    monkeypatch.setattr(measure, "_sync", lambda device: None)
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: products.append(1) or real_mm(*a, **k))
    fake_gpu = torch.device("meta")  # not a CPU: the GPU rule
    peak = measure.matmul_peak(fake_gpu, n=8, repeats=3)
    assert len(products) == 20 * (2 + 3) and peak["gflops"] > 0
    products.clear()
    measure.matmul_peak(torch.device("cpu"), n=8, repeats=3)
    assert len(products) == 2 + 3


def test_benchmark_refuses_what_would_fail_after_the_timing(capsys):
    """A patch size that does not tile the input, an odd batch for mixup: tracebacks from a
    worker after the peak measurement, once."""
    from mae_transfer.benchmark.cli import main

    for argv, text in (
        (
            ["pretrain", "--input_size", "30"],
            "--input_size 30 is not a multiple of the patch size 16",
        ),
        (["classification", "--batch", "3"], "--batch 3: fine-tuning's mixup (timm) needs an even"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and text in capsys.readouterr().err, argv


def test_sections_that_pretrain_refuse_an_encoder_only_vit(capsys, monkeypatch):
    """A vit_* name (registered, encoder-only) went through the name check and failed in the
    first case (``norm_pix_loss`` / ``decoder_embed_dim`` unexpected) after the peak; an
    unknown name was answered with the vit_* names too. classification takes either."""
    from mae_transfer.benchmark import cli

    monkeypatch.setattr(cli.measure, "matmul_peak", lambda *a, **k: {"gflops": 1.0})
    for argv, text in (
        *(
            ([what, "--model", "vit_base_patch16"], "use mae_vit_base_patch16")
            for what in (*cli.MAE_SECTIONS, "all")
        ),
        (["table2", "--table2_model", "vit_large_patch16"], "use mae_vit_large_patch16"),
        (["pretrain", "--model", "vit_base"], "pretrain builds an MAE model: one of mae_vit_"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--tiny"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and text in err, (argv, err)
        assert "vit_tiny_patch16," not in err.replace("mae_vit_tiny_patch16,", ""), err
    # what does take a vit_* name runs (the sections stubbed: no timing here)
    for what in ("classification", "data", "transfer"):
        monkeypatch.setitem(cli.SECTIONS, what, lambda args: [{"model": args.model}])
        assert cli.main([what, "--tiny", "--model", "vit_base_patch16"]) == 0
    from mae_transfer.benchmark.classification import _encoder_name

    assert _encoder_name("mae_vit_base_patch16_dec512d8b") == "vit_base_patch16"  # an alias
    assert _encoder_name("vit_large_patch16") == "vit_large_patch16"


def test_table2_puts_the_speedup_on_the_row_of_ours(monkeypatch):
    """The speedup of ours sat on the row of the encoder with mask tokens (the slower one)."""
    import argparse

    from mae_transfer.benchmark import pretrain

    def row(args, mask_ratio=0.75, mask_tokens=False, compile_=False, model=None):
        slow = 3.0 if mask_tokens else 1.0
        return {
            "mask_tokens_in_encoder": mask_tokens,
            "img_s": 6.0 / slow,
            "matmul_peak_gflops": 100.0,
            "gflop_step_per_img": 10.0 * slow,
        }

    monkeypatch.setattr(pretrain, "_pretrain_row", row)
    args = argparse.Namespace(tiny=True, model="mae_vit_base_patch16")
    ours, with_tokens = pretrain.bench_table2(args)
    assert ours["mask_tokens_in_encoder"] is False and with_tokens["mask_tokens_in_encoder"]
    assert ours["speedup_of_ours"] == ours["speedup_at_equal_peak"] == ours["flop_ratio"] == 3
    assert not {"speedup_of_ours", "speedup_at_equal_peak", "flop_ratio"} & set(with_tokens)


def test_cpu_memory_is_not_measured_when_the_cases_share_the_process(monkeypatch):
    """With --tiny the cases run in the tool's process, where memory freed by earlier cases
    stays resident: the growth printed as a measured 0 (and mem_vs_* as 0); it is now NaN,
    null in the JSON and n/a in the table. The step still runs (it is also the first one)."""
    import math

    from mae_transfer.benchmark import measure, report

    cpu, steps = torch.device("cpu"), []
    monkeypatch.setattr(measure, "IN_PROCESS", True)
    assert math.isnan(measure.peak_memory_mb(lambda: steps.append(1), cpu)) and steps == [1]
    monkeypatch.setattr(measure, "IN_PROCESS", False)
    assert measure.peak_memory_mb(lambda: steps.append(2), cpu) >= 0 and steps == [1, 2]
    rows = [{"backbone": "det", "peak_mem_mb": float("nan"), "mem_vs_global": None, "x": 0.0}]
    table = report.markdown({"machine": {}, "matmul": {"fp32": {"gflops": 1.0}}, "t": rows})
    assert "| det | n/a | n/a | 0 |" in table  # (a measured 0 stays 0)


def test_transfer_rows_name_their_fixed_model_and_batch(monkeypatch):
    """transfer times ViT-B on one image (and the demo configs) whatever --model / --batch /
    --input_size, which its rows did not say; they name model, batch and size now (the
    backbone marked with --tiny, as the other sections' models), and a note says so."""
    import argparse

    from mae_transfer.benchmark import cli, transfer

    class Step(torch.nn.Module):  # the demo models (detectron2, mmseg): seconds to build
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

    def tiny_model(dev):
        model = Step()
        return model, lambda: {"loss": model.w.sum()}

    monkeypatch.setattr(transfer, "_tiny_maskrcnn", tiny_model)
    monkeypatch.setattr(transfer, "_tiny_upernet", tiny_model)
    monkeypatch.setattr(transfer, "in_fresh_process", lambda fn, *a: fn(*a))
    args = argparse.Namespace(
        tiny=True, device="cpu", warmup=0, repeats=1, amp="fp32", model="mae_vit_large_patch16"
    )
    rows = transfer.bench_transfer(args)
    cli._mark_tiny(rows)
    backbones = [r for r in rows if "backbone" in r]
    assert len(backbones) == 7
    assert {(r["model"], r["batch"]) for r in backbones} == {("vit_base_patch16 (tiny)", 1)}
    iterations = {r["iteration"]: r for r in rows if "iteration" in r}
    assert iterations["maskrcnn"]["config"] == "configs/detectron2/demo_tiny.yaml"
    assert [(r["batch"], r["input"]) for r in iterations.values()] == [(4, 128), (8, 128)]
    results = {"machine": {}, "matmul": {"fp32": {"gflops": 1.0}}, "transfer": rows}
    table = cli.markdown(results, cli.NOTES)
    assert "### transfer\n\nFixed cases, whatever --model, --batch and --input_size" in table
    assert "| backbone | model | batch | input |" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="kineto may have GPU news to tell")
def test_cpu_profiles_print_nothing_from_kineto():
    """Every CPU run printed ``ERROR: ... gpuGetDeviceCount failed with code 35`` (a CUDA
    build of torch without a driver) and USDT lines from the profiler of the time shares and
    the attention kernels."""
    code = (
        "import torch\n"
        "from mae_transfer.benchmark.attention import _kernel\n"
        "from mae_transfer.benchmark.measure import time_breakdown\n"
        "x = torch.randn(16, 16)\n"
        "time_breakdown(lambda: torch.mm(x, x))\n"
        "print(_kernel(lambda: torch.softmax(x, -1)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == "matmul + softmax", r.stderr[-2000:]
    assert "gpuGetDeviceCount" not in r.stderr and "USDT" not in r.stderr, r.stderr[-2000:]
