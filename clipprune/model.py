"""Build or load any open_clip model; registers the default profile's small architecture (clipprune-tiny)."""

import logging
import os
from pathlib import Path

import numpy as np
import open_clip
import torch

from .errors import ClipPruneError
from .io import save_torch_atomic

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # our archs become ordinary open_clip names: clipprune-tiny, ...

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def build_model(arch: str, *, pretrained: str | None = None, device: str = "cpu"):
    """Return (model in eval mode, inference preprocess, tokenizer) for an open_clip arch.

    pretrained: None (random init), an open_clip tag (e.g. "openai"), or a checkpoint written by `save_checkpoint`.
    Every failure is one ClipPruneError line: unknown arch, unreadable checkpoint, weights that cannot be fetched.
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
        model.load_state_dict(state_dict)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def _check_quick_gelu(arch: str, tag: str) -> None:
    """OpenAI's weights were trained with QuickGELU; open_clip only warns when the arch uses GELU, and the
    model then silently loses accuracy (~4 ImageNet points for ViT-B-16). Refuse instead."""
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(arch, tag) or {}
    if tag_cfg.get("quick_gelu") and not (open_clip.get_model_config(arch) or {}).get("quick_gelu"):
        raise ClipPruneError(f"{arch}/{tag} weights need QuickGELU: use arch {arch}-quickgelu")


def load_checkpoint(path: str | Path, *, arch: str) -> dict[str, torch.Tensor]:
    """State dict of a checkpoint saved by `save_checkpoint`, checked against the arch it is loaded into."""
    path = Path(path)
    if not path.is_file():
        raise ClipPruneError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClipPruneError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ClipPruneError(f"{path} is not a clipprune checkpoint (expected a dict with 'arch' and 'state_dict')")
    if ckpt.get("arch", arch) != arch:
        raise ClipPruneError(f"checkpoint {path} holds arch {ckpt['arch']!r}, not {arch!r}")
    return ckpt["state_dict"]


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
