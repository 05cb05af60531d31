"""python -m analysis RESULT_DIR [RESULT_DIR ...] --out DIR"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Turn finished simpo_ray.tune searches into one recommendation per model size.

RESULT_DIR is an experiment directory written by simpo_ray.tune (search.json, trials.csv,
curves.csv, best_config.yaml) or a folder holding several (a Tune storage path). All searches
must share one objective. Trials are grouped by size: the size bucket and the model searched
(the bundled CPU ladder gives cpu/tiny, cpu/small, cpu/base).

Written to --out (replaced as a whole, only once everything is written):
  recommendations.md      per size: recommended learning_rate, beta, gamma_beta_ratio,
                          sft_weight (best trial), robust range (min-max over the top quarter
                          of finished trials, at least 3), the guide's default and range, a
                          flag where they disagree, best vs documented-default trial, trials
                          by status, fANOVA importance, diagnostics; a cross-size table;
                          with a reward model, the final win rate, LC win rate and generated
                          length beside the score, and a length-exploitation check
  recommendations.csv, cross_size.csv, best_vs_default.csv, status_counts.csv,
  importance.csv, diagnostics.csv, diagnostics_trials.csv, all_trials.csv
  extrapolated.csv,       with searches of two sizes or more: settings predicted for the
  leave_one_size_out.csv  standard sizes not searched (bundled ladder, one model per guide
                          bucket), EXTRAPOLATED from each parameter's trend against log
                          parameter count, with an interval; with three sizes or more, each
                          searched size predicted from the others against its best trial
  plots/<size>_*.png      objective vs parameters, learning curves by outcome, parallel
                          coordinates of the top trials, preference accuracy vs chosen NLL,
                          final objective and win rates vs generated length (reward model)
  configs/<size>.yaml     the best configuration, for python -m simpo_ray.train --config
"""

EPILOG = """\
exit status: 0 on success; 2 on a problem with the input (one line 'error: ...' on stderr;
--debug shows the traceback).

example: python -m analysis ~/simpo_ray_results --out analysis_out
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result_dirs", nargs="+", metavar="RESULT_DIR", help="experiment directory or a folder of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the analysis to")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    from analysis.run import analyse
    from simpo_ray.cli import run_command  # a UserError: one `error:` line, exit 2

    def analyse_and_say() -> int:
        out = analyse(args.result_dirs, args.out)
        print(f"wrote {out / 'recommendations.md'}")
        return 0

    return run_command(analyse_and_say, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
