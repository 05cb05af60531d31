"""`python -m simpo_ray.export CHECKPOINT OUT_DIR`: a plain Hugging Face model directory (weights,
config, tokenizer) from any simpo-ray checkpoint, whatever strategy and worker count wrote it."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from simpo_ray.cli import OneLineArgumentParser, run_command

    p = OneLineArgumentParser(prog="python -m simpo_ray.export", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("checkpoint", help="a checkpoint directory (trials.csv's best_checkpoint, or a Train run's)")
    p.add_argument("out_dir", help="where to write the model (save_pretrained)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)

    def command() -> int:
        from simpo_ray.train.checkpoints import export_pretrained

        out = export_pretrained(args.checkpoint, args.out_dir)
        print(f"[simpo-ray] exported {args.checkpoint} -> {out}")
        return 0

    return run_command(command, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
