"""Benchmark: `eval`'s answers/s and perplexity tokens/s against a plain transformers loop, same model and data.

For each model size (random-init Llamas with the example word-level tokenizer and its chat template), both
sides answer the same prompts (the user turns of examples/data/tiny_chat.jsonl, rendered with the chat
template, greedy, `--new-tokens` new tokens) and score the same corpus (examples/data/tiny_corpus.jsonl,
windows of the model's positions). recipec runs its own rule functions (backends/evaluate.py: prompts
sorted by length, left-padded batches; windows in batches); the plain loop is what one writes with
transformers by hand: one prompt per `generate`, one document per forward with `labels=`. The two sides
alternate, `--repeats` times each, on `--threads` torch threads, and the medians are compared:
target recipec ≥ 1.0× the plain loop on both measures. The answers of both sides are compared too (greedy
answers must not depend on batching), and so are the perplexities.

Usage: python benchmarks/eval_vs_transformers.py [--sizes tiny,small] [--repeats 3] [--threads 1]
       [--prompts 32] [--new-tokens 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from recipec import arch  # noqa: E402
from recipec.backends.evaluate import corpus_nll, greedy_answers, rendered_prompts  # noqa: E402
from recipec.textprep.encode import chat_format, encode_document  # noqa: E402

TOKENIZER = ROOT / "examples" / "tokenizers" / "llama-chat"
PROMPTS = ROOT / "examples" / "data" / "tiny_chat.jsonl"
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.jsonl"


def make_model(size: str, directory: Path):
    """A seeded random Llama of a preset size, sized to the example tokenizer, saved with it."""
    config = arch.preset_config("llama", size) | {"vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    model.save_pretrained(directory)
    for file in TOKENIZER.iterdir():
        shutil.copy(file, directory)
    return model, transformers.AutoTokenizer.from_pretrained(str(directory))


def load_data(count: int) -> tuple[list[list[dict]], list[str]]:
    users = [json.loads(line)["messages"][0] for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [[{"role": "user", "content": m["content"]}] for m in (users * (count // len(users) + 1))[:count]]
    documents = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if line.strip()]
    return prompts, documents


def recipec_answers(model, tokenizer, prompts, new_tokens: int, batch: int) -> list[str]:
    return greedy_answers(model, tokenizer, rendered_prompts(chat_format(tokenizer), prompts), new_tokens, batch)


def plain_answers(model, tokenizer, prompts, new_tokens: int) -> list[str]:
    answers = []
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def plain_nll(model, tokenizer, documents, seq_len: int) -> tuple[float, int]:
    """One window per forward, `labels=` as the transformers docs show; same windows as recipec's default."""
    total, count = 0.0, 0
    for text in documents:
        ids = encode_document(tokenizer, text).ids
        for begin in range(0, len(ids), seq_len):
            window = torch.tensor([ids[begin:begin + seq_len]])
            if window.shape[1] < 2:
                continue
            with torch.inference_mode():
                loss = model(input_ids=window, labels=window).loss
            total += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return total, count


def timed(function):
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def bench_size(size: str, args, work: Path) -> dict:
    model, tokenizer = make_model(size, work / size)
    prompts, documents = load_data(args.prompts)
    seq_len = model.config.max_position_embeddings
    times = {"recipec answers": [], "plain answers": [], "recipec ppl": [], "plain ppl": []}
    results = {}
    for _ in range(args.repeats):  # alternated, so drift in the machine's speed hits both sides alike
        t, results["recipec answers"] = timed(lambda: recipec_answers(model, tokenizer, prompts, args.new_tokens,
                                                                      args.batch))
        times["recipec answers"].append(t)
        t, results["plain answers"] = timed(lambda: plain_answers(model, tokenizer, prompts, args.new_tokens))
        times["plain answers"].append(t)
        t, results["recipec ppl"] = timed(lambda: corpus_nll(model, tokenizer, documents, seq_len, seq_len, args.batch))
        times["recipec ppl"].append(t)
        t, results["plain ppl"] = timed(lambda: plain_nll(model, tokenizer, documents, seq_len))
        times["plain ppl"].append(t)
    median = {k: statistics.median(v) for k, v in times.items()}
    tokens = results["recipec ppl"][1]
    same = sum(a == b for a, b in zip(results["recipec answers"], results["plain answers"]))
    return {
        "size": size, "params": sum(p.numel() for p in model.parameters()),
        "answers_per_s": {"recipec": len(prompts) / median["recipec answers"],
                          "plain": len(prompts) / median["plain answers"]},
        "ppl_tokens_per_s": {"recipec": tokens / median["recipec ppl"], "plain": results["plain ppl"][1] / median["plain ppl"]},
        "answers_speedup": median["plain answers"] / median["recipec answers"],
        "ppl_speedup": median["plain ppl"] / median["recipec ppl"],
        "same_answers": f"{same}/{len(prompts)}",
        "perplexity": {"recipec": math.exp(results["recipec ppl"][0] / tokens),
                       "plain": math.exp(results["plain ppl"][0] / results["plain ppl"][1])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            r = bench_size(size, args, Path(tmp))
            print(f"{r['size']} ({r['params']:,} params, {args.threads} thread(s), {args.prompts} prompts × "
                  f"{args.new_tokens} new tokens, batch {args.batch}):")
            print(f"  answers/s      recipec {r['answers_per_s']['recipec']:8.2f}   plain {r['answers_per_s']['plain']:8.2f}"
                  f"   speed-up {r['answers_speedup']:.2f}×   same answers {r['same_answers']}")
            print(f"  ppl tokens/s   recipec {r['ppl_tokens_per_s']['recipec']:8.0f}   plain "
                  f"{r['ppl_tokens_per_s']['plain']:8.0f}   speed-up {r['ppl_speedup']:.2f}×   perplexity "
                  f"{r['perplexity']['recipec']:.4f} vs {r['perplexity']['plain']:.4f}")


if __name__ == "__main__":
    main()
