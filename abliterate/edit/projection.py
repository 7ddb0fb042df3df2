"""Weight orthogonalization, the math on one tensor: project a direction out of what a matrix writes.

For a unit direction r, every matrix W that writes into the residual stream becomes W - r r^T W (its outputs
lose their r component), the embedding E becomes E - (E r) r^T, output biases b become b - (r.b) r.
Families with a norm between a sub-block and the residual stream (Gemma 2/3, gain 1 + w) are edited against
u = normalize(r * (1 + w)) instead, so that the norm's output is orthogonal to r (docs/method.md).
Directions of method `norm-preserving` are edited the same way, and then every vector a matrix writes into
the stream (a column of W, a row of E; not a bias) is rescaled back to its original norm.
A direction with per-layer ablation weights w (`abliterate optimize`) edits partially: W - w r r^T W,
E - w (E r) r^T, b - w (r.b) r, with each tensor's own layer's weight (w = 1 is exactly the edit above).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from abliterate.model.archs import Component, default_hidden_axis

_CHUNK_ELEMENTS = 1 << 24  # rows edited at once: 16M float32 values (64 MB) per chunk
_KEEP_ELEMENTS = 1 << 26  # a matrix up to 64M values (256 MB in float32) is converted to float32 once, not twice
NORM_PRESERVING = "norm-preserving"  # the direction method whose edit keeps every written vector's norm
_RESCALE_FLOOR = 1e-4  # vectors keeping less of their norm than this after projection are rounding noise


def hidden_axis(component: Component, ndim: int) -> int:
    """The axis of a stored tensor that indexes the residual stream, by the default rule.

    Embedding [vocab, hidden]: the last. Linear weights [hidden, in] and biases [hidden]: the first.
    Fused expert stacks [experts, hidden, in]: the second. A writer whose registry entry names its own axis
    (stacks stored [experts, in, hidden]) overrides it: see `Architecture.hidden_axis`.
    """
    return default_hidden_axis(component, ndim)


def project_out(
    tensor: torch.Tensor, direction: torch.Tensor, axis: int, *, rescale: bool = False, weight: float = 1.0
) -> torch.Tensor:
    """Remove `direction` (unit, float32) from `tensor` along `axis`, computing in float32.

    Returns a new tensor of the input's dtype; the input is not modified. With `rescale`, each vector along
    `axis` of a matrix is scaled back to its original norm after the projection (1-D tensors, the biases, are
    only projected). With `weight` w, only w times the component is removed. The streaming edit uses
    `projected_blocks`, which yields the same values block by block.
    """
    blocks = [block.reshape(-1) for block in projected_blocks(tensor, direction, axis, rescale=rescale, weight=weight)]
    return torch.cat(blocks).reshape(tensor.shape) if blocks else tensor.clone()


def projected_blocks(
    tensor: torch.Tensor, direction: torch.Tensor, axis: int, *, rescale: bool = False, weight: float = 1.0
) -> Iterator[torch.Tensor]:
    """`project_out(tensor, ...)` as consecutive contiguous blocks of whole rows, in storage order.

    Written to disk one after the other, the blocks are the edited tensor's bytes, so the edit never holds
    more than one float32 block (at most 64 MB) besides the source tensor (docs/performance.md).
    """
    if tensor.dim() == 1:
        edited = tensor.to(torch.float32, copy=True)
        if not torch.isfinite(edited).all():
            raise FloatingPointError("NaN or Inf in the tensor")
        yield (edited - (weight * (edited @ direction)) * direction).to(tensor.dtype)
    elif tensor.dim() == 3:  # fused expert stack: one 2-D matrix per expert
        for expert in range(tensor.shape[0]):
            yield from projected_blocks(tensor[expert], direction, axis - 1, rescale=rescale, weight=weight)
    elif axis == 1:
        yield from _project_rows(tensor, direction, rescale, weight)
    elif rescale:
        yield _project_columns_rescaled(tensor, direction, weight)
    else:
        yield from _project_columns_two_pass(tensor, direction, weight)


def _row_blocks(matrix: torch.Tensor) -> Iterator[slice]:
    """Slices of whole rows holding about `_CHUNK_ELEMENTS` values each."""
    step = max(1, _CHUNK_ELEMENTS // max(matrix.shape[1], 1))
    for start in range(0, matrix.shape[0], step):
        yield slice(start, min(start + step, matrix.shape[0]))


def _project_rows(
    source: torch.Tensor, r: torch.Tensor, rescale: bool, weight: float
) -> Iterator[torch.Tensor]:
    """Rows of `source` (an embedding [vocab, hidden]) minus w (row . r) r, block by block."""
    for rows in _row_blocks(source):
        block = source[rows].to(torch.float32, copy=True)
        coefficients = block @ r
        if not torch.isfinite(coefficients).all():  # a NaN/Inf anywhere in the block reaches these sums
            raise FloatingPointError("NaN or Inf in the tensor")
        norms = block.norm(dim=1) if rescale else None
        block.addr_(coefficients, r, alpha=-weight)
        if norms is not None:
            _restore_norms(block, norms, 1)
        yield block.to(source.dtype)


def _project_columns_two_pass(source: torch.Tensor, r: torch.Tensor, weight: float) -> Iterator[torch.Tensor]:
    """`source` [hidden, in] minus w r (r^T source), in row blocks: r^T source is summed over the blocks first.

    A matrix of at most `_KEEP_ELEMENTS` values keeps its float32 blocks from the first pass to the second
    (each element converted once, not twice; the same values, so the same bytes); a larger one converts its
    blocks again, so that memory stays bounded.
    """
    coefficients = torch.zeros(source.shape[1], dtype=torch.float32)
    keep = source.numel() <= _KEEP_ELEMENTS
    kept: list[torch.Tensor] = []
    for rows in _row_blocks(source):
        block = source[rows].to(torch.float32, copy=keep)  # a copy, to edit in place: the source is read-only
        coefficients.addmv_(block.T, r[rows])
        if keep:
            kept.append(block)
    if not torch.isfinite(coefficients).all():  # a NaN/Inf anywhere in the matrix reaches these sums
        raise FloatingPointError("NaN or Inf in the tensor")
    kept.reverse()  # popped from the end: each block is freed once written
    for rows in _row_blocks(source):
        block = kept.pop() if keep else source[rows].to(torch.float32, copy=True)
        block.addr_(r[rows], coefficients, alpha=-weight)
        yield block.to(source.dtype)
        del block


def _project_columns_rescaled(source: torch.Tensor, r: torch.Tensor, weight: float) -> torch.Tensor:
    """source - w r r^T source by column slices, every column then scaled back to its original norm.

    Column slices, not row blocks: a column's norm after the projection needs the whole column.
    """
    result = torch.empty_like(source)
    step = max(1, _CHUNK_ELEMENTS // max(source.shape[0], 1))
    for start in range(0, source.shape[1], step):
        part = slice(start, min(start + step, source.shape[1]))
        chunk = source[:, part].to(torch.float32, copy=True)
        coefficients = r @ chunk
        if not torch.isfinite(coefficients).all():
            raise FloatingPointError("NaN or Inf in the tensor")
        norms = chunk.norm(dim=0)
        chunk.addr_(r, coefficients, alpha=-weight)
        _restore_norms(chunk, norms, 0)
        result[:, part] = chunk
    return result


def _restore_norms(chunk: torch.Tensor, norms: torch.Tensor, axis: int) -> None:
    """Scale each vector of `chunk` along `axis` (in place) back to `norms`, its norm before the projection.

    A vector that lay (almost) entirely along the direction keeps only rounding noise; it is left as projected
    rather than blown up to full norm.
    """
    projected = chunk.norm(dim=axis)
    keep = projected > _RESCALE_FLOOR * norms
    scale = torch.where(keep, norms / torch.where(keep, projected, 1.0), 1.0)
    chunk.mul_(scale.unsqueeze(axis))


def post_norm_direction(
    direction: torch.Tensor, norm_weight: torch.Tensor | Sequence[torch.Tensor], offset: float
) -> torch.Tensor:
    """u = normalize(r * (offset + w)): orthogonal to u before an RMSNorm means orthogonal to r after it.

    For a chain of norms (one weight per norm), u = normalize(r * prod(offset + w)): each RMSNorm scales its
    input by a positive number and then by its gain, so the gains multiply.
    """
    weights = [norm_weight] if isinstance(norm_weight, torch.Tensor) else list(norm_weight)
    mapped = direction.to(torch.float32)
    for weight in weights:
        mapped = mapped * (offset + weight.to(torch.float32))
    return mapped / mapped.norm()
