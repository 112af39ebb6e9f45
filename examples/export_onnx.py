"""Export weights from a training run to ONNX, for onnxruntime or any other ONNX runtime (as ``tinynet export``).

    python examples/export_onnx.py --weights runs/resnet/best.safetensors --out model.onnx

Needs the optional extra: pip install -e ".[onnx]" (from the checkout).  See tinynet/commands/export.py.
"""
import sys

from tinynet.commands.export import check_out, main as export_main  # noqa: F401 (check_out: for the tests)
from tinynet.predict import load_model


def main(argv=None) -> int:
    return export_main(argv, load=lambda *args, **kwargs: load_model(*args, **kwargs))  # this module's load_model


if __name__ == "__main__":
    sys.exit(main())
