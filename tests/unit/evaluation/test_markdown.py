"""One number formatter for every table: what the report's and the reliability tables' own copies printed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from heatmapbench.evaluation.markdown import MISSING, format_ci, format_number


def test_the_one_formatter_prints_what_each_copy_printed():
    # the copies it replaces: the report's tables (".4g", NaN as "–") and the reliability tables' (".3f",
    # anything not finite as "–"); they agreed on every finite number and on NaN/None
    report = lambda v, f=".4g": "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f)  # noqa: E731
    reliability = lambda v, f=".3f": "–" if v is None or not np.isfinite(v) else format(v, f)  # noqa: E731
    values = [0.123456, -3.0, 1e-7, 12345.678, np.float64(0.5), np.float32(0.25), 7, np.int64(3), -0.0,
              None, float("nan"), np.nan, np.float64("nan")]
    for value in values:
        for spec in (".4g", "+.3f", ".0%", ".2f", "g", ".0f", ".2g"):
            assert format_number(value, spec) == report(value, spec) == reliability(value, spec), (value, spec)
    assert format_number(0.123456) == report(0.123456) and format_number(None) == MISSING
    assert format_number(float("inf")) == "inf"  # a measured infinity is not "not measured"


def test_an_estimate_and_its_interval():
    assert format_ci(0.12345, 0.1, 0.15) == "0.1235 [0.1, 0.15]"
    assert format_ci(0.5, -0.25, 1.0, "+.2f") == "+0.50 [-0.25, +1.00]"
    assert format_ci(0.5, float("nan"), 1.0, ".0%") == "50% [–, 100%]"
    row = pd.Series({"aopc_rel": 0.2, "aopc_rel_lo": 0.1, "aopc_rel_hi": 0.3})
    assert format_ci(row.aopc_rel, row.aopc_rel_lo, row.aopc_rel_hi) == "0.2 [0.1, 0.3]"
