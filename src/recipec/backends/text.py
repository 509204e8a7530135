"""Text rules: train a tokenizer, grow a model's vocabulary, filter data by perplexity.

The text work itself is textprep's (train_bpe, extend_tokenizer, extend_rows, encode_*); these rules read the
inputs as artifacts, turn `TextPrepError` into located run-time errors and write results the way each kind
expects: a tokenizer directory, a model directory (canonical safetensors), normalized data records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ..artifacts import Artifact
from ..artifacts.corpus import iter_texts
from ..artifacts.data import RECORDS, iter_records
from ..dtypes import TensorSpec
from ..ir.types import Kind
from ..ops.text import VOCAB_ROW_TENSORS, ExtendVocab, PplFilter, TrainTokenizer
from ..store.tensors import ModelReader, ModelWriter, write_json
from ..textprep.errors import TextPrepError
from ..textprep.templates import DEFAULT_CHAT_TEMPLATE
from ..textprep.vocab import extend_rows, extend_tokenizer, read_tokenizer_json, vocabulary_size
from .job import Job, RunFailure, checked_text

SHARD_SIZE = 5 * 10**9
# Upper edges of the perplexity histogram's bins; the last bin holds everything above the last edge.
PPL_BIN_EDGES = (2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
FILTER_META = "ppl_filter.json"


def _text_prep(err: TextPrepError) -> RunFailure:
    return RunFailure("E582", err.message, err.hint)


def _counted(texts: Iterator[str], job: Job) -> Iterator[str]:
    for done, text in enumerate(texts, 1):
        job.progress.update(done, None, "documents")
        yield text


def build_tokenizer(job: Job) -> None:
    from ..textprep.bpe import train_bpe

    params: TrainTokenizer.Params = TrainTokenizer.params_of(job.node)
    template = checked_text(params.chat_template) if params.chat_template else DEFAULT_CHAT_TEMPLATE
    try:
        train_bpe(_counted(iter_texts(job.inputs[0]), job), job.out, params.vocab_size, params.special_tokens,
                  template)
    except TextPrepError as err:
        raise _text_prep(err) from None
    size = vocabulary_size(read_tokenizer_json(job.out))
    if size != params.vocab_size:
        # A model is sized to `vocab_size` at check time, so the tokenizer must have exactly that many tokens.
        raise RunFailure("E581", f"the corpus yields only {size} tokens, fewer than vocab_size={params.vocab_size}",
                         f"use vocab_size={size} or less, or a larger corpus")


def _vocab_tensors(files) -> list[str]:
    return [name for name in VOCAB_ROW_TENSORS if name in files.tensors]


def build_extend_vocab(job: Job) -> str:
    params: ExtendVocab.Params = ExtendVocab.params_of(job.node)
    model, source = job.inputs
    files = model.files
    rows = files.tensors[_vocab_tensors(files)[0]].shape[0]
    try:
        if vocabulary_size(read_tokenizer_json(model.path)) != rows:
            raise RunFailure("E583", f"the model's tokenizer does not fill its {rows} vocabulary rows",
                             "new tokens must start right after the model's last row; extend a model whose "
                             "tokenizer has exactly as many tokens as it has embedding rows")
        from_corpus = source.kind is Kind.CORPUS
        extension = extend_tokenizer(model.path, job.out, params.add,
                                     other_dir=None if from_corpus else source.path,
                                     corpus=iter_texts(source) if from_corpus else None)
    except TextPrepError as err:
        raise _text_prep(err) from None
    added = len(extension.added)
    if added != params.add:
        raise RunFailure("E583", f"only {added} new tokens found, not add={params.add}",
                         f"use add={added}, or a source with more new text")
    digest = _write_grown_weights(job, files, params.add, params.init)
    config = dict(files.config)
    config["vocab_size"] = rows + params.add
    write_json(job.out / "config.json", config)
    return digest


def _write_grown_weights(job: Job, files, add: int, init: str) -> str:
    """Every tensor of `files` into job.out, vocabulary rows extended, the others byte for byte; the digest."""
    grown = set(_vocab_tensors(files))
    layout = [TensorSpec(name, e.dtype, (e.shape[0] + add, *e.shape[1:]) if name in grown else tuple(e.shape))
              for name, e in sorted(files.tensors.items())]
    reader, writer = ModelReader(files), ModelWriter(job.out, layout, SHARD_SIZE)
    try:
        for spec in layout:
            tensor = reader.tensor(spec.name)
            writer.write(spec.name, extend_rows(tensor, add, init) if spec.name in grown else tensor)
            job.progress(spec.nbytes)
        return writer.finish()
    finally:
        writer.close()
        reader.close()


def _encoder(data: Artifact, model_dir: Path):
    """Records of `data` to token ids as the model reads them: documents as `cp` sees them, conversations
    through the model's chat template (every token counted)."""
    from ..textprep.encode import chat_format, encode_conversation, encode_document, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if data.kind is Kind.CORPUS:
        return lambda record: encode_document(tokenizer, record["text"]).ids
    fmt = chat_format(tokenizer)
    return lambda record: encode_conversation(fmt, record["messages"], loss="all").ids


def _windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """A document cut into pieces of at most `seq_len` tokens (each scored on its own)."""
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]


def _nll_sums(model, pieces: list[list[int]]) -> list[tuple[float, int]]:
    """(summed next-token NLL, target count) of each piece, in one padded fp32 forward pass."""
    width = max(len(p) for p in pieces)
    ids = torch.zeros(len(pieces), width, dtype=torch.long)
    mask = torch.zeros(len(pieces), width, dtype=torch.long)
    for row, piece in enumerate(pieces):
        ids[row, :len(piece)] = torch.tensor(piece)
        mask[row, :len(piece)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    targets = mask[:, 1:].float()
    return [(float((nll[r] * targets[r]).sum()), int(targets[r].sum())) for r in range(len(pieces))]


def perplexities(model, encoded: Iterator[list[int]], seq_len: int, batch: int, job: Job) -> list[float]:
    """exp(mean NLL over each document's target tokens), inf for a document with none (under 2 tokens)."""
    totals: list[list[float]] = []  # per document: [NLL sum, target count]
    pending: list[tuple[int, list[int]]] = []  # (document, piece) waiting for a batch

    def flush() -> None:
        for (doc, _), (nll, count) in zip(pending, _nll_sums(model, [p for _, p in pending])):
            totals[doc][0] += nll
            totals[doc][1] += count
        pending.clear()

    for doc, ids in enumerate(encoded):
        totals.append([0.0, 0])
        pending.extend((doc, piece) for piece in _windows(ids, seq_len) if len(piece) > 1)
        if len(pending) >= batch:
            flush()
        job.progress.update(doc + 1, None, "documents")
    if pending:
        flush()
    return [math.exp(nll / count) if count else math.inf for nll, count in totals]


def histogram(values: list[float]) -> list[dict]:
    """How many perplexities fall in each bin: `upto` its upper edge (None for the last, unbounded bin)."""
    counts = [0] * (len(PPL_BIN_EDGES) + 1)
    for value in values:
        counts[next((i for i, edge in enumerate(PPL_BIN_EDGES) if value <= edge), len(PPL_BIN_EDGES))] += 1
    return [{"upto": edge, "count": n} for edge, n in zip((*PPL_BIN_EDGES, None), counts)]


def build_ppl_filter(job: Job) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # run draws its own progress; a loading bar would garble it
    params: PplFilter.Params = PplFilter.params_of(job.node)
    data, scorer = job.inputs
    noun = "documents" if data.kind is Kind.CORPUS else "conversations"
    try:
        encode = _encoder(data, scorer.path)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(scorer.path), dtype=torch.float32)
        model.eval()
        ppl = perplexities(model, (encode(r) for r in iter_records(data)), params.seq_len, params.batch, job)
    except TextPrepError as err:
        raise _text_prep(err) from None
    low = params.min if params.min is not None else 0.0
    high = params.max if params.max is not None else math.inf
    keep = [low <= value <= high for value in ppl]
    finite = sorted(v for v in ppl if math.isfinite(v))
    summary = {"kept": sum(keep), "dropped": len(keep) - sum(keep), "unit": noun,
               "min": finite[0] if finite else None, "median": finite[len(finite) // 2] if finite else None,
               "max": finite[-1] if finite else None, "histogram": histogram(ppl)}
    if not any(keep):
        raise RunFailure("E584", f"ppl_filter keeps none of the {len(keep)} {noun}", _range_hint(summary))
    with open(data.path / RECORDS, encoding="utf-8") as source, open(job.out / RECORDS, "w", encoding="utf-8") as out:
        for line, kept in zip(source, keep):
            if kept:
                out.write(line)  # the normalized record as it is: the same kind, the same format
    write_json(job.out / FILTER_META, summary)
    job.warn("E580", f"kept {summary['kept']} of {len(keep)} {noun} (perplexity {_range_text(summary)})")


def _range_text(summary: dict) -> str:
    if summary["min"] is None:
        return "unknown: every one is too short to score"
    return f"{summary['min']:.3g} to {summary['max']:.3g}, median {summary['median']:.3g}"


def _range_hint(summary: dict) -> str:
    return f"their perplexities run from {_range_text(summary)}; widen `max=`/`min=`, or check the model"
