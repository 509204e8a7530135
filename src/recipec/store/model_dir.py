"""A Hugging Face model directory on disk: config.json plus safetensors weights, single or sharded.

`read_model_dir` learns everything the planner needs (config, every tensor's dtype, shape and place)
from config.json and the safetensors headers alone. A sharded index is distrusted: its `weight_map`
may only name plain files inside the directory, and it must agree with the shards' own headers.
A file that is a symbolic link must stay inside the directory (or, in a Hugging Face cache snapshot,
inside the repository's own `blobs/`): a folder must not make recipec read or ship files from elsewhere.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

from .safetensors_header import HeaderError, TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Every non-weight file of a model directory that can reach an output, besides config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


class ModelDirError(Exception):
    """A problem with a model directory, carrying its diagnostic code, the file and a hint."""

    def __init__(self, code: str, message: str, path: Path, hint: str | None = None):
        super().__init__(message)
        self.code, self.message, self.path, self.hint = code, message, path, hint


@dataclass(frozen=True)
class ModelFiles:
    root: Path
    config: dict
    tensors: dict[str, TensorEntry]  # every tensor, with the file holding it in `.path` of its header
    shard_of: dict[str, Path]  # tensor name -> the file that holds it
    files: tuple[Path, ...]  # weight files, sorted

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class MappedWeights:
    """The stored bytes of a model's tensors, each weight file memory-mapped once; no torch, so digests
    can be taken while another thread is still importing it."""

    def __init__(self, files: ModelFiles):
        self.files = files
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def raw(self, name: str) -> memoryview:
        """The stored bytes of one tensor."""
        entry = self.files.tensors[name]
        return memoryview(self._map(self.files.shard_of[name]))[entry.begin:entry.end]

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes when it does
                pass
        self._maps.clear()


def check_links(root: Path) -> None:
    """Refuse a model directory with a file that links outside it; raises ModelDirError."""
    real_root = root.resolve()
    allowed = [real_root]
    if real_root.parent.name == "snapshots" and real_root.parent.parent.name.startswith("models--"):
        allowed.append(real_root.parent.parent / "blobs")  # the hub cache's snapshot -> blob links
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() and entry.is_file() and not any(a in entry.resolve().parents for a in allowed):
            raise ModelDirError("E314", f"{entry.name} in {root} links outside the model directory, to "
                                f"{entry.resolve()}", entry,
                                "copy the file into the directory (`cp -L`), or remove the link")


def check_json_files(root: Path) -> None:
    """Every JSON file beside the weights (tokenizer, generation config) parses: a release ships them as
    they are and transformers reads them, so a broken one is refused where the recipe names the folder,
    not found by the user of a release, or late in an export. Raises ModelDirError (E404)."""
    for name in TOKENIZER_FILES:
        path = root / name
        if name.endswith(".json") and path.is_file():
            try:
                json.loads(path.read_bytes())
            except (UnicodeDecodeError, ValueError) as err:
                raise ModelDirError("E404", f"{name} is not valid JSON: {err}", path,
                                    f"fix or remove {path}: releases ship it as it is, and transformers "
                                    "reads it") from None


def read_config(root: Path) -> dict:
    """config.json of a model directory (or a config file itself), validated enough to be trusted."""
    if root.is_dir():
        check_links(root)  # every reader of a model directory starts here
    path = root if root.is_file() else root / "config.json"
    if not path.is_file():
        raise ModelDirError("E401", f"no config.json in {root}", root,
                            "a model directory needs config.json and safetensors weights")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelDirError("E404", f"config.json is not valid JSON: {err}", path) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelDirError("E404", "config.json has no `model_type`", path,
                            "every transformers config names its `model_type`, e.g. \"llama\"")
    problem = _config_field_problem(config)
    if problem is not None:
        raise ModelDirError("E404", f"config.json: {problem}", path,
                            f"transformers would refuse or misread this model: fix the field in {path}")
    return config


# Config fields the signature and the exported model depend on: each a positive integer where given
# (null is how some configs say "derive it").
_COUNT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")


def _config_field_problem(config: dict) -> str | None:
    """What is wrong with the typed fields of a config (and of its `text_config`), or None."""
    sections = [("", config)]
    if isinstance(config.get("text_config"), dict):
        sections.append(("text_config.", config["text_config"]))
    for prefix, section in sections:
        for name in _COUNT_FIELDS:
            value = section.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                return f"`{prefix}{name}` must be a positive integer, got {json.dumps(value)}"
        tie = section.get("tie_word_embeddings")
        if tie is not None and not isinstance(tie, bool):
            return f"`{prefix}tie_word_embeddings` must be true or false, got {json.dumps(tie)}"
    return None


def read_model_dir(root: Path) -> ModelFiles:
    """Config and tensor table of a local model directory; raises ModelDirError."""
    if not root.is_dir():
        raise ModelDirError("E401", f"model directory {root} does not exist", root,
                            "paths in a recipe are relative to the recipe's own directory")
    if not (root / "config.json").is_file() and not weight_files(root) and not pickled_weights(root):
        raise ModelDirError("E401", f"{root} has neither config.json nor safetensors weights", root,
                            "a model directory needs config.json and model.safetensors (or an index with shards)")
    config = read_config(root)
    if (root / INDEX_FILE).is_file():
        shard_of = _read_index(root)
    elif (root / SINGLE_FILE).is_file():
        shard_of = None
    else:
        if pickled_weights(root):
            raise ModelDirError("E509", f"{root} has only pickled weights ({PICKLE_FILES[0]})", root,
                                "loading a pickle can run code: convert it to safetensors, or allow it "
                                "explicitly with load(path, allow_pickle=true)")
        raise ModelDirError("E401", f"no safetensors weights in {root}", root,
                            f"expected {SINGLE_FILE} or {INDEX_FILE} with its shards")
    files = sorted(set(shard_of.values())) if shard_of else [root / SINGLE_FILE]
    tensors: dict[str, TensorEntry] = {}
    holder: dict[str, Path] = {}
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ModelDirError("E401", f"{INDEX_FILE} lists {_shards(absent)} that {'is' if len(absent) == 1 else 'are'} "
                            "missing", root / absent[0], "the download is incomplete: fetch the missing files")
    for file in files:
        try:
            header = read_header(file)
        except HeaderError as err:
            raise ModelDirError("E402", f"{file.name}: {err}", file,
                                "the file is damaged or incompletely downloaded: fetch it again") from None
        for name, entry in header.tensors.items():
            if shard_of is not None and shard_of.get(name) != file:
                raise ModelDirError("E406", f"{file.name} holds `{name}`, which {INDEX_FILE} does not map to it",
                                    file)
            tensors[name] = entry
            holder[name] = file
    if shard_of is not None:
        missing = sorted(set(shard_of) - set(tensors))
        if missing:
            raise ModelDirError("E406", f"{INDEX_FILE} lists `{missing[0]}` but {shard_of[missing[0]].name} "
                                f"does not contain it ({len(missing)} missing)", root / INDEX_FILE)
    return ModelFiles(root, config, tensors, holder, tuple(files))


def _shards(names: list[str]) -> str:
    return f"shard {names[0]}" if len(names) == 1 else f"{len(names)} shards ({', '.join(names)})"


def weight_files(root: Path) -> list[Path]:
    """A model directory's safetensors files, from its index or by name, without reading any header."""
    if (root / INDEX_FILE).is_file():
        return sorted(set(_read_index(root).values()))
    return [root / SINGLE_FILE] if (root / SINGLE_FILE).is_file() else []


def pickled_weights(root: Path) -> list[Path]:
    """The pickled weight files of a directory without safetensors: one file, or the shards of an index."""
    if (root / PICKLE_FILES[0]).is_file():
        return [root / PICKLE_FILES[0]]
    index = root / PICKLE_FILES[1]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [root / s for s in shards if _is_plain_file_name(s)]


def _read_index(root: Path) -> dict[str, Path]:
    index_path = root / INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ModelDirError("E402", f"{INDEX_FILE} is not a valid index (JSON with a `weight_map` object)",
                            index_path) from None
    shard_of = {}
    for name, file in weight_map.items():
        if not _is_plain_file_name(file):
            raise ModelDirError("E403", f"{INDEX_FILE} maps `{name}` to {file!r}, outside the model directory",
                                index_path, "a shard must be a plain file name in the model directory")
        shard_of[name] = root / file
    return shard_of


def _is_plain_file_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\x00" not in name and not name.startswith("~") and ":" not in name)
