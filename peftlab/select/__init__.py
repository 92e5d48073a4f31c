"""Choosing a method: the memory estimator (:mod:`.estimator`), model presets (:mod:`.presets`),
per-method closed forms (:mod:`.plans`), the table of what is known of each method — its plan,
the fields it reads, its priors (:mod:`.models`) — and the recommender (:mod:`.recommend`)."""
