"""Nothing lost, nothing half-written: interruptions, full or read-only disks, bad checkpoints, bad numbers."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest
import torch
from helpers import assert_one_line_error, run
from safetensors.torch import load_file, save_file
from tiny_models import build

from abliterate.direction.vector import Direction
from abliterate.edit.formats import OutputOptions
from abliterate.errors import CheckpointError, ModelError, OutputError
from abliterate.model.checkpoint import Checkpoint
from abliterate.publish.write_edited import write_edited
from abliterate.storage.atomic import OWNER_FILE, TMP_PREFIX

SHARD = 40_000


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model-*.safetensors"))}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


def owned_by(parent: Path, pid: int) -> list[Path]:
    """Temporary output folders in `parent` that the process `pid` created."""
    found = []
    for tmp in leftovers(parent):
        try:
            if int((tmp / OWNER_FILE).read_text()) == pid:
                found.append(tmp)
        except (OSError, ValueError):
            continue
    return found


def _writing(parent: Path, pid: int) -> bool:
    """True once the temporary output folder of process `pid` holds a shard: it is writing weights."""
    return any(any(tmp.glob("model-*.safetensors")) for tmp in owned_by(parent, pid))


def _signal_while_writing(proc: subprocess.Popen[bytes], parent: Path, sig: signal.Signals, extra: float) -> None:
    """Send `sig` once shards are being written (and `extra` seconds later), or as soon as the run ends."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _writing(parent, proc.pid) and time.monotonic() < deadline:
        time.sleep(0.0005)
    time.sleep(extra)
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=120)


def interrupt_runs(cmd: list[str], out: Path, reference: dict[str, bytes], trials: int, seed: int) -> int:
    """Start `cmd` `trials` times, each stopped by SIGKILL or SIGINT (alternately) while it writes shards.

    After every trial, before any restart: --out is absent or complete and equal to `reference`; a SIGINT run
    has removed its temporary folder; a SIGKILL run that was still writing left its partial shards behind (the
    proof that the kill landed mid-write; the next run removes them). Returns the trials killed mid-write.
    """
    rng = random.Random(seed)
    mid_write = 0
    for trial in range(trials):
        sig = signal.SIGINT if trial % 2 else signal.SIGKILL
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _signal_while_writing(proc, out.parent, sig, rng.uniform(0.0, 0.02))
        if out.exists():  # the run finished before the signal arrived
            assert shards(out) == reference
            shutil.rmtree(out)
        elif sig == signal.SIGINT:
            assert proc.returncode != 0 and not owned_by(out.parent, proc.pid), "SIGINT left a temporary folder"
            mid_write += 1
        else:
            partial = owned_by(out.parent, proc.pid)
            assert partial and any(partial[0].glob("model-*.safetensors")), "killed before it wrote any shard"
            mid_write += 1
    return mid_write


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rel") / "src"
    build("llama", folder, tied=True)
    return folder


@pytest.fixture(scope="module")
def direction_file(model_dir: Path) -> Path:
    path = model_dir.parent / "r.safetensors"
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(0))).save(path)
    return path


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs (needs mount rights, as root in a container); skipped where it can't be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        needs.skip_or_fail("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


class TestInterruption:
    def test_killed_runs_never_leave_a_finished_looking_output(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        work = tmp_path_factory.mktemp("kill")
        source = work / "src"
        build(
            "llama",
            source,
            extra=dict(
                hidden_size=256,
                intermediate_size=1024,
                num_attention_heads=8,
                head_dim=32,
                vocab_size=8192,
                num_hidden_layers=24,  # ~110 MB in 2 MB shards: long enough a write that most signals land in it
            ),
        )
        Direction(torch.randn(256, generator=torch.Generator().manual_seed(3))).save(work / "r.safetensors")
        args = [
            sys.executable,
            "-m",
            "abliterate",
            "apply",
            str(source),
            "--direction",
            str(work / "r.safetensors"),
            "--max-shard-size",
            "2MB",
            "--out",
        ]
        subprocess.run([*args, str(work / "reference")], check=True, capture_output=True)
        reference = shards(work / "reference")
        out = work / "out"
        assert interrupt_runs([*args, str(out)], out, reference, trials=12, seed=0) >= 8
        subprocess.run([*args, str(out)], check=True, capture_output=True)
        assert shards(out) == reference  # a clean restart gives byte-identical shards
        assert not leftovers(work)  # SIGINT cleans up after itself; the restart removed what SIGKILL left


    def test_interrupted_edit_restarts_to_the_same_result(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        from helpers import FAST
        from tiny_models import save_tokenizer

        work = tmp_path_factory.mktemp("killedit")
        source = work / "src"
        build("llama", source, tied=True)
        save_tokenizer(source)
        args = [sys.executable, "-m", "abliterate", "edit", str(source), *FAST, "--out"]
        subprocess.run([*args, str(work / "reference")], check=True, capture_output=True)
        reference = shards(work / "reference")
        out = work / "out"
        assert interrupt_runs([*args, str(out)], out, reference, trials=4, seed=1) >= 2
        subprocess.run([*args, str(out)], check=True, capture_output=True)
        assert shards(out) == reference
        assert not leftovers(work)


class TestDisk:
    def test_not_enough_space_fails_before_writing(self, model_dir: Path, direction_file: Path, tmpfs: Path) -> None:
        big = model_dir.parent / "big"
        if not big.exists():
            build(
                "llama",
                big,
                extra=dict(hidden_size=128, intermediate_size=512, vocab_size=2048, num_attention_heads=4, head_dim=32),
            )
        Direction(torch.randn(128)).save(model_dir.parent / "r128.safetensors")
        done = run("apply", big, "--direction", model_dir.parent / "r128.safetensors", "--out", tmpfs / "out")
        assert_one_line_error(done, "not enough disk space", "GB")
        assert list(tmpfs.iterdir()) == []

    def test_disk_full_while_writing(
        self, model_dir: Path, direction_file: Path, tmpfs: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import abliterate.edit.stream as ortho

        filler = tmpfs / "filler"
        monkeypatch.setattr(ortho, "ensure_free_space", lambda folder, needed: filler.write_bytes(b"x" * 1_000_000))
        with pytest.raises(OutputError, match="full"):
            write_edited(tmpfs / "out", model_dir, Direction.load(direction_file), OutputOptions(max_shard_size=SHARD))
        assert not (tmpfs / "out").exists() and not leftovers(tmpfs)

    def test_read_only_location(self, model_dir: Path, direction_file: Path, tmpfs: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
        done = run("apply", model_dir, "--direction", direction_file, "--out", tmpfs / "out")
        assert_one_line_error(done, "cannot write in", "--out")


class TestBadCheckpoints:
    def copy(self, model_dir: Path, tmp_path: Path) -> Path:
        return Path(shutil.copytree(model_dir, tmp_path / "m"))

    def apply(self, folder: Path, tmp_path: Path) -> None:
        write_edited(tmp_path / "out", folder, Direction(torch.randn(32)), OutputOptions(max_shard_size=SHARD))

    def test_missing_config(self, model_dir: Path, tmp_path: Path) -> None:
        folder = self.copy(model_dir, tmp_path)
        (folder / "config.json").unlink()
        with pytest.raises(ModelError, match=r"config\.json is missing"):
            self.apply(folder, tmp_path)

    def test_corrupt_config(self, model_dir: Path, tmp_path: Path) -> None:
        folder = self.copy(model_dir, tmp_path)
        (folder / "config.json").write_text("{not json")
        with pytest.raises(ModelError, match="cannot read"):
            self.apply(folder, tmp_path)

    def test_truncated_shard(self, model_dir: Path, tmp_path: Path) -> None:
        folder = self.copy(model_dir, tmp_path)
        shard = sorted(folder.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-100])
        with pytest.raises(CheckpointError, match="truncated"):
            self.apply(folder, tmp_path)
        assert not (tmp_path / "out").exists()

    def test_index_names_missing_shard(self, model_dir: Path, tmp_path: Path) -> None:
        folder = self.copy(model_dir, tmp_path)
        sorted(folder.glob("model-*.safetensors"))[-1].unlink()
        with pytest.raises(CheckpointError, match="missing"):
            self.apply(folder, tmp_path)

    def test_index_cannot_escape_the_folder(self, model_dir: Path, tmp_path: Path) -> None:
        folder = self.copy(model_dir, tmp_path)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = "../../etc/passwd"
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="outside the model folder"):
            self.apply(folder, tmp_path)

    def test_shape_disagrees_with_config(self, model_dir: Path, tmp_path: Path) -> None:
        folder = self.copy(model_dir, tmp_path)
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] = 48
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match="hidden_size"):
            write_edited(tmp_path / "out", folder, Direction(torch.randn(48)), OutputOptions(max_shard_size=SHARD))

    def test_nan_in_a_tensor_names_it(self, model_dir: Path, tmp_path: Path) -> None:
        folder = self.copy(model_dir, tmp_path)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        name = "model.layers.1.mlp.down_proj.weight"
        shard = folder / index["weight_map"][name]
        tensors = load_file(shard)
        tensors[name][3, 5] = float("nan")
        save_file(tensors, shard, metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=name):
            self.apply(folder, tmp_path)
        assert not (tmp_path / "out").exists()

    def test_same_source_and_output(self, model_dir: Path) -> None:
        with pytest.raises(OutputError, match="source model itself"):
            write_edited(model_dir, model_dir, Direction(torch.randn(32)),
                         OutputOptions(max_shard_size=SHARD), overwrite=True)


class TestNumerics:
    def test_edit_is_idempotent(self, model_dir: Path, direction_file: Path, tmp_path: Path) -> None:
        direction = Direction.load(direction_file)
        write_edited(tmp_path / "once", model_dir, direction, OutputOptions(max_shard_size=SHARD))
        write_edited(tmp_path / "twice", tmp_path / "once", direction, OutputOptions(max_shard_size=SHARD))
        once, twice = Checkpoint.open(tmp_path / "once"), Checkpoint.open(tmp_path / "twice")
        for name in once.tensors:
            assert torch.allclose(once.get(name), twice.get(name), atol=1e-6), name

    def test_same_inputs_same_direction(self, tmp_path: Path) -> None:
        from tiny_models import save_tokenizer

        from abliterate.commands.edit import run_directions
        from abliterate.settings import Settings

        build("llama", tmp_path / "m")
        save_tokenizer(tmp_path / "m")
        fast = dict(n_train=8, n_val=4, screen_prompts=2, finalists=2, refusal_tokens=["I"])
        for name in ("a", "b"):
            run_directions(Settings(model=str(tmp_path / "m"), out=tmp_path / f"{name}.safetensors", **fast))
        assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()

    def test_same_inputs_same_bytes(self, model_dir: Path, direction_file: Path, tmp_path: Path) -> None:
        for name in ("a", "b"):
            write_edited(tmp_path / name, model_dir, Direction.load(direction_file),
                         OutputOptions(max_shard_size=SHARD))
        assert shards(tmp_path / "a") == shards(tmp_path / "b")


class TestBadInputFiles:
    def test_chat_model_without_template(self, tmp_path: Path) -> None:
        from tiny_models import save_tokenizer

        folder = tmp_path / "base"
        build("llama", folder)
        save_tokenizer(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        for extra in folder.glob("chat_template.*"):
            extra.unlink()
        done = run("edit", folder, "--out", tmp_path / "out", "--refusal-tokens", "I")
        assert_one_line_error(done, "no chat template", "--chat-template")
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize(
        ("content", "needle"),
        [(b"", "no prompts"), (b'{"instruction": "x", "kind": ', "invalid JSON"), (b"\xff\xfe\x00bad", "UTF-8")],
        ids=["empty", "malformed", "encoding"],
    )
    def test_bad_prompts_file(self, tmp_path: Path, content: bytes, needle: str) -> None:
        bad = tmp_path / "prompts.jsonl"
        bad.write_bytes(content)
        done = run("prompts", "--prompts", bad)
        assert_one_line_error(done, needle)

    def test_judge_model_unavailable(self, tmp_path: Path) -> None:
        from abliterate.evaluation.judge import make_judge

        with pytest.raises(ModelError):
            make_judge(f"model:{tmp_path / 'no-such-judge'}")


class TestFuzz:
    """Parsers of user files never crash with anything but our typed errors."""

    def test_prompt_file_parser(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        from abliterate.errors import AbliterateError
        from abliterate.prompts.sources import from_path

        folder = tmp_path_factory.mktemp("fuzz")

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]), data=st.binary(max_size=300))
        def check(suffix: str, data: bytes) -> None:
            path = folder / f"harmful_train{suffix}"
            path.write_bytes(data)
            try:
                prompt_set = from_path(path)
            except AbliterateError:
                return
            assert all(p.instruction.strip() for p in prompt_set.prompts)

        check()

    def test_index_parser(self, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        folder = Path(shutil.copytree(model_dir, tmp_path_factory.mktemp("fuzzidx") / "m"))
        names = st.one_of(st.text(max_size=30), st.sampled_from(["../x", "/etc/passwd", "a/../../b", ""]))
        maps = st.dictionaries(st.text(max_size=20), names, max_size=5)
        values = st.one_of(maps.map(lambda m: {"weight_map": m}), st.just([]), st.text(max_size=20), st.none())

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(index=values)
        def check(index: object) -> None:
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
            try:
                Checkpoint.open(folder)
            except CheckpointError:
                return

        check()
