"""What check time knows of a model's tokenizer, without building anything: whether it has one, where its
files are, and its chat template. Ops that turn text into a model's tokens (training, distillation,
evaluation) refuse a model without one before anything runs (E478).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..ir.graph import Node
from ..ir.types import Kind
from ..store.model_dir import TOKENIZER_FILES
from ..textprep.errors import TextPrepError
from ..textprep.templates import DEFAULT_CHAT_TEMPLATE, read_chat_template
from .base import REGISTRY, Context

# Files a tokenizer directory may hold that are no tokenizer by themselves.
NOT_A_TOKENIZER = ("generation_config.json", "chat_template.jinja", "chat_template.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TokenizerFacts:
    """A model's tokenizer as check time sees it: whether it has one, where its files are (None when a
    `tokenizer` op builds them) and its chat template."""

    present: bool
    directory: Path | None = None
    template: str | None = None


def tokenizer_facts(node: Node, recipe_dir: Path) -> TokenizerFacts | None:
    """What a model node's tokenizer will be, or None when only building the model tells."""
    op = REGISTRY[node.op]
    if node.op == "init":
        if node.params.get("tokenizer"):
            return _directory_facts(Path(node.params["tokenizer"]["path"]))
        if node.inputs:  # a `tokenizer` op's result: its template is the op's file or the default one
            template = node.inputs[0].params.get("chat_template")
            return TokenizerFacts(True, None, Path(template["path"]).read_text(encoding="utf-8")
                                  if template else DEFAULT_CHAT_TEMPLATE)
        return TokenizerFacts(False)
    if not op.builds:
        source = op.source_dir(node.params, recipe_dir)
        return _directory_facts(source) if source is not None else None
    models = [n for n in node.inputs if n.type.kind in (Kind.MODEL, Kind.DELTA)]
    if not models:
        return None
    if node.op == "combine":
        return _combination_facts(node, models, recipe_dir)
    return tokenizer_facts(models[0], recipe_dir)  # training, vocabulary growth, compression keep the input's


def _directory_facts(directory: Path) -> TokenizerFacts:
    present = any((directory / name).is_file() for name in TOKENIZER_FILES if name not in NOT_A_TOKENIZER)
    return TokenizerFacts(present, directory, read_chat_template(directory) if present else None)


def _combination_facts(node: Node, leaves: list[Node], recipe_dir: Path) -> TokenizerFacts | None:
    """A combination ships its first model's tokenizer (or `tokenizer=`) and a chat model's template (or
    `chat_template=`): the template is known when any leaf has one."""
    given = node.params.get("tokenizer")
    first = _directory_facts(Path(given["path"])) if given else tokenizer_facts(leaves[0], recipe_dir)
    if first is None:
        return None
    if node.params.get("chat_template"):
        template = Path(node.params["chat_template"]["path"]).read_text(encoding="utf-8")
    else:
        leaf_facts = [tokenizer_facts(leaf, recipe_dir) for leaf in leaves]
        if any(f is None for f in leaf_facts) and first.present and first.template is None:
            return None  # a leaf built by the recipe may bring the template: known once built
        template = next((f.template for f in leaf_facts if f.template), None)
    return TokenizerFacts(first.present, first.directory, template)


def require_tokenizer(ctx: Context, model: Node, needs: str, argument: str | None = None) -> bool:
    """False after E478 when `model` is known to have no tokenizer; `needs` says what for ("eval", "cp"...).
    A tokenizer whose chat template cannot be read is judged where the template is (E479, E571), not here."""
    try:
        facts = tokenizer_facts(model, ctx.recipe_dir)
    except (OSError, TextPrepError):
        return True
    return facts is None or facts.present or no_tokenizer(ctx, model, needs, argument)


def no_tokenizer(ctx: Context, model: Node, needs: str, argument: str | None = None) -> bool:
    """E478 for `model`, which has no tokenizer that `needs` could turn text into its tokens with; False."""
    who = f"`{model.label}`" if model.names else "this model"  # never the plan's `%id`
    ctx.error("E478", f"{who} has no tokenizer, so {needs} cannot turn text into its tokens", argument,
              'give the model one: init(..., tokenizer="dir" or tokenizer(corpus, ...)), or a model '
              "directory with tokenizer.json")
    return False
