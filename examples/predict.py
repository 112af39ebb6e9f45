"""Classify photos with a model trained by train_cnn.py / train_resnet.py.

    python examples/predict.py --weights runs/resnet/best.safetensors photo.jpg more/*.png folder/
    python examples/predict.py --weights runs/resnet/best.safetensors --top-k 3 --csv out.csv folder/
    python examples/predict.py --onnx model.onnx folder/          # the exported graph, run by onnxruntime

Prints, for every image, its top-k classes with their probabilities (one line
per image); files that cannot be read are listed as skipped, with the reason
(the same decoder and limits as in training).  Folders are searched
recursively for image files.  The model, its class names, image size and
normalisation come from the weights file's metadata.

Exit status: 0 when at least one image was classified; 1 when none could be;
2 for unusable input (no weights, weights that do not fit, metadata with a
value tinynet cannot use, an unknown option, --device cuda without a GPU),
with a one-line message.

Class names and file names are someone else's text: printed, their control
characters are escaped (tinynet.text.printable: no ESC sequence reaches the
terminal); in the CSV file, a cell that would start like a spreadsheet
formula (= + - @ ...) starts with a ' (tinynet.text.csv_cell, OWASP's advice).
"""
import argparse
import csv
import itertools
import sys

from tinynet import backend
from tinynet.predict import ModelFileError, find_images, load_model, load_onnx, model_forward, predict_files
from tinynet.text import csv_cell, printable


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = Parser(prog="predict.py", description="Top-k classes of photos, with a model trained by tinynet.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="best.safetensors or last.safetensors from a training run")
    source.add_argument("--onnx", help="a model exported with examples/export_onnx.py (runs on onnxruntime)")
    parser.add_argument("inputs", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image; default 5")
    parser.add_argument("--csv", help="also write the predictions to this CSV file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; default cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass; default 64")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.top_k < 1 or args.batch_size < 1:
        print(f"{prog}: error: --top-k and --batch-size must be positive, got {args.top_k} and {args.batch_size}",
              file=sys.stderr)
        return 2
    try:
        device = backend.check_device(args.device)
        if args.onnx:
            forward, meta = load_onnx(args.onnx, device)
        else:
            model, meta = load_model(args.weights, device)
            forward = model_forward(model, device)
    except (ModelFileError, ValueError, RuntimeError, ImportError) as error:
        print(f"{prog}: error: {printable(error)}", file=sys.stderr)
        return 2

    files, missing = find_images(args.inputs)
    k = min(args.top_k, len(meta["classes"]))
    try:
        csv_file = open(args.csv, "w", newline="", encoding="utf-8", errors="backslashreplace") if args.csv else None
    except OSError as error:
        print(f"{prog}: error: --csv {args.csv!r} cannot be written: {printable(error.strerror or error)}",
              file=sys.stderr)
        return 2
    writer = csv.writer(csv_file) if csv_file else None
    if writer:
        writer.writerow(["path"] + [f"{what}{i}" for i in range(1, k + 1) for what in ("class", "p")] + ["skipped"])
    done = skipped = 0
    try:  # printed (and written) as each batch is done, so a large folder shows results as it goes
        results = predict_files(forward, meta, files, top_k=args.top_k, batch_size=args.batch_size,
                                progress=not args.no_progress and sys.stderr.isatty())
        for item in itertools.chain(missing, results):
            if item.skipped:
                skipped += 1
                print(f"{printable(item.path)}: skipped: {printable(item.skipped)}")
            else:
                done += 1
                print(f"{printable(item.path)}: "
                      + ", ".join(f"{printable(name)} {100 * p:.1f} %" for name, p in item.top))
            if writer:
                row = [c for name, p in item.top for c in (csv_cell(name), f"{p:.6f}")]
                writer.writerow([csv_cell(item.path)] + row + [""] * (2 * k - len(row))
                                + [csv_cell(item.skipped or "")])
    except ModelFileError as error:  # outputs that do not fit the class names, found at the first batch
        print(f"{prog}: error: {printable(error)}", file=sys.stderr)
        return 2
    finally:
        if csv_file:
            csv_file.close()
    print(f"{prog}: {done} images classified, {skipped} skipped", file=sys.stderr)
    return 0 if done else 1


if __name__ == "__main__":
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    sys.exit(main())
