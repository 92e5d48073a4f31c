"""Choosing a method: the memory estimator (:mod:`.estimator`), model presets (:mod:`.presets`),
per-method closed forms (:mod:`.methods`) and the recommender (:mod:`.recommend`)."""
