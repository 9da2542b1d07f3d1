"""The demo summary's statistics and verdicts, on constructed cases with known answers."""

from __future__ import annotations

import math

import pytest

from mae_transfer.demo.charts import plot_comparison, plot_knn_curve
from mae_transfer.demo.stats import (
    Spread,
    metric_spreads,
    paired_wins,
    separated,
    spread,
    table_rows,
    verdict,
)


def test_spread_is_mean_min_max_of_finite_values():
    s = spread([10.0, 13.0, 16.0, math.nan])
    assert (s.mean, s.low, s.high, s.n) == (13.0, 10.0, 16.0, 3)
    assert s.width == 6.0
    assert str(s) == " 13.0 (10.0-16.0)"
    empty = spread([math.nan, None])
    assert empty.n == 0 and math.isnan(empty.mean) and str(empty) == "n/a"


def test_verdict_needs_the_ranges_apart():
    mae = spread([30.0, 32.0, 34.0])
    assert separated(mae, spread([20.0, 26.0, 29.0]))
    assert verdict(mae, spread([20.0, 26.0, 29.0])) == "MAE ahead by 7.0"
    # overlapping ranges: the gap of the means (+2.0) is within the seed spread
    assert not separated(mae, spread([29.0, 31.0, 36.0]))
    assert verdict(mae, spread([29.0, 31.0, 36.0])).startswith("within the seed spread (+0.0")
    assert verdict(spread([1.0, 2.0]), spread([3.0, 4.0])) == "MAE behind by 2.0"
    # one seed on a side: any gap would have been "ahead" or "behind"
    assert verdict(spread([0.0]), spread([0.0, 0.0])) == (
        "MAE +0.0 (one seed on a side: no spread to judge it by)"
    )
    assert not separated(spread([]), mae)
    assert verdict(spread([math.nan]), mae) == "no result on one side"  # AP of a run without boxes


def test_table_rows_per_stage_and_metric():
    runs = {
        "detection": {
            "mae": [{"bbox_AP": 20.0, "segm_AP": 10.0}, {"bbox_AP": 22.0, "segm_AP": 12.0}],
            "random": [{"bbox_AP": 10.0, "segm_AP": 11.0}, {"bbox_AP": 14.0, "segm_AP": 13.0}],
        },
        "segmentation": {"mae": [{"mIoU": 50.0}], "random": [{"mIoU": 40.0}]},
    }
    rows = table_rows(runs, {"bbox_AP": "box AP", "segm_AP": "mask AP", "mIoU": "mIoU"})
    assert [(r[0], r[1]) for r in rows] == [
        ("detection", "box AP"),
        ("detection", "mask AP"),
        ("segmentation", "mIoU"),
    ]
    box = rows[0][2]
    assert box["mae"] == Spread(21.0, 20.0, 22.0, 2) and box["random"] == Spread(
        12.0, 10.0, 14.0, 2
    )
    assert rows[0][3] == "MAE ahead by 9.0; MAE higher in 2 of 2 seeds"
    assert rows[1][3] == "within the seed spread (-1.0); MAE higher in 0 of 2 seeds"
    assert metric_spreads(runs["segmentation"], "mIoU")["mae"].mean == 50.0
    assert rows[2][3].startswith("MAE +10.0 (one seed")
    # a seed without a result (NaN AP: no detections) is said, not dropped silently
    runs = {"det": {"mae": [{"a": 3.0}, {"a": 4.0}], "random": [{"a": math.nan}, {"a": 1.0}]}}
    assert "; random: 1 of 2 seeds gave a result" in table_rows(runs, {"a": "A"})[0][3]


def test_paired_wins_compare_the_same_seed_and_skip_missing_results():
    # seed 0: MAE higher; seed 1: equal (not a win); seed 2: lower; seed 3: no AP on one side
    assert paired_wins([5.0, 3.0, 1.0, math.nan], [4.0, 3.0, 2.0, 7.0]) == (1, 3)
    # the ranges overlap, yet MAE is higher on every seed: the verdict says both
    runs = {"det": {"mae": [{"a": 15.2}, {"a": 13.6}], "random": [{"a": 14.5}, {"a": 12.2}]}}
    assert table_rows(runs, {"a": "A"})[0][3] == (
        "within the seed spread (+1.0); MAE higher in 2 of 2 seeds"
    )


@pytest.mark.filterwarnings("ignore")
def test_charts_are_written(tmp_path):
    rows = table_rows(
        {"det": {"mae": [{"a": 2.0}, {"a": 3.0}], "random": [{"a": 1.0}, {"a": 1.5}]}}, {"a": "A"}
    )
    png = plot_comparison(rows, str(tmp_path / "c.png"))
    records = [{"epoch": -1, "knn_k20_top1": 20.0, "knn_k200_top1": 21.0}]
    records.append({"epoch": 1, "knn_k20_top1": 30.0, "knn_k200_top1": 28.0})
    curve = plot_knn_curve(records, str(tmp_path / "k.png"), {"knn_k20_top1": spread([19, 21])})
    for path in (png, curve):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
