"""The comparison lab: ``peftlab compare`` / :func:`peftlab.compare`.

``runner`` plans and runs one worker process per method and seed, ``worker`` trains and
measures one run, ``measure`` holds the measurement definitions, ``claims`` checks the user's
document's comparison table, ``report`` writes the table, Markdown and HTML.
"""

from peftlab.bench.runner import compare

__all__ = ["compare"]
