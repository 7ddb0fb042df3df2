"""The edited tensors' bytes are exactly those of the edit as first written (two float32 conversions per
element: one to sum r^T W, one to update W), whether the float32 blocks are kept between the passes or not.

The reference is that algorithm spelled out here with plain torch calls, independent of edit/projection.py's
block bookkeeping; bytes are compared, not values with a tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import build

import abliterate.edit.projection as projection
from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.publish.write_edited import write_edited


def reference_two_pass(source: torch.Tensor, r: torch.Tensor, weight: float, chunk: int) -> torch.Tensor:
    """W - w r (r^T W) for W [hidden, in]: r^T W summed over row blocks of `chunk` values, then each block
    converted to float32 again, updated and converted back."""
    step = max(1, chunk // source.shape[1])
    starts = range(0, source.shape[0], step)
    coefficients = torch.zeros(source.shape[1], dtype=torch.float32)
    for start in starts:
        coefficients.addmv_(source[start : start + step].to(torch.float32).T, r[start : start + step])
    blocks = []
    for start in starts:
        block = source[start : start + step].to(torch.float32, copy=True)
        block.addr_(r[start : start + step], coefficients, alpha=-weight)
        blocks.append(block.to(source.dtype))
    return torch.cat(blocks)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kept", [True, False], ids=["blocks-kept", "blocks-converted-again"])
@pytest.mark.parametrize("chunk", [1 << 24, 300], ids=["one-block", "several-blocks"])
def test_two_pass_blocks_are_byte_identical_to_the_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, kept: bool, chunk: int
) -> None:
    monkeypatch.setattr(projection, "_CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(projection, "_KEEP_ELEMENTS", 1 << 26 if kept else 10)
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(48, 40, generator=g) * 0.05).to(dtype)
    original = w.clone()
    r = torch.randn(48, generator=g)
    r /= r.norm()
    blocks = list(projection.projected_blocks(w, r, 0, weight=0.8))
    assert (len(blocks) > 3) == (chunk == 300)
    assert _bytes(torch.cat(blocks)) == _bytes(reference_two_pass(w, r, 0.8, chunk))
    assert torch.equal(w, original)  # the source is never written to


def test_a_written_checkpoint_holds_the_reference_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, bf16, several row blocks per matrix: every edited writer's bytes in the output shards."""
    monkeypatch.setattr(projection, "_CHUNK_ELEMENTS", 500)
    source, out = tmp_path / "source", tmp_path / "out"
    build("llama", source, dtype=torch.bfloat16)
    r = torch.randn(32, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "r.safetensors"
    Direction(r, layer=1, pos=-1, lang="en").save(path)
    unit = Direction.load(path).for_layer(0).to(torch.float32)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    write_edited(out, source, Direction.load(path), OutputOptions(max_shard_size=30_000))
    originals: dict[str, torch.Tensor] = {}
    for shard in source.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            names = [k for k in fh.keys() if k.endswith(("o_proj.weight", "down_proj.weight"))]  # noqa: SIM118
            originals |= {k: fh.get_tensor(k) for k in names}  # (safe_open is not iterable)
    checked = 0
    for shard in out.glob("model-*.safetensors"):
        with safe_open(str(shard), framework="pt") as fh:
            for name in set(fh.keys()) & set(originals):
                assert _bytes(fh.get_tensor(name)) == _bytes(reference_two_pass(originals[name], unit, 1.0, 500))
                checked += 1
    assert checked == len(originals) >= 4
