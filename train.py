"""``python train.py --model convnextv2_base --replace-convplus ...``: the same as ``convplus train ...``."""

import sys

from convplus.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
