"""Row layout of the chunk buffer, shared by sizing (what a row costs) and the torch ops (what they allocate)."""

from __future__ import annotations

# Rows of the fp32 chunk buffer start on multiples of this many elements (64 B; 16-byte alignment of the fp32 rows
# and of the packed 16-bit view over them is what cuBLAS's aligned kernels and Triton's vector loads need).
ROW_ALIGN = 16


def row_stride(vocab: int) -> int:
    """Row stride (elements) of a chunk buffer of `vocab` columns: round_up(vocab, ROW_ALIGN)."""
    return -(-int(vocab) // ROW_ALIGN) * ROW_ALIGN
