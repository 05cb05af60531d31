"""`python -m simpo_ray.train`: one SimPO training run (the command line is `simpo_ray.cli.train_main`)."""

import sys

from simpo_ray.cli import train_main

sys.exit(train_main())
