"""The comparison lab: ``peftlab compare`` / :func:`peftlab.compare`.

``spec`` holds what a comparison runs (``CompareConfig`` → one ``RunSpec`` per run), ``runner``
plans and runs one worker process per method and seed, ``worker`` trains and measures one run
(``probe`` is its callback into the training loop), ``measure`` and ``inference`` hold the
measurement definitions, ``result`` the typed result of a run and its ``quality()``, ``claims``
checks the user's document's comparison table, ``report`` writes the table, Markdown and HTML.
The trainer knows nothing of any of it: the bench wraps :func:`peftlab.train.train` from outside.
"""

from peftlab.bench.runner import compare

__all__ = ["compare"]
