"""Export weights from a training run to ONNX, for onnxruntime or any other ONNX runtime.

    python examples/export_onnx.py --weights runs/resnet/best.safetensors --out model.onnx

The graph (opset 17, standard operators only: see tinynet/onnx.py) takes a
float32 batch ``input`` of shape (N, 3, size, size), normalised as in
training, and returns ``logits`` (N, classes).  The class names, image size
and normalisation are copied into the ONNX file's metadata, so that
``examples/predict.py --onnx model.onnx photo.jpg`` needs nothing else.
Needs the optional extra: pip install "tinynet[onnx]".
"""
import argparse
import sys

from tinynet.predict import ModelFileError, load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="export_onnx.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="best.safetensors or last.safetensors of a training run")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    args = parser.parse_args(argv)
    try:
        from tinynet.onnx import OPSET, ExportError, OnnxUnavailable, export
        model, meta = load_model(args.weights)
        size = meta["image_size"]
        export(model, args.out, (1, 3, size, size), metadata=meta)
    except (ModelFileError, ExportError, OnnxUnavailable, ImportError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['model']}, {len(meta['classes'])} classes, input (N, 3, {size}, {size}), "
          f"opset {OPSET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
