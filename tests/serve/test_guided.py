"""Constrained decoding: schema checks that name the keyword, grammars that accept what they should."""

from __future__ import annotations

import json
import random
from typing import Literal

import pytest
import torch
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from medtune.serve.engines.base import Constraint
from medtune.serve.errors import BadRequest
from medtune.serve.guided import Guide, check_schema


@pytest.fixture(scope="module")
def guide(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return Guide(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])


def _accepts(guide: Guide, constraint: Constraint, text: str) -> bool:
    matcher = guide.matcher(constraint)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, ["properties.a.type", "strin"]),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, ["properties.a", "'not'"]),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ["'uniqueItems'"]),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, ["'if'"]),
        ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, ["'allOf'"]),
        ([1, 2], ["object"]),
        ({"type": "array", "contains": {"const": 5}}, ["'contains'"]),
        ({"type": "array", "items": {"type": "integer"}, "minContains": 2}, ["'minContains'"]),
        ({"properties": {"a": {}, "b": {}}, "dependencies": {"a": ["b"]}}, ["'dependencies'"]),
        ({"properties": {"a": {"$dynamicRef": "#node"}}}, ["properties.a", "'$dynamicRef'"]),
        ({"properties": {"a": {"$ref": "https://example.com/s.json"}}}, ["properties.a", "'$ref'", "example.com"]),
        ({"properties": {"a": {"$ref": "other.json#/x"}}}, ["'$ref'", "other.json"]),
        ({"$defs": {"n": {"$anchor": "num", "type": "integer"}}, "properties": {"a": {"$ref": "#num"}}}, ["'#num'"]),
        ({"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 10}]},
         ["'oneOf'", "oneOf[0] and oneOf[1]", "anyOf"]),
        ({"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "integer"}]}, ["oneOf[1] and oneOf[2]"]),
        ({"$defs": {"a": {"properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]},
                    "b": {"properties": {"k": {"enum": ["y", "z"]}}, "required": ["k"]}},
          "oneOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}]}, ["'oneOf'"]),
        ({"oneOf": [{"type": "object", "properties": {"k": {"const": 1}}, "required": ["k"]},
                    {"type": "object", "properties": {"k": {"const": 1.0}}, "required": ["k"]}]}, ["'oneOf'"]),
        # Without "type": "object", a string matches both (required constrains objects only).
        ({"oneOf": [{"properties": {"k": {"const": 1}}, "required": ["k"]},
                    {"properties": {"k": {"const": 2}}, "required": ["k"]}]}, ["'oneOf'"]),
    ],
)  # fmt: skip
def test_schemas_that_cannot_be_enforced_are_refused_naming_the_keyword(schema, words):
    with pytest.raises(BadRequest) as err:
        check_schema(schema)
    for word in words:
        assert word in str(err.value)


def _random_answers(guide: Guide, tokenizer, constraint: Constraint, n: int, seed: int = 0) -> list[str]:
    """Answers built by picking uniformly among the tokens the guide's mask allows, step after step (the
    ones complete within 60 tokens): what the grammar lets through, whatever a model would prefer."""
    rng = random.Random(seed)
    answers = []
    for _ in range(n):
        matcher, ids = guide.matcher(constraint), []
        while len(ids) < 60 and not matcher.is_completed():
            allowed = _allowed(guide, matcher)[0].nonzero().flatten().tolist()
            token = rng.choice([t for t in allowed if t != tokenizer.eos_token_id])
            assert matcher.accept_token(token)
            ids.append(token)
        if matcher.is_completed():
            answers.append(tokenizer.decode(ids))
    return answers


class Cat(BaseModel):
    pet_type: Literal["cat"]
    lives: int = Field(ge=0, le=9)


class Dog(BaseModel):
    pet_type: Literal["dog"]
    good: bool


class Owner(BaseModel):
    pet: Cat | Dog = Field(discriminator="pet_type")
    age: int | None = None


@pytest.mark.parametrize(
    "schema",
    [
        Owner.model_json_schema(),  # pydantic: a discriminated union (oneOf of $refs) and an anyOf
        {"type": "object", "properties": {"v": {"oneOf": [{"type": "string", "maxLength": 3},
                                                          {"type": "integer", "maximum": 99, "minimum": 0},
                                                          {"type": "boolean"}]}}, "required": ["v"]},
    ],
    ids=["discriminated union", "different types"],
)  # fmt: skip
def test_a_oneof_whose_branches_cannot_overlap_is_served_and_every_answer_matches_exactly_one(
    guide, tiny_model_dir, schema
):
    check_schema(schema)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    answers = _random_answers(guide, tokenizer, Constraint("json_schema", schema), n=40)
    assert len(answers) >= 20
    validator = Draft202012Validator(schema)
    for answer in answers:
        assert not list(validator.iter_errors(json.loads(answer))), answer


def test_the_aria_schema_keeps_non_ascii_values_as_utf8(guide):
    schema = {
        "type": "object",
        "properties": {
            "pathologie": {"type": "string"},
            "confiance": {"enum": ["élevée", "modérée", "faible"]},
        },
        "required": ["pathologie", "confiance"],
    }
    c = Constraint("json_schema", schema)
    assert _accepts(guide, c, '{"pathologie": "SFP", "confiance": "élevée"}')
    assert not _accepts(guide, c, '{"pathologie": "SFP", "confiance": "\\u00e9lev\\u00e9e"}')
    assert not _accepts(guide, c, '{"pathologie":"SFP","confiance":"élevée"}')  # one layout only
    assert not _accepts(guide, c, '{"pathologie": "SFP",  "confiance": "élevée"}')  # no free whitespace


def test_regex_choice_and_json_object(guide):
    assert _accepts(guide, Constraint("regex", "[0-9]{3}-[a-z]+"), "123-abc")
    assert not _accepts(guide, Constraint("regex", "[0-9]{3}-[a-z]+"), "12-abc")
    choice = Constraint("choice", ["Recommandation:", 'Pour "préciser"'])
    assert _accepts(guide, choice, 'Pour "préciser"') and not _accepts(guide, choice, "Pour")
    assert _accepts(guide, Constraint("json_object"), '{"any": [1, 2], "keys": null}')
    assert not _accepts(guide, Constraint("json_object"), "[1, 2]")
    with pytest.raises(BadRequest, match="Lookbehind"):
        guide.compile(Constraint("regex", "(?<=a)b"))
    with pytest.raises(BadRequest, match="guided_choice"):
        guide.compile(Constraint("choice", []))


def test_compiled_grammars_are_cached_by_content(guide):
    a = guide.compile(Constraint("json_schema", {"type": "object", "properties": {"x": {"type": "integer"}}}))
    b = guide.compile(Constraint("json_schema", {"properties": {"x": {"type": "integer"}}, "type": "object"}))
    assert a is b


def test_masking_forbids_special_tokens_inside_constrained_answers(guide, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    matcher = guide.matcher(Constraint("json_object"))
    assert matcher.accept_string('{"a": "')  # inside a string, where any text is allowed
    bitmask = guide.allocate(2)
    guide.fill(bitmask, 1, matcher)
    logits = torch.zeros(2, guide.vocab_size)
    guide.apply(logits, bitmask, [1])
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert logits[1, start] == float("-inf")
    assert torch.isfinite(logits[0]).all()  # unconstrained rows are untouched
    assert torch.isfinite(logits[1]).sum() > 100  # plenty of text tokens remain allowed


def test_domain_terms_stay_writable_inside_constrained_answers(tiny_model_factory):
    # The embedded builder makes each recipe term one token; transformers lists such tokens among the
    # "extra special tokens", but they are text: a justification names its measurement with one.
    model = tiny_model_factory("terms", symbols=["valgus_genou"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    term = tokenizer.convert_tokens_to_ids("valgus_genou")
    assert term in tokenizer.all_special_ids  # what made the old mask forbid it
    # An added whitespace run is text too, though the template is indented with it.
    assert "    " in tokenizer.chat_template
    tokenizer.add_tokens(["    "])
    spaces = tokenizer.convert_tokens_to_ids("    ")
    guide = Guide(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])
    matcher = guide.matcher(
        Constraint("json_schema", {"type": "object", "properties": {"j": {"type": "string"}}})
    )
    assert matcher.accept_string('{"j": "')
    bitmask = guide.allocate(1)
    guide.fill(bitmask, 0, matcher)
    logits = torch.zeros(1, guide.vocab_size)
    guide.apply(logits, bitmask, [0])
    assert torch.isfinite(logits[0, term]) and torch.isfinite(logits[0, spaces])
    markers = ["<|im_start|>", tokenizer.pad_token, tokenizer.bos_token, tokenizer.unk_token]
    for marker in markers:
        assert logits[0, tokenizer.convert_tokens_to_ids(marker)] == float("-inf"), marker
    assert matcher.accept_token(term) and matcher.accept_string(' 12.1° > 10°"}') and matcher.is_completed()


def _allowed(guide: Guide, *matchers) -> torch.Tensor:
    """The tokens the guide's mask allows next, per matcher (the rows of one batch, filled together)."""
    rows = list(range(len(matchers)))
    bitmask = guide.allocate(len(rows))
    guide.fill_rows(bitmask, list(zip(rows, matchers, strict=True)))
    logits = torch.zeros(len(rows), guide.vocab_size)
    guide.apply(logits, bitmask, rows)
    return torch.isfinite(logits)


@pytest.mark.parametrize("bounded", [False, True], ids=["string", "string with maxLength"])
def test_json_strings_never_hold_a_raw_control_character(guide, tiny_model_dir, bounded):
    """xgrammar 0.2.8's rules for strings with minLength / maxLength let byte tokens such as <0x15> in
    (invalid JSON: json.loads refuses it); the guide's mask keeps them out of every JSON answer, and
    leaves them to constraints that may allow them (a regex)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    control = tokenizer.convert_tokens_to_ids("<0x15>")
    letter = tokenizer.convert_tokens_to_ids("<0x61>")  # "a": allowed in a string
    string = {"type": "string", "maxLength": 40} if bounded else {"type": "string"}
    constraint = Constraint("json_schema", {"type": "object", "properties": {"j": string}, "required": ["j"]})
    raw = guide.matcher(constraint)
    assert raw.accept_string('{"j": "a')
    assert raw.accept_token(control) == bounded  # what xgrammar itself allows
    matcher = guide.matcher(constraint)
    assert matcher.accept_string('{"j": "a')
    allowed = _allowed(guide, matcher)[0]
    assert not allowed[control] and allowed[letter]
    regex = guide.matcher(Constraint("regex", "a[\\x00-\\x7f]b"))
    assert regex.accept_string("a")
    assert _allowed(guide, regex)[0, control]  # not a JSON answer: the grammar decides
    mixed = _allowed(guide, regex, matcher)  # both kinds in one batch
    assert mixed[0, control] and not mixed[1, control] and mixed[1, letter]
