"""The data a training run sees, decided in one place for ``peftlab train`` and ``compare``.

:func:`load_data` makes the splits of a :class:`~peftlab.train.config.TrainConfig` (a pure
function of the config: data, sizes, seed, columns), and :func:`num_labels` sizes a
classification head from them: the label set is the sorted set of labels in the data, at
least two. The trainer loads a model with that many labels; the compare worker, which loads
the model itself before training, asks the same two functions first, so a three- or
five-class file gets the same head in both.
"""

from __future__ import annotations

from peftlab.data import TaskData, load_streamed, load_task_data
from peftlab.train.config import TrainConfig


def load_data(cfg: TrainConfig, tokenizer, kind: str) -> TaskData:
    """The encoded splits ``train()`` trains and evaluates on for ``cfg`` (``streaming``: the
    training split a :class:`~peftlab.data.StreamedTrain`, read as batches need it)."""
    if cfg.streaming:
        kw = {**cfg.data_kwargs(), "shuffle_buffer": cfg.shuffle_buffer}
        return load_streamed(tokenizer, cfg.data, kind, cfg.max_length, **kw)
    return load_task_data(tokenizer, cfg.data, kind, cfg.max_length, **cfg.data_kwargs())


def num_labels(data: TaskData) -> int:
    """The classification head's size for ``data``: its label count, at least 2."""
    return max(2, len(data.label_names))
