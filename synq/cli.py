"""The `synq` command: zero-shot quantization end to end, its stages, and the benchmarks.

    synq quantize      synthesize, fine-tune with SynQ, evaluate, save (defaults: the bundled
                       Fashion-MNIST ResNet-20 at W4A4 on a budget that runs in minutes on a CPU)
    synq synthesize    only the synthetic calibration set
    synq finetune      only the fine-tuning, from a synthetic set file
    synq evaluate      top-1 / top-5 of a float or a saved quantized model on a test set
    synq export        a saved quantized model as integer layers (synq.deploy)
    synq bench         the kernel benchmarks

Exit codes: 0 success, 1 a run-time error (missing file, model that cannot be quantized),
2 a bad command line, 130 interrupted (continue with --resume).

Several GPUs or machines: start the same command under torchrun
(`torchrun --nproc_per_node=N -m synq quantize ...`); see synq.distributed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import platform
import sys
import time
import typing
from pathlib import Path

import torch

from . import __version__, distributed
from .filters import PAPER_D0, PAPER_SIZE, scaled_d0

log = logging.getLogger("synq")

# The default budget of `synq quantize`: 512 images x 200 steps; 34 epochs x 24 iterations
# of batch 64, lr 3e-5. Chosen on 2,000 held-out training images, seeds 0-4, by rules
# written before the runs (benchmarks/results/tune_default/): the ablation's budget (17
# epochs) over the earlier 256 x 150 / 6 epochs at lr 1e-5 (mean 93.10 against 92.54), then
# twice its fine-tuning (93.50 against 93.10). On this project's 2-core CPU the run on the
# bundled model takes about 2 minutes. The paper's budget (5,120 images x 1,000 steps,
# 100 x 200 iterations) is a flag away.
QUICK_SYNTH = {"num_images": 512, "batch_size": 256, "steps": 200}
QUICK_FINETUNE = {"epochs": 34, "calib_epochs": 1, "iters_per_epoch": 24, "batch_size": 64,
                  "lr": 3e-5, "d0": None}


class UsageError(Exception):
    """A bad option value found after parsing (exit code 2)."""


# ------------------------------------------------------------------------------------------
# options generated from the config dataclasses, so every hyper-parameter is a flag

def _parse_optional(kind):
    def parse(text):
        return None if text.lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _parse_pair(text):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'lo,hi', got {text!r}")
    return (lo, hi)


def _parse_json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"num_classes\": 100}}', got {text!r} ({e})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"num_classes\": 100}}', got {text!r}")
    return value


def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W (such as "
                                         f"1,28,28), got {text!r}")
    return shape


def _add_dataclass_options(parser, cls, prefix: str, dest_prefix: str, defaults: dict,
                           skip=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = dest_prefix + f.name
        default = defaults.get(f.name, f.default)
        hint = hints[f.name]
        text = f"(default: {default})"
        if f.name == "d0" and default is None:
            text = f"(default: {PAPER_D0:g} scaled from {PAPER_SIZE}px to the image size)"
        if hint is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=default, help=text)
            continue
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint)
        if hint is tuple or base is tuple:
            kind = _parse_pair
        elif type(None) in args:
            kind = _parse_optional(base)
        else:
            kind = base
        parser.add_argument(flag, dest=dest, type=kind, default=default, metavar=f.name.upper(),
                            help=text)


def _collect(args, cls, dest_prefix: str, skip=()):
    return cls(**{f.name: getattr(args, dest_prefix + f.name)
                  for f in dataclasses.fields(cls) if f.name not in skip})


# ------------------------------------------------------------------------------------------
# model and data

def _add_model_options(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="'default' (the bundled Fashion-MNIST ResNet-20), a registry name "
                        "(resnet20, resnet18, resnet50, mobilenet_v2; needs --weights), or "
                        "'module:function' returning an nn.Module")
    g.add_argument("--model-kwargs", default={}, type=_parse_json_object,
                   help="JSON keyword arguments for the registry model or the function")
    g.add_argument("--weights", help="state dict (.safetensors or .pt) to load into the model")
    g.add_argument("--image-shape", type=_parse_shape, metavar="C,H,W",
                   help="C,H,W of one input image (default: the bundled model's, or the test "
                        "set's)")


def _add_test_options(p):
    p.add_argument("--test-set", default=None,
                   help="fashion-mnist, digits, none, or 'module:function' returning a Dataset "
                        "or an (x, y) pair (default: fashion-mnist for the bundled model, none "
                        "otherwise)")


def _add_run_options(p):
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_model(args):
    """(float model in eval mode, model spec for reloading, default image shape or None)."""
    from . import io
    if args.model == "default":
        if args.weights:  # (they used to be ignored without a word)
            raise UsageError("--weights is for a registry model or a 'module:function' one "
                             "(--model); the bundled model comes with its own weights")
        from .assets import DEFAULT_TEACHER, load_default_teacher
        model, meta = load_default_teacher()
        return model, {"source": "bundled", "name": DEFAULT_TEACHER}, tuple(meta["input_size"])
    if ":" in args.model:
        model = io.call_target(args.model, args.model_kwargs)
        spec = {"source": "callable", "target": args.model, "kwargs": args.model_kwargs}
    else:
        from .models import MODELS, get_model
        if args.model not in MODELS:
            raise UsageError(f"unknown --model {args.model!r}: give 'default' (the bundled "
                             f"model), one of {', '.join(sorted(MODELS))} (with --weights), or "
                             f"'module:function' returning an nn.Module")
        if not args.weights:
            raise UsageError(f"--model {args.model} is an untrained architecture: give its "
                             f"pre-trained weights with --weights")
        model = get_model(args.model, **args.model_kwargs)
        spec = {"source": "registry", "name": args.model, "kwargs": args.model_kwargs}
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {args.model} returned {type(model).__name__}, not an "
                         f"nn.Module")
    if args.weights:
        state = _load_state(args.weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # missing / unexpected keys, shape mismatches
            why, channels = _state_mismatch(model, state)
            hint = (f"; a {channels}-channel model needs --model-kwargs "
                    f"'{{\"in_channels\": {channels}}}'" if channels else "")
            raise RuntimeError(f"the weights in {args.weights} do not fit --model {args.model}"
                               f" (--model-kwargs {json.dumps(args.model_kwargs)}{hint}): "
                               f"{why or str(e).strip().splitlines()[0]}") from e
    return model.eval(), spec, None


def _state_mismatch(model, state: dict, shown: int = 3) -> tuple[str, int | None]:
    """One line on how `state` differs from the model's state dict (torch's message lists
    every key: hundreds of lines for another architecture), and the input channels of the
    file's first convolution where only they differ from the model's (else None)."""
    own = model.state_dict()

    def few(items):
        more = f", ... ({len(items)} in all)" if len(items) > shown else ""
        return ", ".join(items[:shown]) + more

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
              for k in own if k in state and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [f"{len(items)} {what} ({few(items)})" for what, items in (
        ("missing key(s)", missing), ("unexpected key(s)", unexpected),
        ("shape mismatch(es)", shapes)) if items]
    first = next((k for k, v in own.items() if v.dim() == 4), None)
    channels = None
    if first is not None and first in state and hasattr(state[first], "shape"):
        got, want = tuple(state[first].shape), tuple(own[first].shape)
        if len(got) == 4 and got[1] != want[1] and got[:1] + got[2:] == want[:1] + want[2:]:
            channels = got[1]
    return "; ".join(parts), channels


def _load_state(path):
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights file {p} does not exist")
    if not p.is_file():
        raise ValueError(f"--weights {p} is a folder, not a state dict file (.safetensors or "
                         f".pt)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise ValueError(f"cannot read weights file {p} as a torch.save state dict: "
                             f"{e}") from e
        raise ValueError(f"weights file {p} holds pickled Python objects (a whole model saved "
                         f"with torch.save(model)?), which synq does not unpickle: save "
                         f"model.state_dict() instead, or give the model itself with --model "
                         f"module:function") from e
    except Exception as e:  # a damaged or foreign file: unpickling raises many kinds
        raise ValueError(f"cannot read weights file {p} as a "
                         f"{'safetensors' if p.suffix == '.safetensors' else 'torch.save'} "
                         f"state dict: {type(e).__name__}: {e}") from e
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"weights file {p} holds a {type(state).__name__}, not a state dict "
                         f"(save model.state_dict())")
    return state


def load_test_set(args):
    from . import io
    name = args.test_set
    if name is None:
        name = "fashion-mnist" if args.model == "default" else "none"
    if name == "none":
        return None
    if name == "fashion-mnist":
        from .data.fashion_mnist import fashion_mnist_dataset
        return fashion_mnist_dataset("test")
    if name == "digits":
        from .data.digits import digits_datasets
        return digits_datasets()[1]
    if ":" in name:
        data = io.call_target(name)
        if data is None:  # (it used to read as "no test set")
            raise ValueError(f"--test-set {name} returned None, not a Dataset or an (x, y) "
                             f"pair of tensors")
        return data
    raise UsageError(f"--test-set must be fashion-mnist, digits, none or module:function, "
                     f"got {name!r}")


def _image_shape(args, default, test_set, model):
    if args.image_shape:
        shape = tuple(args.image_shape)
    elif default:
        shape = tuple(default)
    elif test_set is not None:
        x = test_set[0][0] if not isinstance(test_set, (tuple, list)) else test_set[0][0]
        shape = tuple(x.shape)
    else:
        raise UsageError("give --image-shape C,H,W (no bundled model or test set to read it "
                         "from)")
    from .synth import channel_mismatch
    why = channel_mismatch(model, shape)
    if why:
        raise UsageError(why)
    if test_set is not None and (args.image_shape or default):
        try:
            seen = tuple(test_set[0][0].shape)
        except Exception:  # noqa: BLE001 - a test set without indexing: nothing to compare
            seen = shape
        if seen != shape:  # (e.g. the bundled 28x28 model on --test-set digits, 8x8)
            log.warning("warning: the test set's images are %s but the synthetic ones will be "
                        "%s (%s): is --test-set the model's?", ",".join(map(str, seen)),
                        ",".join(map(str, shape)),
                        "--image-shape" if args.image_shape else "the bundled model's")
    return shape


# ------------------------------------------------------------------------------------------
# the commands

def _setup_run(out_dir: Path | None, args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--out {out_dir} is a file, not a folder")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the output folder {out_dir}: "
                          f"{e.strerror or e}") from e
    if out_dir is not None and distributed.is_main():  # one writer of log.txt
        handler = logging.FileHandler(out_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.synq_run = True  # removed when the command ends
        log.addHandler(handler)
    log.info("synq %s: synq %s", __version__, " ".join(args.argv))
    if distributed.is_distributed():
        log.info("%d processes (torchrun), %s backend", distributed.world_size(),
                 torch.distributed.get_backend())


def _check_quantizable(model, cfg) -> None:
    """Fail before any long stage when the model holds a layer the quantizer cannot take, or
    has no module named --cam-layer."""
    from .quant import quantize_model
    quantize_model(model, cfg.wbits, cfg.abits)
    if cfg.use_cam and cfg.cam_layer is not None:
        names = [n for n, _ in model.named_modules() if n]
        if cfg.cam_layer not in names:  # (fine-tuning said so only after the synthesis)
            convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
            raise UsageError(f"--cam-layer {cfg.cam_layer!r} is not a module of the model "
                             f"(its last convolutions: {', '.join(convs[-3:]) or 'none'})")


def _environment(device: str) -> dict:
    env = {"synq": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": device, "threads": torch.get_num_threads(),
           "processes": distributed.world_size()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    import synq_kernels
    env["backends"] = synq_kernels.available_backends("fake_quant", torch.device(device).type)
    return env


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def _synth_config(args):
    from .synth import SynthConfig
    return dataclasses.replace(_collect(args, SynthConfig, "synth_", skip=("seed",)),
                               seed=args.seed)


def cmd_synthesize(args, model=None, out_file=None):
    from . import synth
    if model is None:
        model, _, default_shape = load_model(args)
        test_set = None if args.image_shape or default_shape else load_test_set(args)
        shape = _image_shape(args, default_shape, test_set, model)
        out_file = Path(args.out)
        if out_file.is_dir():
            raise UsageError(f"--out {out_file} is a folder: synthesize writes one file "
                             f"(such as {out_file / 'synthetic.pt'})")
        _setup_run(out_file.parent, args)
    else:
        shape = args._image_shape
    cfg = _synth_config(args)
    model = model.to(args.device)
    t0 = time.time()
    saved = synth.synthesize(model, out_file, shape, config=cfg, device=args.device,
                             progress=not args.no_progress)
    images = saved.get("images") if isinstance(saved, dict) else None
    bad = 0 if images is None else sum(  # in chunks: the set may be gigabytes
        int((~torch.isfinite(c).flatten(1).all(1)).sum()) for c in images.split(256))
    if bad:  # (it used to be saved as a finished set, to fail in fine-tuning)
        raise FloatingPointError(
            f"synthesis diverged: {bad} of {len(images)} images in {out_file} hold "
            f"inf / NaN; lower --synth-lr (now {cfg.lr:g}) or keep --synth-keep-best, and "
            f"delete {out_file} (or choose another --out) before running again")
    log.info("synthetic set: %s (%d images, %.0f s)", out_file, cfg.num_images, time.time() - t0)
    return out_file


def _finetune_config(args, image_shape=None):
    """The FinetuneConfig of the command line. d0 left unset scales SynQ's 80 at 224x224 to
    the image size (80 barely filters a 28x28 image: its smallest gain is above 0.96)."""
    from . import finetune
    cfg = _collect(args, finetune.FinetuneConfig, "ft_", skip=("seed", "backend", "d0"))
    d0 = args.ft_d0
    if d0 is None:
        shape = image_shape or getattr(args, "_image_shape", None)
        d0 = scaled_d0(shape) if shape else PAPER_D0
    return dataclasses.replace(cfg, seed=args.seed, backend=args.backend, d0=float(d0))


def cmd_finetune(args, model=None, spec=None, data=None, test_set=None, out_dir=None):
    from . import finetune, io
    standalone = model is None
    if standalone:
        model, spec, _ = load_model(args)
        test_set = load_test_set(args)
        data = Path(args.data)
        if data.is_dir():
            raise ValueError(f"--data {data} is a folder: give the synthetic set file in it "
                             f"(`synq quantize` writes synthetic.pt)")
        if not data.is_file():
            raise FileNotFoundError(f"synthetic set {data} does not exist (make it with "
                                    f"`synq synthesize`)")
        _check_quantizable(model, _finetune_config(args))
        from .synth import load_synthetic
        try:
            args._image_shape = tuple(load_synthetic(data).tensors[0].shape[1:])
        except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
            raise ValueError(f"{data} is not a synthetic set written by `synq synthesize` "
                             f"({type(e).__name__}: {e})") from e
        out_dir = Path(args.out)
        _guard_out_dir(out_dir, args.resume, ("checkpoint.pt", "model.json"))
        if args.resume:
            _check_resume(out_dir, ft_cfg=_finetune_config(args))
        _setup_run(out_dir, args)
    cfg = _finetune_config(args)
    t0 = time.time()
    result = finetune.finetune(model.to(args.device), str(data), cfg, eval_data=test_set,
                               checkpoint=out_dir / "checkpoint.pt", resume=args.resume,
                               device=args.device, progress=not args.no_progress)
    if distributed.is_main():
        io.save_quantized(result.student, out_dir, spec,
                          extra={"finetune_config": cfg.to_dict(), "test_top1": result.top1})
    log.info("fine-tuned in %.0f s; saved %s", time.time() - t0, out_dir)
    if standalone and result.top1 is not None and distributed.is_main():
        print(f"quantized top-1 {result.top1:.2f}% (top-5 {result.top5:.2f}%, n={result.n})")
    return result


def _flag(key: str, prefix: str = "") -> str:
    return "--" + ("" if key in ("seed", "backend") else prefix) + key.replace("_", "-")


def _check_resume(out_dir: Path, synth_cfg=None, ft_cfg=None) -> None:
    """With --resume: refuse at once, naming the options, when the files in --out were written
    with other settings than this command line's. (Synthesis found out only after the float
    evaluation and printed two whole config dicts; fine-tuning only after the synthesis, with
    "its config differs; delete it or pass resume=False", a Python argument.)"""
    import zipfile

    from .synth import _config_dict
    checks = []
    if synth_cfg is not None:
        checks.append((out_dir / "synthetic.pt", _config_dict(synth_cfg), "synth-"))
    if ft_cfg is not None:
        checks.append((out_dir / "checkpoint.pt", ft_cfg.to_dict(), ""))
    for path, now, prefix in checks:
        if not path.is_file():
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False,
                               mmap=zipfile.is_zipfile(path))
            then = saved["meta"]["config"]
        except Exception:  # noqa: BLE001 - unreadable: the stage itself says what is wrong
            continue
        diffs = [f"{_flag(k, prefix)} {then.get(k)!r} then, {v!r} now"
                 for k, v in now.items() if then.get(k) != v]
        if diffs:
            raise UsageError(f"--resume: {path} was written with other options ("
                             f"{'; '.join(diffs)}): resume with the options it was written "
                             f"with, or choose another --out")


def _guard_out_dir(out_dir: Path, resume: bool, markers) -> None:
    found = [m for m in markers if (out_dir / m).exists()]
    if found and not resume:
        raise UsageError(f"{out_dir} already holds a run ({', '.join(found)}): pass --resume to "
                         f"continue it, or choose another --out")


def cmd_quantize(args):
    from .evaluate import evaluate
    t_start = time.time()
    out_dir = Path(args.out)
    _guard_out_dir(out_dir, args.resume, ("synthetic.pt", "checkpoint.pt", "summary.json"))
    _setup_run(out_dir, args)
    model, spec, default_shape = load_model(args)
    _check_quantizable(model, _finetune_config(args))
    test_set = load_test_set(args)
    args._image_shape = _image_shape(args, default_shape, test_set, model)
    if args.resume:
        _check_resume(out_dir, _synth_config(args), _finetune_config(args))
    model = model.to(args.device)
    fp = evaluate(model, test_set, args.device) if test_set is not None else None
    if fp:
        log.info("float top-1 %.2f%%", fp["top1"])
    data = cmd_synthesize(args, model, out_dir / "synthetic.pt")
    result = cmd_finetune(args, model, spec, data, test_set, out_dir)
    cfg = _finetune_config(args)
    rows = [("float", fp), (f"W{cfg.wbits}A{cfg.abits} SynQ",
                            {"top1": result.top1, "top5": result.top5, "n": result.n}
                            if result.top1 is not None else None)]
    summary = {
        "command": ["synq"] + args.argv, "model": spec, "test_set": args.test_set or (
            "fashion-mnist" if args.model == "default" else "none"),
        "synth_config": _synth_config(args).validate().__dict__,
        "finetune_config": cfg.to_dict(), "environment": _environment(args.device),
        "float": fp, "quantized": rows[1][1], "wall_time_s": round(time.time() - t_start, 1),
        "output": str(out_dir),
    }
    if not distributed.is_main():
        return summary
    _write_json(out_dir / "summary.json", summary)
    print(_table(rows, summary["test_set"]))
    print(f"\nsaved to {out_dir} (model.safetensors, model.json, summary.json, log.txt) "
          f"in {summary['wall_time_s']:.0f} s; reload with synq.io.load_quantized('{out_dir}')")
    return summary


def _table(rows, test_set):
    lines = [f"| model | top-1 % ({test_set}) | top-5 % |", "|---|---|---|"]
    for name, r in rows:
        if r is None:
            lines.append(f"| {name} | - | - |")
        else:
            lines.append(f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} |")
    return "\n".join(lines)


def _saved_model_kind(meta: dict) -> str:
    """The --model a saved quantized model stands for when its test set is chosen: "default"
    for the bundled model (Fashion-MNIST), "other" for any other (no default test set)."""
    return "default" if (meta.get("model") or {}).get("source") == "bundled" else "other"


def cmd_evaluate(args):
    from .evaluate import evaluate
    from .io import load_quantized
    if args.quantized:
        path = Path(args.quantized)
        if (path / "int_model.json").is_file() and not (path / "model.json").is_file() \
                or path.name == "int_model.json":  # a folder written by `synq export`
            from .deploy import load_int
            model, name = load_int(path, device=args.device), "integer (exported)"
        else:
            model, name = load_quantized(path, device=args.device), "quantized"
        # the default test set follows the saved model, not --model (as in cmd_export)
        args.model = _saved_model_kind(model.meta)
    test_set = load_test_set(args)
    if test_set is None:
        raise UsageError("evaluate needs a test set (--test-set)")
    if not args.quantized:
        model, _, _ = load_model(args)
        model, name = model.to(args.device), "float"
    r = evaluate(model, test_set, args.device)
    if distributed.is_main():
        print(_table([(name, r)], args.test_set or "fashion-mnist"))
    return r


def cmd_bench(args):
    from benchmarks.__main__ import main as bench_main
    argv = ["--device", args.device, "--out", args.out] + (["--quick"] if args.quick else [])
    argv += ["--only", args.only] if args.only else []
    return bench_main(argv)


def bundled_input_range(meta: dict):
    """The input range of the bundled model (normalized Fashion-MNIST pixels in [0, 1]), so
    that its export quantizes the first layer's input on a fixed grid; None for other
    models, whose input range the exporter cannot know."""
    if (meta.get("model") or {}).get("source") != "bundled":
        return None
    from .data import FMNIST_MEAN, FMNIST_STD
    return (-FMNIST_MEAN / FMNIST_STD, (1.0 - FMNIST_MEAN) / FMNIST_STD)


def cmd_export(args):
    """Export a saved quantized model to integer layers, save it, and (with a test set)
    compare the two models' accuracy."""
    from .deploy import export, save_int
    from .evaluate import evaluate
    from .io import load_quantized
    folder = Path(args.quantized)
    folder = folder if folder.is_dir() else folder.parent  # (a folder or its model.json)
    out = Path(args.out) if args.out else folder / "int"
    if out.exists() and not out.is_dir():  # (found only after the export, as "[Errno 17]")
        raise UsageError(f"--out {out} is a file, not a folder")
    qmodel = load_quantized(args.quantized, device=args.device)
    if args.input_range is not None:
        try:
            lo, hi = (float(v) for v in args.input_range.split(","))
        except ValueError:
            raise UsageError(f"--input-range must be LO,HI, got {args.input_range!r}") from None
        input_range = (lo, hi)
    else:
        input_range = bundled_input_range(qmodel.meta)
        if input_range is not None:
            log.info("first layer input range %.4f,%.4f (normalized Fashion-MNIST pixels of "
                     "the bundled model; --input-range overrides)", *input_range)
    try:
        int_model = export(qmodel, weight_format=args.weight_format, input_range=input_range)
    except ValueError as e:
        raise UsageError(str(e)) from e
    save_int(int_model, out)
    log.info("integer model written to %s (reload with synq.deploy.load_int)", out)
    args.model = _saved_model_kind(qmodel.meta)
    test_set = load_test_set(args)
    result = {"out": str(out)}
    if test_set is not None:
        rows = [("fake-quantized", evaluate(qmodel, test_set, args.device)),
                ("integer (exported)", evaluate(int_model, test_set, args.device))]
        result.update(fake_quantized=rows[0][1], integer=rows[1][1])
        if distributed.is_main():
            print(_table(rows, args.test_set or "fashion-mnist"))
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .finetune import FinetuneConfig
    from .synth import SynthConfig
    p = argparse.ArgumentParser(prog="synq", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"synq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def synth_opts(sp):
        g = sp.add_argument_group("synthesis (BN-statistics matching)")
        _add_dataclass_options(g, SynthConfig, "synth-", "synth_", QUICK_SYNTH, skip=("seed",))

    def ft_opts(sp):
        g = sp.add_argument_group("quantization and SynQ fine-tuning")
        _add_dataclass_options(g, FinetuneConfig, "", "ft_", QUICK_FINETUNE,
                               skip=("seed", "backend"))
        g.add_argument("--no-lowpass", dest="ft_use_lowpass", action="store_false",
                       help="ablation: no low-pass filter")
        g.add_argument("--no-cam", dest="ft_use_cam", action="store_false",
                       help="ablation: no CAM alignment")
        g.add_argument("--no-hard-soft-labels", dest="ft_use_hard_soft_labels",
                       action="store_false", help="ablation: CE on every sample")
        g.add_argument("--backend", default=None, choices=["reference", "cpu", "cuda", "triton"],
                       help="synq_kernels backend (default: fastest available)")
        sp.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out")

    q = sub.add_parser("quantize", help="zero-shot quantization end to end")
    _add_model_options(q), _add_test_options(q), _add_run_options(q)
    q.add_argument("--out", default="runs/quantize", help="output folder (default: %(default)s)")
    synth_opts(q), ft_opts(q)
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser("synthesize", help="synthesize a calibration set from a model")
    _add_model_options(s), _add_run_options(s)
    s.add_argument("--out", default="runs/synthetic.pt", help="output file (resumes if present)")
    s.set_defaults(test_set="none")
    synth_opts(s)
    s.set_defaults(func=cmd_synthesize)

    f = sub.add_parser("finetune", help="quantize and fine-tune on a synthetic set")
    _add_model_options(f), _add_test_options(f), _add_run_options(f)
    f.add_argument("--data", required=True, help="synthetic set written by `synq synthesize`")
    f.add_argument("--out", default="runs/finetune", help="output folder")
    ft_opts(f)
    f.set_defaults(func=cmd_finetune)

    e = sub.add_parser("evaluate", help="top-1 / top-5 on a test set")
    _add_model_options(e), _add_test_options(e), _add_run_options(e)
    e.add_argument("--quantized", help="folder of a saved quantized model, or of its integer "
                                       "export (`synq export`); else the float model")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a saved quantized model to integer kernels")
    x.add_argument("--quantized", required=True,
                   help="folder of a saved quantized model (`synq quantize --out`)")
    x.add_argument("--out", default=None, help="output folder (default: QUANTIZED/int)")
    x.add_argument("--weight-format", default="auto", choices=["auto", "int8", "int4"],
                   help="auto: 5-8-bit weights as int8, 2-4-bit weights as packed int4")
    x.add_argument("--input-range", default=None, metavar="LO,HI",
                   help="fixed range of the model input for the first layer's 8-bit grid "
                        "(default: the pixel range for the bundled model, else each batch's "
                        "own range)")
    _add_test_options(x), _add_run_options(x)
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="run the kernel benchmarks")
    b.add_argument("--quick", action="store_true", help="smaller sizes (CPU: under 5 minutes)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: %(default)s)")
    b.add_argument("--out", default="benchmarks/results",
                   help="folder for the CSV / markdown tables (default: %(default)s)")
    b.add_argument("--only", default=None, metavar="FAMILY",
                   help="run one family (int_gemm, inference, train, fake_quant, lowpass, ...)")
    b.set_defaults(func=cmd_bench)
    return p


# An option that does nothing once its component is switched off: giving both is a mistake
# (`--no-cam --lambda-cam 5` used to run without CAM and without a word).
_NEEDS = {
    "ft_use_cam": ("--no-cam", ("lambda_cam", "cam_layer", "cam_eps")),
    "ft_use_lowpass": ("--no-lowpass", ("d0", "lowpass_mask")),
    "ft_use_hard_soft_labels": ("--no-hard-soft-labels", ("tau",)),
    "ft_feature_attention": ("--no-feature-attention", ("fa_weight",)),
    "ft_difficulty_promotion": ("--no-difficulty-promotion", ("dp_eps",)),
    "ft_augment": ("--no-augment", ("crop_scale",)),
    "synth_augment": ("--no-synth-augment", ("aug_prob", "crop_scale")),
    "synth_lbns": ("--no-synth-lbns", ("centre_steps", "centre_ce_weight",
                                       "centre_early_weight", "centre_late_weight",
                                       "lbns_bns_weight", "lbns_ce_weight", "lbns_weight")),
}


def _check_conflicts(args) -> None:
    from .finetune import FinetuneConfig
    from .synth import SynthConfig
    for switch, (off_flag, names) in _NEEDS.items():
        if not hasattr(args, switch) or getattr(args, switch):
            continue
        synth = switch.startswith("synth_")
        cls, defaults = (SynthConfig, QUICK_SYNTH) if synth else (FinetuneConfig, QUICK_FINETUNE)
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        for name in names:
            value = getattr(args, ("synth_" if synth else "ft_") + name)
            if value != defaults.get(name, fields[name]):
                flag = _flag(name, "synth-" if synth else "")
                raise UsageError(f"{flag} has no effect with {off_flag}: drop one of them")


def _validate_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and distributed.env_world_size() == 1:
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no CUDA GPU here "
                             f"(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: torch sees {torch.cuda.device_count()} "
                             f"CUDA GPU(s) here (cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1})")


def _validate_options(args) -> None:
    """Check the hyper-parameters before any model is loaded, as command-line errors."""
    from .finetune import FinetuneConfig
    from .synth import SynthConfig
    try:
        if hasattr(args, "synth_steps"):
            _collect(args, SynthConfig, "synth_", skip=("seed",)).validate()
        if hasattr(args, "ft_wbits"):
            d0 = args.ft_d0 if args.ft_d0 is not None else PAPER_D0
            dataclasses.replace(_collect(args, FinetuneConfig, "ft_",
                                         skip=("seed", "backend", "d0")), d0=d0).validate()
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    if hasattr(args, "ft_momentum") and not 0.0 <= args.ft_momentum < 1.0:
        raise UsageError(f"--momentum must lie in [0, 1), got {args.ft_momentum!r}")
    _check_conflicts(args)
    if hasattr(args, "seed") and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be an integer from 0 to 2^64 - 1, got {args.seed}")
    device = getattr(args, "device", None)
    if isinstance(device, str):
        _validate_device(device)
        backend = getattr(args, "backend", None)
        if backend is not None:  # (it failed only when the fine-tuning started)
            import synq_kernels
            from synq_kernels.backends import unavailable_reason
            kind = torch.device(device).type
            for op in ("fake_quant", "lowpass"):
                if backend not in synq_kernels.available_backends(op, kind):
                    why = unavailable_reason(backend, kind) or f"it has no {op} kernel"
                    raise UsageError(f"--backend {backend} cannot run on --device {device}: "
                                     f"{why}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {args.threads}")
    world = distributed.env_world_size()
    if hasattr(args, "ft_batch_size") and args.ft_batch_size % world:
        raise UsageError(f"--batch-size {args.ft_batch_size} is the global batch and must be "
                         f"divisible by the number of processes ({world})")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not log.handlers:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("synq: %(message)s"))
        log.addHandler(console)
        log.setLevel(logging.INFO)
    level, where = log.level, ""
    try:
        _validate_options(args)
        # Under torchrun: join the process group, take this rank's GPU; logs from rank 0 only.
        with distributed.process_group(getattr(args, "device", "cpu")) as device:
            if distributed.is_distributed():
                where = f" (rank {distributed.rank()} of {distributed.world_size()})"
                args.device = str(device)
                if not distributed.is_main():
                    log.setLevel(logging.WARNING)
            result = args.func(args)
    except UsageError as e:
        parser.error(str(e) + where)  # exits 2
    except KeyboardInterrupt:
        how = {"quantize": "; run the same command with --resume to continue",
               "finetune": "; run the same command with --resume to continue",
               "synthesize": "; run the same command again to continue (it resumes from --out)",
               }.get(args.command, "")  # (the others have nothing to resume, nor --resume)
        print(f"\nsynq: interrupted{how}", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, NotImplementedError, RuntimeError,
            FloatingPointError) as e:
        # OSError includes FileNotFoundError and PermissionError; FloatingPointError is a
        # diverged fine-tuning epoch. Under torchrun this rank's exit code 1 makes torchrun
        # stop the other ranks.
        print(f"synq: error{where}: {e}", file=sys.stderr)
        return 1
    finally:
        log.setLevel(level)
        for h in [h for h in log.handlers if getattr(h, "synq_run", False)]:
            log.removeHandler(h)
            h.close()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
