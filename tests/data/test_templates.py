"""Chat templates: each named one renders, trains on answers and their stop token, and training and
serving renders agree. Tokenizers are built in-process (nothing downloaded)."""

import pytest
from trl.chat_template_utils import is_chat_template_stop_token_trained

from medtune.data.templates import (
    TEMPLATES,
    end_of_turn_tokens,
    ensure_chat_template,
    get_template,
    render_chat,
)
from medtune.errors import ConfigError, DataError, ModelError

CONVERSATION = [
    {"role": "system", "content": "Tu es un assistant de triage."},
    {"role": "user", "content": "Céphalée brutale depuis une heure."},
    {"role": "assistant", "content": "Recommandation: IRM cérébrale urgente."},
    {"role": "user", "content": "Et sans fièvre ?"},
    {"role": "assistant", "content": "Recommandation: IRM urgente, début en coup de tonnerre."},
]


def test_the_issue_template_set_is_available():
    assert {"chatml", "llama3", "gemma", "mistral", "phi3", "qwen", "alpaca", "vicuna"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_each_template_renders_system_user_and_assistant(chat_tokenizer, name):
    text = render_chat(CONVERSATION, chat_tokenizer(name))
    for message in CONVERSATION:
        assert message["content"] in text


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_serving_prompt_plus_answer_is_what_training_saw(chat_tokenizer, name):
    tok = chat_tokenizer(name)
    training = render_chat(CONVERSATION, tok)
    prompt = render_chat(CONVERSATION[:-1], tok, add_generation_prompt=True)
    answer = CONVERSATION[-1]["content"]
    # vicuna puts one space between "ASSISTANT:" and the answer; the model generates it.
    generated = training[len(prompt) :]
    assert training.startswith(prompt)
    assert generated.lstrip(" ").startswith(answer)
    # The rest of the training text after the answer is the end-of-turn marker the model learns to emit.
    rest = generated.lstrip(" ")[len(answer) :]
    assert rest.strip().startswith(end_of_turn_tokens(tok)[0])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_assistant_mask_covers_answers_and_their_end_of_turn_token(chat_tokenizer, name):
    tok = chat_tokenizer(name)
    # TRL's own check: the last masked token of an assistant turn must be the end-of-turn token.
    assert is_chat_template_stop_token_trained(tok)
    out = tok.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(masked).replace(" ", "").count("IRM") == 2  # both answers, nothing else
    assert "triage" not in tok.decode(masked)


def test_end_of_turn_tokens_are_the_template_terminators(chat_tokenizer):
    assert end_of_turn_tokens(chat_tokenizer("chatml")) == ["<|im_end|>", "</s>"]
    assert end_of_turn_tokens(chat_tokenizer("llama3")) == ["<|eot_id|>", "</s>"]
    assert end_of_turn_tokens(chat_tokenizer("gemma")) == ["<end_of_turn>", "</s>"]
    assert end_of_turn_tokens(chat_tokenizer("alpaca")) == ["</s>"]


def test_end_of_turn_falls_back_to_text_when_the_token_is_not_in_the_vocabulary(chat_tokenizer):
    tok = chat_tokenizer()
    ensure_chat_template(tok, "chatml")  # <|im_end|> is not a token of this tokenizer
    assert end_of_turn_tokens(tok) == ["<|im_end|>", "</s>"]


def test_the_tokenizers_own_template_is_kept(chat_tokenizer):
    tok = chat_tokenizer()
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.chat_template = own
    assert ensure_chat_template(tok, "chatml") == "tokenizer"
    assert tok.chat_template == own
    assert ensure_chat_template(tok, "chatml", override=True) == "chatml"
    assert tok.chat_template == TEMPLATES["chatml"]


def test_no_template_and_no_name_is_a_clear_error(chat_tokenizer):
    with pytest.raises(ModelError, match=r"no chat template.*model\.chat_template"):
        ensure_chat_template(chat_tokenizer(), None)
    with pytest.raises(ModelError, match="ensure_chat_template"):
        render_chat(CONVERSATION, chat_tokenizer())


def test_unknown_template_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown chat template 'chatlm'.*did you mean 'chatml'"):
        get_template("chatlm")


def test_aliases_name_the_model_families():
    assert get_template("MedGemma") == TEMPLATES["gemma"]
    assert get_template("tinyllama") == TEMPLATES["zephyr"]
    assert get_template("qwen2.5") == TEMPLATES["qwen"]


def test_a_conversation_the_template_refuses_is_a_data_error(chat_tokenizer):
    tok = chat_tokenizer("gemma")  # gemma demands user/assistant alternation
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(DataError, match=r"roles \['user', 'user'\]"):
        render_chat(bad, tok)


def test_end_of_turn_of_a_template_that_closes_turns_only_before_the_next_message(chat_tokenizer):
    tok = chat_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
    )
    assert end_of_turn_tokens(tok) == ["<|im_end|>", "</s>"]
