"""QLoRA training throughput on one GPU: mixtune vs the stock stack, numerics checked first.

    PYTHONPATH=src python bench/train_throughput.py --layers 4 --stock "mb=8,ckpt=1" --full "mb=8,ckpt=0"

All options: `--help` (the same as `mixtune bench`, plus --stock, which needs bench/stock_stack.py).
Prints a table and one JSON line last. See BENCHMARKS.md for the measured rows and their commands.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mixtune.bench import main  # noqa: E402
from stock_stack import run_stock  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], stock_runner=run_stock))
