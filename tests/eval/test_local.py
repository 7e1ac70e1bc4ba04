"""In-process evaluation: the requests sent, the engine constraint, errors a user can cause."""

import pytest

from medtune.errors import DataError, ModelError
from medtune.eval.local import evaluate_model, request_messages, response_constraint
from medtune.serve.engines.base import Constraint
from medtune.tasks import get_task

SYSTEM = {"role": "system", "content": "Réponds en JSON."}
USER = {"role": "user", "content": "inclinaison_tronc 8.2"}


def test_request_drops_the_reference_answer_turn():
    example = {"messages": [SYSTEM, USER, {"role": "assistant", "content": '{"pathologie": "x"}'}]}
    assert request_messages(example, None) == [SYSTEM, USER]


def test_request_keeps_a_prompt_only_example_as_is():
    assert request_messages({"messages": [SYSTEM, USER]}, None) == [SYSTEM, USER]


def test_request_without_messages_or_input_names_the_example():
    with pytest.raises(DataError, match="example 7"):
        request_messages({"label": "x"}, None, where="example 7")


def test_request_of_only_an_answer_is_an_error():
    with pytest.raises(DataError, match="only an assistant"):
        request_messages({"messages": [{"role": "assistant", "content": "hi"}]}, None)


def test_response_format_becomes_the_engine_constraint():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    rf = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
    assert response_constraint(rf) == Constraint("json_schema", schema)
    assert response_constraint({"type": "json_object"}) == Constraint("json_object")
    assert response_constraint(None) is None
    assert response_constraint({"type": "text"}) is None
    with pytest.raises(DataError, match="response_format"):
        response_constraint({"type": "xml"})


def test_missing_model_folder_is_a_model_error(tmp_path):
    class Dummy:
        max_tokens = 8

        def response_format(self):
            return None

    with pytest.raises(ModelError, match="not found"):
        evaluate_model(tmp_path / "nope", Dummy(), [{"messages": [SYSTEM, USER]}])


def test_answers_keep_example_order_across_batches(tiny_model_dir):
    task = get_task("aria")
    task.max_tokens = 24  # an untrained model rambles: short answers keep the test fast
    examples = task.generate_test(5, seed=11)
    one = evaluate_model(tiny_model_dir, task, examples, batch_size=1)
    many = evaluate_model(tiny_model_dir, task, examples, batch_size=4)
    assert one.predictions == many.predictions  # greedy: the same answer alone or batched, in order
    assert len(one.finish_reasons) == 5
    assert (
        one.metrics["pathology_exact_match"] == task.score(examples, one.predictions)["pathology_exact_match"]
    )
    assert set(one.metrics["ci"]) >= {"pathology_exact_match", "json_valid"}
    # Every answer starts as the schema demands, even cut at 24 tokens.
    assert all(p.startswith('{"pathologie"') for p in one.predictions)


def test_a_prompt_too_long_names_its_example(tiny_model_dir):
    task = get_task("aria")
    examples = task.generate_test(3, seed=1)
    examples[2]["messages"][-1]["content"] += " mesure" * 3000
    with pytest.raises(DataError, match=r"example 3: .*context"):
        evaluate_model(tiny_model_dir, task, examples)
