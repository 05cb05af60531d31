"""The hyperparameter search: the space (schema, loader, start points, objectives), the plan,
the searcher and schedulers, the run, what it records, and the experiment lock. No tensors."""
