"""Pallas attention kernels for SparVAR, each with a pure-JAX reference beside it.

- `BlockMask`, `TokenBoxRule` (block_mask.py): block-sparse layout and token rule tables.
- `block_sparse_attention` (block_sparse.py): block-granular or exact block-sparse attention.
- `gather_attention` (gather.py): per-query-group token-gather attention with residual.
- `dense_colsum_attention`, `topk_key_indices` (colsum.py): dense attention + column sums.
- `dense_attention` (dense.py): dispatch to cuDNN, our Pallas kernel, or XLA.
Kernels use the Pallas Triton lowering (portable; `interpret=True` runs them on CPU).
"""

from pallas_kernels.block_mask import BlockMask, TokenBoxRule
from pallas_kernels.block_sparse import (BlockSparseConfig, block_sparse_attention,
                                         block_sparse_attention_reference,
                                         masked_attention_reference, token_mask_of)
from pallas_kernels.colsum import (ColsumConfig, column_sums, dense_colsum_attention,
                                   dense_colsum_attention_reference, key_budget,
                                   topk_key_indices)
from pallas_kernels.dense import dense_attention
from pallas_kernels.gather import (GatherConfig, gather_attention, gather_attention_reference,
                                   validate_gather_lists)
