"""Train the assignment's small CNN with tinynet.

    python examples/train_cnn.py                          # bundled digits, runs out of the box
    python examples/train_cnn.py --data path/to/Cropped_final --device cuda

See ``python examples/train_cnn.py --help`` and tinynet/experiment.py.
"""
import sys

from tinynet import backend
from tinynet.experiment import main

if __name__ == "__main__":
    backend.keep_freed_host_memory()  # glibc keeps freed arrays for reuse: ~10 % of a step (see its docstring)
    sys.exit(main("cnn"))
