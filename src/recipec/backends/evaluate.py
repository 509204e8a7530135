"""Evaluation rule: perplexity and bits per byte on a corpus, greedy answers to prompts and their language,
for each model in turn, then one report with the first model as reference (ops/evaluate.py says what is
measured and how).

Every model sees the same documents in the same windows (of its own tokens) and the same prompts in the same
batches. Windows are scored in batches of `batch`, right-padded (no token attends to padding after it);
prompts are sorted by length so that a batch holds similar lengths, left-padded with the attention mask
given to `generate`, so a padded prompt is answered as it would be alone. Decoding is greedy, with one
generation config for every model (the models' own sampling defaults do not apply).

The training figure draws the loss curve of every training node the evaluated models are built from, the
models themselves included, by the node's name: a pruned chat model shows the curve of the `sft` before it.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from ..artifacts import Artifact
from ..artifacts.corpus import iter_texts
from ..artifacts.dataset import iter_conversations
from ..artifacts.report import Report, Table, bar_chart, cell_text, line_chart, write_report
from ..ir.types import Kind
from ..ops.evaluate import DEFAULT_SEQ_LEN, Eval, prompt_of_conversation, read_prompt_lines
from ..store.release_files import TRAINING_FILES
from ..textprep.encode import ChatFormat, chat_format, encode_document, load_tokenizer
from ..textprep.errors import TextPrepError
from ..textprep.language import identify
from .job import Job, RunFailure, checked_text
from .train.metrics import read_metrics

SAMPLE_CHARS = 240  # an answer on the report's page; report.json keeps it whole
TRAINING_METRICS = TRAINING_FILES[0]


# ----------------------------------------------------------------------------- perplexity


def windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target) of the windows over a document of `length` tokens: windows of `seq_len`
    starting every `stride` tokens. A token is scored once at most, in the first window that holds it after
    at least one token of context: with `stride < seq_len` every token but the document's first, with
    `stride == seq_len` every token but each window's first."""
    spans, scored, begin = [], 1, 0
    while scored < length:
        end = min(begin + seq_len, length)
        first = max(scored, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        scored, begin = max(scored, end), begin + stride
    return spans


def _window_nll(model, pieces: list[tuple[list[int], int]]) -> tuple[float, int]:
    """Summed next-token NLL (nats, fp32 logits, summed in float64) and target count of a batch of windows,
    each (ids, index of its first target)."""
    width = max(len(ids) for ids, _ in pieces)
    ids = torch.zeros(len(pieces), width, dtype=torch.long)
    mask = torch.zeros(len(pieces), width, dtype=torch.long)
    targets = torch.zeros(len(pieces), width - 1, dtype=torch.bool)
    for row, (piece, first) in enumerate(pieces):
        ids[row, :len(piece)] = torch.tensor(piece)
        mask[row, :len(piece)] = 1
        targets[row, first - 1:len(piece) - 1] = True  # logits at p predict the token at p + 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return float(nll[targets].double().sum()), int(targets.sum())


def corpus_nll(model, tokenizer, documents: list[str], seq_len: int, stride: int, batch: int) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of every document, as `cp` tokenizes it, in windows."""
    total, count, pending = 0.0, 0, []
    for text in documents:
        ids = encode_document(tokenizer, text).ids
        pending.extend((ids[begin:end], first - begin) for begin, end, first in windows(len(ids), seq_len, stride))
        while len(pending) >= batch:
            nll, n = _window_nll(model, pending[:batch])
            total, count, pending = total + nll, count + n, pending[batch:]
    if pending:
        nll, n = _window_nll(model, pending)
        total, count = total + nll, count + n
    return total, count


# ----------------------------------------------------------------------------- answers


def _eos_ids(model, tokenizer) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def rendered_prompts(fmt: ChatFormat, prompts: list[list[dict]]) -> list[list[int]]:
    """Each prompt rendered by the chat template with the generation prompt, then tokenized without adding
    special tokens (the template writes its own BOS)."""
    encoded = []
    for messages in prompts:
        text = fmt.tokenizer.apply_chat_template(messages, chat_template=fmt.template, tokenize=False,
                                                 add_generation_prompt=True)
        encoded.append(list(fmt.tokenizer(text, add_special_tokens=False)["input_ids"]))
    return encoded


def greedy_answers(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, batch: int) -> list[str]:
    """Greedy answers to token-id prompts, in batches of similar lengths, left-padded."""
    from transformers import GenerationConfig

    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos or None)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # stable: ties keep file order
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch):
        group = order[start:start + batch]
        width = max(len(encoded[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in enumerate(group):
            new = out[row, width:].tolist()
            stop = next((k for k, token in enumerate(new) if token in eos), len(new))
            answers[i] = tokenizer.decode(new[:stop], skip_special_tokens=True).strip()
    return answers


def window_length(models: list[Artifact]) -> int:
    """The default window: the fewest positions among the models (one window length for all), at most
    DEFAULT_SEQ_LEN."""
    positions = [a.files.config.get("max_position_embeddings") for a in models]
    return min([DEFAULT_SEQ_LEN, *(p for p in positions if isinstance(p, int) and p >= 2)])


def _positions(model) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


# ----------------------------------------------------------------------------- one model


def evaluate_model(label: str, artifact: Artifact, documents: list[str] | None, prompts: list[list[dict]],
                   params: Eval.Params) -> dict:
    """What eval measures of one model."""
    import transformers

    try:
        tokenizer = load_tokenizer(artifact.path)
        fmt = chat_format(tokenizer) if prompts else None
    except TextPrepError as err:
        raise RunFailure("E605", f"`{label}`: {err.message}", err.hint) from None
    torch.manual_seed(params.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(artifact.path), dtype=torch.float32)
    model.eval()
    positions = _positions(model)
    result: dict = {"label": label, "trained": _training_losses(artifact.path)}
    if documents is not None:
        if positions is not None and params.seq_len > positions:
            raise RunFailure("E606", f"seq_len={params.seq_len} is beyond the {positions} positions of `{label}`",
                             f"set `seq_len` to at most {positions}, or leave it out (the models' positions)")
        nll, count = corpus_nll(model, tokenizer, documents, params.seq_len, params.stride or params.seq_len,
                                params.batch)
        if count == 0:
            raise RunFailure("E608", f"the corpus gives `{label}` no token to score: every document is under "
                             "two tokens", "give eval a corpus of whole documents")
        corpus_bytes = sum(len(text.encode("utf-8")) for text in documents)
        result.update(nll=nll, tokens=count, perplexity=math.exp(nll / count),
                      bits_per_byte=nll / math.log(2) / corpus_bytes)
    if prompts:
        encoded = rendered_prompts(fmt, prompts)
        longest = max(len(ids) for ids in encoded)
        if positions is not None and longest + params.max_new_tokens > positions:
            raise RunFailure("E606", f"the longest prompt is {longest} tokens for `{label}`; with "
                             f"max_new_tokens={params.max_new_tokens} it runs past the model's {positions} "
                             "positions", f"use max_new_tokens of at most {max(positions - longest, 0)}, "
                                          "or shorter prompts")
        texts = greedy_answers(model, tokenizer, encoded, params.max_new_tokens, params.batch)
        found = [_identified(text) for text in texts]
        result["answers"] = [{"text": text, "language": f.name, "score": f.score} for text, f in zip(texts, found)]
        if params.language is not None:
            result["language_share"] = sum(f.matches(params.language) for f in found) / len(found)
    return result


def _identified(text: str):
    try:
        return identify(text)
    except TextPrepError as err:
        raise RunFailure("E609", err.message, err.hint) from None


def training_curves(job: Job, names: dict[int, str]) -> dict[str, list[dict]]:
    """The per-step losses of every trained node upstream of the evaluated models (and of the models
    themselves), by the name the report shows it by (`names`, ops/base.py `upstream_names`), in plan order."""
    curves = {}
    for node_id in sorted(names):
        artifact = job.upstream.get(node_id)
        losses = _training_losses(artifact.path) if artifact is not None and artifact.kind is Kind.MODEL else None
        if losses:
            curves[names[node_id]] = losses
    return curves


def _training_losses(model_dir: Path) -> list[dict] | None:
    """The per-step losses a training op kept beside the model, or None for a model not trained by one."""
    path = model_dir / TRAINING_METRICS
    if not path.is_file():
        return None
    return [{"step": r["step"], "loss": r["loss"]} for r in read_metrics(path) if "step" in r and "loss" in r]


# ----------------------------------------------------------------------------- the report


def _prompts(job: Job, params: Eval.Params) -> list[list[dict]]:
    dataset = next((a for a in job.inputs if a.kind is Kind.DATASET), None)
    if dataset is not None:
        prompts = [p for p in map(prompt_of_conversation, iter_conversations(dataset)) if p is not None]
        if not prompts:
            raise RunFailure("E607", "no conversation of the prompt set has a user message to answer",
                             "the prompt of a conversation is its turns up to the last user message")
        return prompts
    if params.prompts is None:
        return []
    return read_prompt_lines(checked_text(params.prompts))


def _with_reference(models: list[dict], language: str | None) -> None:
    """Each model's ratios (perplexity, bits per byte) and differences (language share) to the first.
    Perplexity is per token of a model's own tokenizer: it is compared only where the corpus gave the
    same number of tokens (one tokenization); bits per byte compares models across tokenizers."""
    first = models[0]
    for model in models:
        comparable = {"perplexity": model.get("tokens") == first.get("tokens"), "bits_per_byte": True}
        model["vs_reference"] = {
            **{key: (model[key] / first[key] if key in model and first.get(key) and comparable[key] else None)
               for key in ("perplexity", "bits_per_byte")},
            **({"language_share": model["language_share"] - first["language_share"]} if language else {}),
        }


def _other_tokens(models: list[dict]) -> bool:
    return any("perplexity" in m and m["vs_reference"]["perplexity"] is None for m in models[1:])


def _ratio_cell(model: dict, key: str, first: bool) -> str:
    value, ratio = model.get(key), model["vs_reference"].get(key)
    if value is None:
        return "—"
    if first:
        return f"{value:.4g}"
    if ratio is None:
        return f"{value:.4g} (other tokens)" if key == "perplexity" and "perplexity" in model else f"{value:.4g}"
    return f"{value:.4g} ({ratio:.2f}×)"


def _share_cell(model: dict, first: bool) -> str:
    share, delta = model["language_share"], model["vs_reference"]["language_share"]
    return f"{share:.1%}" if first else f"{share:.1%} ({100 * delta:+.1f} pt)"


def _languages_cell(model: dict) -> str:
    counts = Counter(a["language"] for a in model["answers"])
    return ", ".join(f"{lang} {n}" for lang, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:4])


def eval_table(models: list[dict], language: str | None) -> Table:
    header = ["", *(f"{m['label']} (reference)" if i == 0 else m["label"] for i, m in enumerate(models))]
    rows = []
    if "perplexity" in models[0]:
        rows.append(["perplexity", *(_ratio_cell(m, "perplexity", i == 0) for i, m in enumerate(models))])
        rows.append(["bits per byte", *(_ratio_cell(m, "bits_per_byte", i == 0) for i, m in enumerate(models))])
        rows.append(["tokens scored", *(f"{m['tokens']:,}" for m in models)])
    if "answers" in models[0]:
        if language is not None:
            rows.append([f"answers in {language}", *(_share_cell(m, i == 0) for i, m in enumerate(models))])
        rows.append(["answer languages", *(_languages_cell(m) for m in models)])
    if any(m["trained"] for m in models):
        rows.append(["final training loss", *(f"{m['trained'][-1]['loss']:.4g}" if m["trained"] else "—"
                                              for m in models)])
    return Table(header, rows)


def _settings(params: Eval.Params, corpus: dict | None, prompts: list[list[dict]]) -> str:
    parts = []
    if corpus is not None:
        stride = params.stride or params.seq_len
        parts.append(f"corpus: {corpus['documents']:,} documents, {corpus['bytes']:,} bytes, windows of "
                     f"{params.seq_len} tokens every {stride}")
    if prompts:
        parts.append(f"prompts: {len(prompts):,}, greedy answers of at most {params.max_new_tokens} tokens"
                     + (f", target language {params.language}" if params.language else ""))
    parts.append(f"seed {params.seed}")
    return "Settings: " + "; ".join(parts) + "."


def _samples(models: list[dict], prompts: list[list[dict]], count: int) -> str | None:
    if not prompts or count == 0:
        return None
    lines = ["## Sample answers"]
    for i, prompt in enumerate(prompts[:count]):
        lines.append(f"\n**Prompt {i + 1}:** {cell_text(prompt[-1]['content'], SAMPLE_CHARS)}\n")
        lines += [f"- `{m['label']}` ({m['answers'][i]['language']}): "
                  f"{cell_text(m['answers'][i]['text'], SAMPLE_CHARS) or '(empty)'}" for m in models]
    return "\n".join(lines)


def eval_report(models: list[dict], params: Eval.Params, corpus: dict | None, prompts: list[list[dict]],
                curves: dict[str, list[dict]] | None = None) -> Report:
    """The report of models evaluated side by side, the first as reference; `curves`: the training losses
    of the nodes upstream of them, by label (by default, of the models trained themselves)."""
    _with_reference(models, params.language)
    labels = [m["label"] for m in models]
    figures = {}
    if corpus is not None:
        figures["perplexity"] = bar_chart(labels, [m["perplexity"] for m in models], "perplexity")
        figures["bits_per_byte"] = bar_chart(labels, [m["bits_per_byte"] for m in models], "bits per byte")
    if prompts and params.language is not None:
        figures["language_share"] = bar_chart(labels, [m["language_share"] for m in models],
                                              f"share of answers in {params.language}")
    if curves is None:
        curves = {m["label"]: m["trained"] for m in models if m["trained"]}
    if curves:
        figures["training_loss"] = line_chart({label: ([r["step"] for r in losses], [r["loss"] for r in losses])
                                               for label, losses in curves.items()},
                                              "optimizer step", "training loss (nats per token)")
    data = {"kind": "eval", "settings": params.model_dump(mode="json", exclude={"prompts"}), "corpus": corpus,
            "prompts": prompts, "models": models, "training": curves}
    sections = [_settings(params, corpus, prompts)]
    if corpus is not None and _other_tokens(models):
        sections.append("Perplexity is per token of each model's own tokenizer, so it is compared only between "
                        "models that cut the corpus into the same tokens; across tokenizers, compare bits per byte.")
    sample = _samples(models, prompts, params.samples)
    if sample:
        sections.append(sample)
    return Report("Evaluation", data, [eval_table(models, params.language)], figures, sections)


def build_eval(job: Job) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # run draws its own progress; a loading bar would garble it
    params: Eval.Params = Eval.params_of(job.node)
    corpus_artifact = next((a for a in job.inputs if a.kind is Kind.CORPUS), None)
    documents = list(iter_texts(corpus_artifact)) if corpus_artifact is not None else None
    corpus = ({"documents": len(documents), "bytes": sum(len(t.encode("utf-8")) for t in documents)}
              if documents is not None else None)
    prompts = _prompts(job, params)
    names = Eval.shown_names(job.node)
    models = [(names[node.id], artifact) for node, artifact in zip(job.node.inputs, job.inputs)
              if artifact.kind is Kind.MODEL]
    params = params.model_copy(update={"seq_len": params.seq_len or window_length([a for _, a in models])})
    results = []
    for done, (label, artifact) in enumerate(models):
        job.progress.update(done, len(models), "models")
        results.append(evaluate_model(label, artifact, documents, prompts, params))
    job.progress.update(len(models), len(models), "models")
    write_report(eval_report(results, params, corpus, prompts, training_curves(job, names)), job.out)
