"""medtune.data: read, check, convert, split and describe training data; format chats.

    from medtune.data import load_records, read_file, convert_records, write_records, render_chat
    records = load_records("train.jsonl")                 # any supported format -> canonical records

Formats: messages (OpenAI), sharegpt, alpaca, prompt_completion, preference, medicalgpt_preference,
text; files: .jsonl, .json, .csv, .parquet, .txt. See `medtune.data.formats` for the canonical forms.
"""

from medtune.data.files import ValidationReport, load_records, read_file, write_records
from medtune.data.formats import FORMATS, convert_records, detect_format
from medtune.data.split import split_records
from medtune.data.stats import dataset_stats
from medtune.data.templates import end_of_turn_tokens, ensure_chat_template, get_template, render_chat

__all__ = [
    "FORMATS",
    "ValidationReport",
    "convert_records",
    "dataset_stats",
    "detect_format",
    "end_of_turn_tokens",
    "ensure_chat_template",
    "get_template",
    "load_records",
    "read_file",
    "render_chat",
    "split_records",
    "write_records",
]
