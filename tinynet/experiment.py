"""The assignment's image-classification experiment, end to end, behind one command line.

``examples/train_cnn.py`` and ``examples/train_resnet.py`` are thin wrappers
around :func:`main`.  A run:

1. loads a folder of photos (one sub-folder per class) with
   :class:`~tinynet.data.ImageFolder`, or, without ``--data``, the digits
   bundled with scikit-learn rendered to 64x64 RGB, so it works out of the box;
2. splits it 70/20/10, stratified, with ``random_state=42`` (the assignment's two
   ``train_test_split`` calls);
3. builds the model (the assignment's CNN, or ResNet18 with the head
   512 -> 512 -> classes, optionally starting from pretrained weights);
4. trains with Adam and cross-entropy, evaluating on the validation set after
   every epoch, writing a checkpoint after every epoch;
5. evaluates on the test set: accuracy and weighted F1;
6. writes every figure and a ``metrics.json`` with every number into ``--out``;
7. ships ``best.safetensors`` (best validation epoch) and ``last.safetensors``
   (:mod:`tinynet.predict`), scores both on the test set, writes ``report.html``
   (:mod:`tinynet.report`) and, with ``--wandb`` / ``--tensorboard``, logs the
   run (:mod:`tinynet.tracking`).

Errors a user can cause (a missing data folder, an unknown option, ``--device
cuda`` without a GPU, an output folder that cannot be written) end the program
with a one-line message and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import time
import types

import numpy as np

from . import distributed, nn, optim
from .cli import (CommandLineParser, FailedRun, InterruptedAfterTraining, UsageError, add_threads_argument,
                  check_counts, check_device, check_image_size, check_output_folder, check_outside, check_seed,
                  check_threads, claim_output_folder, hardware, remove_stale_temporaries, run_command,
                  start_threads, write_json)
from .data import (ArrayDataset, ColorJitter, Compose, DataLoader, ImageFolder, RandomHorizontalFlip,
                   RandomRotation, digits_dataset, stratified_split)
from .io import WeightsFileError, load_into
from .metrics import classification_metrics
from .models import resnet18, simple_cnn
from .predict import BestWeights, model_metadata, ship_weights
from .random import manual_seed
from .report import mistakes_gallery, write_report
from .text import printable
from .tracking import TrackingUnavailable, Trackers
from .train import evaluate, fit, predict
from .train.checkpoint import check_checkpoint
from .data.identity import dataset_identity

__all__ = ["build_parser", "main", "run", "UsageError"]  # the other command-line pieces live in tinynet.cli

DIGITS_NOTE = ("no --data given: using scikit-learn's bundled handwritten digits (1,797 images, 10 classes) "
               "rendered to {size}x{size} RGB, so that the script runs out of the box. Point it at real "
               "photos with --data DIR, where DIR holds one sub-folder of images per class.")


#: The fewest images per class that the stratified 70/20/10 split accepts: with 10 classes or more, 10 (the
#: 10 % test part must hold one image of each class); with 2 classes, 6.  tests/test_command.py checks both
#: against :func:`tinynet.data.stratified_split`; :func:`minimum_per_class` finds the number for any count.
MIN_PER_CLASS_MANY, MIN_PER_CLASS_FEW, CLASSES_FEW = 10, 6, 2


def minimum_per_class(num_classes: int) -> int:
    """The fewest images per class for which ``num_classes`` equal classes can be split 70/20/10, stratified."""
    for count in range(2, MIN_PER_CLASS_MANY + 1):
        try:
            stratified_split(np.repeat(np.arange(num_classes), count))
        except ValueError:
            continue
        return count
    return MIN_PER_CLASS_MANY


def build_parser(model: str, prog: str | None = None, choose_model: bool = False) -> argparse.ArgumentParser:
    """The options of ``train_<model>.py``; with ``choose_model``, also ``--model`` (``tinynet train``)."""
    what = "the assignment's small CNN" if model == "cnn" else "ResNet18 (torchvision layout, head 512-512-classes)"
    parser = CommandLineParser(prog=prog or f"train_{model}.py",
                     description=f"Train {what} on a folder of images with tinynet, as in the assignment: "
                                 f"70/20/10 stratified split, 64x64 images normalised with mean and std 0.5, "
                                 f"Adam, cross-entropy; test accuracy and weighted F1 at the end.")
    if choose_model:
        parser.add_argument("--model", choices=("cnn", "resnet"), default="resnet",
                            help="the assignment's small CNN, or ResNet18 (default); each has its own options below")
    parser.add_argument("--data", help="folder with one sub-folder of images per class (default: the bundled "
                                       "scikit-learn digits, so that the script runs out of the box)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (needs CuPy and a GPU); default cpu")
    parser.add_argument("--epochs", type=int, default=10, help="default 10")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, default 1e-3")
    parser.add_argument("--augment", action="store_true",
                        help="the augmentation run: every epoch trains on the plain images plus a freshly "
                             "augmented copy of each (flip p=0.5, rotation +-10 degrees, colour jitter 0.1)")
    parser.add_argument("--image-size", type=int, default=64, help="images are resized to SIZE x SIZE; default 64")
    parser.add_argument("--out", default=f"runs/{model}", help=f"output folder; default runs/{model}")
    parser.add_argument("--seed", type=int, default=42,
                        help="seeds the split, the weights and the batch order; default 42")
    parser.add_argument("--limit", type=int,
                        help=f"use at most N images per class (quick runs); the stratified 70/20/10 split needs at "
                             f"least {MIN_PER_CLASS_MANY} per class ({MIN_PER_CLASS_FEW} with {CLASSES_FEW} classes)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--on-nan", choices=("stop", "skip"), default="stop",
                        help="a non-finite loss stops the run (default) or its batch is skipped and counted")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    add_threads_argument(parser)
    parser.add_argument("--wandb", metavar="PROJECT", help="log the run to Weights & Biases project PROJECT "
                        "(offline, under --out, unless you are logged in; needs pip install -e \".[track]\" in the "
                        "checkout)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="write TensorBoard scalar event files to OUT/tensorboard (needs tensorboardX)")
    if model == "resnet":
        parser.add_argument("--pretrained", metavar="PATH",
                            help="start from these weights (torchvision's resnet18-f37072fd.pth, or an .npz/"
                                 ".safetensors from examples/pretrain_resnet.py); the backbone is loaded, the "
                                 "head (fc.*) is freshly initialised")
        parser.add_argument("--no-tsne", action="store_true", help="skip the t-SNE plots of pooled features")
    else:
        parser.add_argument("--softmax-before-loss", action="store_true",
                            help="reproduce the original notebook's bug: a softmax layer in front of "
                                 "CrossEntropyLoss, which applies log-softmax itself, so the model is trained "
                                 "on a squashed softmax of softmax and learns more slowly. Off by default.")
    distributed.add_arguments(parser)  # --distributed, --sync-batchnorm
    return parser


#: The files a run writes into --out (a killed run's temporary files for them are removed at the start).
OUTPUT_FILES = frozenset({"metrics.json", "checkpoint.npz", "skipped.tsv", "class_distribution.png",
                          "batch_grid.png", "curves.png", "confusion_matrix.png", "tsne_train_2d.png",
                          "tsne_validation_2d.png", "tsne_test_3d.png", "report.html", "best.safetensors",
                          "last.safetensors"})


def _check_args(args, model: str) -> None:
    check_counts(args, ("epochs", "batch_size", "image_size"))
    check_image_size("--image-size", args.image_size)
    check_seed(args.seed)
    check_threads(args.threads)
    if model == "cnn" and args.image_size % 16:
        raise UsageError(f"--image-size must be a multiple of 16 for the CNN (its pools divide it by 4, 2 and 2), "
                         f"got {args.image_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive number of images per class, got {args.limit}")
    if not (args.lr > 0 and np.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.lr > 10:  # Adam's step is about lr per weight: beyond this the first step destroys the model
        raise UsageError(f"--lr must be at most 10, got {args.lr:g}")
    args.device = check_device(args.device)
    if args.data is not None and not pathlib.Path(args.data).is_dir():
        raise UsageError(f"data folder {args.data!r} does not exist or is not a folder")
    pretrained = getattr(args, "pretrained", None)
    if pretrained is not None and not pathlib.Path(pretrained).is_file():
        raise UsageError(f"pretrained weights file {pretrained!r} does not exist")
    if args.data is not None:  # before the folder is made: the next scan would read the run's figures as photos
        check_outside(args.out, args.data)
    check_output_folder(args.out)


def _limit_per_class(labels, limit):
    """Indices of at most ``limit`` images of each class (the first ones, in dataset order)."""
    keep = [np.flatnonzero(labels == k)[:limit] for k in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def load_dataset(args, log):
    if args.data is None:
        log(DIGITS_NOTE.format(size=args.image_size))
        dataset = digits_dataset(size=args.image_size)
        if args.limit:
            keep = _limit_per_class(dataset.labels, args.limit)
            dataset = ArrayDataset(dataset.images(keep), dataset.labels[keep], dataset.classes)
        return dataset, "sklearn digits (rendered)"
    dataset = ImageFolder(args.data, size=args.image_size, limit_per_class=args.limit)
    # The decode report counts the files that failed to decode; the folder scan can skip more (not listed, ...)
    others = len(dataset.skipped) - dataset.report.skipped
    more = f"; {len(dataset.skipped)} files skipped in all" if others else ""
    log(f"data: {args.data}: {len(dataset)} images in {len(dataset.classes)} classes ({dataset.report}){more}")
    for item in dataset.skipped[:10]:
        log(f"  skipped {printable(item.path)}: {printable(item.reason)}")  # a file name can hold ESC sequences
    if len(dataset.skipped) > 10:
        log(f"  ... and {len(dataset.skipped) - 10} more (all listed in skipped.tsv)")
    return dataset, str(pathlib.Path(args.data).resolve())


def build_model(model: str, num_classes: int, args, log):
    if model == "cnn":
        return simple_cnn(num_classes, image_size=args.image_size,
                          softmax_before_loss=args.softmax_before_loss), None
    net = resnet18(num_classes, head="mlp")
    report = None
    if args.pretrained:
        try:  # the backbone comes from the file; the head (fc.*) keeps its fresh initialisation
            result = load_into(net, args.pretrained, strict=False, skip_prefixes="fc.")
        except (WeightsFileError, nn.StateDictError, OSError) as error:  # StateDictError: no key matched
            raise UsageError(f"cannot load pretrained weights {args.pretrained!r}: {error}") from None
        head = [k for k in net.state_dict() if k.startswith("fc.")]
        not_loaded = set(result.missing_keys) | {key for key, _, _ in result.mismatched_keys}
        loaded = [k for k in net.state_dict() if k not in not_loaded and not k.startswith("fc.")]
        report = {"path": str(args.pretrained), "loaded": loaded, "fresh": head + result.missing_keys,
                  "ignored": ["fc.* (the file's own head, if it has one)"] + result.unexpected_keys,
                  "mismatched": [list(m) for m in result.mismatched_keys]}
        log(f"pretrained: loaded {len(loaded)} of the backbone's tensors from {args.pretrained}")
        log(f"  freshly initialised: {', '.join(report['fresh'])}")
        log(f"  ignored from the file: {', '.join(report['ignored'])}")
        if result.mismatched_keys:
            log(f"  not loaded (shape differs): {', '.join(key for key, _, _ in result.mismatched_keys)}")
        if not loaded:
            raise UsageError(f"{args.pretrained!r} holds no ResNet18 backbone weights (no key matched)")
    return net, report


def resume_recipe(model: str, args, data_name: str) -> dict:
    """The settings a resumed run must share with the run it continues (stored in every checkpoint).

    ``--resume`` refuses a change of any of them, naming it and both values
    (:func:`tinynet.train.load_checkpoint` compares them): the checkpoint's
    optimizer state would override a new ``--lr``; a new batch size would
    shift the position a mid-epoch stop resumes from (training images twice,
    or past the end); the others change the data or the model the saved
    weights were trained on.  ``--epochs`` (the run continues up to the new
    total), ``--device``, ``--on-nan``, ``--no-progress`` and ``--no-tsne``
    are honoured.
    """
    recipe = {"data": data_name, "batch_size": args.batch_size, "lr": args.lr, "augment": args.augment,
              "image_size": args.image_size, "limit": args.limit}
    if model == "cnn":
        recipe["softmax_before_loss"] = args.softmax_before_loss
    else:
        recipe["pretrained"] = str(args.pretrained) if args.pretrained else None
    return recipe


def _threads() -> int:
    """The threads this process computes with (the BLAS pool and tinynet's own: :func:`tinynet.backend.num_threads`)."""
    from . import backend

    return backend.num_threads()


def _has_batch_norm(net) -> bool:
    return any(isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) for module in net.modules())


def _check_finite(what: str, value) -> None:
    """A loss that is not a number is a failed run, never a result to report."""
    if value is not None and not np.isfinite(value):
        raise FailedRun(f"the {what} loss is {value}: the model's outputs are not finite numbers, so no accuracy "
                        f"is reported (a diverged run, or weights with NaN or infinite values)")


def run(model: str, args, log=print) -> dict:
    """Run the experiment described by parsed ``args``; returns the metrics written to metrics.json.

    The output folder is held (locked) until the run ends; a new run never
    writes into the folder of another run (:func:`tinynet.cli.claim_output_folder`):
    ``args.out`` is set to the folder it writes to.
    """
    stage = types.SimpleNamespace(trained=False)  # set once fit has returned: the rest is the results
    with contextlib.ExitStack() as held:
        try:
            return _run(model, args, log, held, stage)
        except KeyboardInterrupt:
            if stage.trained:  # the checkpoint holds every epoch: --resume trains nothing and writes the results
                raise InterruptedAfterTraining() from None
            raise


def _run(model: str, args, log, held, stage) -> dict:
    from . import plots

    _check_args(args, model)
    comm = distributed.setup(args, UsageError)  # None without --distributed
    is_main = comm is None or comm.is_main
    log = log if is_main else (lambda *a, **k: None)
    out = pathlib.Path(args.out)
    if is_main:  # rank 0 alone writes in the output folder: it holds the folder, and alone tidies it
        out, moved = claim_output_folder(out, OUTPUT_FILES, resume=args.resume, keep=held)
        args.out = str(out)
        if moved:
            log(moved)
        for path in remove_stale_temporaries(out, OUTPUT_FILES):  # no live run writes here: this one holds it
            log(f"removed {path}, a temporary file left by a run that was killed while writing")
    started = time.time()
    manual_seed(args.seed)
    try:  # an empty folder, a class without usable images, a class too small to split
        dataset, data_name = load_dataset(args, log)
        classes = list(dataset.classes)
        if args.limit is not None and args.limit < minimum_per_class(len(classes)):
            raise UsageError(f"--limit {args.limit} is too few: the stratified 70/20/10 split of {len(classes)} "
                             f"classes needs at least {minimum_per_class(len(classes))} images per class")
        train_idx, val_idx, test_idx = stratified_split(dataset.labels, seed=42, classes=classes)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        raise UsageError(str(error)) from None
    log(f"split: {len(train_idx)} train, {len(val_idx)} validation, {len(test_idx)} test images")
    # What the run trains on, recorded in every checkpoint: --resume refuses other images or another split.
    data_identity = {"images": dataset_identity(dataset, split=(train_idx, val_idx, test_idx))}
    if comm is not None:  # every rank must have been started for this job: same classes, images and settings
        settings = {f"--{k.replace('_', '-')}": v for k, v in resume_recipe(model, args, data_name).items()
                    if k != "data"}  # the folder's path may differ between machines; its images may not
        distributed.check_same_job(comm, {"its classes": classes, "its images (--data)":
                                          data_identity["images"]["digest"], **settings, "--seed": args.seed},
                                   error=UsageError)

    augment = Compose([RandomHorizontalFlip(0.5), RandomRotation(10), ColorJitter(0.1, 0.1, 0.1, 0.1)])
    train_loader = DataLoader(dataset, train_idx, args.batch_size, shuffle=True, seed=args.seed,
                              transform=augment if args.augment else None, augment_copy=args.augment)
    val_loader = DataLoader(dataset, val_idx, args.batch_size)
    test_loader = DataLoader(dataset, test_idx, args.batch_size)

    net, pretrained_report = build_model(model, len(classes), args, log)
    if _has_batch_norm(net):  # BatchNorm's batch statistics need two images (PyTorch refuses one as well)
        if args.batch_size == 1:
            raise UsageError(f"--batch-size 1: {type(net).__name__}'s BatchNorm layers cannot train on one image "
                             f"at a time (a variance needs two values); use 2 or more")
        if train_loader.num_items % args.batch_size == 1:
            train_loader.drop_last = True
            log(f"the last training batch would hold one image, which BatchNorm cannot train on: it is left out "
                f"of every epoch (a different image each epoch, as the order is shuffled)")
    if comm is not None:  # each rank's share of every batch (the test set is evaluated by rank 0 alone)
        train_loader = distributed.DistributedLoader.wrap(train_loader, comm)
        val_loader, whole_val_loader = distributed.DistributedLoader.wrap(val_loader, comm), val_loader
    net.to(args.device)
    net.set_input_grad(False)  # the images need no gradient
    optimizer = optim.Adam(net.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    if comm is not None:  # SyncBatchNorm (optional), rank 0's weights, gradients averaged over the ranks
        net, optimizer = distributed.prepare(net, optimizer, comm, args.sync_batchnorm)
    run_extra = {"model": model, "classes": classes, "seed": args.seed, **resume_recipe(model, args, data_name)}
    if args.resume and (out / "checkpoint.npz").exists():  # a --resume that fit would refuse is refused before
        check_checkpoint(out / "checkpoint.npz", expect=run_extra, data=data_identity,  # anything is written
                         batches_per_epoch=len(train_loader))  # (figures, skipped.tsv...)
    # Shipped weights (best.safetensors while training, last.safetensors after) and run tracking: rank 0's.
    meta = model_metadata(model, net, classes, args.image_size)
    callbacks = []
    if is_main:
        try:
            trackers = Trackers.from_args(args, dict(vars(args)), out)
        except TrackingUnavailable as error:
            raise UsageError(str(error)) from None
        if trackers:
            log(f"tracking: {trackers.describe()}")
        callbacks = [BestWeights(out / "best.safetensors", meta), trackers.on_epoch_end]

    if is_main:  # with --distributed, rank 0 alone writes the figures and files
        if hasattr(dataset, "write_skipped"):
            dataset.write_skipped(out / "skipped.tsv")
        plots.plot_class_distribution({"train": dataset.labels[train_idx], "validation": dataset.labels[val_idx]},
                                      classes, out / "class_distribution.png")
        x0, y0 = next(iter(DataLoader(dataset, train_idx, min(32, len(train_idx)), shuffle=True, seed=args.seed,
                                      transform=augment if args.augment else None, prefetch=0)))
        plots.plot_batch_grid(x0, y0, classes, out / "batch_grid.png")

    # With --distributed the ranks share the cores (tinynet.distributed.setup divides them); alone, the run
    # takes the cores other programs leave free, and gives them back while they need them.
    governor = start_threads(args.threads, log) if comm is None else None
    log(f"model: {type(net).__name__}, {sum(p.size for p in net.parameters()):,} parameters, on {args.device}; "
        f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}, batch {args.batch_size}, Adam lr {args.lr}"
        f"{', augmentation run' if args.augment else ''}; {_threads()} CPU thread{'s' if _threads() != 1 else ''}")
    history = fit(net, optimizer, loss_fn, train_loader, val_loader, args.epochs, device=args.device,
                  checkpoint_path=out / "checkpoint.npz", resume=args.resume, on_nan=args.on_nan,
                  progress=not args.no_progress and is_main,
                  extra=run_extra, data_identity=data_identity,
                  log=log, on_epoch_end=lambda *state: [callback(*state) for callback in callbacks],
                  distributed=distributed.FitHooks(comm) if comm is not None else None, threads=governor)
    stage.trained = True
    if not is_main:
        return {}
    if comm is not None:
        val_loader = whole_val_loader  # rank 0's figures show every validation image
    for epoch in history.epochs:
        _check_finite(f"validation (epoch {epoch.epoch})", epoch.val_loss)

    test = evaluate(net, test_loader, loss_fn, args.device)
    _check_finite("test", test["loss"])
    metrics = classification_metrics(test["labels"], test["predictions"], classes)
    plots.plot_curves(history, out / "curves.png")
    plots.plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png",
                                title=f"Test set: accuracy {metrics['accuracy']:.3f}, weighted F1 "
                                      f"{metrics['f1_weighted']:.3f}")
    figures = ["class_distribution.png", "batch_grid.png", "curves.png", "confusion_matrix.png"]
    if model == "resnet" and not args.no_tsne:
        for name, loader, idx, dims in (("train", train_loader, train_idx, 2), ("validation", val_loader, val_idx, 2),
                                        ("test", test_loader, test_idx, 3)):
            plain = DataLoader(dataset, idx, args.batch_size) if name == "train" else loader
            feats = predict(net, plain, args.device, features=True)
            if len(feats) >= 4:
                path = f"tsne_{name}_{dims}d.png"
                plots.plot_tsne(feats, dataset.labels[idx], classes, out / path, dims=dims,
                                title=f"t-SNE of pooled features ({name})")
                figures.append(path)

    mistakes = mistakes_gallery(net, dataset, test_idx, test_loader, classes, args.device,
                                outputs_probabilities=meta.get("softmax_before_loss", False))
    shipped = ship_weights(net, out, meta, history, metrics, test_loader, loss_fn, classes, args.device)

    best = history.best_epoch
    result = {
        "model": model,
        "data": data_name,
        "classes": classes,
        "images": int(len(dataset)),
        "skipped_files": len(getattr(dataset, "skipped", [])),
        "split": {"train": int(len(train_idx)), "validation": int(len(val_idx)), "test": int(len(test_idx))},
        "config": {k: v for k, v in vars(args).items()},
        "last_training_batch_dropped": train_loader.drop_last,  # a batch of one image, with BatchNorm
        "pretrained": pretrained_report,
        "history": history.to_dict(),
        "best_epoch": best,
        "best_val_accuracy": max((e.val_acc for e in history.epochs), default=None),
        "seconds_per_epoch": float(np.mean([e.seconds for e in history.epochs])) if history.epochs else None,
        "test": {"accuracy": metrics["accuracy"], "f1_weighted": metrics["f1_weighted"],
                 "loss": test["loss"], "per_class": metrics["per_class"],
                 "confusion_matrix": metrics["confusion_matrix"]},
        "figures": figures,
        "shipped": shipped,
        "report": "report.html",
        "hardware": hardware(args.device),
        "world_size": comm.size if comm is not None else 1,  # processes that trained (--distributed)
        "wall_seconds": time.time() - started,
        "estimated_training_seconds": history.estimated_seconds,  # fit's up-front estimate, from timed steps
        "threads": _threads(),  # at the end of the run
        "threads_setting": args.threads,  # "auto": the free cores, adapted while training (tinynet.cores)
        "threads_changes": governor.changes if governor is not None else 0,
    }
    write_json(out / "metrics.json", result)
    write_report(out, result, mistakes)
    trackers.log_run(result, out, test["labels"], test["predictions"])
    log(f"best validation accuracy {result['best_val_accuracy']:.4f} at epoch {best}")
    log(f"Test accuracy: {100 * metrics['accuracy']:.1f} %  |  weighted F1: {metrics['f1_weighted']:.2f}  "
        f"({len(test_idx)} test images; last: epoch {shipped['last']['epoch']}'s weights, the assignment's number)")
    if shipped["best"]:
        log(f"Test accuracy, best: {100 * shipped['best']['accuracy']:.1f} %  |  weighted F1: "
            f"{shipped['best']['f1_weighted']:.2f}  (best validation epoch {shipped['best']['epoch']}'s weights, "
            f"the ones to ship: best.safetensors)")
    if best is not None and not shipped["best"]:
        log(f"no best.safetensors: the file of the best validation epoch ({best}) is missing (removed after it was "
            f"written?); last.safetensors holds epoch {shipped['last']['epoch']}")
    weights = "best.safetensors and last.safetensors" if shipped["best"] else "last.safetensors"
    log(f"figures, metrics.json, report.html, {weights} written to {out}")  # only what is there
    log(f"total time {result['wall_seconds']:.0f} s on {_threads()} CPU thread{'s' if _threads() != 1 else ''}")
    return result


def main(model: str, argv=None, prog: str | None = None, choose_model: bool = False) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser(model, prog, choose_model)
    args = parser.parse_args(argv)
    status = run_command(parser.prog, lambda: run(model, args))
    return distributed.world().finish(status)  # with --distributed, an error on one rank stops them all
