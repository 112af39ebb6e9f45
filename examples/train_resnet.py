"""Train ResNet18 (torchvision layout, head 512 -> 512 -> classes) with tinynet.

    python examples/train_resnet.py                       # bundled digits, runs out of the box
    python examples/train_resnet.py --data path/to/Cropped_final --pretrained resnet18-f37072fd.pth --augment

See ``python examples/train_resnet.py --help`` and tinynet/experiment.py.
"""
import sys

from tinynet.experiment import main

if __name__ == "__main__":
    sys.exit(main("resnet"))
