"""A package of the user's own: a Conv1d classifier and 1-D signals, for a `kind: python` job."""
