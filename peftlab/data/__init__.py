"""Data: readers (Alpaca JSON/JSONL, chat JSONL, CSV/TSV), built-in tasks, encoding, collation."""

from peftlab.data.builtin import TASKS, generate
from peftlab.data.encode import IGNORE, TaskData, collate, encode_messages, load_task_data, render
from peftlab.data.readers import DataError, read_classification, read_generation

__all__ = [
    "IGNORE",
    "TASKS",
    "DataError",
    "TaskData",
    "collate",
    "encode_messages",
    "generate",
    "load_task_data",
    "read_classification",
    "read_generation",
    "render",
]
