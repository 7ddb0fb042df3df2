"""storage/shards.py directly: sizes, the shard plan, the streamed writer, the index and tensor bytes.

The references do not share the code under test: sizes and shard groups are computed by hand, written shards
are read back with the `safetensors` library and compared byte for byte with what `safetensors.torch.save`
makes of the same tensors, the index is checked against the tensors each file really holds, and tensor bytes
against numpy's `tobytes()` and hand-written little-endian constants.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from abliterate.errors import CheckpointError, UsageError
from abliterate.storage.shards import (
    SAFETENSORS_INDEX,
    ShardPlan,
    ShardWriter,
    TensorSpec,
    parse_size,
    plan_shards,
    tensor_buffer,
    write_index,
)

# dtype codes of the safetensors format, written out here rather than taken from abliterate.storage.tensors
CODES = {torch.int64: "I64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.bool: "BOOL"}
METADATA = {"format": "pt"}


def _tensors() -> dict[str, torch.Tensor]:
    """Tensors of five dtypes, named so that plan order is safetensors' own order (alignment, then name)."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "b.weight": torch.randn(4, 5, generator=g),
        "c.scalar": torch.tensor(3.5),
        "d.weight": torch.randn(3, 8, generator=g).to(torch.bfloat16),
        "e.bias": torch.randn(7, generator=g).to(torch.float16),
        "f.mask": torch.tensor([True, False, True]),
    }


def _spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, CODES[tensor.dtype], tuple(tensor.shape), tensor.numel() * tensor.element_size())


def _write(folder: Path, tensors: dict[str, torch.Tensor], limit: int) -> list[ShardPlan]:
    """Plan and write `tensors` with ShardWriter (each tensor in two chunks), and the index."""
    plans = plan_shards([_spec(n, t) for n, t in tensors.items()], limit)
    for plan in plans:
        with ShardWriter(folder, plan, METADATA) as writer:
            for spec in plan.tensors:
                data = bytes(tensor_buffer(tensors[spec.name]))
                writer.write(spec.name, data[: len(data) // 2])
                writer.write(spec.name, data[len(data) // 2 :])
    write_index(folder, plans)
    return plans


# --- parse_size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5_000_000_000),
        ("500MB", 500_000_000),
        ("2GiB", 2_147_483_648),
        ("1.5KB", 1_500),
        (" 3 mib ", 3_145_728),
        ("10kib", 10_240),
        ("1TB", 1_000_000_000_000),
        ("7B", 7),
        ("1024", 1_024),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text: str, expected: int) -> None:
    """Decimal units are powers of 1000, binary (KiB, MiB, ...) powers of 1024, any case; plain numbers are bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0GB", "-5GB", "GB", "5XB", "5G", "5 G B", "five"])
def test_parse_size_rejects_what_is_not_a_positive_size(text: str) -> None:
    """Zero, negatives, unknown or bare-prefix units and words are a UsageError with a hint, not a guess."""
    with pytest.raises(UsageError) as caught:
        parse_size(text)
    assert caught.value.hint


# --- plan_shards -----------------------------------------------------------------------------------------


def _sized(*sizes: int) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", "U8", (n,), n) for i, n in enumerate(sizes)]


def test_plan_packs_greedily_in_order_and_isolates_oversized_tensors() -> None:
    """Sizes 40, 30, 50, 100, 10 under 80 bytes: [40+30] [50] [100 alone, over the limit] [10], by hand."""
    plans = plan_shards(_sized(40, 30, 50, 100, 10), 80)
    assert [[s.name for s in p.tensors] for p in plans] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [p.nbytes for p in plans] == [70, 50, 100, 10]
    assert [p.filename for p in plans] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


def test_plan_fills_a_shard_up_to_exactly_the_limit() -> None:
    """The limit is inclusive: 40 + 40 fit in 80 bytes, the next byte starts a new shard."""
    plans = plan_shards(_sized(40, 40, 1), 80)
    assert [p.nbytes for p in plans] == [80, 1]


def test_plan_under_a_large_limit_is_one_shard_with_every_tensor() -> None:
    """Everything fits: one file named 1-of-1, holding all tensors in the given order."""
    plans = plan_shards(_sized(3, 1, 2), 10**9)
    assert len(plans) == 1 and plans[0].filename == "model-00001-of-00001.safetensors"
    assert [s.name for s in plans[0].tensors] == ["t0", "t1", "t2"] and plans[0].nbytes == 6


# --- ShardWriter and write_index ---------------------------------------------------------------------------


def test_written_shards_equal_what_safetensors_itself_writes(tmp_path: Path) -> None:
    """Each shard, byte for byte, is `safetensors.torch.save` of its tensors with the same metadata."""
    tensors = _tensors()
    plans = _write(tmp_path, tensors, limit=100)
    assert len(plans) > 2  # the limit really splits the tensors
    for plan in plans:
        reference = save({s.name: tensors[s.name] for s in plan.tensors}, metadata=METADATA)
        assert (tmp_path / plan.filename).read_bytes() == reference, plan.filename


def test_written_shards_load_back_with_their_values_and_metadata(tmp_path: Path) -> None:
    """`safetensors` reads every tensor back equal (dtype, shape, values) and the metadata unchanged."""
    tensors = _tensors()
    plans = _write(tmp_path, tensors, limit=100)
    loaded: dict[str, torch.Tensor] = {}
    for plan in plans:
        loaded |= load_file(tmp_path / plan.filename)
        with safe_open(tmp_path / plan.filename, framework="pt") as handle:
            assert handle.metadata() == METADATA
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_header_is_8_byte_aligned_and_offsets_are_contiguous(tmp_path: Path) -> None:
    """The header length (a little-endian u64) is a multiple of 8 and the data offsets tile the rest of the file."""
    tensors = _tensors()
    plan = _write(tmp_path, tensors, limit=10**9)[0]
    raw = (tmp_path / plan.filename).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert length % 8 == 0 and header.pop("__metadata__") == METADATA
    end = 0
    for name, tensor in tensors.items():
        entry = header[name]
        assert entry["dtype"] == CODES[tensor.dtype] and entry["shape"] == list(tensor.shape)
        assert entry["data_offsets"] == [end, end + tensor.numel() * tensor.element_size()]
        end = entry["data_offsets"][1]
    assert len(raw) == 8 + length + end


def test_index_names_the_file_that_holds_each_tensor_and_the_total_size(tmp_path: Path) -> None:
    """The index's weight_map agrees with the keys found in each file; total_size is the sum of tensor bytes."""
    tensors = _tensors()
    _write(tmp_path, tensors, limit=100)
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
    held: dict[str, str] = {}
    for path in sorted(tmp_path.glob("model-*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            held |= dict.fromkeys(handle.keys(), path.name)
    assert index["weight_map"] == held
    # 6*8 (I64) + 20*4 + 1*4 (F32) + 24*2 (BF16) + 7*2 (F16) + 3 (BOOL), by hand
    assert index["metadata"]["total_size"] == 48 + 80 + 4 + 48 + 14 + 3


def test_copy_from_copies_a_byte_range_of_another_file(tmp_path: Path) -> None:
    """A tensor copied from a range of a source file arrives intact, between tensors written as bytes."""
    tensors = _tensors()
    source = tmp_path / "source.bin"
    payload = bytes(tensor_buffer(tensors["b.weight"]))
    source.write_bytes(b"junk-before" + payload + b"junk-after")
    plan = plan_shards([_spec(n, t) for n, t in tensors.items()], 10**9)[0]
    with ShardWriter(tmp_path, plan, METADATA) as writer:
        for spec in plan.tensors:
            if spec.name == "b.weight":
                writer.copy_from(spec.name, source, len(b"junk-before"), len(payload))
            else:
                writer.write(spec.name, tensor_buffer(tensors[spec.name]))
    assert (tmp_path / plan.filename).read_bytes() == save(tensors, metadata=METADATA)


def test_writer_refuses_tensors_out_of_plan_order(tmp_path: Path) -> None:
    """Bytes for a tensor other than the next one planned are an internal CheckpointError."""
    plan = ShardPlan("model-00001-of-00001.safetensors", _sized(4, 4))
    writer = ShardWriter(tmp_path, plan, METADATA)
    with pytest.raises(CheckpointError, match="expected tensor 't0', got 't1'"):
        writer.write("t1", b"1234")


def test_writer_refuses_more_bytes_than_the_header_says(tmp_path: Path) -> None:
    """A chunk that overruns its tensor's size is an error, not a silent shift of every later offset."""
    writer = ShardWriter(tmp_path, ShardPlan("model-00001-of-00001.safetensors", _sized(4, 4)), METADATA)
    with pytest.raises(CheckpointError, match="more bytes"):
        writer.write("t0", b"12345")


def test_closing_before_every_tensor_is_written_fails(tmp_path: Path) -> None:
    """A shard whose header promises a tensor that never came is an error at close."""
    writer = ShardWriter(tmp_path, ShardPlan("model-00001-of-00001.safetensors", _sized(4, 4)), METADATA)
    writer.write("t0", b"1234")
    writer.write("t1", b"12")
    with pytest.raises(CheckpointError, match="closed before all its tensors"):
        writer.close()


def test_an_exception_inside_the_writer_propagates_unchanged(tmp_path: Path) -> None:
    """Leaving the `with` block by an exception closes the file without masking it by the incomplete-shard error."""
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, ShardPlan("x.safetensors", _sized(4)), {}) as w:
        raise KeyboardInterrupt
    assert w._fh.closed


# --- tensor_buffer ---------------------------------------------------------------------------------------


def test_tensor_buffer_is_the_little_endian_bytes() -> None:
    """float32 1.0 and -2.0, bfloat16 1.0 and int64 258 as their little-endian byte patterns, written by hand."""
    assert bytes(tensor_buffer(torch.tensor([1.0, -2.0]))) == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    assert bytes(tensor_buffer(torch.tensor([1.0], dtype=torch.bfloat16))) == b"\x80\x3f"
    assert bytes(tensor_buffer(torch.tensor([258]))) == b"\x02\x01" + b"\x00" * 6


def test_tensor_buffer_of_bool_non_contiguous_and_empty_tensors() -> None:
    """Bools are one byte 0/1; a transposed tensor gives the bytes of its row-major copy; an empty one none."""
    assert bytes(tensor_buffer(torch.tensor([True, False, True]))) == b"\x01\x00\x01"
    matrix = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert bytes(tensor_buffer(matrix.T)) == matrix.T.contiguous().numpy().tobytes()
    assert bytes(tensor_buffer(torch.empty(0, 4))) == b""


def test_tensor_buffer_of_a_contiguous_tensor_is_a_view_not_a_copy() -> None:
    """The buffer shares the tensor's memory: a later write to the tensor shows in it (no copy was made)."""
    tensor = torch.zeros(2, dtype=torch.float32)
    buffer = tensor_buffer(tensor)
    tensor[1] = 1.0
    assert bytes(buffer) == b"\x00" * 4 + b"\x00\x00\x80\x3f"
