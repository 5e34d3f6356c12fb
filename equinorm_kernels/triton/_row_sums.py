"""A deterministic two-stage row sum: out[j] = sum over r of x[j // width, r, j % width].

For a (batches, rows, width) float matrix stored contiguously (the EquiNorm backward's per-output-
channel terms of dL/dmu, one batch per conv group; the partial sums of split reductions). Stage 1
adds chunks of rows into a (chunks, columns) scratch, stage 2 adds the chunks in order: the plan
(:func:`.launch_plans.row_sum_plan`) depends only on the shape, and each stage adds its tile with
one fixed-shape ``tl.sum``, so the result has the same bits on every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import size_hint, wrap_triton
from .launch_plans import RowSumPlan, row_sum_plan


@triton.jit
def _row_sums_kernel(
    x_ptr, out_ptr, rows, width, columns, chunk_rows,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (b, k): out[k, j] = sum of x[j // width, r, j % width] over the rows r of chunk k,
    for the BLOCK_C columns j of block b; BLOCK_R rows per step, reduced once at the end."""
    chunk = tl.program_id(1)
    acc_t = out_ptr.dtype.element_ty
    js = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_valid = js < columns
    wide_width = tl.cast(width, tl.int64)
    base = (js // width).to(tl.int64) * tl.cast(rows, tl.int64) * wide_width + (js % width)
    first = chunk * chunk_rows
    last = tl.minimum(first + chunk_rows, rows)
    offsets = tl.arange(0, BLOCK_R)
    acc = tl.full([BLOCK_R, BLOCK_C], 0, acc_t)
    for r0 in range(first, last, BLOCK_R):
        r = r0 + offsets
        mask = (r < last)[:, None] & column_valid[None, :]
        acc += tl.load(x_ptr + r.to(tl.int64)[:, None] * wide_width + base[None, :], mask=mask, other=0).to(acc_t)
    tl.store(out_ptr + tl.cast(chunk, tl.int64) * columns + js, tl.sum(acc, axis=0), mask=column_valid)


def launch_row_sums(x: torch.Tensor, out: torch.Tensor, batches: int, rows: int | torch.SymInt, width: int,
                    plan: RowSumPlan | None = None) -> RowSumPlan:
    """Writes out (batches * width,) = the row sums of x viewed as (batches, rows, width) (contiguous),
    in out's dtype; returns the plan it launched (``plan`` overrides the default, for tests).

    ``rows`` may be symbolic (a split count that follows the batch size under torch.compile): the
    plan comes from its hint and the grid from ``rows`` itself, so any value gets a correct launch."""
    plan = plan or row_sum_plan(batches, size_hint(rows), width, out.element_size())
    chunks = triton.cdiv(rows, plan.chunk_rows)
    if isinstance(chunks, int) and chunks == 1:
        wrap_triton(_row_sums_kernel)[(plan.column_blocks, 1)](
            x, out, rows, width, plan.columns, plan.chunk_rows, BLOCK_R=plan.block_rows, BLOCK_C=plan.block_columns)
        return plan
    partial = torch.empty((chunks, plan.columns), dtype=out.dtype, device=out.device)
    wrap_triton(_row_sums_kernel)[(plan.column_blocks, chunks)](
        x, partial, rows, width, plan.columns, plan.chunk_rows, BLOCK_R=plan.block_rows, BLOCK_C=plan.block_columns)
    # The finish is the same kernel over the (chunks, columns) scratch, in one chunk.
    wrap_triton(_row_sums_kernel)[(triton.cdiv(plan.columns, plan.finish_block_columns), 1)](
        partial, out, chunks, plan.columns, plan.columns, chunks,
        BLOCK_R=plan.finish_block_rows, BLOCK_C=plan.finish_block_columns)
    return plan
