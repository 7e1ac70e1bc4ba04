"""The web page (Gradio): the ARIA diagnosis form, the headache assistant and a chat.

    medtune ui --model runs/aria/dpo                     # loads the model in this process
    medtune ui --endpoint http://127.0.0.1:8001 --model aria-ft --api-key ...   # a running server

then open http://127.0.0.1:7860. Every request goes through a `medtune.ui.backends.Backend`, so
the page sends exactly what production sends: the ARIA diagnosis call with its JSON schema,
temperature 0.1 and 256 tokens, then the free-text report call (temperature 0.3).

Elements the browser test drives carry stable ids: `aria-<field>` for the seven measurements,
`aria-submit`, `aria-card` (the diagnosis card), `aria-report`.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterator
from typing import Any

import gradio as gr

from medtune.errors import MedtuneError, ModelError
from medtune.tasks import get_task
from medtune.ui.backends import Backend, ChatRequest

log = logging.getLogger(__name__)

# A runner whose trunk leans forward (9.2° > 7°): a sensible first example for the form.
ARIA_EXAMPLE = {
    "inclinaison_tronc": 9.2,
    "valgus_genou": 6.5,
    "adduction_hanche": 7.0,
    "longueur_foulée": 1.18,
    "pronation_pied": 4.1,
    "heel_strike_index": 0.45,
    "dorsiflexion_max": 11.0,
}
CONFIDENCE_COLOURS = {"élevée": "#1b7f3b", "modérée": "#b36b00", "faible": "#a12622"}
CSS = """
.aria-card {border: 1px solid #c9d6d3; border-radius: 10px; padding: 14px 18px; background: #f6fbfa;}
.aria-card h3 {margin: 0 0 6px 0;}
.aria-badge {display: inline-block; padding: 2px 10px; border-radius: 12px; color: white; font-weight: 600;}
.aria-error {border-color: #a12622; background: #fdf3f2;}
"""


def diagnosis_card(answer_text: str) -> str:
    """HTML for the model's diagnosis JSON (or a card saying what is wrong with it)."""
    try:
        answer = json.loads(answer_text)
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict) or "pathologie" not in answer:
        shown = html.escape(answer_text[:500]) or "(empty answer)"
        return f'<div class="aria-card aria-error"><h3>No diagnosis</h3><p>The model answered:</p><pre>{shown}</pre></div>'
    confidence = str(answer.get("confiance", ""))
    colour = CONFIDENCE_COLOURS.get(confidence, "#555")
    return (
        '<div class="aria-card">'
        f'<p>Pathologie</p><h3 class="aria-pathology">{html.escape(str(answer["pathologie"]))}</h3>'
        f'<p>Confiance: <span class="aria-badge aria-confidence" style="background:{colour}">'
        f"{html.escape(confidence)}</span></p>"
        f'<p class="aria-justification">{html.escape(str(answer.get("justification", "")))}</p>'
        "</div>"
    )


def error_card(message: str) -> str:
    return f'<div class="aria-card aria-error"><h3>Cannot diagnose</h3><p>{html.escape(message)}</p></div>'


def build_app(backend: Backend, title: str = "medtune", selected: str | None = None) -> gr.Blocks:
    """The page as a Gradio Blocks app (not launched); `selected` preselects an adapter or served model."""
    aria = get_task("aria")
    headache = get_task("headache")
    models = backend.models()
    if selected is not None and selected not in models:
        raise ModelError(f"--adapter {selected}: not among the models: {', '.join(models)}")

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nAnswers from `{backend.describe()}`.")
        with gr.Row():
            model = gr.Dropdown(
                models, value=selected or models[0], label="Model or adapter", elem_id="model"
            )
            temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (chat)")
            max_tokens = gr.Slider(16, 4096, value=512, step=16, label="Max tokens (chat and report)")

        with gr.Tab("ARIA diagnosis", id="aria"):
            gr.Markdown(
                "Enter the seven running measurements. The diagnosis is constrained to the ARIA JSON "
                "schema (pathologie, confiance, justification); a free-text report follows."
            )
            fields: list[gr.Number] = []
            with gr.Row():
                for name in ARIA_EXAMPLE:
                    fields.append(
                        gr.Number(ARIA_EXAMPLE[name], label=name, elem_id=f"aria-{name}", min_width=120)
                    )
            with gr.Row():
                # Text boxes: an empty optional field must stay empty (a Number box would send 0).
                age = gr.Textbox(label="age (optional)", elem_id="aria-age")
                sexe = gr.Radio(["F", "H"], value=None, label="sexe (optional)", elem_id="aria-sexe")
                km = gr.Textbox(label="km_semaine (optional)", elem_id="aria-km")
            submit = gr.Button("Diagnose", variant="primary", elem_id="aria-submit")
            card = gr.HTML(elem_id="aria-card")
            report = gr.Markdown(elem_id="aria-report", label="Report")
            record_state = gr.State(None)

        with gr.Tab("Headache assistant", id="headache"):
            gr.Markdown(
                "Describe the clinical case in French. The assistant asks `Pour préciser:` questions "
                "when facts are missing, or gives a `Recommandation:` on brain imaging."
            )
            case = gr.Textbox(label="Cas clinique", lines=4, elem_id="headache-case")
            ask = gr.Button("Ask", variant="primary", elem_id="headache-submit")
            answer = gr.Markdown(elem_id="headache-answer")

        with gr.Tab("Chat", id="chat"):
            system = gr.Textbox(label="System prompt", value="", lines=2, elem_id="chat-system")
            chatbot = gr.Chatbot(label="Conversation", elem_id="chat-history", height=420)
            message = gr.Textbox(label="Message", elem_id="chat-message", submit_btn=True)
            clear = gr.Button("Clear", elem_id="chat-clear")

        # -- handlers ------------------------------------------------------------------------------

        def diagnose(chosen: str, *values: Any) -> tuple[str, str, Any]:
            record: dict[str, Any] = dict(zip(ARIA_EXAMPLE, values[:7], strict=True))
            for key, value in zip(("age", "sexe", "km_semaine"), values[7:], strict=True):
                if value is not None and str(value).strip():
                    record[key] = value
            try:
                record = aria.validate_input(record)
                result = backend.complete(
                    ChatRequest(
                        messages=aria.messages(record),
                        model=chosen,
                        temperature=aria.temperature,
                        max_tokens=aria.max_tokens,
                        response_format=aria.response_format(),
                        fit_context=True,
                    )
                )
            except MedtuneError as exc:
                return error_card(str(exc)), "", None
            return diagnosis_card(result.text), "*Writing the report…*", record

        def write_report(chosen: str, limit: float, record: dict[str, Any] | None) -> Iterator[str]:
            if record is None:
                yield ""
                return
            request = ChatRequest(
                messages=aria.report_messages(record),
                model=chosen,
                temperature=aria.report_temperature,
                max_tokens=min(int(limit), aria.report_max_tokens),
                fit_context=True,
            )
            yield from _streamed(backend, request)

        inputs = [model, *fields, age, sexe, km]
        submit.click(diagnose, inputs, [card, report, record_state]).then(
            write_report, [model, max_tokens, record_state], report
        )

        def ask_headache(chosen: str, text: str) -> Iterator[str]:
            if not text.strip():
                yield "*Describe the case first.*"
                return
            try:
                messages = headache.messages(headache.validate_input({"case": text}))
            except MedtuneError as exc:
                yield f"**Error:** {exc}"
                return
            request = ChatRequest(
                messages=messages,
                model=chosen,
                temperature=headache.temperature,
                max_tokens=headache.max_tokens,
                fit_context=True,
            )
            yield from _streamed(backend, request)

        ask.click(ask_headache, [model, case], answer)

        def chat(
            text: str, history: list[dict[str, Any]], chosen: str, temp: float, limit: float, sys_text: str
        ) -> Iterator[tuple[str, list[dict[str, Any]]]]:
            if not text.strip():
                yield "", history
                return
            history = [*history, {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            messages = [{"role": "system", "content": sys_text}] if sys_text.strip() else []
            messages += [{"role": m["role"], "content": _text(m["content"])} for m in history[:-1]]
            request = ChatRequest(
                messages, model=chosen, temperature=temp, max_tokens=int(limit), fit_context=True
            )
            for shown in _streamed(backend, request):
                history[-1] = {"role": "assistant", "content": shown}
                yield "", history

        message.submit(chat, [message, chatbot, model, temperature, max_tokens, system], [message, chatbot])
        clear.click(lambda: [], None, chatbot)
    return app


def _text(content: Any) -> str:
    """Gradio may hand back message content as a list of parts; the model wants plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _streamed(backend: Backend, request: ChatRequest) -> Iterator[str]:
    """The answer so far, after each decoded piece; an error ends it with a visible message."""
    text = ""
    try:
        for piece in backend.stream(request):
            text += piece
            yield text
    except MedtuneError as exc:
        yield f"{text}\n\n**Error:** {exc}"
        return
    if not text.strip():  # nothing a person could see: say so rather than show a blank
        yield "*(empty answer)*"


def launch(
    backend: Backend,
    host: str = "127.0.0.1",
    port: int = 7860,
    title: str = "medtune",
    selected: str | None = None,
) -> None:
    """Serve the page until interrupted (blocking)."""
    app = build_app(backend, title=title, selected=selected)
    app.queue(default_concurrency_limit=8)
    app.launch(server_name=host, server_port=port, css=CSS, show_error=True, footer_links=[], quiet=False)
