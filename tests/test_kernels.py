"""The CUDA kernels' host side, on any machine: which sums each loss takes,
the launch geometry, and the constants of their exp (tests/test_gpu.py runs
the kernels themselves against the NumPy engine)."""

from __future__ import annotations

import decimal
import itertools
import math
import re

import numpy as np
import pytest

from distill_server import kernels
from distill_server.kernels import Sums

KINDS = [Sums(True, False, False), Sums(False, True, False), Sums(False, False, True), Sums(True, False, True)]


@pytest.mark.parametrize("sums", [*KINDS, Sums(False, False, True, True), Sums(True, False, True, True)], ids=repr)
def test_each_loss_takes_its_sums_and_no_others(sums: Sums) -> None:
    expected = {"sq"} if sums.mse else set()
    expected |= {"tt", "ss", "ts"} if sums.cosine else set()
    expected |= {"ma", "za", "w", "mb", "zb"} if sums.kl else set()
    expected |= {"gap", "v"} if sums.kl and sums.kl_gradient else set()
    assert set(sums.fields) == expected
    assert list(sums.fields) == [name for name in kernels.FIELDS if name in expected]  # kernel order


@pytest.mark.parametrize("sums", KINDS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_source_defines_each_sum_at_its_index(sums: Sums, dtype: type) -> None:
    source = kernels.source(sums, dtype, dtype, dtype, scaled=False)
    defines = dict(re.findall(r"^#define (\w+) (.*)$", source, re.MULTILINE))
    assert int(defines["NF"]) == len(sums.fields)
    assert {key: int(defines[key]) for key in defines if key.startswith("I_")} == {
        f"I_{name.upper()}": index for index, name in enumerate(sums.fields)
    }
    flags = (sums.mse, sums.cosine, sums.kl)
    assert (defines["MSE"], defines["COS"], defines["KL"]) == tuple(str(int(x)) for x in flags)
    assert defines["T_TYPE"] == {np.float32: "float", np.float16: "__half", np.float64: "double"}[dtype]


@pytest.mark.parametrize(
    ("rows", "width", "processors"),
    list(itertools.product([1, 3, 64, 70_000], [1, 255, 256, 257, 9_001, 1 << 26], [1, 132])),
)
def test_segments_cover_each_row_and_none_is_empty(rows: int, width: int, processors: int) -> None:
    segments, segment = kernels.grid(rows, width, processors)
    assert segments * segment >= width and (segments - 1) * segment < width
    assert segments <= max(1, math.ceil(width / kernels.THREADS))
    if rows == 1 and width >= kernels.THREADS * processors * kernels.BLOCKS_PER_SM:
        assert segments == processors * kernels.BLOCKS_PER_SM  # a long row fills the device


def _exp_neg(x: np.ndarray) -> np.ndarray:
    """The kernels' exp_neg, step for step in NumPy (without fused multiply-adds)."""
    constants = kernels._EXP_CONSTANTS
    table = np.array([float(v) for v in constants["EXP_TABLE_VALUES"].split(",")])
    with np.errstate(all="ignore"):
        k = np.rint(x * float(constants["EXP_N_OVER_LN2"]))
        r = (x - k * float(constants["EXP_LN2_N_HI"])) - k * float(constants["EXP_LN2_N_LO"])
        n = np.where(np.isfinite(k), k, 0).astype(np.int64)
        middle = table[n & 255]
        y = (middle + middle * (r * (1 + r * (0.5 + r * (1 / 6 + r / 24))))) * np.ldexp(1.0, n >> 8)
    return np.where(x < -708.0, 0.0, y)  # below -708, before any of the above matters


def test_exp_table_is_correctly_rounded() -> None:
    constants = kernels._EXP_CONSTANTS
    table = [float(v) for v in constants["EXP_TABLE_VALUES"].split(",")]
    with decimal.localcontext() as context:
        context.prec = 50
        for j, value in enumerate(table):
            exact = decimal.Decimal(2) ** (decimal.Decimal(j) / 256)
            assert abs(decimal.Decimal(value) - exact) <= decimal.Decimal(math.ulp(value)) / 2
        step = decimal.Decimal(2).ln() / 256
        high, low = float(constants["EXP_LN2_N_HI"]), float(constants["EXP_LN2_N_LO"])
        assert abs(decimal.Decimal(high) + decimal.Decimal(low) - step) < step * decimal.Decimal("1e-25")
    mantissa = math.frexp(high)[0] * 2**32
    assert mantissa == int(mantissa)  # k * high is exact for the k that occur (|k| < 2**19)


@pytest.mark.parametrize("low", [-1e-3, -1.0, -40.0, -708.0])
def test_exp_of_the_kernels_is_within_an_ulp(low: float) -> None:
    x = np.random.default_rng(int(-low)).uniform(low, 0.0, 200_000)
    exact = np.exp(x)
    assert float(np.max(np.abs(_exp_neg(x) - exact) / exact)) <= 2**-52


def test_exp_below_its_range_is_zero_and_nan_stays_nan() -> None:
    values = _exp_neg(np.array([0.0, -708.0 - 1e-9, -1e300, -np.inf, np.nan]))
    assert values[0] == 1.0
    assert np.all(values[1:4] == 0.0)
    assert np.isnan(values[4])
