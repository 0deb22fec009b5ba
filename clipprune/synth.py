"""A procedurally generated image-text world for CPU-sized CLIP experiments.

Each 64x64 image holds one saturated foreground object (shape, colour, size, position, pattern) on grey-ish
clutter; its caption names those attributes. Every attribute is also a zero-shot classification task.
The object covers a minority of the 8x8 patch grid, so which patches a pruner keeps matters.
Everything is a pure function of (seed, split): no files are needed to regenerate the world.
"""

import functools
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import write_bytes_atomic

IMAGE_SIZE = 64

# Class names are the caption words. No colour starts with a vowel, so "a photo of a {c} object." stays grammatical.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross", "diamond", "ring"),
    "colour": ("red", "green", "blue", "yellow", "purple", "cyan"),
    "size": ("small", "medium", "large"),
    "position": ("top left", "top right", "bottom left", "bottom right"),
    "pattern": ("solid", "striped", "dotted"),
}
RGB = np.array([(225, 30, 30), (30, 190, 40), (40, 70, 235), (235, 215, 25), (150, 40, 200), (25, 205, 215)],
               dtype=np.float32)
RADIUS = (7.0, 10.0, 13.0)  # half-extent in pixels per size class
# (shape, colour) pairs absent from train and present in test: zero-shot must compose attributes it never saw together
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("circle", "green"), ("square", "purple"),
                                              ("triangle", "blue"), ("ring", "red"))
PREFIXES = ("a photo of", "a picture of")
CAPTION_DROP = 0.3  # train captions omit each attribute with this probability, so partial prompts make sense

TASKS: dict[str, dict] = {
    "shape": {"classnames": list(ATTRIBUTES["shape"]), "templates": ["a photo of a {c}.", "a picture of a {c}."]},
    "colour": {"classnames": list(ATTRIBUTES["colour"]),
               "templates": ["a photo of a {c} object.", "a picture of a {c} object."]},
    "size": {"classnames": list(ATTRIBUTES["size"]),
             "templates": ["a photo of a {c} object.", "a picture of a {c} object."]},
    "position": {"classnames": list(ATTRIBUTES["position"]),
                 "templates": ["a photo of an object in the {c}.", "a picture of an object in the {c}."]},
    "pattern": {"classnames": list(ATTRIBUTES["pattern"]),
                "templates": ["a photo of a {c} object.", "a picture of a {c} object."]},
}
SPLITS = ("train", "test")


def _caption(*, prefix: str, size: str | None, colour: str | None, pattern: str | None, shape: str | None,
             position: str | None) -> str:
    words = [w for w in (size, colour, pattern) if w] + [shape or "object"]
    article = "an" if words[0][0] in "aeiou" else "a"
    where = f" in the {position}" if position else ""
    return f"{prefix} {article} {' '.join(words)}{where}."


def _sample_labels(rng: np.random.Generator, n: int, *, split: str) -> dict[str, np.ndarray]:
    labels = {k: rng.integers(0, len(v), size=n).astype(np.int64) for k, v in ATTRIBUTES.items()}
    if split == "train":
        held = [(ATTRIBUTES["shape"].index(s), ATTRIBUTES["colour"].index(c)) for s, c in HELD_OUT_PAIRS]
        while True:  # redraw the colour of held-out pairs until none is left (deterministic given rng)
            bad = np.zeros(n, dtype=bool)
            for s, c in held:
                bad |= (labels["shape"] == s) & (labels["colour"] == c)
            if not bad.any():
                break
            labels["colour"][bad] = rng.integers(0, len(ATTRIBUTES["colour"]), size=int(bad.sum()))
    return labels


def _render(rng: np.random.Generator, lab: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Render one chunk of images with vectorised numpy. Returns (uint8 [b,H,W,3], bool fg mask [b,H,W])."""
    b, S = len(lab["shape"]), IMAGE_SIZE
    ys, xs = np.meshgrid(np.arange(S, dtype=np.float32) + 0.5, np.arange(S, dtype=np.float32) + 0.5, indexing="ij")
    X, Y = xs[None], ys[None]  # [1,S,S] pixel centres

    # Background: grey base, grey-ish rectangles and lines with a faint tint, pixel noise. Low saturation keeps
    # the object findable while giving the patches around it real content. Layers are painted as an index map
    # (which layer is on top) and coloured once at the end, which is much cheaper than painting RGB per layer.
    n_rect, n_line = 8, 3
    grey = np.concatenate([rng.uniform(70, 180, size=(b, 1)), rng.uniform(40, 220, size=(b, n_rect)),
                           rng.uniform(30, 230, size=(b, n_line))], axis=1)
    levels = (grey[..., None] + rng.uniform(-10, 10, size=(b, 1 + n_rect + n_line, 3))).astype(np.float32)
    top = np.zeros((b, S, S), dtype=np.int64)
    x0, y0 = rng.uniform(-8, S, size=(2, n_rect, b, 1, 1)).astype(np.float32)
    w, h = rng.uniform(4, 28, size=(2, n_rect, b, 1, 1)).astype(np.float32)
    for k in range(n_rect):
        top[(X >= x0[k]) & (X < x0[k] + w[k]) & (Y >= y0[k]) & (Y < y0[k] + h[k])] = 1 + k
    theta = rng.uniform(0, np.pi, size=(n_line, b, 1, 1)).astype(np.float32)
    px, py = rng.uniform(0, S, size=(2, n_line, b, 1, 1)).astype(np.float32)
    for k in range(n_line):
        top[np.abs(np.cos(theta[k]) * (X - px[k]) + np.sin(theta[k]) * (Y - py[k])) < 0.8] = 1 + n_rect + k
    img = np.take_along_axis(levels, top.reshape(b, S * S, 1), axis=1).reshape(b, S, S, 3)

    # Object geometry: radius per size class with a little jitter; centre inside its quadrant, object inside image.
    r = np.asarray(RADIUS, dtype=np.float32)[lab["size"]] * rng.uniform(0.9, 1.1, size=b).astype(np.float32)
    qx, qy = lab["position"] % 2, lab["position"] // 2
    lo_x, hi_x = np.maximum(qx * 32 + 4, r + 1), np.minimum(qx * 32 + 28, S - 1 - r)
    lo_y, hi_y = np.maximum(qy * 32 + 4, r + 1), np.minimum(qy * 32 + 28, S - 1 - r)
    cx = (lo_x + (hi_x - lo_x) * rng.uniform(size=b)).astype(np.float32)
    cy = (lo_y + (hi_y - lo_y) * rng.uniform(size=b)).astype(np.float32)
    dx, dy = X - cx[:, None, None], Y - cy[:, None, None]
    ax, ay, rr = np.abs(dx), np.abs(dy), r[:, None, None]
    d = np.sqrt(dx**2 + dy**2)
    masks = [
        d <= rr,                                                                      # circle
        np.maximum(ax, ay) <= 0.85 * rr,                                              # square
        (dy <= 0.75 * rr) & (ax <= (dy + rr) / 1.75),                                 # triangle, apex up
        ((ax <= 0.35 * rr) & (ay <= rr)) | ((ay <= 0.35 * rr) & (ax <= rr)),          # cross
        ax + ay <= 1.15 * rr,                                                         # diamond
        (d <= rr) & (d >= 0.5 * rr),                                                  # ring
    ]
    fg = np.choose(lab["shape"][:, None, None], masks)

    # Pattern: dark parts are a darkened object colour so the hue stays readable on every pixel of the object.
    xi, yi = xs.astype(np.int64), ys.astype(np.int64)
    dark = np.stack([np.zeros((S, S), dtype=bool),              # solid
                     ((xi + yi) // 2) % 2 == 1,                 # diagonal stripes, period 4
                     (xi % 4 < 2) & (yi % 4 < 2)])[lab["pattern"]]  # 2x2 dots on a 4 px grid
    colour = RGB[lab["colour"]] + rng.uniform(-15, 15, size=(b, 3)).astype(np.float32)
    fill = np.where(dark[..., None], 0.3 * colour[:, None, None], colour[:, None, None])
    img = np.where(fg[..., None], fill, img)

    img += rng.standard_normal(size=img.shape, dtype=np.float32) * 6.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), fg


def generate(n: int, *, seed: int, split: str, chunk: int = 1024) -> dict:
    """Generate `n` images with labels, captions and foreground masks; a pure function of (n, seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])  # train and test draw from independent streams
    labels = _sample_labels(rng, n, split=split)

    keep = rng.uniform(size=(n, len(ATTRIBUTES))) >= (CAPTION_DROP if split == "train" else 0.0)
    prefix = rng.integers(0, len(PREFIXES), size=n) if split == "train" else np.zeros(n, dtype=np.int64)
    captions = []
    for i in range(n):
        words = {k: (v[labels[k][i]] if keep[i, j] else None) for j, (k, v) in enumerate(ATTRIBUTES.items())}
        captions.append(_caption(prefix=PREFIXES[prefix[i]], **words))

    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    fg_mask = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for s in range(0, n, chunk):
        images[s:s + chunk], fg_mask[s:s + chunk] = _render(rng, {k: v[s:s + chunk] for k, v in labels.items()})
    return {"images": images, **labels, "captions": captions, "fg_mask": fg_mask}


def patch_coverage(fg_mask: np.ndarray, *, patch: int = 8) -> np.ndarray:
    """Fraction of the patch grid each object touches, per image."""
    n, h, w = fg_mask.shape
    touched = fg_mask.reshape(n, h // patch, patch, w // patch, patch).any(axis=(2, 4))
    return touched.mean(axis=(1, 2))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """np.savez_compressed's format, but reproducible: numpy stamps each zip entry with the current time, so
    the same world written twice differed byte for byte (and DVC reran everything downstream)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_world(root: str | Path, *, n_train: int, n_test: int, seed: int) -> None:
    """Write root/train.npz, root/test.npz and root/world.json (tasks, seed, sizes, held-out pairs)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    coverage = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = generate(n, seed=seed, split=split)
        data["captions"] = np.array(data["captions"])  # fixed-width unicode: loads without pickle
        coverage[split] = float(patch_coverage(data["fg_mask"]).mean())
        write_bytes_atomic(root / f"{split}.npz", npz_bytes(data))
    meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "image_size": IMAGE_SIZE, "tasks": TASKS,
            "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS], "mean_patch_coverage": coverage}
    write_bytes_atomic(root / "world.json", json.dumps(meta, indent=2).encode())


def load_split(root: str | Path, split: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Read `keys` of root/<split>.npz with errors that name the file."""
    path = Path(root) / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"synthetic world split not found: {path} (create it with clipprune.synth.write_world)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in keys}
    except Exception as e:  # zip/npy/key errors all mean the same thing to the caller
        raise ValueError(f"cannot read {keys} from {path} (corrupt or incomplete world; regenerate it): {e}") from e


@functools.lru_cache(maxsize=2)
def _shared_images(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """A split's images, decompressed once per process for all five tasks (keyed by the file's identity, so a
    rewritten world is read anew), read-only because every task's dataset shares them."""
    images = load_split(Path(path).parent, Path(path).stem, ("images",))["images"]
    images.flags.writeable = False
    return images


def split_images(root: str | Path, split: str) -> np.ndarray:
    path = Path(root) / f"{split}.npz"
    if not path.is_file():
        load_split(root, split, ("images",))  # its error names the missing file
    st = path.stat()
    return _shared_images(str(path.resolve()), st.st_mtime_ns, st.st_size)


class SynthTaskDataset(torch.utils.data.Dataset):
    """One zero-shot task of the world: (image, class index) pairs plus the task's classnames and templates."""

    def __init__(self, root: str | Path, *, split: str, task: str, transform=None):
        if task not in TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; tasks: {sorted(TASKS)}")
        self.images, self.labels = split_images(root, split), load_split(root, split, (task,))[task]
        self.transform = transform
        self.classes = list(TASKS[task]["classnames"])
        self.templates = list(TASKS[task]["templates"])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])
