"""Mean and min-max over seeds, and the comparison of two initialisations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple


@dataclass(frozen=True)
class Spread:
    """Summary of one metric over seeds."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def width(self) -> float:
        return self.high - self.low

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.mean:5.1f} ({self.low:.1f}-{self.high:.1f})"


def spread(values: Sequence[float]) -> Spread:
    """Mean, min and max of the finite values (a run without detections gives NaN AP)."""
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(sum(finite) / len(finite), min(finite), max(finite), len(finite))


def metric_spreads(
    runs: Mapping[str, Sequence[Mapping[str, float]]], metric: str
) -> Dict[str, Spread]:
    """{init: Spread of ``metric``} from {init: [one metrics dict per seed]}."""
    return {init: spread(_values(rs, metric)) for init, rs in runs.items()}


def separated(better: Spread, worse: Spread) -> bool:
    """True when every seed of ``better`` is above every seed of ``worse`` (min > max): the
    gap of the means is then larger than either side's seed spread."""
    return better.n > 0 and worse.n > 0 and better.low > worse.high


def verdict(mae: Spread, random: Spread) -> str:
    """A word on the comparison: ahead (ranges apart), behind, or within the seed spread;
    with one result on a side there is no spread to weigh the gap against, and it says so."""
    if mae.n == 0 or random.n == 0:
        return "no result on one side"
    gap = round(mae.mean - random.mean, 1) + 0.0  # + 0.0: no "-0.0"
    if min(mae.n, random.n) < 2:
        return f"MAE {gap:+.1f} (one seed on a side: no spread to judge it by)"
    if separated(mae, random):
        return f"MAE ahead by {gap:.1f}"
    if separated(random, mae):
        return f"MAE behind by {-gap:.1f}"
    return f"within the seed spread ({gap:+.1f})"


def paired_wins(mae: Sequence[float], random: Sequence[float]) -> Tuple[int, int]:
    """(seeds where MAE scored higher, seeds with a finite result on both sides); the i-th value
    of each side comes from the same seed (same data, data order and head initialisation)."""
    pairs = [(float(m), float(r)) for m, r in zip(mae, random) if _finite(m) and _finite(r)]
    return sum(m > r for m, r in pairs), len(pairs)


def table_rows(
    runs: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
    metrics: Mapping[str, str],
) -> List[tuple]:
    """(stage, metric label, {init: Spread}, verdict) rows for the summary and the chart; the
    verdict also counts the seeds where MAE scored higher than random on the same seed.

    Args:
        runs: {stage: {"mae": [...], "random": [...]}}, one metrics dict per seed.
        metrics: {metric key: label}, e.g. {"bbox_AP": "box AP"}; keys missing from a stage's
            runs are skipped.
    """
    rows = []
    for stage, by_init in runs.items():
        for key, label in metrics.items():
            if not any(key in r for rs in by_init.values() for r in rs):
                continue
            s = metric_spreads(by_init, key)
            text = verdict(s["mae"], s["random"])
            wins, n = paired_wins(*(_values(by_init[i], key) for i in ("mae", "random")))
            if n:
                text += f"; MAE higher in {wins} of {n} seed{'s' * (n > 1)}"
            for init in ("mae", "random"):
                if 0 < s[init].n < len(by_init[init]):  # a run without detections: NaN AP
                    text += f"; {init}: {s[init].n} of {len(by_init[init])} seeds gave a result"
            rows.append((stage, label, s, text))
    return rows


def _values(runs: Sequence[Mapping[str, float]], key: str) -> List[float]:
    """``key`` of each seed's metrics, NaN where a run has none."""
    return [r.get(key, math.nan) for r in runs]


def _finite(value) -> bool:
    """A usable result: not missing, not NaN (a run without detections gives NaN AP)."""
    return value is not None and math.isfinite(value)
