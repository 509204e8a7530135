"""Content digests (BLAKE3, each byte hashed once per algorithm), the SHA-256 people check, and the
versioned cache layout: an older cache is ignored with a note, never misread."""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path

import blake3
import pytest

from helpers import run_cli, tiny_llama, write_model
from recipec.arch import preset_config
from recipec.store.cache import LAYOUT, Cache
from recipec.store.digests import weights_identity
from recipec.store.filehash import content_file_hash, content_hash

RECIPE = 'recipec 1\na = load("models/a")\nb = load("models/b")\nexport 0.5*a + 0.5*b to "out/m"\n'
WEIGHT_BYTES = 820_480  # one tiny Llama's fp32 weights
SMALL = 64 << 10  # everything that is not weights, hashed in one run: configs, cards, sums, keys


run = run_cli


@pytest.fixture
def project(tmp_path) -> Path:
    tiny_llama(tmp_path / "models" / "a")
    write_model(tmp_path / "models" / "b", preset_config("llama", "tiny"), shards=3)
    (tmp_path / "r.rcp").write_text(RECIPE)
    return tmp_path / "r.rcp"


def lock_of(recipe: Path) -> dict:
    return tomllib.loads(recipe.with_name(recipe.name + ".lock").read_text())


class HashCounter:
    """Bytes hashed per algorithm, counted by wrapping both hashers' constructors and updates."""

    def __init__(self, monkeypatch):
        self.bytes = {"sha256": 0, "blake3": 0}
        monkeypatch.setattr(hashlib, "sha256", self._counting("sha256", hashlib.sha256))
        monkeypatch.setattr(blake3, "blake3", self._counting("blake3", blake3.blake3))

    def _counting(self, algorithm: str, make):
        counter = self

        class Counted:
            def __init__(self, data=None, **options):
                self._inner = make(**options)
                if data is not None:
                    self.update(data)

            def update(self, data):
                counter.bytes[algorithm] += memoryview(data).nbytes
                self._inner.update(data)

            def update_mmap(self, path, **options):
                counter.bytes[algorithm] += os.stat(path).st_size
                self._inner.update_mmap(path, **options)

            def __getattr__(self, name):
                return getattr(self._inner, name)

        return Counted


def test_content_digests_are_blake3_and_the_files_people_check_are_sha256(project, capsys):
    status, _, err = run(["run", project], capsys)
    assert status == 0, err
    lock = lock_of(project)
    digests = [i["digest"] for i in lock["inputs"].values()] + [n["digest"] for n in lock["nodes"].values()]
    assert digests and all(d.startswith("blake3:") and len(d) == len("blake3:") + 64 for d in digests)
    release = project.parent / "out" / "m"
    sums = dict(line.split("  ")[::-1] for line in (release / "SHA256SUMS").read_text().splitlines())
    assert sums == {name: hashlib.sha256((release / name).read_bytes()).hexdigest() for name in sums}
    assert {f["name"]: f["sha256"] for f in lock["outputs"]["out/m"]["files"]} == sums | {
        "SHA256SUMS": hashlib.sha256((release / "SHA256SUMS").read_bytes()).hexdigest()}


def test_sharding_does_not_change_a_digest_and_one_byte_does(project, capsys):
    b = project.parent / "models" / "b"
    write_model(project.parent / "models" / "c", preset_config("llama", "tiny"))  # b's tensors, one file
    project.write_text(RECIPE + 'c = load("models/c")\nexport 0.5*a + 0.5*c to "out/n"\n')
    assert run(["run", project], capsys)[0] == 0
    inputs = lock_of(project)["inputs"]
    assert inputs["b"]["digest"] == inputs["c"]["digest"]
    shard = b / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size, one bit of one weight
    shard.write_bytes(data)
    assert run(["run", project], capsys)[0] == 0
    assert lock_of(project)["inputs"]["b"]["digest"] != inputs["b"]["digest"]


def test_a_tensor_digest_is_blake3_of_its_bytes():
    data = os.urandom(3 << 20)
    assert content_hash(memoryview(data)) == blake3.blake3(data).hexdigest()


def test_a_file_is_content_hashed_alike_on_any_number_of_threads(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(os.urandom(5 << 20))
    one = content_file_hash(path, threads=1)
    assert one == blake3.blake3(path.read_bytes()).hexdigest() == content_file_hash(path, threads=4)
    (tmp_path / "empty").write_bytes(b"")
    assert content_file_hash(tmp_path / "empty") == blake3.blake3(b"").hexdigest()


def test_a_cold_run_hashes_each_byte_at_most_once_per_algorithm(project, capsys, monkeypatch):
    counter = HashCounter(monkeypatch)
    status, _, err = run(["run", project], capsys)
    assert status == 0, err
    # blake3: both inputs' weights as they are read, the result's as it is written; once each.
    assert 3 * WEIGHT_BYTES <= counter.bytes["blake3"] < 3 * WEIGHT_BYTES + SMALL, counter.bytes
    # sha256: the result's files once, when committed; the release links them and reuses the sums.
    assert WEIGHT_BYTES <= counter.bytes["sha256"] < WEIGHT_BYTES + SMALL, counter.bytes


def test_lock_hashes_inputs_once_per_algorithm_and_a_rerun_hashes_no_weight(project, capsys, monkeypatch):
    assert run(["run", project], capsys)[0] == 0
    counter = HashCounter(monkeypatch)
    assert run(["lock", project], capsys)[0] == 0  # re-hashes the inputs: their digests and their file sums
    assert 2 * WEIGHT_BYTES <= counter.bytes["blake3"] < 2 * WEIGHT_BYTES + SMALL, counter.bytes
    assert 2 * WEIGHT_BYTES <= counter.bytes["sha256"] < 2 * WEIGHT_BYTES + SMALL, counter.bytes
    counter.bytes.update(sha256=0, blake3=0)
    assert run(["run", project], capsys)[0] == 0
    assert counter.bytes["blake3"] < SMALL and counter.bytes["sha256"] < SMALL, counter.bytes


def test_the_cache_keeps_everything_in_its_layout_directory_and_says_nothing(project, capsys):
    cache = Path(os.environ["RECIPEC_CACHE"])
    status, _, err = run(["run", project], capsys)
    assert status == 0 and "note:" not in err, err
    assert sorted(p.name for p in cache.iterdir()) == [LAYOUT]
    key = lock_of(project)["nodes"]["%2"]["key"]
    assert (cache / LAYOUT / "objects" / key).is_dir() and (cache / LAYOUT / "digests.json").is_file()
    assert run(["run", project], capsys)[2].count("note:") == 0


def test_an_older_cache_is_ignored_with_a_note_never_misread(project, tmp_path, capsys, monkeypatch):
    assert run(["run", project], capsys)[0] == 0
    fresh = lock_of(project)
    old = tmp_path / "old-cache"
    # What recipec wrote before layouts had a directory: a digest memo, here claiming another digest for
    # this very input, and an object under the key the node has now.
    a = project.parent / "models" / "a"
    (old / "objects" / fresh["nodes"]["%2"]["key"]).mkdir(parents=True)
    (old / "digests.json").write_text(json.dumps({weights_identity(a): "sha256:" + "0" * 64}))
    (old / "v9").mkdir()  # a newer recipec's layout is not this one's either
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    monkeypatch.setenv("RECIPEC_CACHE", str(old))
    status, out, err = run(["run", "--json", project], capsys)
    assert status == 0, err
    notes = [line for line in err.splitlines() if "note:" in line]
    assert notes == [f"recipec: note: ignoring digests.json, objects, v9 in {old}: left by a recipec with another "
                     f"cache layout (this one uses {LAYOUT}/); delete them to free the space"]
    assert [n["status"] for n in json.loads(out)["nodes"]] == ["input", "input", "built"]  # not the old object
    assert lock_of(project)["inputs"] == fresh["inputs"] and lock_of(project)["nodes"] == fresh["nodes"]
    assert Cache(old).known_digests()[weights_identity(a)].startswith("blake3:")  # remembered anew, in v2
    after = sorted(str(p.relative_to(old)) for p in old.rglob("*") if not str(p.relative_to(old)).startswith(LAYOUT))
    assert after == before  # left as it was: the note says how to free the space


def test_the_writer_sha256_of_each_file_matches_its_bytes_in_any_write_order(tmp_path, monkeypatch):
    """Files' SHA-256 taken while tensors arrive out of file order, on several threads, with empty tensors
    and several shards: what `hash_file` then returns is the hash of the bytes on disk."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from recipec.dtypes import TensorSpec
    from recipec.store.filehash import hash_file
    from recipec.store.tensors import ModelWriter

    specs = [TensorSpec(f"t{i:02d}", "F32", (0,) if i % 7 == 0 else (i + 1, 33)) for i in range(24)]
    writer = ModelWriter(tmp_path, specs, shard_size=6_000)
    assert len(writer.files) > 2
    order = [t for t in specs if t.shape != (0,)]
    random.Random(0).shuffle(order)

    def write(t: TensorSpec) -> None:
        values = torch.arange(t.shape[0] * t.shape[1], dtype=torch.float32) * len(t.name)
        for piece in values.split(40):
            writer.write(t.name, piece)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(write, order))
    writer.finish()
    on_disk = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in writer.files}
    monkeypatch.setattr(hashlib, "sha256", None)  # the files are not read again: the writer hashed them
    assert {name: hash_file(tmp_path / name) for name in writer.files} == on_disk


def test_a_file_changed_after_writing_is_hashed_again(tmp_path):
    from recipec.store.filehash import hash_file, remember_written_hash

    path = tmp_path / "f"
    path.write_bytes(b"one")
    remember_written_hash(path, "stale")
    path.write_bytes(b"two, longer")
    assert hash_file(path) == hashlib.sha256(b"two, longer").hexdigest()


def test_a_large_file_read_twice_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    # A rerun looks at the old release before and after replacing it: its weights are read once.
    from recipec.store import filehash

    monkeypatch.setattr(filehash, "_REMEMBERED_FROM", 0)
    expected = hashlib.sha256(b"b" * 1000).hexdigest()
    counter = HashCounter(monkeypatch)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    first = filehash.hash_file(weights)
    assert filehash.hash_file(weights) == first and counter.bytes["sha256"] == 1000
    weights.write_bytes(b"b" * 1000)  # same size, same inode
    assert filehash.hash_file(weights) == expected != first
    assert counter.bytes["sha256"] == 2000
