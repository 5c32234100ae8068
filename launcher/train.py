"""Entry script for the `deepspeed` launcher: `deepspeed --num_gpus N launcher/train.py --config CONFIG [key=value ...]`."""

import sys

from lmscale.training.worker import main

if __name__ == "__main__":
    sys.exit(main())
