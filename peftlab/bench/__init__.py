"""The comparison lab: ``peftlab compare`` / :func:`peftlab.compare`.

``spec`` holds what a comparison runs (``CompareConfig`` → one ``RunSpec`` per run), ``runner``
plans and runs one worker process per method and seed (each method at its own learning rate)
inside the output directory it owns (``outdir``), ``search`` runs each method's own
``--tune`` search (successive halving from ``tune``) first, ``worker`` trains and measures one
run (``probe`` is its callback into the training loop; ``baselines`` the majority class and
the untrained model), ``measure``, ``inference``, ``timing`` and ``load`` hold the measurement
definitions and when a timing is a finding, :mod:`peftlab.results` the typed result of a run
and its ``quality()``, ``stats`` the intervals and verdicts, ``summary`` the figures over seeds
and methods against each other, ``claims`` checks the user's document's comparison table,
``report``, ``findings``, ``figures`` and ``render`` write the table, Markdown and HTML.
The trainer knows nothing of any of it: the bench wraps :func:`peftlab.train.train` from outside.
"""

from peftlab.bench.runner import compare

__all__ = ["compare"]
