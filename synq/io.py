"""Saving and reloading quantized models: weights and quantizer state as safetensors, and a
JSON beside them with what is needed to rebuild the module (the float architecture and the
quantization settings)."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from torch import nn

from . import quant
from .versions import normal_tensors

FORMAT = "synq-quantized-v1"


def build_float_model(spec: dict) -> nn.Module:
    """The float architecture described by a model spec (weights as initialized):
    {"source": "bundled", "name"} | {"source": "registry", "name", "kwargs"} |
    {"source": "callable", "target": "module:function", "kwargs"}."""
    source = spec.get("source")
    if source == "bundled":
        from .assets import ASSETS_DIR
        from .models import get_model
        meta = json.loads((ASSETS_DIR / f"{spec['name']}.json").read_text())
        return get_model(meta["architecture"], **meta["kwargs"])
    if source == "registry":
        from .models import get_model
        return get_model(spec["name"], **spec.get("kwargs", {}))
    if source == "callable":
        return call_target(spec["target"], spec.get("kwargs", {}))
    raise ValueError(f"unknown model source {source!r} in the model spec {spec!r}")


def call_target(target: str, kwargs: dict | None = None):
    """Import `module:function` and call it with `kwargs`."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"expected 'module:function', got {target!r}")
    mod_name, fn_name = target.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod_name!r} of {target!r}: {e}") from e
    except Exception as e:  # a module that fails while it runs (SyntaxError, NameError, ...)
        raise ValueError(f"importing module {mod_name!r} of {target!r} failed: "
                         f"{type(e).__name__}: {e}") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{target!r}: module {mod_name!r} has no callable {fn_name!r}")
    try:
        return fn(**(kwargs or {}))
    except (OSError, ValueError, TypeError, RuntimeError):
        raise  # the kinds a caller expects of a loader (`synq` prints them in one line)
    except Exception as e:  # the user's code failed otherwise (KeyError, AttributeError, ...)
        raise RuntimeError(f"{target} raised {type(e).__name__}: {e}") from e


def save_quantized(model: nn.Module, out_dir, model_spec: dict, extra: dict | None = None) -> Path:
    """Write `model.safetensors` and `model.json` into `out_dir` (atomically each)."""
    cfg = getattr(model, "quant_config", None)
    if cfg is None:
        raise ValueError("save_quantized takes a model returned by synq.quant.quantize_model")
    meta = {"format": FORMAT, "model": model_spec, "quant_config": cfg, **(extra or {})}
    return write_saved(out_dir, "model", model.state_dict(), meta)


def write_saved(out_dir, stem: str, state: dict, meta: dict) -> Path:
    """Write `stem.safetensors` (the tensors of `state`) and `stem.json` (`meta`) into
    `out_dir`, each atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = out / f"{stem}.safetensors.tmp"
    # safetensors leaves its file readable by the owner alone (0600); give it the mode of any
    # other file written here (0666 less the umask), as the JSON beside it has. The mode is
    # read off a file created the usual way (os.umask would change it process-wide: not
    # thread-safe in a library).
    tmp.unlink(missing_ok=True)  # (one left by an interrupted save keeps its old mode)
    tmp.open("wb").close()
    mode = tmp.stat().st_mode & 0o777
    save_file(state, str(tmp))
    os.chmod(tmp, mode)
    os.replace(tmp, out / f"{stem}.safetensors")
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    os.replace(tmp, out / f"{stem}.json")
    return out


def read_saved(path, stem: str, fmt: str, writer: str, device="cpu") -> tuple[dict, dict]:
    """(meta, tensors) of a folder written by `write_saved` (`path`: the folder or its
    json); FileNotFoundError naming `writer` for a missing file, ValueError for another
    format than `fmt`."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():  # (its parent would be searched otherwise, and named in the error)
        raise FileNotFoundError(f"{p} does not exist: expected a folder written by {writer}")
    if not p.is_dir() and p.name not in (f"{stem}.json", f"{stem}.safetensors"):
        # (its parent folder would be read otherwise, and a file missing there named)
        raise ValueError(f"{p} is a file, not a folder written by {writer} (give the folder, "
                         f"or its {stem}.json)")
    folder = p if p.is_dir() else p.parent
    meta_path, weights = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    for f in (meta_path, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: not a folder written by {writer}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != fmt:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {fmt!r}")
    return meta, load_file(str(weights), device=str(device))


@normal_tensors
def load_quantized(path, device="cpu") -> nn.Module:
    """Reload a model saved by `save_quantized` (a folder, or its model.json), in eval mode with
    frozen activation ranges: its outputs equal the saved model's."""
    meta, state = read_saved(path, "model", FORMAT,
                             "synq (save_quantized / `synq quantize`)", device)
    cfg = dict(meta["quant_config"])
    model = quant.quantize_model(build_float_model(meta["model"]), **cfg)
    model.load_state_dict(state, strict=True)
    for q in quant.act_quantizers(model).values():
        q.calibrating = False
    model.meta = meta
    return model.to(device).eval()
