"""Build or load any open_clip model; registers the default profile's small architecture (clipprune-tiny)."""

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import torch

from .errors import ClipPruneError
from .io import save_torch_atomic

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # our archs become ordinary open_clip names: clipprune-tiny, ...

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Integers OpenAI's TorchScript archives keep beside the weights (open_clip's build_model_from_openai_state_dict
# drops the same three).
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def build_model(arch: str, *, pretrained: str | None = None, device: str = "cpu"):
    """Return (model in eval mode, inference preprocess, tokenizer) for an open_clip arch.

    pretrained: None (random init), an open_clip tag (e.g. "openai"), or local weights in any format
    `load_checkpoint` reads (a file or a directory holding one).
    Every failure is one ClipPruneError line: unknown arch, unreadable weights, weights that do not fit the arch,
    weights that cannot be fetched.
    """
    if arch not in open_clip.list_models():
        raise ClipPruneError(f"unknown arch {arch!r}: valid names are open_clip.list_models() "
                             f"after `import clipprune.model` (ours: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))})")
    local = pretrained is not None and (os.path.exists(pretrained) or pretrained.endswith(_CHECKPOINT_SUFFIXES))
    state_dict = load_checkpoint(pretrained, arch=arch) if local else None  # fail before building a big model
    if pretrained is not None and not local:
        _check_quick_gelu(arch, pretrained)
    root = logging.getLogger()
    level = root.level
    if local:
        root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly": true only until we load below
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None if local else pretrained,
                                                                     device=device)
    except RuntimeError as e:
        if "Failed to download" in str(e) or "Unknown pretrained" in str(e):
            raise ClipPruneError(f"cannot get weights {arch}/{pretrained} (no network here?): fetch them where a "
                                 "network exists, or set model.pretrained to a local checkpoint path") from None
        raise
    finally:
        root.setLevel(level)
    if state_dict is not None:
        _load_exactly(model, state_dict, source=pretrained, arch=arch)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def _check_quick_gelu(arch: str, tag: str) -> None:
    """OpenAI's weights were trained with QuickGELU; open_clip only warns when the arch uses GELU, and the
    model then silently loses accuracy (~4 ImageNet points for ViT-B-16). Refuse instead."""
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag) or {}
    if tag_cfg.get("quick_gelu") and not _arch_quick_gelu(arch):
        raise ClipPruneError(f"{arch}/{tag} weights need QuickGELU: use arch {arch}-quickgelu")


def _arch_quick_gelu(arch: str) -> bool:
    return bool((open_clip.get_model_config(arch) or {}).get("quick_gelu"))


def _gelu_fix(arch: str, quick: bool) -> str:
    return f"use arch {arch}-quickgelu" if quick else f"use an arch without QuickGELU (e.g. {arch.removesuffix('-quickgelu')})"


def load_checkpoint(path: str | Path, *, arch: str) -> dict[str, torch.Tensor]:
    """State dict of local weights in the formats people have, checked against the arch it is loaded into:

    - this project's {"arch", "state_dict"} (`save_checkpoint`; the arch it names must be `arch`),
    - an open_clip state dict (`open_clip_pytorch_model.bin`, `.pt`, `.pth`; also open_clip training
      checkpoints {"state_dict": ...} with DDP's "module." prefix), or `.safetensors`,
    - OpenAI's TorchScript archive (`ViT-B-16.pt`): weights trained with QuickGELU, so `arch` must use it,
    - a directory holding one of them (a Hugging Face snapshot: open_clip_model.safetensors /
      open_clip_pytorch_model.bin, maybe open_clip_config.json, whose quick_gelu must match `arch`'s).
    """
    path = Path(path)
    if path.is_dir():
        path = _weights_in_dir(path)
    if not path.is_file():
        raise ClipPruneError(f"checkpoint not found: {path}")
    _check_config_beside(path, arch=arch)
    if _is_torchscript(path):
        if not _arch_quick_gelu(arch):
            raise ClipPruneError(f"{path} is an OpenAI TorchScript archive, trained with QuickGELU: "
                                 f"{_gelu_fix(arch, True)}")
        try:
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise ClipPruneError(f"cannot read TorchScript archive {path}: {_first_line(e)}") from None
        return {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRAS}
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt = load_file(str(path), device="cpu")
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code from a file
    except Exception as e:
        raise ClipPruneError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if not isinstance(ckpt, dict) or not ckpt:
        raise ClipPruneError(f"{path} holds no state dict (a {type(ckpt).__name__}): expected open_clip/OpenAI "
                             "weights or a checkpoint written by the pretrain stage")
    if ckpt.get("arch", arch) != arch:
        raise ClipPruneError(f"checkpoint {path} holds arch {ckpt['arch']!r}, not {arch!r}")
    state_dict = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    if all(k.startswith("module.") for k in state_dict):  # saved from a DistributedDataParallel wrapper
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


def _weights_in_dir(folder: Path) -> Path:
    """The weights file in `folder`, chosen as open_clip chooses in a local-dir/HF snapshot (safetensors
    first, open_clip_* names first), else its one `.pt` (OpenAI's archive). A Hugging Face cache root
    (models--org--name/) with one snapshot stands for that snapshot."""
    snapshots = sorted(p for p in (folder / "snapshots").glob("*") if p.is_dir())
    if len(snapshots) == 1:
        folder = snapshots[0]
    found = open_clip.factory._find_checkpoint_in_dir(folder)
    if found:
        return Path(found)
    pts = sorted(folder.glob("*.pt"))
    if len(pts) == 1:
        return pts[0]
    what = f"several .pt files ({', '.join(p.name for p in pts)})" if pts else "no weights file"
    raise ClipPruneError(f"{folder} holds {what}: set model.pretrained to the file itself, or use a folder with "
                         "one of open_clip_model.safetensors, open_clip_pytorch_model.bin, *.safetensors, *.bin, *.pt")


def _check_config_beside(path: Path, *, arch: str) -> None:
    """A Hugging Face snapshot says in open_clip_config.json whether its weights want QuickGELU; the file
    alone cannot, and GELU vs QuickGELU changes every output without changing a shape."""
    config = path.parent / "open_clip_config.json"
    if not config.is_file():
        return
    try:
        model_cfg = json.loads(config.read_text()).get("model_cfg", {})
    except (OSError, ValueError, AttributeError) as e:
        raise ClipPruneError(f"cannot read {config}: {_first_line(e)}") from None
    quick = bool(model_cfg.get("quick_gelu"))
    if quick != _arch_quick_gelu(arch):
        raise ClipPruneError(f"{config} says quick_gelu={str(quick).lower()} but arch {arch} has "
                             f"quick_gelu={str(not quick).lower()}: {_gelu_fix(arch, quick)}")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a code/ folder and constants.pkl beside the weights."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in z.namelist())


def _load_exactly(model: torch.nn.Module, state_dict: dict, *, source: str, arch: str) -> None:
    """Every weight of `arch` from `state_dict` and nothing else; anything else is one line naming both."""
    want = model.state_dict()
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    shapes = [k for k in want if k in state_dict and tuple(state_dict[k].shape) != tuple(want[k].shape)]
    problems = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    if extra:
        problems.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state_dict[k].shape)}, "
                        f"{tuple(want[k].shape)} in {arch})")
    if problems:
        raise ClipPruneError(f"weights {source} do not fit arch {arch}: keys {'; '.join(problems)}; "
                             "set model.arch to the arch they were trained as")
    model.load_state_dict(state_dict)  # copy_ casts: fp16 weights (OpenAI's) become the model's fp32 exactly


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def save_checkpoint(model: torch.nn.Module, path: str | Path, *, arch: str) -> None:
    """Write {"arch", "state_dict"} atomically: a crash never leaves a half-written checkpoint behind."""
    save_torch_atomic(path, {"arch": arch, "state_dict": model.state_dict()})


def images_to_input(images: np.ndarray | torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """uint8 [N,H,W,3] at the model's input size -> normalised float [N,3,H,W].

    Equal to the open_clip preprocess (resize and center crop are the identity at the input size) but batched,
    which is what training and search loops over the synthetic world want.
    """
    cfg = model.visual.preprocess_cfg
    x = torch.as_tensor(images)
    size = model.visual.image_size
    if tuple(x.shape[1:3]) != tuple(size if isinstance(size, (tuple, list)) else (size, size)):
        raise ValueError(f"images are {tuple(x.shape[1:3])}, the model wants {size}; use the preprocess transform")
    x = x.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return (x - mean) / std
