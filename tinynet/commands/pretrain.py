"""``tinynet pretrain`` (and ``examples/pretrain_resnet.py``): ResNet18 on Tiny-ImageNet-188, to fine-tune later.

    tinynet pretrain --time-budget 60             # the CPU run: as many epochs as fit an hour
    tinynet pretrain --device cuda --epochs 30 --size 64
    tinynet pretrain --resume                     # continue the run in runs/pretrain, with the recipe it began with
    tinynet train --model resnet --data ../shared/data/popular-animals \\
        --pretrained runs/pretrain/resnet18-tinyimagenet-32px.npz

The data is ``../shared/data/tiny-imagenet-188-32px.zip`` (``--data``): 188
ImageNet classes, 500 training and 50 validation photos each, 32x32.  Both
splits are decoded once into uint8 arrays and cached as ``.npz`` files in
``--cache-dir`` (about 300 MB at 32 px, 1.2 GB at 64 px); later runs load the
cache in a second.

The recipe, and why:

- ResNet18 in torchvision's layout with ``fc`` 512 -> 188 (one linear layer,
  as torchvision's), so the saved state dict has the keys of torchvision's
  ImageNet file and ``train_resnet.py --pretrained`` treats both alike.
- SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, learning rate
  0.1 annealed to 0 along a cosine, one step per epoch: the standard recipe
  for ResNets on small images.  BatchNorm makes the large rate stable; the
  annealing lets the last epochs settle; 500 photos per class would be
  over-fitted without the weight decay.
- Random crop with 4 pixels of zero padding and a horizontal flip, drawn
  afresh for every image of every epoch
  (:func:`tinynet.data.random_crop_flip_batch`, vectorised over the batch):
  the cheapest augmentation that stops a ResNet from memorising 94,000 images.
- The images' native 32x32 by default; ``--size 64`` upscales them
  (bilinear, once, at decoding) to the 64x64 at which ``train_resnet.py``
  fine-tunes, at four times the cost per image.
- Inputs normalised with mean and std 0.5, as ``train_resnet.py`` does, so
  the network is fine-tuned on inputs with the statistics it was trained on.

Before training, the script measures the data pipeline alone, a training
step alone and evaluation (images per second), and says whether the loader
keeps up with the step.  With ``--time-budget MINUTES`` it uses those
measurements to plan how many epochs fit (at most ``--epochs``) and anneals
the learning rate over that many, so a budgeted run still ends with a fully
annealed schedule; should the epochs turn out slower than measured, the run
stops cleanly at the end of the last epoch that fits the budget.

Written to ``--out`` (default ``runs/pretrain``): ``checkpoint.npz`` after
every epoch (``--resume`` continues a stopped run, with the schedule it
planned, kept in ``plan.json`` with the options it was started with: a bare
``--resume`` continues it with those, and options given with ``--resume`` that
differ from them are refused, all named in one line, before any image is decoded
or anything written), and at the end the weights,
``resnet18-tinyimagenet-<size>px.npz`` (or ``--save PATH``, ``.npz`` or
``.safetensors``): the whole state dict; ``train_resnet.py`` loads its
backbone and leaves out ``fc.*``.  Beside the weights, the same name with
``.json`` records the recipe, the epochs, the validation top-1 and top-5
accuracy of every epoch, the throughput and the hardware.

Errors a user can cause (a missing archive, a bad option, ``--device cuda``
without a GPU) end the program with a one-line message and exit status 2.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import pathlib
import time

import numpy as np

from .. import backend, distributed, nn, optim
from ..data import DataLoader, ZipImageDataset, random_crop_flip_batch
from ..cli import (CommandLineParser, FailedRun, UsageError, add_threads_argument, check_counts, check_device,
                   check_image_size, check_output_folder, check_seed, check_threads, claim_output_folder, hardware,
                   remove_abandoned_partials, remove_stale_temporaries, run_command, start_threads, write_json)
from ..io import save_weights
from ..models import resnet18
from ..nn.module import no_grad
from ..random import manual_seed
from ..train import fit
from ..train.checkpoint import check_checkpoint
from ..data.identity import dataset_identity

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout (tinynet/commands/pretrain.py)
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tiny-imagenet-188-32px.zip"
PLAN_FILE = "plan.json"
# The part of the budget the planned epochs may fill: the measurement before
# training runs on a few batches, and other work on the machine can slow the epochs.
PLAN_MARGIN = 0.95


def build_parser(prog: str = "pretrain_resnet.py") -> CommandLineParser:
    parser = CommandLineParser(
        prog=prog,
        description="Pretrain ResNet18 (torchvision layout, fc to 188 classes) on Tiny-ImageNet-188: SGD with "
                    "Nesterov momentum 0.9, weight decay 5e-4, batch 128, cosine learning rate from 0.1, random "
                    "crop (padding 4) and flip. Saves weights that train_resnet.py --pretrained loads.")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="the Tiny-ImageNet zip, or the folder it was extracted to (default: "
                             "../shared/data/tiny-imagenet-188-32px.zip beside the project)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (needs CuPy and a GPU); default cpu")
    parser.add_argument("--epochs", type=int, default=30, help="epochs to train (at most, with --time-budget); "
                                                               "default 30")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="plan the epochs to fit in this time, and stop at the end of the last epoch that fits")
    parser.add_argument("--size", type=int, default=32, help="image size; 32 is native, 64 upscales; default 32")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate of the cosine; default 0.1")
    parser.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum; default 0.9")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="default 5e-4")
    parser.add_argument("--padding", type=int, default=4, help="zero padding of the random crop; default 4")
    parser.add_argument("--limit", type=int, help="train on the first N images of each class (quick runs)")
    parser.add_argument("--out", default="runs/pretrain", help="output folder; default runs/pretrain")
    parser.add_argument("--save", help="weights file, .npz or .safetensors; default "
                                       "OUT/resnet18-tinyimagenet-<size>px.npz")
    parser.add_argument("--cache-dir", help="folder for the decoded image arrays; default OUT")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights, the order and the crops; default 0")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint, with the options it was started with "
                             "(kept in OUT/plan.json); options given with it must match them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    add_threads_argument(parser)
    distributed.add_arguments(parser)  # --distributed, --sync-batchnorm
    return parser


def check_args(args) -> None:
    check_counts(args, ("epochs", "size", "batch_size"))
    check_image_size("--size", args.size)
    check_seed(args.seed)
    check_threads(args.threads)
    if args.batch_size == 1:
        raise UsageError("--batch-size 1: ResNet18's BatchNorm layers cannot train on one image at a time (a variance "
                         "needs two values); use 2 or more")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be a positive number of images per class, got {args.limit}")
    if not 0 <= args.padding <= args.size:
        raise UsageError(f"--padding must lie in 0..{args.size} (the image size), got {args.padding}")
    for name in ("lr", "time_budget"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.lr > 10:  # SGD diverges at the first step long before this
        raise UsageError(f"--lr must be at most 10, got {args.lr:g}")
    # The deadline is the budget in seconds: 1e308 minutes passes the check above and is infinite in seconds.
    if args.time_budget is not None and args.time_budget > 5_259_600:
        raise UsageError(f"--time-budget must be at most 5259600 minutes (ten years), got {args.time_budget:g}")
    for name in ("momentum", "weight_decay"):
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(args, name)}")
    args.device = check_device(args.device)
    if not pathlib.Path(args.data).exists():
        raise UsageError(f"Tiny-ImageNet archive {args.data!r} does not exist; pass --data PATH (the zip, or the "
                         f"folder it was extracted to)")
    out = check_output_folder(args.out)
    if args.save is not None:  # by default OUT/resnet18-tinyimagenet-<size>px.npz, in the folder the run takes
        args.save = pathlib.Path(args.save)
        if args.save.suffix not in (".npz", ".safetensors"):
            raise UsageError(f"--save must name an .npz or .safetensors file, got {str(args.save)!r}")
        check_output_folder(args.save.parent)
    args.cache_dir = check_output_folder(args.cache_dir or out)  # --out as given: a new run reuses the cache


def recipe(args) -> dict:
    """The settings that define the training run (a resumed run must use the same).

    ``--resume`` refuses a change of any of them, naming it and both values;
    ``--time-budget``, ``--device``, ``--save``, ``--cache-dir`` and
    ``--no-progress`` are honoured.
    """
    return {"model": "resnet18, torchvision layout, fc 512 -> 188", "epochs": args.epochs, "size": args.size,
            "batch_size": args.batch_size, "optimizer": "SGD, Nesterov", "lr": args.lr, "momentum": args.momentum,
            "weight_decay": args.weight_decay, "schedule": "cosine to 0, stepped per epoch",
            "augmentation": f"random crop, zero padding {args.padding}, horizontal flip",
            "normalize": "mean 0.5, std 0.5", "limit_per_class": args.limit, "seed": args.seed}


def load_splits(args, log):
    """The training and validation splits, decoded once and cached in ``args.cache_dir``."""
    splits = []
    for split, limit in (("train", args.limit), ("val", None)):
        name = f"tinyimagenet-{split}-{args.size}px{f'-limit{limit}' if limit else ''}.npz"
        try:
            dataset = ZipImageDataset(args.data, split, args.size, limit_per_class=limit,
                                      cache_path=args.cache_dir / name)
        except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as error:
            raise UsageError(str(error)) from None
        log(f"{split}: {dataset.report}; {len(dataset.classes)} classes")
        for item in dataset.skipped[:10]:
            log(f"  skipped {item.path}: {item.reason}")
        if len(dataset.skipped) > 10:
            log(f"  ... and {len(dataset.skipped) - 10} more")
        splits.append(dataset)
    train, val = splits
    if list(train.classes) != list(val.classes):
        raise UsageError(f"{args.data!r}: the train and val splits have different classes")
    if len(train) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(train)} training images")
    return train, val


def make_model(num_classes: int, device: str):
    net = resnet18(num_classes, head="linear")
    net.to(device)
    net.set_input_grad(False)  # the images need no gradient
    return net


def make_optimizer(net, args):
    return optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True,
                     weight_decay=args.weight_decay)


def measure_speed(args, train_loader, val_loader, num_classes: int) -> dict:
    """Images per second of the loader alone, of a training step alone, and of evaluation.

    The step is timed on a throwaway network (so the one that is trained
    starts untouched), on a real augmented batch already on the device,
    after two warm-up steps; the loader prepares batches with its threads
    and nothing consumes them.  Training runs at most at the slower of the two.
    """
    net = make_model(num_classes, args.device)
    optimizer = make_optimizer(net, args)
    loss_fn = nn.CrossEntropyLoss()
    batches = train_loader.iter_from(0)
    x, y = next(batches)
    batches.close()
    x, y = backend.to_device(x, args.device), backend.to_device(y, args.device)

    def step():
        optimizer.zero_grad()
        loss_fn(net(x), y)
        net.backward(loss_fn.backward())
        optimizer.step()

    for _ in range(2):
        step()
    backend.synchronize(x)
    steps, started = 0, time.perf_counter()
    while steps < 3 or (steps < 20 and time.perf_counter() - started < 3.0):
        step()
        steps += 1
    backend.synchronize(x)
    step_rate = steps * len(y) / (time.perf_counter() - started)

    net.eval()
    batches = val_loader.iter_from(0)
    xv, _ = next(batches)
    batches.close()
    xv = backend.to_device(xv, args.device)
    with no_grad():
        net(xv)
        backend.synchronize(xv)
        started = time.perf_counter()
        for _ in range(2):
            net(xv)
        backend.synchronize(xv)
    eval_rate = 2 * len(xv) / (time.perf_counter() - started)
    return {"loader_images_per_second": train_loader.throughput(20), "step_images_per_second": step_rate,
            "eval_images_per_second": eval_rate, "batch_size": len(y), "image_size": args.size}


class DeadlineCosine(optim.CosineAnnealingLR):
    """Cosine annealing to 0 over ``T_max`` epochs, shortened when the epochs left no longer fit a deadline.

    The probe before training plans ``T_max`` from a few batches; on a
    machine shared with other work the epochs can then run slower.  After
    every epoch, the epochs that still fit before ``deadline`` (a
    ``time.perf_counter()`` value) at the pace of the longest epoch so far are
    counted, the rule :func:`tinynet.train.fit` uses to stop; if fewer remain
    than the schedule has left, ``T_max`` is cut so that the rate still
    reaches 0 at the last epoch that fits, and ``on_change(T_max)`` is called
    (to record it for a resumed run).  ``T_max`` never grows; past it the
    rate stays at 0.
    """

    def __init__(self, optimizer, T_max: int, deadline: float | None = None, on_change=None):
        super().__init__(optimizer, T_max)
        self.deadline, self.on_change = deadline, on_change
        self.epoch_began, self.longest_epoch = time.perf_counter(), 0.0
        self.agree = None  # with --distributed: rank 0's decision, the same on every rank

    def _lr(self, base_lr, epoch):
        return super()._lr(base_lr, min(epoch, self.T_max))

    def step(self) -> None:
        now = time.perf_counter()
        self.longest_epoch = max(self.longest_epoch, now - self.epoch_began)
        self.epoch_began = now
        if self.deadline is not None:
            done = self.last_epoch + 1
            fits = done + max(0, int((self.deadline - now) // self.longest_epoch))
            if self.agree is not None:
                fits = self.agree(fits)
            if fits < self.T_max:
                self.T_max = max(fits, 1)
                if self.on_change is not None:
                    self.on_change(self.T_max)
        super().step()


def plan_epochs(args, speed: dict, train_items: int, val_items: int, seconds_left: float | None, log) -> int:
    """How many epochs to anneal over: ``--epochs``, or fewer when the time budget holds fewer."""
    epoch_seconds = train_items / speed["step_images_per_second"] + val_items / speed["eval_images_per_second"]
    log(f"one epoch: about {epoch_seconds / 60:.1f} minutes ({train_items:,} training images at "
        f"{speed['step_images_per_second']:.0f} img/s, {val_items:,} validation images at "
        f"{speed['eval_images_per_second']:.0f} img/s)")
    if seconds_left is None:
        return args.epochs
    fits = int(PLAN_MARGIN * seconds_left // epoch_seconds)
    if fits < 1:
        raise UsageError(f"--time-budget {args.time_budget:g} minutes holds no epoch: one takes about "
                         f"{epoch_seconds / 60:.1f} minutes here; raise the budget, or lower --limit or --size")
    epochs = min(args.epochs, fits)
    log(f"time budget {args.time_budget:g} minutes: {fits} epochs fit; training {epochs}, the learning rate "
        f"annealed over {epochs}")
    return epochs


#: The options a plan records, and a bare ``--resume`` takes from it: the recipe's, and where the data is.
PLAN_OPTIONS = ("epochs", "size", "batch_size", "lr", "momentum", "weight_decay", "padding", "limit", "seed", "data")


def write_plan(out: pathlib.Path, args, epochs: int) -> None:
    """Record the epochs the learning rate is annealed over, for ``--resume`` (atomically: a kill keeps the old)."""
    options = {name: getattr(args, name) for name in PLAN_OPTIONS}
    options["data"] = str(pathlib.Path(args.data).resolve())
    write_json(out / PLAN_FILE, {"epochs": epochs, "recipe": recipe(args), "options": options})


def given_options(parser, argv) -> set:
    """The destinations of the options written on the command line ``argv`` (not those left at their default)."""
    import argparse

    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def restore_options(args, given: set) -> None:
    """With ``--resume``: take the options of the run in ``--out`` from its plan, refusing any given that differ.

    Called before anything is decoded or written.  Every option of
    :data:`PLAN_OPTIONS` not on the command line takes the plan's value; those
    on it must equal the plan's, and all that do not are named in one
    :class:`UsageError`.  A plan written before options were recorded
    restores nothing (its recipe is still compared by :func:`resumed_plan`).
    """
    path = pathlib.Path(args.out) / PLAN_FILE
    if not (args.resume and path.is_file()):
        return
    plan = _read_plan(path)
    options = plan.get("options")
    if not isinstance(options, dict):
        return
    differ = []
    for name in PLAN_OPTIONS:
        if name not in options:
            continue
        value = getattr(args, name)
        if name not in given:
            setattr(args, name, options[name])
        elif (str(pathlib.Path(value).resolve()) if name == "data" else value) != options[name]:
            differ.append(f"{name} = {options[name]!r}, this one has {value!r}")
    if differ:
        raise UsageError(f"--resume: the run in {str(args.out)!r} was started with {'; '.join(differ)}; leave these "
                         f"options out to continue it as it was started, or start a new run without --resume")


def _read_plan(path: pathlib.Path) -> dict:
    try:
        plan = json.loads(path.read_bytes()[:1 << 20])  # a plan is a few hundred bytes
        valid = (isinstance(plan, dict) and isinstance(plan.get("recipe"), dict)
                 and isinstance(plan.get("epochs"), int) and plan["epochs"] >= 1)
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        valid, plan = False, error
    if not valid:
        raise UsageError(f"--resume: {str(path)!r} is damaged (expected a JSON object with the planned epochs "
                         f"and the recipe); delete it to plan the schedule again from --epochs")
    return plan


def resumed_plan(args, out: pathlib.Path) -> int | None:
    """The epochs planned by the run in ``out`` that ``--resume`` continues (None: nothing to resume)."""
    path = out / PLAN_FILE
    if not (args.resume and path.exists()):
        return None
    plan = _read_plan(path)
    differ = [f"{key} = {plan['recipe'].get(key)!r}, this one has {value!r}" for key, value in recipe(args).items()
              if plan["recipe"].get(key) != value]
    if differ:
        raise UsageError(f"--resume: the run in {str(out)!r} was started with {'; '.join(differ)}")
    return int(plan["epochs"])


def run(args, log=print, *, fit=None, measure_speed=None) -> dict:
    """Pretrain as ``args`` say; returns the summary written beside the weights.

    A new run never writes into another run's folder: with ``--out`` holding
    one, it takes ``OUT-2``, ``OUT-3``, ... and says so
    (:func:`tinynet.cli.claim_output_folder`); ``--resume`` continues ``--out``.
    ``fit`` and ``measure_speed`` replace :func:`tinynet.train.fit` and
    :func:`measure_speed` (the tests' seams).
    """
    with contextlib.ExitStack() as held:
        return _run(args, log, held, fit or globals()["fit"], measure_speed or globals()["measure_speed"])


def _run(args, log, held, fit, measure_speed) -> dict:
    started = time.perf_counter()
    check_args(args)
    comm = distributed.setup(args, UsageError)  # None without --distributed
    is_main = comm is None or comm.is_main
    log = log if is_main else (lambda *a, **k: None)
    out = pathlib.Path(args.out)
    if is_main:  # rank 0 alone writes in the output folder: it holds the folder, and alone tidies it
        out, moved = claim_output_folder(out, {"checkpoint.npz", PLAN_FILE}, resume=args.resume, keep=held)
        args.out = str(out)
        if moved:
            log(moved)
        for path in remove_stale_temporaries(out, {"checkpoint.npz", PLAN_FILE}):
            log(f"removed {path}, a temporary file left by a run that was killed while writing")
        for path in remove_abandoned_partials(args.cache_dir):  # the cache folder may be shared: dead pids only
            log(f"removed {path}, a half-written image cache left by a run that was killed while writing it")
    args.save = args.save or out / f"resnet18-tinyimagenet-{args.size}px.npz"
    manual_seed(args.seed)
    if not is_main:  # rank 0 decodes the photos and writes the cache; the others then read it
        comm.barrier(timeout=math.inf)
    if is_main:  # a refused --resume is refused before any image is decoded or any cache written
        resumed_plan(args, out)
    train, val = load_splits(args, log)
    if comm is not None and is_main:
        comm.barrier(timeout=math.inf)
    classes = list(train.classes)
    # What the run trains and validates on, recorded in every checkpoint: --resume refuses other images.
    data_identity = {"train": dataset_identity(train), "val": dataset_identity(val)}
    if comm is not None:  # every rank must have been started for this job: same classes, images and recipe
        distributed.check_same_job(comm, {"its classes": classes, "its training images (--data)":
                                          data_identity["train"]["digest"], "its validation images (--data)":
                                          data_identity["val"]["digest"],
                                          **{f"--{k.replace('_', '-')}": v for k, v in recipe(args).items()}},
                                   error=UsageError)
    crop_flip = functools.partial(random_crop_flip_batch, padding=args.padding)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, seed=args.seed,
                              batch_transform=crop_flip, drop_last=True)  # a batch of 1 would break BatchNorm
    val_loader = DataLoader(val, batch_size=256)
    if comm is not None:  # each rank's share of every batch; the speeds below are the ranks' sums
        train_loader = distributed.DistributedLoader.wrap(train_loader, comm)
        val_loader = distributed.DistributedLoader.wrap(val_loader, comm)

    epochs = resumed_plan(args, out)  # before the measurement: a refused --resume is refused at once
    run_extra = {"model": "resnet18-pretrain", "classes": classes, "seed": args.seed, "recipe": recipe(args)}
    if args.resume and (out / "checkpoint.npz").exists():  # other data, or a damaged checkpoint: refused now
        check_checkpoint(out / "checkpoint.npz", expect=run_extra, data=data_identity,
                         batches_per_epoch=len(train_loader))
    # Alone on the machine: the cores other programs leave free, given back while they need them (with
    # --distributed the ranks share the cores: tinynet.distributed.setup divides them).
    governor = start_threads(args.threads, log) if comm is None else None
    speed = measure_speed(args, train_loader, val_loader, len(classes))
    if comm is not None:
        keys = ("loader_images_per_second", "step_images_per_second", "eval_images_per_second")
        speed.update(zip(keys, comm.sum_numbers([speed[k] for k in keys])), ranks=comm.size)
    ratio = speed["loader_images_per_second"] / speed["step_images_per_second"]
    log(f"speed at {args.size}x{args.size}, batch {args.batch_size}, on {args.device}: training step "
        f"{speed['step_images_per_second']:,.0f} img/s, data pipeline alone {speed['loader_images_per_second']:,.0f} "
        f"img/s ({ratio:,.0f}x the step: "
        f"{'it never starves the step' if ratio > 2 else 'it limits training'}), evaluation "
        f"{speed['eval_images_per_second']:,.0f} img/s")
    deadline = started + args.time_budget * 60 if args.time_budget else None
    if epochs is None:
        epochs = plan_epochs(args, speed, len(train_loader) * args.batch_size, len(val),
                             deadline - time.perf_counter() if deadline else None, log)
        if comm is not None:
            epochs = comm.agree(epochs)
        if is_main:
            write_plan(out, args, epochs)
    else:
        log(f"resuming the run in {out}: its learning rate is annealed over {epochs} epoch{'s' if epochs != 1 else ''}")

    def shortened(epochs):
        log(f"time budget: the epochs run slower than measured; the learning rate is now annealed over "
            f"{epochs} epochs")
        if is_main:
            write_plan(out, args, epochs)

    manual_seed(args.seed)  # the same initial weights whatever the measurement drew
    net = make_model(len(classes), args.device)
    optimizer = make_optimizer(net, args)
    if comm is not None:  # SyncBatchNorm (optional), rank 0's weights, gradients averaged over the ranks
        net, optimizer = distributed.prepare(net, optimizer, comm, args.sync_batchnorm)
    scheduler = DeadlineCosine(optimizer, epochs, deadline, on_change=shortened)
    if comm is not None:
        scheduler.agree = comm.agree
    log(f"model: ResNet18, {sum(p.size for p in net.parameters()):,} parameters, on {args.device}; {epochs} "
        f"epoch{'s' if epochs != 1 else ''} "
        f"of {len(train_loader)} batches of {args.batch_size}, SGD Nesterov lr {args.lr} cosine, weight decay "
        f"{args.weight_decay}, crop (padding {args.padding}) and flip")
    history = fit(net, optimizer, nn.CrossEntropyLoss(), train_loader, val_loader, epochs, device=args.device,
                  scheduler=scheduler, checkpoint_path=out / "checkpoint.npz", resume=args.resume,
                  progress=not args.no_progress and is_main,
                  extra=run_extra, data_identity=data_identity,
                  log=log, time_budget=deadline - time.perf_counter() if deadline else None,
                  distributed=distributed.FitHooks(comm) if comm is not None else None, threads=governor)
    if not is_main:  # rank 0 checks and writes the weights and the summary
        return {}
    for epoch in history.epochs:
        if not math.isfinite(epoch.val_loss):
            raise FailedRun(f"the validation loss of epoch {epoch.epoch} is {epoch.val_loss}: the model's outputs "
                            f"are not finite numbers, so no weights or accuracy are reported")

    save_weights(net.state_dict(), args.save)
    last = history.epochs[-1]
    summary = {
        "weights": str(args.save),
        "about": "ResNet18 (torchvision layout) pretrained with tinynet on Tiny-ImageNet-188; fc.* is the "
                 "188-class layer, which train_resnet.py --pretrained leaves out",
        "data": {"source": str(pathlib.Path(args.data).resolve()), "train_images": len(train),
                 "val_images": len(val), "classes": len(classes)},
        "recipe": recipe(args),
        "epochs": len(history.epochs),
        "planned_epochs": epochs,
        "annealed_over_epochs": scheduler.T_max,
        "stopped_by_time_budget": len(history.epochs) < epochs,
        "val_top1": last.val_acc,
        "val_top5": last.val_top5,
        "train_minutes": sum(e.seconds for e in history.epochs) / 60,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "speed": speed,
        "train_images_per_second": float(np.mean([e.images_per_second for e in history.epochs])),
        "history": history.to_dict(),
        "hardware": hardware(args.device),
        "world_size": comm.size if comm is not None else 1,  # processes that trained (--distributed)
        "threads": backend.num_threads(),
        "estimated_training_seconds": history.estimated_seconds,  # fit's up-front estimate, from timed steps
        "classes": classes,
    }
    write_json(args.save.with_suffix(".json"), summary)
    top5 = f", top-5 {100 * last.val_top5:.1f} %" if last.val_top5 is not None else ""
    done = len(history.epochs)
    log(f"validation after {done} epoch{'s' if done != 1 else ''}: top-1 {100 * last.val_acc:.1f} %{top5}")
    log(f"weights written to {args.save} (and {args.save.with_suffix('.json').name}); fine-tune with\n"
        f"  tinynet train --model resnet --data PHOTOS --pretrained {args.save}")
    log(f"total time {summary['wall_minutes'] * 60:.0f} s on {summary['threads']} CPU thread{'s' if summary['threads'] != 1 else ''}")
    return summary


def main(argv=None, prog: str = "pretrain_resnet.py", *, fit=None, measure_speed=None) -> int:
    """Command-line entry point; returns the exit status (``fit``, ``measure_speed``: see :func:`run`)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    backend.keep_freed_host_memory()  # glibc keeps freed arrays for reuse: ~10 % of a step (see its docstring)

    def job():
        restore_options(args, given_options(build_parser(prog), argv))
        run(args, fit=fit, measure_speed=measure_speed)

    status = run_command(parser.prog, job)
    return distributed.world().finish(status)  # with --distributed, an error on one rank stops them all
