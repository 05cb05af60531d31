"""`python -m simpo_ray.tune`: the hyperparameter search (command line: `simpo_ray.cli.tune_main`).

Programmatic entry points, re-exported for users and notebooks: `run_search` (run or resume a
search; `simpo_ray.search.run`), `load` and `dry_run` (a space resolved and its plan described;
`simpo_ray.search.plan`).
"""

from simpo_ray.search.plan import dry_run, load
from simpo_ray.search.run import run_search

__all__ = ["dry_run", "load", "run_search"]

if __name__ == "__main__":
    import sys

    from simpo_ray.cli import tune_main

    sys.exit(tune_main())
