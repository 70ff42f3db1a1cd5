"""The executor's blocked transpose of grouped expert blocks: the same bits as numpy's `.T`, any shape/dtype."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from ms2mg_converter.stream.reader import TRANSPOSE_ROWS, transposed


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (TRANSPOSE_ROWS, 7), (TRANSPOSE_ROWS * 2 + 3, 33), (9, 300)])
def test_transposed_is_exact(dtype: type, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    block = rng.standard_normal(shape).astype(dtype)
    block.reshape(-1)[0] = np.nan
    out = transposed(block)
    assert out.dtype == block.dtype and out.shape == shape[::-1] and out.flags.c_contiguous
    words = {2: np.uint16, 4: np.uint32, 8: np.uint64}[block.itemsize]
    assert np.array_equal(out.view(words), block.T.view(words) if block.T.flags.c_contiguous else
                          np.ascontiguousarray(block.view(words).T))
