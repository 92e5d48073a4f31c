"""Data: sources (strict readers, ``datasets``), record formats and column mapping, splits and
mixtures, streaming, built-in tasks, encoding, collation, and inspection."""

from peftlab.data.builtin import TASKS, generate
from peftlab.data.encode import IGNORE, TaskData, collate, encode_messages, render
from peftlab.data.formats import read_classification, read_generation
from peftlab.data.load import load_task_data
from peftlab.data.readers import DataError
from peftlab.data.stream import StreamedTrain, load_streamed

__all__ = [
    "IGNORE",
    "TASKS",
    "DataError",
    "StreamedTrain",
    "TaskData",
    "collate",
    "encode_messages",
    "generate",
    "load_streamed",
    "load_task_data",
    "read_classification",
    "read_generation",
    "render",
]
