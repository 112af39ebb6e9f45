"""Models of the assignment: the small CNN and ResNet18 (torchvision layout)."""
from .cnn import SimpleCNN, simple_cnn
from .resnet import ResNet, kaiming_init_, make_head, resnet18

__all__ = ["SimpleCNN", "simple_cnn", "ResNet", "resnet18", "make_head", "kaiming_init_"]
