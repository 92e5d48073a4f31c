"""Data: sources (strict readers, ``datasets``), record formats and column mapping, splits and
mixtures, built-in tasks, encoding, collation, and inspection."""

from peftlab.data.builtin import TASKS, generate
from peftlab.data.encode import IGNORE, TaskData, collate, encode_messages, render
from peftlab.data.formats import read_classification, read_generation
from peftlab.data.load import load_task_data
from peftlab.data.readers import DataError

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
