"""Classify photos with a model trained by train_cnn.py / train_resnet.py (the same as ``tinynet predict``).

    python examples/predict.py --weights runs/resnet/best.safetensors photo.jpg more/*.png folder/
    python examples/predict.py --weights runs/resnet/best.safetensors --top-k 3 --csv out.csv folder/
    python examples/predict.py --onnx model.onnx folder/          # the exported graph, run by onnxruntime

Everything it does, and its exit statuses, are described in tinynet/commands/predict.py.
"""
import sys

from tinynet.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
