"""Analysis of simpo_ray.tune searches: one recommendation per model size, compared with the guide.

`load_results(paths)` reads experiment directories into pandas; `analyse(paths, out)` writes
recommendations.md, the tables as CSV, the plots and the best configs (what
`python -m analysis` does).
"""

from analysis.load import Results, default_results_dir, load_results
from analysis.run import analyse

__all__ = ["Results", "analyse", "default_results_dir", "load_results"]
