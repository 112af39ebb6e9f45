"""The ``tinynet`` command (tinynet.commands): subcommands, evaluate, and the messages of issue 24."""
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tinynet import experiment
from tinynet.commands import main
from tinynet.data import digits_dataset, stratified_split
from tinynet.predict import find_images

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK = ["--model", "cnn", "--limit", "12", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
         "--no-progress"]


def call(capsys, *args):
    try:
        status = main([str(a) for a in args])
    except SystemExit as stop:  # argparse's --help and errors
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CNN trained for one epoch by ``tinynet train``, and a labelled folder of digits (class-named folders)."""
    base = tmp_path_factory.mktemp("command")
    assert main(["train", *QUICK, "--out", str(base / "run")]) == 0
    data = digits_dataset(size=32)
    for label in range(10):
        folder = base / "labelled" / data.classes[label]
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(data.labels == label)[:3]):
            Image.fromarray(data.images([i])[0]).save(folder / f"img{k}.png")
    return base / "run", base / "labelled"


def test_console_script_and_python_m_list_the_subcommands():
    for command in ([str(ROOT / ".venv" / "bin" / "tinynet")], [sys.executable, "-m", "tinynet"]):
        if not pathlib.Path(command[0]).exists():
            pytest.skip("the console script is not installed (pip install -e .)")
        result = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        for name in ("train", "pretrain", "predict", "evaluate", "export"):
            assert f"  {name} " in result.stdout


def test_unknown_subcommand_is_one_line_exit_2(capsys):
    status, _, err = call(capsys, "fit")
    assert status == 2 and err.startswith("tinynet: error: unknown command 'fit'") and len(err.splitlines()) == 1


@pytest.mark.parametrize("model, own", [("cnn", "--softmax-before-loss"), ("resnet", "--pretrained")])
def test_train_help_has_model_and_the_models_own_options(capsys, model, own):
    status, out, _ = call(capsys, "train", "--model", model, "--help")
    assert status == 0 and "--model {cnn,resnet}" in out and own in out and "--limit" in out
    assert f"at least {experiment.MIN_PER_CLASS_MANY} per class" in " ".join(out.split())


def test_every_subcommand_has_help(capsys):
    for name in ("pretrain", "predict", "evaluate", "export"):
        status, out, _ = call(capsys, name, "--help")
        assert status == 0 and out.startswith(f"usage: tinynet {name}"), name


def test_train_writes_a_run_with_threads_estimate_and_total_time(trained, capsys):
    run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "cnn" and metrics["threads"] >= 1
    assert metrics["estimated_training_seconds"] is not None and metrics["estimated_training_seconds"] > 0


def test_train_logs_estimate_plural_and_total(tmp_path, capsys):
    status, out, err = call(capsys, "train", *QUICK, "--out", tmp_path / "run")
    assert status == 0, err
    assert "estimate: " in out and "1 epoch, batch" in out and "1 epochs" not in out
    assert "total time" in out and ("CPU threads" in out or "on 1 CPU thread\n" in out)


def test_minimum_per_class_constants_match_the_split():
    for classes, minimum in ((experiment.CLASSES_FEW, experiment.MIN_PER_CLASS_FEW),
                             (10, experiment.MIN_PER_CLASS_MANY), (50, experiment.MIN_PER_CLASS_MANY)):
        assert experiment.minimum_per_class(classes) == minimum
        stratified_split(np.repeat(np.arange(classes), minimum))
        with pytest.raises(ValueError):
            stratified_split(np.repeat(np.arange(classes), minimum - 1))


def test_limit_below_the_minimum_is_our_own_one_line_error(tmp_path, capsys):
    status, _, err = call(capsys, "train", *[a if a != "12" else "4" for a in QUICK], "--out", tmp_path / "run")
    assert status == 2, err  # before: scikit-learn's text inside a long message
    assert err.strip() == ("tinynet train: error: --limit 4 is too few: the stratified 70/20/10 split of 10 classes "
                           "needs at least 10 images per class")


def test_resume_of_a_finished_run_says_nothing_is_left(trained, tmp_path, capsys):
    import shutil

    run, _ = trained
    shutil.copytree(run, tmp_path / "run")
    status, out, err = call(capsys, "train", *QUICK, "--out", tmp_path / "run", "--resume")
    assert status == 0, err
    assert "all 1 epoch already trained" in out and "continuing at epoch 2 of 1" not in out


def test_evaluate_gives_accuracy_f1_table_matrix_and_report(trained, tmp_path, capsys):
    run, labelled = trained
    status, out, err = call(capsys, "evaluate", "--weights", run / "best.safetensors", labelled,
                            "--out", tmp_path / "eval", "--no-progress")
    assert status == 0, err
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["images"] == 30 and set(result["test"]["per_class"]) == {str(k) for k in range(10)}
    assert f"Accuracy: {100 * result['test']['accuracy']:.1f} %" in out and "weighted F1" in out
    assert "precision" in out and (tmp_path / "eval" / "confusion_matrix.png").is_file()
    assert (tmp_path / "eval" / "report.html").is_file()
    # predict on the same folders prints the same accuracy
    status, _, err = call(capsys, "predict", "--weights", run / "best.safetensors", labelled, "--no-progress")
    assert status == 0 and f"accuracy {100 * result['test']['accuracy']:.1f} %" in err, err
    assert "30 images classified" in err


def test_evaluate_refuses_folders_that_are_not_the_models_classes(trained, tmp_path, capsys):
    run, _ = trained
    (tmp_path / "data" / "cat").mkdir(parents=True)
    status, _, err = call(capsys, "evaluate", "--weights", run / "best.safetensors", tmp_path / "data",
                          "--out", tmp_path / "eval")
    assert status == 2 and "sub-folders cat are not among the model's 10 classes" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_an_onnx_file_given_to_weights_suggests_onnx(tmp_path, capsys, command):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "data").mkdir()
    status, _, err = call(capsys, command, "--weights", tmp_path / "model.onnx", tmp_path / "data")
    assert status == 2 and f"run it with --onnx {tmp_path / 'model.onnx'}" in err and len(err.splitlines()) == 1


def test_one_image_classified_is_singular(trained, capsys):
    run, labelled = trained
    status, _, err = call(capsys, "predict", "--weights", run / "best.safetensors", labelled / "3" / "img0.png",
                          "--no-progress")
    assert status == 0 and "1 image classified, 0 skipped" in err, err


def test_folders_are_listed_in_natural_order(tmp_path):
    for name in ("img10.png", "img2.png", "img1.png"):
        (tmp_path / name).write_bytes(b"")
    files, _ = find_images([tmp_path])
    assert [pathlib.Path(f).name for f in files] == ["img1.png", "img2.png", "img10.png"]


# ---------------------------------------------------------------------------
# tinynet pretrain --resume: the recipe comes from plan.json
# ---------------------------------------------------------------------------
from test_resume_midstep import PRETRAIN, archive  # noqa: E402,F401 (a fixture)


def fake_speed(args, train_loader, val_loader, num_classes):
    return {"loader_images_per_second": 1000.0, "step_images_per_second": 100.0, "eval_images_per_second": 300.0,
            "batch_size": args.batch_size, "image_size": args.size}


def test_pretrain_bare_resume_continues_and_refusals_list_every_difference(archive, tmp_path, capsys,  # noqa: F811
                                                                           monkeypatch):
    from tinynet.commands import pretrain

    out = tmp_path / "out"
    first = [*PRETRAIN[:1], "1", *PRETRAIN[2:]]  # 1 epoch of the 2-epoch recipe's options
    assert pretrain.main(["--data", str(archive), "--out", str(out), *first], measure_speed=fake_speed) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["options"]["lr"] == 0.01 and plan["options"]["batch_size"] == 8
    capsys.readouterr()
    # A bare --resume: every option from the plan (before: the defaults, batch 128, refused after decoding)
    assert pretrain.main(["--out", str(out), "--resume"], measure_speed=fake_speed) == 0
    output = capsys.readouterr().out
    assert "all 1 epoch already trained" in output and "annealed over 1 epoch" in output and "1 epochs" not in output
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(pretrain, "load_splits", lambda *a: pytest.fail("decoded before the refusal"))
    status = pretrain.main(["--out", str(out), "--resume", "--lr", "0.5", "--seed", "3", "--data", str(archive)],
                           measure_speed=fake_speed)
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "lr = 0.01, this one has 0.5" in err and "seed = 0, this one has 3" in err and "data" not in err.split(
        "started with")[1].split(";")[0], err
    assert sorted(p.name for p in out.iterdir()) == before


def test_checkpoint_refusal_names_every_changed_setting(tmp_path, capsys):
    from fault_inject import call_main, image_folder

    data = image_folder(tmp_path / "data")
    quick = ["--data", data, "--out", tmp_path / "out", "--epochs", "1", "--batch-size", "7", "--image-size", "16",
             "--no-progress"]
    assert call_main(capsys, "cnn", *quick)[0] == 0
    status, _, err = call_main(capsys, "cnn", *quick, "--lr", "0.002", "--augment", "--resume")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "its lr is 0.001, this run's is 0.002" in err and "its augment is False, this run's is True" in err


# ---------------------------------------------------------------------------
# export: the same parser and errors as the other subcommands
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--weights", "a.safetensors", "--out", "b.onnx", "--bogus"], "unrecognized arguments: --bogus (see --help)"),
    ([], "the following arguments are required: --weights, --out (see --help)"),
])
def test_export_option_errors_are_one_line_like_every_subcommand(capsys, args, message):
    """Before: plain argparse printed its usage line first, and no "(see --help)"."""
    status, out, err = call(capsys, "export", *args)
    assert status == 2 and out == "" and err == f"tinynet export: error: {message}\n", err


def test_export_bad_paths_are_one_line_errors(capsys, tmp_path):
    status, _, err = call(capsys, "export", "--weights", tmp_path / "missing.safetensors", "--out", tmp_path / "m.onnx")
    assert status == 2 and err == f"tinynet export: error: model file {str(tmp_path / 'missing.safetensors')!r} " \
                                  f"does not exist\n", err
    status, _, err = call(capsys, "export", "--weights", tmp_path / "m.safetensors", "--out", tmp_path)
    assert status == 2 and err.startswith(f"tinynet export: error: --out {str(tmp_path)!r} is a folder"), err
    assert not list(tmp_path.iterdir())


def test_export_help_is_a_description_not_a_docstring(capsys):
    status, out, _ = call(capsys, "export", "--help")
    assert status == 0 and "``" not in out and "Export the weights of a training run" in " ".join(out.split())


# ---------------------------------------------------------------------------
# --threads on predict and evaluate, as on train
# ---------------------------------------------------------------------------
@pytest.fixture
def thread_counts(monkeypatch):
    """The thread counts tinynet.cores set (recorded, not applied: the test process keeps its threads)."""
    import tinynet.cores

    counts = []
    monkeypatch.setattr(tinynet.cores, "set_threads", counts.append)
    return counts


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_threads_bad_value_is_a_one_line_error(trained, tmp_path, capsys, thread_counts, command):
    """Before: "unrecognized arguments: --threads many"."""
    run, labelled = trained
    status, _, err = call(capsys, command, "--weights", run / "best.safetensors", labelled, "--threads", "many",
                          "--out" if command == "evaluate" else "--top-k", tmp_path / "eval" if command == "evaluate"
                          else 1)
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err == f"tinynet {command}: error: --threads: expected 'auto' or a number of threads, got 'many'\n"
    assert thread_counts == [] and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("how", ["option", "environment"])
def test_threads_n_is_given_to_the_thread_governor(trained, tmp_path, capsys, thread_counts, monkeypatch, command,
                                                   how):
    run, labelled = trained
    if how == "environment":
        monkeypatch.setenv("TINYNET_THREADS", "1")
    threads = ["--threads", "1"] if how == "option" else []
    data, extra = (labelled, ["--out", tmp_path / "eval"]) if command == "evaluate" else (labelled / "3", [])
    status, out, err = call(capsys, command, "--weights", run / "best.safetensors", data, *threads, *extra,
                            "--no-progress")
    assert status == 0, err
    assert thread_counts == [1]
    if command == "evaluate":
        assert "threads: 1 CPU thread (--threads 1)" in out
        result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
        assert result["threads_setting"] == "1" and result["config"]["threads"] == "1"
    else:
        assert "3 images classified, 0 skipped; 1 CPU thread (--threads 1)" in err


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_auto_threads_look_at_the_machine_after_every_batch(trained, tmp_path, capsys, thread_counts, monkeypatch,
                                                            command):
    """As in training, "auto" can give cores back during a long prediction (ThreadGovernor.tick per batch)."""
    import tinynet.cores

    run, labelled = trained
    ticks = []
    monkeypatch.setattr(tinynet.cores.ThreadGovernor, "tick", lambda self: ticks.append(self.mode))
    extra = ["--out", tmp_path / "eval"] if command == "evaluate" else []
    status, _, err = call(capsys, command, "--weights", run / "best.safetensors", labelled, "--batch-size", 4,
                          "--threads", "auto", *extra, "--no-progress")
    assert status == 0, err
    assert ticks == ["auto"] * 8  # 30 images in batches of 4
    assert len(thread_counts) == 1


# ---------------------------------------------------------------------------
# predict --onnx --device cuda: onnxruntime's CUDA provider, never CuPy (issue 22, defect 6)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    run, _ = trained
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", "--weights", str(run / "best.safetensors"), "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_onnx_on_cuda_without_the_cuda_provider_says_so_not_cupy(exported, trained, tmp_path, capsys, monkeypatch,
                                                                   command):
    """Before: "device 'cuda' needs CuPy, which could not be imported", though onnxruntime never uses CuPy."""
    import onnxruntime

    _, labelled = trained
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    extra = ["--out", tmp_path / "eval"] if command == "evaluate" else []
    status, _, err = call(capsys, command, "--onnx", exported, "--device", "cuda", labelled, *extra)
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "CuPy" not in err and "cupy" not in err, err
    assert ("--device cuda with --onnx runs the graph on onnxruntime's CUDAExecutionProvider, which this "
            f"onnxruntime ({onnxruntime.__version__}) does not have (it has CPUExecutionProvider); install the "
            "onnxruntime-gpu package in its place, or leave out --device to run on the CPU") in err


class _FakeSessions:
    """onnxruntime.InferenceSession recorded: the providers and threads asked for; runs on the CPU, and says it
    got the providers in ``started``."""

    def __init__(self, onnxruntime, started):
        self.asked, self.threads, self.real, self.started = [], [], onnxruntime.InferenceSession, started

    def __call__(self, path, sess_options=None, providers=None, **kwargs):
        self.asked.append(list(providers))
        self.threads.append(sess_options.intra_op_num_threads if sess_options is not None else None)
        session = self.real(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)
        started = self.started

        class Session:
            def __getattr__(self, name):
                return getattr(session, name)

            def get_providers(self):
                return [p for p in providers if p in started]
        return Session()


@pytest.mark.parametrize("starts", [True, False])
def test_onnx_on_cuda_asks_onnxruntime_for_its_cuda_provider(exported, trained, capsys, monkeypatch, starts):
    """With a CUDA-capable onnxruntime the session is asked for CUDAExecutionProvider (CuPy absent or not); a
    provider that does not start is refused in one line (before: onnxruntime ran the graph on the CPU, with a warning)."""
    import onnxruntime

    _, labelled = trained
    available = onnxruntime.get_available_providers()
    sessions = _FakeSessions(onnxruntime, ["CUDAExecutionProvider", "CPUExecutionProvider"] if starts else available)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    monkeypatch.setattr(onnxruntime, "InferenceSession", sessions)
    status, _, err = call(capsys, "predict", "--onnx", exported, "--device", "cuda", labelled / "3", "--no-progress")
    assert sessions.asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    if starts:
        assert status == 0 and "3 images classified" in err, err
    else:
        assert status == 2 and len(err.splitlines()) == 1, err
        assert "CUDAExecutionProvider did not start" in err


def test_onnx_threads_set_onnxruntimes_pool(exported, trained, capsys, monkeypatch, thread_counts):
    """--threads N reaches onnxruntime's intra-op pool (before: checked, then ignored); auto leaves its default."""
    import onnxruntime

    _, labelled = trained
    sessions = _FakeSessions(onnxruntime, ["CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", sessions)
    for threads in ("1", "auto"):
        status, _, err = call(capsys, "predict", "--onnx", exported, labelled / "3", "--threads", threads,
                              "--no-progress")
        assert status == 0, err
    assert sessions.threads == [1, 0] and thread_counts == []  # 0: onnxruntime's own default
    status, _, err = call(capsys, "predict", "--onnx", exported, labelled / "3", "--threads", "0")
    assert status == 2 and "--threads: expected 'auto' or a number of threads from 1 to 1024, got 0" in err


# ---------------------------------------------------------------------------
# evaluate: an evaluation's report, class folders at any depth
# ---------------------------------------------------------------------------
def test_evaluate_report_is_an_evaluations_page_with_file_names(trained, tmp_path, capsys):
    """Before: the training page's headings (split 0 / 0 / 30, "0 epochs", "last epoch's weights", an empty "Data"
    section) and no file names under the mistakes."""

    run, labelled = trained
    status, _, err = call(capsys, "evaluate", "--weights", run / "best.safetensors", labelled, "--out", tmp_path / "e",
                          "--no-progress")
    assert status == 0, err
    page = (tmp_path / "e" / "report.html").read_text(encoding="utf-8")
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert "<h1>tinynet evaluation: best.safetensors on " in page and "without training" in page
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", page)  # an embedded image may spell a word by chance
    for training_only in ("tinynet run", "epoch", "split", "Training", "<h2>Data</h2>", "Features", "Test set"):
        assert training_only not in text, training_only
    assert "Confusion matrix (the evaluated folder)" in page and "Per class (the evaluated folder)" in page
    matrix = np.array(result["test"]["confusion_matrix"])
    mistakes = min(16, int(matrix.sum() - np.trace(matrix)))
    files = re.findall(r"<span class='source'>([^<]*)</span>", page)
    assert page.count("predicted: ") == mistakes == len(files)
    assert all(re.fullmatch(r"\d/img\d\.png", name) for name in files), files


def test_evaluate_takes_the_class_from_the_class_folder_at_any_depth(trained, tmp_path, capsys):
    """Before: an image in labelled/3/more/ was given the class of "more" (not a class): a ValueError traceback."""
    import shutil

    run, labelled = trained
    shutil.copytree(labelled, tmp_path / "data")
    (tmp_path / "data" / "3" / "more").mkdir()
    shutil.copy(labelled / "3" / "img0.png", tmp_path / "data" / "3" / "more" / "again.png")
    status, _, err = call(capsys, "evaluate", "--weights", run / "best.safetensors", tmp_path / "data",
                          "--out", tmp_path / "e", "--no-progress")
    assert status == 0, err
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["images"] == 31 and result["test"]["per_class"]["3"]["support"] == 4
