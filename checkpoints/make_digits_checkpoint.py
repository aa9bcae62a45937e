"""Make checkpoints/digits-mlp.pt, the checkpoint `make demo` analyses.

    python checkpoints/make_digits_checkpoint.py [--epochs 30] [--seed 0] [--out PATH]

A 64-32-32-10 ReLU MLP (3,466 parameters) fitted with SGD to the 1,437 training images of
the bundled UCI digits; saved in hessdiag's checkpoint format (loads with
torch.load(weights_only=True)), recording its model and data specs.
"""

import argparse
from pathlib import Path

from hessdiag.demo import fit_digits, save_digits_checkpoint

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", type=Path, default=Path(__file__).with_name("digits-mlp.pt"))
args = parser.parse_args()
fitted = fit_digits(epochs=args.epochs, seed=args.seed)
sha = save_digits_checkpoint(args.out, fitted)
print(f"{args.out}: train accuracy {fitted.train_accuracy:.4f}, test accuracy "
      f"{fitted.test_accuracy:.4f}, {fitted.steps} steps, sha256 {sha}")
