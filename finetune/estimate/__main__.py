"""python -m finetune.estimate: the memory estimator's command line (finetune/estimate/cli.py)."""

import os
import sys

from finetune.estimate.cli import main


if __name__ == "__main__":
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # config warnings would bury the table
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # peft imports it; its CPU-kernel notice is noise here
    sys.exit(main(sys.argv[1:]))
