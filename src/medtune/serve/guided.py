"""Constrained decoding with xgrammar: JSON schema, any JSON object, regex and choice constraints.

    guide = Guide(tokenizer, vocab_size=model_vocab, stop_token_ids=[eos])
    matcher = guide.matcher(Constraint("json_schema", schema))   # raises BadRequest for a bad schema
    # each decoding step, for the constrained rows of a batch:
    guide.fill(bitmask, row, matcher); guide.apply(logits, bitmask, rows); matcher.accept_token(tok)

JSON is emitted compactly on one line with json.dumps' default separators (`", "`, `": "`), which is
also how the task packs write their reference answers, with no free whitespace between tokens (no
"whitespace runaway") and non-ASCII text as plain UTF-8 (xgrammar keeps enum values as given, so
"élevée" can only come out as "élevée", never as "\\u00e9lev\\u00e9e").

xgrammar silently ignores a few JSON-schema keywords, reads `oneOf` as `anyOf`, and lets a `$ref` it
cannot resolve inside the schema match anything (the output would not be guaranteed to match); requests
using them are refused with a 400 naming the keyword instead of being served unchecked. A `oneOf` whose
branches cannot overlap (distinct types, or a property every branch requires with distinct `const` / `enum`
values: pydantic's discriminated unions) is served: there "any of" and "exactly one of" are the same.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import torch
import xgrammar as xgr
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from medtune.serve.engines.base import Constraint
from medtune.serve.errors import BadRequest

log = logging.getLogger(__name__)

# Keywords xgrammar 0.2 accepts but does not enforce (checked against its matcher; `dependencies` is
# draft 7's spelling of dependentRequired / dependentSchemas).
UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
                        "uniqueItems", "contains", "minContains", "maxContains", "$dynamicRef", "$recursiveRef")  # fmt: skip
# Where sub-schemas live, to walk the whole schema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties")


def check_schema(schema: Any, where: str = "response_format.json_schema.schema") -> None:
    """Raise BadRequest if `schema` is not a valid JSON schema or uses a keyword xgrammar cannot enforce."""
    if not isinstance(schema, dict):
        raise BadRequest(f"{where}: a JSON schema is an object, found {type(schema).__name__}", param=where)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        path = ".".join(str(p) for p in exc.path)
        at = f"{where}.{path}" if path else where
        raise BadRequest(f"{at}: invalid JSON schema: {exc.message}", param=where) from None
    _walk(schema, where, schema)


def _walk(node: Any, where: str, root: dict) -> None:
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if ref is not None and not (ref == "#" or str(ref).startswith("#/")):
        raise BadRequest(
            f"{where}: '$ref' {ref!r} is not supported by constrained decoding: only references inside the "
            "schema ('#/$defs/...') are; put the referenced schema under $defs",
            param=where,
        )
    branches = node.get("oneOf")
    if isinstance(branches, list) and len(branches) > 1:
        for i, a in enumerate(branches):
            for j in range(i + 1, len(branches)):
                if not _exclusive(a, branches[j], root):
                    raise BadRequest(
                        f"{where}: JSON-schema keyword 'oneOf' is enforced as 'anyOf' by constrained decoding, "
                        f"and an answer could match both oneOf[{i}] and oneOf[{j}]; use anyOf, or give the "
                        "branches different types or a required property with different const/enum values",
                        param=where,
                    )
    for key in UNSUPPORTED_KEYWORDS:
        if key in node and not (key == "uniqueItems" and node[key] is False):
            raise BadRequest(
                f"{where}: JSON-schema keyword {key!r} is not supported by constrained decoding "
                "(the output could not be guaranteed to match it)",
                param=where,
            )
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        raise BadRequest(
            f"{where}: JSON-schema keyword 'allOf' with several sub-schemas is not supported by "
            "constrained decoding; merge them into one schema",
            param=where,
        )
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                _walk(sub, f"{where}.{key}.{name}", root)
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                _walk(sub, f"{where}.{key}[{i}]", root)
    for key in _SCHEMA_VALUES:
        _walk(node.get(key), f"{where}.{key}", root)


def _resolve(node: Any, root: dict) -> Any:
    """`node`, or what its local `$ref` chain ('#/a/b') points to in `root` (as is when it does not
    resolve: compiling the grammar reports that)."""
    for _ in range(32):
        ref = node.get("$ref") if isinstance(node, dict) else None
        if not (isinstance(ref, str) and ref.startswith("#")):
            return node
        target: Any = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return node
            target = target[part]
        node = target
    return node


def _exclusive(a: Any, b: Any, root: dict) -> bool:
    """True when no JSON value can match both sub-schemas, by two checks: different types (an integer is
    a number), or two objects (`required` says nothing of other values) with a property both require whose
    `const` / `enum` values differ."""
    a, b = _resolve(a, root), _resolve(b, root)
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    types_a, types_b = _types(a), _types(b)
    if types_a and types_b and not types_a & types_b:
        return True
    if not types_a == types_b == {"object"}:
        return False
    for name in set(a.get("required") or []) & set(b.get("required") or []):
        values_a, values_b = _values(a, name, root), _values(b, name, root)
        if values_a is not None and values_b is not None and not values_a & values_b:
            return True
    return False


def _types(schema: dict) -> set[str]:
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else set(declared or [])
    return types | {"number"} if "integer" in types else types


def _values(schema: dict, name: str, root: dict) -> set[str] | None:
    """The values property `name` may take under `schema` (as canonical JSON), or None when not listed."""
    prop = _resolve((schema.get("properties") or {}).get(name), root)
    if not isinstance(prop, dict):
        return None
    listed = [prop["const"]] if "const" in prop else prop.get("enum")
    if not isinstance(listed, list):
        return None
    # 1 and 1.0 are the same JSON value; true and 1 are not.
    return {
        json.dumps(int(v) if isinstance(v, float) and v.is_integer() else v, sort_keys=True) for v in listed
    }


def marker_ids(tokenizer: Any) -> set[int]:
    """Tokens that never belong inside a constrained answer: the named special tokens (bos, eos, unk,
    pad, ...), added tokens flagged special, and added tokens the chat template writes (turn markers such
    as <|im_start|>, even when a tokenizer forgets to flag them special and xgrammar reads them as plain
    text). Other added tokens are text like any other: a domain's terms (the embedded model's
    measurement names, which transformers lists among the "extra special tokens" of a SentencePiece
    tokenizer) must stay writable, or the model has to spell them out in pieces it never learnt."""
    named = [t for t in getattr(tokenizer, "special_tokens_map", {}).values() if isinstance(t, str)]
    ids = {i for i in tokenizer.convert_tokens_to_ids(named) if isinstance(i, int)}
    template = getattr(tokenizer, "chat_template", None) or ""
    template = " ".join(template.values()) if isinstance(template, dict) else template
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        text = str(added)  # whitespace runs (added by some code models) also indent templates: not markers
        if getattr(added, "special", False) or (text.strip() and text in template):
            ids.add(token_id)
    return ids


class Matcher(xgr.GrammarMatcher):
    """An xgrammar matcher that knows whether its constraint is JSON (`Guide.fill_rows` masks more)."""

    json = False


def _and_mask(forbidden: set[int], vocab_size: int) -> torch.Tensor:
    """The bitmask words that clear `forbidden` tokens when ANDed in: bit i of word w is token 32 * w + i
    (int32 words, as xgrammar's bitmasks)."""
    keep = [0xFFFFFFFF] * ((vocab_size + 31) // 32)
    for i in forbidden:
        if 0 <= i < vocab_size:
            keep[i // 32] &= ~(1 << (i % 32)) & 0xFFFFFFFF
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in keep], dtype=torch.int32)


class Guide:
    """Compiles constraints for one tokenizer (cached by constraint) and masks logits for a batch."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        # vocab_size is the model's (possibly padded) logits width, so padded ids get masked too.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self.vocab_size = vocab_size
        special = marker_ids(tokenizer) - set(stop_token_ids)
        self._forbidden = special  # never chosen in a constrained answer (`allows`)
        self._keep = _and_mask(special, vocab_size)
        self._has_forbidden = bool((self._keep != -1).any())
        # Compact JSON has no raw control character anywhere (inside strings they are escaped), but
        # xgrammar 0.2.8's rules for strings with minLength / maxLength admit any character but `"`, `\`,
        # CR and LF: tokens holding a byte below 0x20 are forbidden in JSON answers here.
        control = {i for i, b in enumerate(info.decoded_vocab[:vocab_size]) if any(c < 0x20 for c in b)}
        self._json_forbidden = special | (control - set(stop_token_ids))
        self._json_keep = _and_mask(self._json_forbidden, vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._compiled: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()
        self._batchers = threading.local()  # a BatchGrammarMatcher per thread (decoding, prefill)

    def is_cached(self, constraint: Constraint) -> bool:
        with self._lock:
            return constraint.cache_key() in self._compiled

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        """The compiled grammar for a constraint (cached by its content)."""
        key = constraint.cache_key()
        with self._lock:
            hit = self._compiled.get(key)
        if hit is not None:
            return hit
        compiled = self._compile(constraint)
        with self._lock:
            if len(self._compiled) >= 256:  # bounded: clients may send a new schema every time
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = compiled
        return compiled

    def _compile(self, c: Constraint) -> xgr.CompiledGrammar:
        try:
            if c.kind == "json_schema":
                check_schema(c.payload)
                return self._compiler.compile_json_schema(
                    json.dumps(c.payload, ensure_ascii=False), any_whitespace=False
                )
            if c.kind == "json_object":
                # strict_mode off: any properties; any_whitespace off: compact, no whitespace runaway.
                return self._compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if c.kind == "regex":
                if not isinstance(c.payload, str) or not c.payload:
                    raise BadRequest(
                        "guided_regex: expected a non-empty regular expression", param="guided_regex"
                    )
                return self._compiler.compile_regex(c.payload)
            if c.kind == "choice":
                choices = c.payload
                if not (
                    isinstance(choices, list) and choices and all(isinstance(x, str) and x for x in choices)
                ):
                    raise BadRequest(
                        "guided_choice: expected a non-empty list of non-empty strings", param="guided_choice"
                    )
                ebnf = "root ::= " + " | ".join(json.dumps(x, ensure_ascii=False) for x in choices)
                return self._compiler.compile_grammar(ebnf)
        except RuntimeError as exc:
            # xgrammar's message names the construct ("Unsupported type", "Lookbehind is not supported").
            detail = str(exc).strip().splitlines()[-1]
            detail = detail.split(": ", 1)[1] if ".cc:" in detail else detail
            param = {"json_schema": "response_format", "regex": "guided_regex"}.get(c.kind, "guided_choice")
            raise BadRequest(
                f"{param}: cannot be used for constrained decoding: {detail}", param=param
            ) from None
        raise BadRequest(f"unknown constraint kind {c.kind!r}", param="response_format")

    def matcher(self, constraint: Constraint) -> Matcher:
        """A fresh matcher (one per request)."""
        matcher = Matcher(self.compile(constraint))
        matcher.json = constraint.kind in ("json_schema", "json_object")
        return matcher

    def allocate(self, batch_size: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(batch_size, self.vocab_size)

    def fill(self, bitmask: torch.Tensor, row: int, matcher: Matcher) -> None:
        """Write the tokens `matcher` allows next (special tokens never) into `bitmask[row]`."""
        self.fill_rows(bitmask, [(row, matcher)])

    def fill_rows(self, bitmask: torch.Tensor, matchers: list[tuple[int, Matcher]]) -> None:
        """`fill` for several rows of one batch, in one call into xgrammar (on the calling thread), and
        the special-token mask applied once for all."""
        if not matchers:
            return
        batcher = getattr(self._batchers, "matcher", None)
        if batcher is None:
            batcher = self._batchers.matcher = xgr.BatchGrammarMatcher(max_threads=1)
        rows = [row for row, _ in matchers]
        batcher.batch_fill_next_token_bitmask([m for _, m in matchers], bitmask, indices=rows)
        json_rows = [row for row, m in matchers if m.json]
        if json_rows and json_rows == list(range(len(json_rows))) and len(json_rows) == len(rows):
            bitmask[: len(rows)] &= self._json_keep  # the usual batch: every row a JSON answer, one call
            return
        if self._has_forbidden:
            bitmask[: max(rows) + 1] &= self._keep
        if json_rows:
            bitmask[json_rows] &= self._json_keep

    def allows(self, matcher: Matcher, token: int) -> bool:
        """Whether `token` may come next, as the mask would say (checked by accepting it and rolling back:
        a few microseconds, against tens for a mask)."""
        if token in (self._json_forbidden if matcher.json else self._forbidden):
            return False
        if not matcher.accept_token(token):
            return False
        matcher.rollback(1)
        return True

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set the logits of tokens the grammar forbids to -inf, for the listed rows only."""
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)
