"""Train ResNet18 (torchvision layout, head 512 -> 512 -> classes) with tinynet.

    python examples/train_resnet.py                       # bundled digits, runs out of the box
    python examples/train_resnet.py --data path/to/Cropped_final --pretrained resnet18-f37072fd.pth --augment

See ``python examples/train_resnet.py --help`` and tinynet/experiment.py.
"""
import sys

from tinynet import backend
from tinynet.experiment import main

if __name__ == "__main__":
    backend.keep_freed_host_memory()  # glibc keeps freed arrays for reuse: ~10 % of a step (see its docstring)
    sys.exit(main("resnet"))
