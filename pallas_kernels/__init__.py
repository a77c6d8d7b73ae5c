"""Pallas attention kernels for SparVAR, each with a pure-JAX reference beside it.

- `BlockMask`, `TokenBoxRule` (block_mask.py): block-sparse layout and token rule tables.
- `block_sparse_attention` (block_sparse.py): block-granular or exact block-sparse attention;
  `backend="auto"` picks the Hopper kernel (block_sparse_mgpu.py, Pallas Mosaic GPU) for
  block-granular 128x128 masks on an H100, the Triton kernel otherwise.
- `gather_attention` (gather.py): per-query-group token-gather attention with residual;
  `backend="auto"` picks the Hopper path (gather_mgpu.py: rows copied per group, then the
  Mosaic kernel) for full lists and large groups on an H100, the Triton kernel otherwise.
- `dense_colsum_attention`, `topk_key_indices` (colsum.py): dense attention + column sums;
  the column-sum pass runs the Hopper kernel (colsum_mgpu.py) on an H100, Triton elsewhere.
- `dense_attention` (dense.py): dispatch to cuDNN, our Pallas kernel, or XLA.
The Triton-lowered kernels are portable (`interpret=True` runs them on CPU); the Mosaic GPU
kernel needs sm_90 and is checked on CPU by lowering it for CUDA.
"""

from pallas_kernels.block_mask import BlockMask, TokenBoxRule
from pallas_kernels.block_sparse import (BACKENDS, BlockSparseConfig, block_sparse_attention,
                                         block_sparse_attention_reference,
                                         masked_attention_reference, token_mask_of)
from pallas_kernels.colsum import (COLSUM_BACKENDS, ColsumConfig, column_sums, dense_colsum_attention,
                                   dense_colsum_attention_reference, key_budget,
                                   topk_key_indices)
from pallas_kernels.dense import dense_attention
from pallas_kernels.gather import (GATHER_BACKENDS, GatherConfig, gather_attention,
                                   gather_attention_reference, validate_gather_lists)
from pallas_kernels.block_sparse_mgpu import (MosaicConfig, block_sparse_attention_mgpu,
                                              block_sparse_attention_mgpu_reference)
from pallas_kernels.colsum_mgpu import (ColsumMosaicConfig, column_sums_mgpu,
                                        column_sums_reference)
from pallas_kernels.gather_mgpu import (RowGatherConfig, gather_attention_mgpu, gather_kv_rows,
                                        gather_kv_rows_reference)
