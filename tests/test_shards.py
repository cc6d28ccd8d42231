"""The output model writer: shards copied with replaced byte ranges, everything else identical,
sidecar policy, and what is left after a failure (nothing of its own)."""

from __future__ import annotations

import errno
import os
import shutil
from io import FileIO
from pathlib import Path

import pytest
import torch

from safelora_cli.errors import CorruptFileError
from safelora_cli.inputs.index import INDEX_NAME, TensorIndex, index_folder
from safelora_cli.inputs.loader import TORCH_DTYPES
from safelora_cli.notices import Notices
from safelora_cli.output import shards
from safelora_cli.output.shards import ShardWriter
from safelora_cli.output.sidecars import plan_sidecars
from safelora_cli.output.writer import OutputFolder
from safelora_cli.synthetic import PairSpec, make_pair
from tests.full_helpers import byte_ranges, folder_tensors, masked_bytes, same_bytes

Q = "model.layers.0.self_attn.q_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"


@pytest.fixture(params=[1, 3], ids=["single", "sharded"])
def model(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    _, aligned = make_pair(tmp_path, PairSpec(dtype=torch.bfloat16, shards=request.param))
    (aligned / "tokenizer.json").write_text('{"version": "1.0"}')
    (aligned / "tokenizer.model").write_bytes(b"\x00sentencepiece\xff")
    return aligned


def new_value(index: TensorIndex, name: str, seed: int) -> torch.Tensor:
    info = index.tensors[name]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(info.shape, generator=gen).to(TORCH_DTYPES[info.dtype])


def test_replaced_tensors_change_and_every_other_byte_is_the_sources(
    model: Path, tmp_path: Path
) -> None:
    index = index_folder(model)
    out = tmp_path / "out"
    out.mkdir()
    values = {name: new_value(index, name, k) for k, name in enumerate((Q, DOWN, NORM))}
    with ShardWriter(index, out) as writer:
        for name, value in values.items():
            writer.replace(index.tensors[name], value)
            # streamed: written at once, not held until finalize
            info = index.tensors[name]
            with (out / info.path.name).open("rb") as fh:
                fh.seek(info.offset)
                assert fh.read(info.nbytes) == value.reshape(-1).view(torch.uint8).numpy().tobytes()
        written = writer.finalize()
    shards = sorted(p.name for p in written if p.suffix == ".safetensors")
    assert shards == [p.name for p in index.files]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in index.files)
    got, source = folder_tensors(out), folder_tensors(model)
    assert got.keys() == source.keys()
    for name, tensor in got.items():
        assert same_bytes(tensor, values.get(name, source[name])), name
    ranges = byte_ranges(index, set(values))
    for path in index.files:  # headers and untouched tensors: byte for byte
        want = ranges.get(path, [])
        assert masked_bytes(out / path.name, want) == masked_bytes(path, want)


def test_sidecar_policy(tmp_path: Path) -> None:
    _, model = make_pair(tmp_path, PairSpec(shards=2))
    outside = tmp_path / "secret.txt"
    outside.write_text("not the model's")
    (model / "generation_config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    (model / "training_args.bin").write_bytes(b"pickle")
    (model / "model.gguf").write_bytes(b"gguf")
    (model / "consolidated.safetensors").write_bytes(b"stale")
    (model / "safelora_report.json").write_text("{}")
    (model / ".gitattributes").write_text("*.bin lfs")
    (model / "subfolder").mkdir()
    (model / "leak.txt").symlink_to(outside)
    (model / "alias.json").symlink_to(model / "config.json")
    os.mkfifo(model / "pipe.json")
    keep, refused = plan_sidecars(model, model.resolve(), model=True)
    assert [p.name for p in keep] == [
        "alias.json", "config.json", "generation_config.json", INDEX_NAME,
    ]  # fmt: skip
    assert {r.path.name: r.code for r in refused} == {
        "leak.txt": "file-outside-input",
        "model.gguf": "stale-weights",
        "pipe.json": "file-not-regular",
        "pytorch_model.bin": "stale-weights",
        "training_args.bin": "stale-weights",
    }
    notices = Notices()
    with OutputFolder(tmp_path / "out") as out:  # never blocks on the FIFO
        out.copy_files(model, model.resolve(), notices, model=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in keep]
    assert sorted(n.code for n in notices.items) == sorted(r.code for r in refused)


def test_a_hub_snapshots_links_into_its_own_blobs_are_copied(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    _, built = make_pair(tmp_path / "build", PairSpec())
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in built.iterdir():
        blob = repo / "blobs" / f"hash-{path.name}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    keep, refused = plan_sidecars(snapshot, repo.resolve(), model=True)
    assert [p.name for p in keep] == ["config.json"]
    assert refused == []
    out = tmp_path / "out"
    out.mkdir()
    with ShardWriter(index_folder(snapshot), out) as writer:
        writer.finalize()
    assert not (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()


def test_bad_replacements_are_refused_and_fail_the_writer(model: Path, tmp_path: Path) -> None:
    index = index_folder(model)
    out = tmp_path / "out"
    out.mkdir()
    info = index.tensors[Q]
    writer = ShardWriter(index, out)
    with pytest.raises(ValueError, match="the file holds BF16"):
        writer.replace(info, torch.zeros(info.shape))  # float32, not bf16
    with pytest.raises(ValueError, match=r"\[64, 63\]"):
        writer.replace(info, torch.zeros(64, 63, dtype=torch.bfloat16))
    writer.replace(info, new_value(index, Q, 1))
    with pytest.raises(ValueError, match="replaced twice"):
        writer.replace(info, new_value(index, Q, 2))
    other = index_folder(make_pair(tmp_path / "other", PairSpec())[1])
    with pytest.raises(ValueError, match="not a tensor of"):
        writer.replace(other.tensors[Q], new_value(other, Q, 3))
    written = writer.finalize()
    assert written == [out / path.name for path in index.files]
    with pytest.raises(RuntimeError, match="finalized"):
        writer.finalize()


def test_an_exception_leaves_nothing_and_finalize_refuses(model: Path, tmp_path: Path) -> None:
    index = index_folder(model)
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs.txt").write_text("the caller's")
    writer = ShardWriter(index, out)

    def interrupted() -> None:
        with writer:
            writer.replace(index.tensors[Q], new_value(index, Q, 1))
            assert any(p.name.endswith(".safetensors") for p in out.iterdir())
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    with pytest.raises(RuntimeError, match="failed"):
        writer.finalize()


def test_disk_full_while_copying_a_shard_leaves_nothing(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last shard's copy fills the disk halfway, in finalize: nothing is left."""
    index = index_folder(model)
    out = tmp_path / "out"
    out.mkdir()
    targets = []
    copy_range = shards.copy_range

    def copy_then_fill(source: FileIO, target: FileIO, start: int, stop: int) -> None:
        targets.append(target.name)
        if Path(target.name).name == index.files[-1].name:
            copy_range(source, target, start, start + (stop - start) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target.name)
        copy_range(source, target, start, stop)

    def write() -> None:
        with ShardWriter(index, out) as writer:
            writer.replace(index.tensors[Q], new_value(index, Q, 1))
            writer.finalize()

    monkeypatch.setattr(shards, "copy_range", copy_then_fill)
    with pytest.raises(OSError, match="No space left") as caught:
        write()
    assert caught.value.errno == errno.ENOSPC
    assert {Path(t).name for t in targets} == {p.name for p in index.files}
    assert list(out.iterdir()) == []


def test_every_byte_is_written_once_and_the_rest_copied(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the ranges no replacement covers are copied from the source: a replaced tensor's
    bytes are not copied first and overwritten after."""
    index = index_folder(model)
    out = tmp_path / "out"
    out.mkdir()
    copied: list[tuple[str, int, int]] = []
    copy_range = shards.copy_range

    def record(source: FileIO, target: FileIO, start: int, stop: int) -> None:
        copied.append((Path(target.name).name, start, stop))
        copy_range(source, target, start, stop)

    monkeypatch.setattr(shards, "copy_range", record)
    info = index.tensors[Q]
    with ShardWriter(index, out) as writer:
        writer.replace(info, new_value(index, Q, 1))
        writer.finalize()
    mine = [(start, stop) for name, start, stop in copied if name == info.path.name]
    assert all(stop <= info.offset or start >= info.offset + info.nbytes for start, stop in mine)
    assert sum(stop - start for start, stop in mine) == info.file_size - info.nbytes
    rest = [p for p in index.files if p != info.path]
    for path in rest:
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_a_shard_changed_since_it_was_indexed_is_refused(model: Path, tmp_path: Path) -> None:
    index = index_folder(model)
    info = index.tensors[DOWN]
    with info.path.open("ab") as fh:
        fh.write(b"extra")
    out = tmp_path / "out"
    out.mkdir()
    with (
        pytest.raises(CorruptFileError, match="changed during the run"),
        ShardWriter(index, out) as writer,
    ):
        writer.replace(info, new_value(index, DOWN, 1))
    assert list(out.iterdir()) == []


def test_a_source_that_ends_early_while_copying_is_refused(tmp_path: Path) -> None:
    """A shard cut short after it was indexed: the range copy names it instead of leaving zeros."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(b"x" * 100)
    with (
        source.open("rb", buffering=0) as src,
        target.open("wb", buffering=0) as dst,
        pytest.raises(CorruptFileError, match="ends at byte 100, 160 expected"),
    ):
        shards.copy_range(src, dst, 40, 160)
    assert target.read_bytes()[40:] == b"x" * 60
