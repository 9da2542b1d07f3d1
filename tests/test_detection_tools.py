"""tools/visualize_det.py and tools/convert_to_detectron2.py: their arguments, output names
and refusals, driven in-process with the tiny detector of test_detection.py."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("detectron2")

import mae_transfer.detection  # noqa: E402,F401  (compat fixes before detectron2's imports)

# isort: split
from detectron2.modeling import build_model  # noqa: E402
from test_detection import (  # noqa: E402
    TINY_CONFIG,
    TINY_OPTS,
    _official_encoder_file,
    _refused,
    load_tool,
)

from mae_transfer.datasets import write_toy_coco  # noqa: E402
from mae_transfer.detection.train import build_cfg  # noqa: E402


@pytest.fixture(scope="module")
def toy_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_coco")
    return write_toy_coco(str(root), num_train=2, num_val=2, size=64)


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> str:
    """A whole (untrained) detector of TINY_CONFIG + TINY_OPTS, as the tool loads it."""
    path = str(tmp_path_factory.mktemp("detector") / "model_final.pth")
    torch.manual_seed(0)  # (module fixtures run before the per-test seed: whichever test is first)
    torch.save({"model": build_model(build_cfg(TINY_CONFIG, TINY_OPTS)).state_dict()}, path)
    return path


def _draw_argv(detector, toy_coco) -> list:
    """--config-file, --weights, --images of one image."""
    image = os.path.join(toy_coco["val"][1], sorted(os.listdir(toy_coco["val"][1]))[0])
    return ["--config-file", TINY_CONFIG, "--weights", detector, "--images", image]


def test_visualize_det_output_a_folder_a_name_without_suffix_a_folder_to_make(
    toy_coco, detector, tmp_path, capsys
):
    """A folder or a name without a suffix failed in PIL (unknown file extension), a missing
    folder once the model had run (FileNotFoundError)."""
    tool = load_tool("visualize_det")
    made_first, build = [], tool.build_model

    def build_model(cfg):
        made_first.append((tmp_path / "new" / "sub").is_dir())
        return build(cfg)

    tool.build_model = build_model
    (tmp_path / "folder").mkdir()
    for given, written in (
        ("named", "named.png"),
        ("folder", "folder/predictions.png"),
        ("new/sub/p.png", "new/sub/p.png"),
    ):
        argv = _draw_argv(detector, toy_coco)
        argv += ["--num", "1", "--score-thresh", "0.0", "--output", str(tmp_path / given)]
        assert tool.main([*argv, *TINY_OPTS]) == 0, given
        png = tmp_path / written
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", given
        assert f"wrote {png}" in capsys.readouterr().out, given  # said as written
    assert made_first[-1]  # the folder was made before the model was built


def test_visualize_det_refuses_num_0_and_a_test_set_without_images(
    toy_coco, detector, tmp_path, capsys, caplog
):
    """Both ended in ``max() arg is an empty sequence`` after the model had been built."""
    tool = load_tool("visualize_det")

    def build_model(cfg):
        raise AssertionError("the model was built")

    tool.build_model = build_model
    argv = _draw_argv(detector, toy_coco) + ["--output", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as e:
        tool.main([*argv, "--num", "0", *TINY_OPTS])
    assert e.value.code == 2 and "--num must be >= 1, got 0" in capsys.readouterr().err
    empty = write_toy_coco(str(tmp_path / "empty"), num_train=0, num_val=0)
    argv = ["--config-file", TINY_CONFIG, "--weights", detector, "--coco-val", *empty["val"]]
    code = tool.main([*argv, "--output", str(tmp_path / "p"), *TINY_OPTS])
    _refused(caplog, code, "DATASETS.TEST 'custom_coco_val' holds no images: give --images")
    assert not (tmp_path / "p.png").exists()


def test_visualize_det_draws_scores_below_the_config_s_test_threshold(
    toy_coco, detector, tmp_path, monkeypatch
):
    """--score-thresh 0 drew nothing from an early model: the model had already dropped every
    box below MODEL.ROI_HEADS.SCORE_THRESH_TEST (0.05)."""
    import mae_transfer.detection.visualize as visualize

    drawn, predict = [], visualize.predict

    def counted(cfg, model, path):
        img, inst = predict(cfg, model, path)
        drawn.append(len(inst))
        return img, inst

    monkeypatch.setattr(visualize, "predict", counted)
    argv = [*_draw_argv(detector, toy_coco), "--output", str(tmp_path / "p.png"), *TINY_OPTS]
    for thresh, model_thresh in (("0", "1.0"), ("0.5", "0.0")):  # the model's kept when lower
        opts = ["--score-thresh", thresh, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", model_thresh]
        assert load_tool("visualize_det").main([*argv, *opts]) == 0
    assert drawn == [build_cfg(TINY_CONFIG, TINY_OPTS).TEST.DETECTIONS_PER_IMAGE] * 2  # 20


@pytest.mark.parametrize("order", ["overrides_first", "overrides_between", "overrides_last"])
def test_visualize_det_takes_overrides_anywhere(toy_coco, detector, tmp_path, order):
    """KEY VALUE before --weights: ``the following arguments are required: --weights`` (the
    overrides were argparse.REMAINDER, which took every option after the first KEY)."""
    out = str(tmp_path / "p.png")
    image = _draw_argv(detector, toy_coco)[-2:]
    config, weights = ["--config-file", TINY_CONFIG], ["--weights", detector]
    rest = ["--num", "1", "--output", out]
    argv = {
        "overrides_first": [*config, *TINY_OPTS, *weights, *image, *rest],
        "overrides_between": [*config, *weights, *rest, *TINY_OPTS, *image],
        "overrides_last": [*config, *weights, *image, *rest, *TINY_OPTS],
    }[order]
    assert load_tool("visualize_det").main(argv) == 0
    assert os.path.isfile(out)


def test_visualize_det_says_where_overrides_after_images_went(toy_coco, detector, caplog):
    """--images takes every word after it: overrides there were named as missing files."""
    argv = [*_draw_argv(detector, toy_coco), *TINY_OPTS]
    code = load_tool("visualize_det").main(argv)
    _refused(caplog, code, "MODEL.VIT.SIZE_OVERRIDES is a config KEY? put the overrides before")


def test_visualize_det_does_not_read_the_encoder_that_initialised_training(
    toy_coco, detector, tmp_path
):
    """A trained detector's config names the MAE file of MODEL.VIT.PRETRAINED; moved since,
    drawing failed with ``checkpoint not found``, though --weights holds the whole model."""
    encoder, _ = _official_encoder_file(tmp_path)
    config = tmp_path / "config.yaml"  # as a training run's config.yaml names it
    config.write_text(f"_BASE_: {TINY_CONFIG}\nMODEL:\n  VIT:\n    PRETRAINED: {encoder}\n")
    os.replace(encoder, tmp_path / "moved_enc.pth")
    out = str(tmp_path / "p.png")
    argv = _draw_argv(detector, toy_coco)
    argv[1] = str(config)
    assert load_tool("visualize_det").main([*argv, "--output", out, *TINY_OPTS]) == 0
    assert os.path.isfile(out)


@pytest.mark.parametrize("case", ["folder", "new_folder", "pkl", "pyth", "missing_folder"])
def test_convert_tool_refuses_an_output_it_cannot_write_before_the_work(tmp_path, caplog, case):
    """A folder failed after the conversion (IsADirectoryError); a .pkl file was written as a
    torch file, which detectron2 then unpickled (UnpicklingError) in train_det's MODEL.WEIGHTS."""
    src, _ = _official_encoder_file(tmp_path)
    (tmp_path / "folder").mkdir()
    output, expected = {
        "folder": ("folder", "names a folder: name the file (e.g. vit_d2.pth)"),
        "new_folder": ("new/", "names a folder"),
        "pkl": ("d2.pkl", "detectron2 reads a .pkl file as a plain pickle"),
        "pyth": ("d2.pyth", "detectron2 reads a .pyth file as a pycls checkpoint"),
        "missing_folder": ("nothere/d2.pth", f"its folder {tmp_path / 'nothere'} does not exist"),
    }[case]
    tool = load_tool("convert_to_detectron2")
    converted = []
    tool.convert_to_detectron2 = lambda *a: converted.append(a)
    output = os.path.join(str(tmp_path), output)  # (a Path would drop the trailing /)
    argv = [src, output, "--config-file", TINY_CONFIG, *TINY_OPTS]
    _refused(caplog, tool.main(argv), output, expected)
    if case in ("pkl", "pyth"):
        assert "name it .pth" in caplog.text
    assert not converted and not os.listdir(tmp_path / "folder")
    assert case == "folder" or not os.path.exists(output)


def test_visualize_det_skips_files_it_cannot_read_and_says_what_num_left_out(
    toy_coco, detector, tmp_path, caplog
):
    """A text file among --images was a traceback once the model had run; images beyond
    --num were dropped without a word."""
    tool = load_tool("visualize_det")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    folder = toy_coco["val"][1]
    images = [os.path.join(folder, f) for f in sorted(os.listdir(folder))][:2]
    base = ["--config-file", TINY_CONFIG, "--weights", detector, "--output", str(tmp_path / "p")]
    argv = [*base, *TINY_OPTS, "--num", "1", "--images", str(notes), *images]
    assert tool.main(argv) == 0 and (tmp_path / "p.png").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"skipped 1 unreadable file(s), e.g. {notes}" in w for w in warnings), warnings
    assert any("3 images given: drawing the first 1" in w for w in warnings), warnings

    def build_model(cfg):
        raise AssertionError("the model was built")

    tool.build_model = build_model
    caplog.clear()
    code = tool.main([*base, *TINY_OPTS, "--images", str(notes)])
    _refused(caplog, code, "none of the 1 images can be read")
