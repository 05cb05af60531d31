"""One training run, inside a Ray Train worker: the SimPO loss and log-probs, model loading,
the parallel strategy and checkpoints, generation and reward scoring, the memory plan.
No Ray Tune here; `python -m simpo_ray.train` runs one training."""
