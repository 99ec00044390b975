"""The `synq` command: argument handling, errors and exit codes, a tiny end-to-end run on
sklearn's digits, save / reload, resume."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from synq import cli
from synq.io import load_quantized

TEACHER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn
    from synq.data.digits import digits_datasets

    _CACHE = {}

    def model():
        """A small BatchNorm CNN trained on digits for a few seconds (cached per process)."""
        if "m" not in _CACHE:
            torch.manual_seed(0)
            net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
            x, y = digits_datasets()[0].tensors
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            g = torch.Generator().manual_seed(0)
            for _ in range(15):
                for idx in torch.randperm(len(y), generator=g).split(64):
                    opt.zero_grad()
                    nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                    opt.step()
            _CACHE["m"] = net.eval()
        return _CACHE["m"]

    def test_set():
        return digits_datasets()[1]

    def not_a_model():
        return 42

    def raises_key_error(**kwargs):
        raise KeyError("no such checkpoint entry")

    def returns_none():
        return None
''')

FT_TINY = ["--image-shape", "1,8,8", "--epochs", "2", "--calib-epochs", "1",
           "--iters-per-epoch", "4", "--batch-size", "32", "--no-progress", "--device", "cpu"]
SYNTH_TINY = ["--synth-num-images", "64", "--synth-batch-size", "32", "--synth-steps", "10"]
TINY = FT_TINY + SYNTH_TINY


@pytest.fixture
def digits_module(tmp_path, monkeypatch):
    (tmp_path / "digits_teacher.py").write_text(TEACHER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "digits_teacher"


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert "synq" in capsys.readouterr().out
    for sub in ("quantize", "synthesize", "finetune", "evaluate", "export", "bench"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0


def test_every_hyper_parameter_is_an_option():
    text = cli.build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    for flag in ("--tau", "--lambda-cam", "--lambda-ce", "--d0", "--kd-temperature",
                 "--kd-alpha", "--no-lowpass", "--no-cam", "--no-hard-soft-labels",
                 "--synth-beta", "--synth-gamma", "--synth-steps", "--backend", "--seed",
                 "--wbits", "--abits", "--resume", "--model", "--test-set", "--device"):
        assert flag in text, flag


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--wbits", "9"], "wbits must be"),
    (["quantize", "--abits", "1"], "abits must be"),
    (["quantize", "--tau", "1.5"], "tau"),
    (["quantize", "--tau", "0"], "tau"),
    (["quantize", "--d0", "-1"], "d0"),
    (["quantize", "--epochs", "0"], "epochs must be a positive integer"),
    (["quantize", "--synth-steps", "0"], "steps must be a positive integer"),
    (["quantize", "--threads", "0"], "--threads"),
    (["quantize", "--wbits", "four"], "invalid int value"),
    (["quantize", "--backend", "gpu"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    # found late (after the float evaluation) or not at all, before
    (["quantize", "--seed", "-1"], "--seed must be"),
    (["quantize", "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
    (["quantize", "--device", "meta"], "--device must be cpu, cuda or cuda:N"),
    (["quantize", "--momentum", "1"], "--momentum must lie in [0, 1)"),
    (["quantize", "--model-kwargs", "[1]"], "expected a JSON object"),
    (["quantize", "--model-kwargs", "{bad"], "expected a JSON object"),
    (["quantize", "--image-shape", "1,28"], "expected three positive integers C,H,W"),
    (["quantize", "--image-shape", "1,0,28"], "expected three positive integers C,H,W"),
    # an option of a component that is switched off used to be ignored without a word
    (["quantize", "--no-cam", "--lambda-cam", "5"], "--lambda-cam has no effect with --no-cam"),
    (["quantize", "--no-lowpass", "--d0", "5"], "--d0 has no effect with --no-lowpass"),
    (["quantize", "--fa-weight", "5"], "--fa-weight has no effect with --no-feature-attention"),
    (["synthesize", "--synth-aug-prob", "0.9"],
     "--synth-aug-prob has no effect with --no-synth-augment"),
])
def test_bad_option_values_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_backend_that_cannot_run_on_the_device_exits_2(capsys):
    """It used to fail (exit 1) only when fine-tuning started, after the synthesis."""
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--backend", "cuda", "--device", "cpu"])
    assert e.value.code == 2 and "--backend cuda cannot run on --device cpu" in \
        capsys.readouterr().err


def test_missing_synthetic_file_exits_1(tmp_path, digits_module, capsys):
    code = cli.main(["finetune", "--model", f"{digits_module}:model", "--data",
                     str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")] + FT_TINY)
    assert code == 1
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_missing_weights_and_bad_model(tmp_path, digits_module, capsys):
    assert cli.main(["evaluate", "--model", "resnet20", "--weights", str(tmp_path / "w.pt"),
                     "--test-set", "digits"]) == 1
    assert "w.pt does not exist" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", "no_such_module_xyz:f", "--test-set", "digits"]) == 1
    assert "cannot import module" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--model", f"{digits_module}:not_a_model", "--test-set", "digits"])
    assert e.value.code == 2
    assert "not an nn.Module" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--model", "resnet20", "--test-set", "digits"])
    assert e.value.code == 2 and "--weights" in capsys.readouterr().err


def test_user_functions_that_fail(tmp_path, digits_module, monkeypatch, capsys):
    """--model / --test-set functions that raise anything print one line naming the function
    (a KeyError used to end in a traceback); one that returns None is not 'no test set'; a
    module that fails on import is named."""
    monkeypatch.setattr(cli.log, "handlers", [])
    assert cli.main(["evaluate", "--model", f"{digits_module}:raises_key_error",
                     "--test-set", "digits"]) == 1
    err = capsys.readouterr().err
    assert f"{digits_module}:raises_key_error raised KeyError" in err and "Traceback" not in err
    assert cli.main(["evaluate", "--model", f"{digits_module}:model",
                     "--test-set", f"{digits_module}:returns_none"]) == 1
    assert "returns_none returned None" in capsys.readouterr().err
    (tmp_path / "broken_module.py").write_text("x = undefined_name\n")
    assert cli.main(["evaluate", "--model", "broken_module:f", "--test-set", "digits"]) == 1
    err = capsys.readouterr().err
    assert "importing module 'broken_module'" in err and "NameError" in err


def test_weights_errors_are_short_and_exact(tmp_path, capsys):
    """--weights with the bundled model used to be ignored; a state dict of another
    architecture printed every key (hundreds of lines); a folder 'did not exist'."""
    from synq.models import resnet20
    sd = tmp_path / "sd.pt"
    torch.save(resnet20(10, 1).state_dict(), sd)
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--weights", str(sd), "--test-set", "digits"])
    assert e.value.code == 2 and "the bundled model comes with its own" in \
        capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4, 2))
               .state_dict(), other)
    assert cli.main(["evaluate", "--model", "resnet20", "--weights", str(other),
                     "--test-set", "digits"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "missing key(s) (conv1.weight" in err and "in all)" in err
    assert "4 unexpected key(s) (0.weight" in err and "in_channels" not in err
    assert cli.main(["evaluate", "--model", "resnet20", "--weights", str(sd),
                     "--test-set", "digits"]) == 1  # only the input channels differ
    err = capsys.readouterr().err
    assert "1 shape mismatch(es) (conv1.weight (16, 1, 3, 3) in the file" in err
    assert """'{"in_channels": 1}'""" in err
    assert cli.main(["evaluate", "--model", "resnet20", "--weights", str(tmp_path),
                     "--test-set", "digits"]) == 1
    assert "is a folder, not a state dict file" in capsys.readouterr().err


def test_unknown_cam_layer_fails_before_synthesis(tmp_path, digits_module, monkeypatch,
                                                  capsys):
    import synq.synth

    def never(*a, **k):
        raise AssertionError("synthesis ran")

    monkeypatch.setattr(synq.synth, "synthesize", never)
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--model", f"{digits_module}:model", "--test-set", "none",
                  "--cam-layer", "nosuch", "--out", str(tmp_path / "r")] + TINY)
    assert e.value.code == 2 and "--cam-layer 'nosuch' is not a module" in \
        capsys.readouterr().err


def test_out_that_is_a_file_exits_2(tmp_path, digits_module, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--model", f"{digits_module}:model", "--test-set", "none",
                  "--out", str(tmp_path / "f")] + TINY)
    assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_folders_where_files_are_expected(tmp_path, digits_module, capsys):
    """`synthesize --out DIR` said "[Errno 21] Is a directory", `finetune --data DIR` that DIR
    "does not exist"."""
    with pytest.raises(SystemExit) as e:
        cli.main(["synthesize", "--model", f"{digits_module}:model", "--image-shape", "1,8,8",
                  "--out", str(tmp_path)] + SYNTH_TINY)
    assert e.value.code == 2 and "synthesize writes one file" in capsys.readouterr().err
    assert cli.main(["finetune", "--model", f"{digits_module}:model", "--data", str(tmp_path),
                     "--out", str(tmp_path / "o")] + FT_TINY) == 1
    assert "is a folder: give the synthetic set file" in capsys.readouterr().err


def test_test_set_of_another_image_shape_is_warned(digits_module, caplog):
    """--image-shape (or the bundled model's 28x28) and a test set of other images (digits,
    8x8) ran on without a word, to a chance-level accuracy."""
    from digits_teacher import model
    from synq.data.digits import digits_datasets
    args = cli.build_parser().parse_args(["quantize", "--image-shape", "1,28,28"])
    with caplog.at_level("WARNING", logger="synq"):
        assert cli._image_shape(args, None, digits_datasets()[1], model()) == (1, 28, 28)
    assert "the test set's images are 1,8,8 but the synthetic ones will be 1,28,28" in \
        caplog.text
    caplog.clear()
    args = cli.build_parser().parse_args(["quantize", "--image-shape", "1,8,8"])
    with caplog.at_level("WARNING", logger="synq"):
        cli._image_shape(args, None, digits_datasets()[1], model())
    assert "warning" not in caplog.text


def test_diverged_synthesis_exits_1(tmp_path, digits_module, monkeypatch, capsys):
    """NaN images used to be saved as a finished set (exit 0), to fail later in fine-tuning."""
    import synq.synth
    monkeypatch.setattr(synq.synth, "synthesize", lambda *a, **k: {
        "images": torch.full((4, 1, 8, 8), float("nan")), "labels": torch.zeros(4)})
    monkeypatch.setattr(cli.log, "handlers", [])
    assert cli.main(["synthesize", "--model", f"{digits_module}:model", "--image-shape",
                     "1,8,8", "--out", str(tmp_path / "s.pt")] + SYNTH_TINY) == 1
    assert "synthesis diverged: 4 of 4 images" in capsys.readouterr().err


@pytest.mark.parametrize("command,hint", [("synthesize", "run the same command again"),
                                          ("evaluate", None)])
def test_interrupt_message_fits_the_command(command, hint, tmp_path, digits_module,
                                            monkeypatch, capsys):
    """`synq synthesize` has no --resume (it resumes by itself), evaluate nothing to resume:
    the message used to tell both to add --resume."""
    import synq.evaluate
    import synq.synth

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synq.synth, "synthesize", interrupted)
    monkeypatch.setattr(synq.evaluate, "evaluate", interrupted)
    argv = {"synthesize": ["--image-shape", "1,8,8", "--out", str(tmp_path / "s.pt")]
                          + SYNTH_TINY,
            "evaluate": ["--test-set", "digits"]}[command]
    assert cli.main([command, "--model", f"{digits_module}:model"] + argv) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "interrupted" in err
    assert hint is None or hint in err


def test_model_that_cannot_be_quantized(tmp_path, monkeypatch, capsys):
    (tmp_path / "conv3d_model.py").write_text(
        "from torch import nn\n"
        "def model():\n"
        "    return nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2), nn.ReLU())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main(["finetune", "--model", "conv3d_model:model", "--data", __file__,
                     "--out", str(tmp_path / "o")] + FT_TINY)
    assert code == 1
    err = capsys.readouterr().err
    assert "synq: error:" in err


def test_quantize_end_to_end_on_digits(tmp_path, digits_module, capsys):
    out = tmp_path / "run"
    argv = ["quantize", "--model", f"{digits_module}:model", "--test-set",
            f"{digits_module}:test_set", "--out", str(out), "--wbits", "8", "--abits", "8"] + TINY
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| float |" in printed and "W8A8 SynQ" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["float"]["top1"] > 80
    assert summary["quantized"]["top1"] > 50, summary["quantized"]  # chance is 10%
    for name in ("model.safetensors", "model.json", "log.txt", "synthetic.pt", "checkpoint.pt"):
        assert (out / name).is_file(), name
    # the weights as readable as the JSON beside them (safetensors wrote them 0600)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == \
        (out / "model.json").stat().st_mode & 0o777
    assert summary["environment"]["torch"] == torch.__version__

    # the saved model reloads with one call and gives the reported accuracy
    model = load_quantized(out)
    from digits_teacher import test_set
    from synq.evaluate import evaluate
    assert evaluate(model, test_set())["top1"] == pytest.approx(summary["quantized"]["top1"])
    x = test_set().tensors[0][:16]
    assert torch.equal(model(x), load_quantized(out)(x))

    # a second run into the same folder must not silently overwrite it ...
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "--resume" in capsys.readouterr().err
    # ... and --resume picks the finished run up again with the same result
    assert cli.main(argv + ["--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["quantized"]["top1"] == summary["quantized"]["top1"]
    # ... but not with other options: at once, naming them (it used to fail after the float
    # evaluation printing two config dicts, or after the synthesis saying "resume=False")
    for extra, message in ((["--lr", "1e-4"], "--lr 3e-05 then, 0.0001 now"),
                           (["--synth-steps", "11"], "--synth-steps 10 then, 11 now")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv + ["--resume"] + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err

    # the stage commands read and write the same files
    assert cli.main(["evaluate", "--quantized", str(out), "--test-set",
                     f"{digits_module}:test_set", "--no-progress"]) == 0
    assert f"{summary['quantized']['top1']:.2f}" in capsys.readouterr().out
    # without --test-set the saved model's metadata decides: not the bundled model, so no
    # default test set (it used to take Fashion-MNIST, from --model's default)
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--quantized", str(out), "--no-progress"])
    assert e.value.code == 2 and "needs a test set" in capsys.readouterr().err

    # export to integer layers: saved, reloadable, accuracy reported beside the fake-quantized
    assert cli.main(["export", "--quantized", str(out), "--test-set",
                     f"{digits_module}:test_set", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| integer (exported) |" in printed
    report = json.loads((out / "int" / "export.json").read_text())
    assert abs(report["integer"]["top1"] - report["fake_quantized"]["top1"]) < 1.0
    from synq.deploy import load_int
    assert load_int(out / "int")(x).shape == (16, 10)
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--quantized", str(out), "--input-range", "zero"])
    assert e.value.code == 2
    # the exported model evaluates like the saved one (it used to be "model.json is missing")
    assert cli.main(["evaluate", "--quantized", str(out / "int"), "--test-set",
                     f"{digits_module}:test_set"]) == 0
    assert f"| integer (exported) | {report['integer']['top1']:.2f} |" in \
        capsys.readouterr().out
    # --quantized DIR/model.json exports to DIR/int (it used to try DIR/model.json/int)
    import shutil
    shutil.rmtree(out / "int")
    assert cli.main(["export", "--quantized", str(out / "model.json")]) == 0
    assert (out / "int" / "int_model.json").is_file()
    with pytest.raises(SystemExit) as e:  # (it failed after the export, "[Errno 17]")
        cli.main(["export", "--quantized", str(out), "--out", str(out / "model.json")])
    assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    # another file than the model's: named (it used to name a missing DIR/model.json)
    assert cli.main(["evaluate", "--quantized", str(out / "synthetic.pt"),
                     "--test-set", "digits"]) == 1
    assert "synthetic.pt is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_and_export_run_on_cuda(tmp_path, digits_module, capsys):
    """The README's main job (W4A4 synthesis and fine-tuning) and the export, on a GPU with a
    tiny budget: every stage runs there, and the exported model agrees with the
    fake-quantized one."""
    out = tmp_path / "run"
    tiny = [a if a != "cpu" else "cuda" for a in TINY]
    argv = ["quantize", "--model", f"{digits_module}:model", "--test-set",
            f"{digits_module}:test_set", "--out", str(out)] + tiny
    assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantized"]["top1"] > 20, summary["quantized"]  # chance is 10%
    assert cli.main(["export", "--quantized", str(out), "--test-set",
                     f"{digits_module}:test_set", "--no-progress", "--device", "cuda"]) == 0
    report = json.loads((out / "int" / "export.json").read_text())
    assert abs(report["integer"]["top1"] - report["fake_quantized"]["top1"]) < 2.0, report


def test_export_of_bundled_model_fixes_the_input_range():
    """The bundled model's inputs are normalized [0, 1] pixels: its export quantizes the first
    layer on that fixed grid (results do not depend on the batch); other models keep the
    per-batch range unless --input-range is given."""
    from synq.data import normalize_images
    lo, hi = cli.bundled_input_range({"model": {"source": "bundled"}})
    px = normalize_images(torch.tensor([[[0, 255]]], dtype=torch.uint8))
    assert lo == pytest.approx(float(px.min()), abs=1e-6)
    assert hi == pytest.approx(float(px.max()), abs=1e-6)
    assert cli.bundled_input_range({"model": {"source": "registry"}}) is None
    assert cli.bundled_input_range({}) is None


def test_interrupt_exits_130_and_says_resume(tmp_path, digits_module, monkeypatch, capsys):
    import synq.finetune

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synq.finetune, "finetune", interrupted)
    argv = ["quantize", "--model", f"{digits_module}:model", "--test-set", "none",
            "--out", str(tmp_path / "r")] + TINY
    assert cli.main(argv) == 130
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["bundled", "callable"])
def test_evaluate_quantized_default_test_set_follows_saved_model(source, monkeypatch, capsys):
    """`synq evaluate --quantized DIR` picks its default test set from the saved model's
    metadata, as `synq export` does, not from --model (whose default is the bundled model)."""
    import synq.io
    from synq.data.digits import digits_datasets
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model.meta = {"model": {"source": source}}
    monkeypatch.setattr(synq.io, "load_quantized", lambda path, device="cpu": model)
    real, seen = cli.load_test_set, []

    def spy(args):
        seen.append(args.model)
        return digits_datasets()[1] if args.model == "default" else real(args)

    monkeypatch.setattr(cli, "load_test_set", spy)
    argv = ["evaluate", "--quantized", "saved", "--no-progress", "--device", "cpu"]
    if source == "bundled":
        assert cli.main(argv) == 0
        assert seen == ["default"] and "| quantized |" in capsys.readouterr().out
    else:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and "needs a test set" in capsys.readouterr().err
        assert seen == ["other"]


@pytest.mark.parametrize("error", [
    FloatingPointError("epoch 3 diverged: the loss is nan"),
    PermissionError(13, "Permission denied", "/read-only/checkpoint.pt")])
def test_run_time_errors_exit_1_with_one_line(error, tmp_path, digits_module, monkeypatch,
                                              capsys):
    """A diverged epoch (FloatingPointError) and an OSError other than FileNotFoundError
    print `synq: error: ...` and exit 1, without a traceback."""
    import synq.finetune
    import synq.synth

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(synq.synth, "synthesize", lambda *a, **k: None)
    monkeypatch.setattr(synq.finetune, "finetune", fail)
    # a console handler of this test's stderr (an earlier test's would write to a closed one)
    monkeypatch.setattr(cli.log, "handlers", [])
    argv = ["quantize", "--model", f"{digits_module}:model", "--test-set", "none",
            "--out", str(tmp_path / "r")] + TINY
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"synq: error: {error}" in err and "Traceback" not in err, err


def test_console_script_entry_point():
    """`python -m synq` is the same program as the installed `synq` command."""
    r = subprocess.run([sys.executable, "-m", "synq", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("synq ")


def test_clear_errors_for_common_mistakes(tmp_path, capsys):
    """An unknown model name, a weights file that is not a state dict or does not fit the
    model, an image shape the model cannot take: each a one-line error naming the cause."""
    from synq.models import resnet20
    garbage, whole, sd = tmp_path / "garbage.pt", tmp_path / "whole.pt", tmp_path / "sd.pt"
    garbage.write_text("not a checkpoint")
    torch.save(resnet20(10, 1), whole)
    torch.save(resnet20(10, 1).state_dict(), sd)
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--model", "resnet21", "--weights", str(sd), "--test-set",
                  "digits"])
    assert e.value.code == 2 and "unknown --model 'resnet21'" in capsys.readouterr().err
    for path, message in ((garbage, "cannot read weights file"),
                          (whole, "holds pickled Python objects"),
                          (sd, "do not fit --model resnet20")):
        assert cli.main(["evaluate", "--model", "resnet20", "--weights", str(path),
                         "--test-set", "digits"]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert cli.main(["evaluate", "--model", "resnet20", "--model-kwargs", '{"in_channels": 1}',
                     "--weights", str(sd), "--test-set", "digits"]) == 0  # the hint's fix
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["synthesize", "--image-shape", "3,28,28", "--out", str(tmp_path / "s.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has 3 channel(s), but the model's first convolution takes 1" \
        in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "--device", "cuda", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_saved_files_take_the_umask(tmp_path):
    """write_saved gives the weights (which safetensors writes 0600) the mode of the JSON
    beside them, 0666 less the umask, without changing the process's umask (os.umask is
    process-wide: not thread-safe). A child process, so as not to touch this one's."""
    code = textwrap.dedent(f"""
        import os, torch
        os.umask(0o027)
        from synq.io import write_saved, read_saved
        write_saved({str(tmp_path)!r}, "m", {{"w": torch.arange(3.)}}, {{"format": "f"}})
        assert os.umask(0o027) == 0o027  # unchanged
        for name in ("m.safetensors", "m.json"):
            print(name, oct(os.stat(os.path.join({str(tmp_path)!r}, name)).st_mode & 0o777))
        meta, state = read_saved({str(tmp_path)!r}, "m", "f", "test")
        assert torch.equal(state["w"], torch.arange(3.)) and meta["format"] == "f"
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["m.safetensors", "0o640", "m.json", "0o640"], r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_ctrl_c_while_importing_exits_130_without_traceback():
    """The entry point (synq._entry) imports the command, torch with it, inside its handler:
    Ctrl-C in that first half-second gives one line and exit status 130. The interrupt is
    raised by an import hook on synq.cli, in a child process."""
    code = textwrap.dedent("""
        import sys
        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "synq.cli":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupt())
        from synq._entry import main
        sys.exit(main(["--version"]))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr.strip() == "synq: interrupted", (r.returncode,
                                                                             r.stderr)
    r = subprocess.run([sys.executable, "-m", "synq", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "synq" in r.stdout + r.stderr, (r.stdout, r.stderr)


def test_saved_file_mode_not_taken_from_a_leftover_tmp(tmp_path):
    """A `.tmp` left by an interrupted save (safetensors writes it 0600) must not pass its
    mode on to the next save: the weights get the JSON's mode."""
    from synq.io import write_saved
    left = tmp_path / "m.safetensors.tmp"
    left.write_bytes(b"partial")
    left.chmod(0o600)
    write_saved(tmp_path, "m", {"w": torch.arange(3.)}, {"format": "f"})
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["m.safetensors"] == modes["m.json"] and set(modes) == {"m.safetensors",
                                                                        "m.json"}, modes
