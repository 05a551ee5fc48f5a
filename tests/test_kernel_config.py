"""The GEMV's tiling rules (quant/kernel_config.py): plain Python, tested without Triton."""

from __future__ import annotations

import pytest

from moe_offload.config import QUANT_BITS
from moe_offload.quant.kernel_config import MAX_GEMV_ROWS, MAX_SPLITS, default_config


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("rows_of_x", [1, MAX_GEMV_ROWS])
def test_default_tiling_of_a_wide_input_stays_within_max_splits(bits, rows_of_x):
    k = 1 << 20
    config = default_config(bits, 16, 4096, k, rows_of_x, sm_count=132)
    assert k // 16 / (config.groups_per_split * config.warps) <= MAX_SPLITS


def test_default_tiling_takes_fewer_groups_a_warp_only_where_they_split_evenly_in_one_wave():
    # Mixtral's w2 at 2 bits: 896 groups of 16 a row, 32 blocks of 128 rows
    assert default_config(2, 16, 4096, 14336, sm_count=132).groups_per_split == 14     # 16 x 32 = 512 <= 4 x 132
    assert default_config(2, 16, 4096, 14336, sm_count=114).groups_per_split == 16     # 512 > 4 x 114
    assert default_config(2, 16, 4096, 14336).groups_per_split == 16                   # SMs not known
    assert default_config(2, 16, 14336, 4096, sm_count=132).groups_per_split == 16     # 256 groups: 12-15 do not divide
    assert default_config(2, 16, 1024, 16 * 4 * 12, sm_count=132).groups_per_split == 12    # the fewest that fit
