"""``python -m hessdiag.experiments NAME [--quick] [--out DIR]``."""

import argparse
import sys

from hessdiag.experiments import EXPERIMENTS


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m hessdiag.experiments",
                                     description="Regenerate an experiment's page.")
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    parser.add_argument("--quick", action="store_true", help="A seconds-long version.")
    parser.add_argument("--out", default="experiments-output", help="Where the store, "
                        "checkpoints and page go.")
    args = parser.parse_args()
    page = EXPERIMENTS[args.name].run(
        args.out, quick=args.quick, progress=lambda text: sys.stderr.write(text + "\n"))
    sys.stdout.write(f"{page}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
