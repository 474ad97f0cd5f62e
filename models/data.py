"""Training data for the model suite: image folders and four built-in offline sets.

``DataConfig.name`` is a built-in set (:data:`BUILTIN`) or a folder path; the image side is the
model's ``resolution``. Nothing is downloaded: the built-in sets come from files shipped inside
scikit-image and scikit-learn. An item is a dict: ``image`` float32 ``[3, R, R]`` in ``[-1, 1]``,
``label`` int (-1: unknown), ``caption`` str ("": none) and, for ``shapes`` only, ``scene`` int64
``[R, R]`` (a class per pixel). Items are deterministic; :meth:`ImageDataset.augment` applies the
training augmentation with randomness drawn only from a given ``torch.Generator``, so a resumed run
replays it.

The sets:

* ``photos``: square crops of 11 photos (skimage's astronaut, camera, chelsea, coffee, coins,
  immunohistochemistry, moon, rocket and the left stereo_motorcycle view; sklearn's china and flower;
  grey ones replicated to 3 channels). The held-out split never shares a pixel with training: every
  photo is cut once, at build time, into a held-out square at one corner (chosen by ``seed``) and
  two training bands beside it (the rows and the columns outside the square), and each crop is cut
  from its split's own region image, so no training crop or resampling filter can reach held-out
  pixels. The square covers ``holdout_fraction`` of the photo's area, enlarged to the largest crop
  window so that held-out crops show the same scales as training ones, and capped at half the
  photo's shorter side. Crop ``i`` of a split is drawn from a generator seeded by
  ``(seed, split, i)``: a photo (uniformly), a window side ``R * max_crop_scale ** u`` (``u``
  uniform in [0, 1], so crops show several scales; capped at what the photo's region holds, upsampled
  when that is below ``R``), a region that fits it and a position; the window is resized to ``R``
  (bicubic, antialiased). ``num_images`` crops in all (default 20000), ``holdout_fraction`` of them
  held out. ``label`` is the source photo (``class_names`` are the photo names); no captions.
* ``faces``: the 100 faces of skimage's ``lfw_subset`` (grey 25x25; its other 100 images, background
  patches, are left out), resized bilinearly to ``R``, grey replicated to 3 channels; no labels.
* ``digits``: sklearn's 1797 8x8 digits (ink 0..16, shown as light ink on black), upscaled with
  bilinear interpolation (smooth strokes rather than 8x8 blocks, which would line up with a
  tokenizer's patches), grey replicated to 3 channels; labels 0-9 (``class_names`` ``zero``..
  ``nine``), captions such as "a handwritten seven". Never flipped: a mirrored digit is not that digit.
* ``shapes``: scenes of 1-3 non-overlapping filled shapes on white, each shape made by
  ``skimage.draw.random_shapes`` (one shape of a kind chosen here per call, so its pixels are
  exactly known; a shape cut off by the border or overlapping an earlier one is drawn again, up to
  20 times, then left out) and painted in a colour from a named palette (distinct colours per scene). The
  ``scene`` map holds the shape kind per pixel (``scene_classes``: background, then skimage's kind
  names rectangle, circle, triangle, ellipse) and matches the painted pixels exactly. Shapes are
  listed largest first: the caption names them in that order ("a red circle and a blue triangle")
  and ``label`` is the kind of the largest (``class_names``: the four kinds). Scene ``i`` of a split
  comes from a generator seeded by ``(seed, split, i)``; ``num_images`` scenes in all (default 20000).
  Needs ``R >= 16``.
* a folder: JPEG / PNG / WebP files found recursively (extension case-insensitive, hidden files and
  folders skipped), in sorted order. When images sit in sub-folders, the first sub-folder under the
  root is the class (labels in sorted name order; images at the root get -1); a ``.txt`` with the
  image's stem beside it is its caption. Images are converted to RGB (grey and palette expanded,
  16-bit grey scaled to 8 bits, transparency composited on white, EXIF rotation applied), resized
  so the shorter side is ``R`` (bicubic, antialiased) and centre-cropped. Every file's header is
  checked at build time (PIL ``verify``, which also catches truncated PNGs); a file that fails then,
  or fails to decode later, is skipped and counted in ``skipped`` with one warning per file, and
  ``__getitem__`` serves the next readable image of the split instead of raising, so a run never
  stops on a bad file (with DataLoader workers each process counts its own decode failures).
  ``num_images`` > 0 keeps the first that many readable files.

Splits: the fixed sets (faces, digits, folders) are split by a permutation seeded by ``seed``:
``max(1, round(holdout_fraction * n))`` items are held out, a clear error when that leaves none for
training. The generated sets (photos, shapes) draw each split's items from its own seeded stream.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import DataConfig

log = logging.getLogger(__name__)

BUILTIN = ("photos", "faces", "digits", "shapes")
SPLITS = ("train", "holdout")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

_DEFAULT_COUNT = {"photos": 20000, "shapes": 20000}
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SHAPE_KINDS = ("rectangle", "circle", "triangle", "ellipse")  # skimage.draw.random_shapes' names
_PALETTE = {"red": (220, 40, 40), "green": (40, 160, 70), "blue": (40, 80, 220), "yellow": (240, 200, 30),
            "purple": (140, 60, 180), "orange": (245, 130, 30)}
_MIN_SHAPES_RESOLUTION = 16
_SHAPE_TRIES = 20          # placements tried per shape before it is left out
# Salts of the seeded streams, so the sets' and splits' random numbers are independent.
_SALT_SPLIT, _SALT_PHOTOS, _SALT_CORNER, _SALT_SHAPES = 11, 12, 13, 14


# ---------------------------------------------------------------- shared helpers

def _check_args(cfg: DataConfig, resolution, split: str) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"model.resolution must be a positive integer (the image side), got {resolution!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0.0 < cfg.holdout_fraction < 1.0:
        raise ValueError(f"data.holdout_fraction must lie strictly between 0 and 1, got {cfg.holdout_fraction!r}")
    if cfg.num_images < 0:
        raise ValueError(f"data.num_images must be >= 0 (0: the set's default), got {cfg.num_images!r}")
    if cfg.max_crop_scale < 1.0:
        raise ValueError(f"data.max_crop_scale must be >= 1, got {cfg.max_crop_scale!r}")
    if not 0.0 <= cfg.half_resolution <= 1.0:
        raise ValueError(f"data.half_resolution must lie in [0, 1], got {cfg.half_resolution!r}")
    if cfg.half_resolution and resolution % 2:
        raise ValueError(f"data.half_resolution needs an even model.resolution, got {resolution}")


def _holdout_count(n: int, cfg: DataConfig, source: str) -> int:
    """Items held out of ``n``: ``max(1, round(fraction * n))``, leaving at least one for training."""
    n_hold = max(1, round(cfg.holdout_fraction * n))
    if n_hold >= n:
        raise ValueError(f"{source}: {n} item(s) cannot be split with data.holdout_fraction="
                         f"{cfg.holdout_fraction} (the held-out split would take everything)")
    return n_hold


def _split_indices(n: int, cfg: DataConfig, split: str, source: str) -> np.ndarray:
    """The sorted pool indices of ``split``, from a permutation seeded by ``cfg.seed``."""
    n_hold = _holdout_count(n, cfg, source)
    perm = np.random.default_rng([cfg.seed, _SALT_SPLIT]).permutation(n)
    return np.sort(perm[n_hold:] if split == "train" else perm[:n_hold])


def _pool_size(cfg: DataConfig, available: int, source: str) -> int:
    """``num_images`` of a fixed set of ``available`` items (0: all of them)."""
    if cfg.num_images > available:
        raise ValueError(f"data.num_images={cfg.num_images} but {source} has {available} images")
    return cfg.num_images or available


def _item_rng(cfg: DataConfig, salt: int, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, salt, SPLITS.index(split), i])


def _uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def _grey_to_tensor(grey: np.ndarray, resolution: int) -> torch.Tensor:
    """An HxW array in [0, 1] resized bilinearly (antialiased) to ``resolution``, as [3, R, R] in [-1, 1]."""
    x = torch.from_numpy(np.asarray(grey, dtype=np.float32))[None, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (x[0].clamp(0, 1) * 2 - 1).expand(3, -1, -1).contiguous()


def _item(image: torch.Tensor, label: int = -1, caption: str = "") -> Dict:
    return {"image": image, "label": int(label), "caption": caption}


def collate(items: List[Dict]) -> Dict:
    """A batch: ``image`` [B, 3, R, R], ``label`` int64 [B], ``caption`` list, ``scene`` [B, R, R] if present."""
    batch = {"image": torch.stack([it["image"] for it in items]),
             "label": torch.tensor([it["label"] for it in items], dtype=torch.int64),
             "caption": [it["caption"] for it in items]}
    if all("scene" in it for it in items):
        batch["scene"] = torch.stack([it["scene"] for it in items])
    return batch


class ImageDataset(torch.utils.data.Dataset):
    """Deterministic items of one split; :meth:`augment` adds the training randomness."""

    def __init__(self, cfg: DataConfig, resolution: int, split: str, hflip: bool):
        self.cfg = cfg
        self.resolution = resolution
        self.split = split
        self.hflip = hflip
        self.skipped = 0
        self.class_names: List[str] = []
        self.scene_classes: List[str] = []

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a data set of {len(self)}")
        return int(i)

    def augment(self, item: Dict, generator: torch.Generator) -> Dict:
        """A training view of ``item``: a horizontal flip (image and scene) with probability 1/2 when
        flips are on. Exactly one number is drawn from the CPU ``generator`` per call either way."""
        flip = bool(torch.rand((), generator=generator) < 0.5)
        out = dict(item)
        if flip and self.hflip:
            out["image"] = item["image"].flip(-1)
            if "scene" in item:
                out["scene"] = item["scene"].flip(-1)
        return out


# ---------------------------------------------------------------- photos

@functools.lru_cache(maxsize=1)
def _photos() -> Tuple[Tuple[str, np.ndarray], ...]:
    """(name, HxWx3 uint8) of the photos shipped inside scikit-image and scikit-learn."""
    from skimage import data as sk
    from sklearn.datasets import load_sample_image
    loaders = (("astronaut", sk.astronaut), ("camera", sk.camera), ("chelsea", sk.chelsea), ("coffee", sk.coffee),
               ("coins", sk.coins), ("immunohistochemistry", sk.immunohistochemistry), ("moon", sk.moon),
               ("rocket", sk.rocket), ("motorcycle", lambda: sk.stereo_motorcycle()[0]),
               ("china", lambda: load_sample_image("china.jpg")), ("flower", lambda: load_sample_image("flower.jpg")))
    out = []
    for name, load in loaders:
        arr = np.asarray(load(), dtype=np.uint8)
        out.append((name, np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr[..., :3]))
    return tuple(out)


Box = Tuple[int, int, int, int]  # rows r0:r1, columns c0:c1


def photo_regions(height: int, width: int, photo: int, cfg: DataConfig, largest_window: int
                  ) -> Tuple[List[Box], List[Box]]:
    """(training boxes, held-out boxes) of one photo: a held-out square at a seeded corner and the two
    bands beside it (rows outside the square, full width; columns outside it, full height)."""
    side = round(math.sqrt(cfg.holdout_fraction * height * width))
    side = max(1, min(max(side, largest_window), min(height, width) // 2))
    corner = int(np.random.default_rng([cfg.seed, _SALT_CORNER, photo]).integers(4))
    top, left = corner < 2, corner % 2 == 0
    r0 = 0 if top else height - side
    c0 = 0 if left else width - side
    rows = (side, height) if top else (0, height - side)
    cols = (side, width) if left else (0, width - side)
    return [(rows[0], rows[1], 0, width), (0, height, cols[0], cols[1])], [(r0, r0 + side, c0, c0 + side)]


class PhotoCrops(ImageDataset):
    """Random crops of the shipped photos; see the module docstring."""

    def __init__(self, cfg: DataConfig, resolution: int, split: str):
        super().__init__(cfg, resolution, split, hflip=cfg.hflip)
        photos = _photos()
        total = cfg.num_images or _DEFAULT_COUNT["photos"]
        n_hold = _holdout_count(total, cfg, "photos")
        self._n = total - n_hold if split == "train" else n_hold
        largest = math.ceil(resolution * cfg.max_crop_scale)
        self.boxes: List[Tuple[int, Box]] = []  # (photo, box in photo pixels) of this split's regions
        for p, (_, arr) in enumerate(photos):
            train, hold = photo_regions(arr.shape[0], arr.shape[1], p, cfg, largest)
            self.boxes += [(p, box) for box in (train if split == "train" else hold)]
        self._regions = [Image.fromarray(np.ascontiguousarray(photos[p][1][r0:r1, c0:c1]))
                         for p, (r0, r1, c0, c1) in self.boxes]
        self._by_photo = [[k for k, (q, _) in enumerate(self.boxes) if q == p] for p in range(len(photos))]
        self.class_names = [name for name, _ in photos]

    def __len__(self) -> int:
        return self._n

    def window(self, i: int) -> Tuple[int, int, int, int]:
        """(region index into :attr:`boxes`, row, column, side) of crop ``i``, in the region's pixels."""
        rng = _item_rng(self.cfg, _SALT_PHOTOS, self.split, self._check_index(i))
        regions = self._by_photo[int(rng.integers(len(self._by_photo)))]
        sizes = [self._regions[k].size[::-1] for k in regions]  # (height, width)
        side = round(self.resolution * self.cfg.max_crop_scale ** rng.uniform())
        side = max(1, min(side, max(min(hw) for hw in sizes)))
        fits = [(k, hw) for k, hw in zip(regions, sizes) if min(hw) >= side]
        positions = np.array([(h - side + 1) * (w - side + 1) for _, (h, w) in fits], dtype=np.float64)
        k, (h, w) = fits[int(rng.choice(len(fits), p=positions / positions.sum()))]
        return k, int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1)), side

    def crop_box(self, i: int) -> Tuple[int, Box]:
        """(photo, box in the photo's pixels) that crop ``i`` was cut from."""
        k, r, c, side = self.window(i)
        p, (r0, _, c0, _) = self.boxes[k]
        return p, (r0 + r, r0 + r + side, c0 + c, c0 + c + side)

    def __getitem__(self, i: int) -> Dict:
        k, r, c, side = self.window(i)
        crop = self._regions[k].crop((c, r, c + side, r + side))
        if side != self.resolution:
            crop = crop.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        return _item(_uint8_to_tensor(np.asarray(crop)), label=self.boxes[k][0])


# ---------------------------------------------------------------- faces and digits

class GreyImages(ImageDataset):
    """A fixed set of grey images in [0, 1] (faces, digits), resized per item."""

    def __init__(self, cfg: DataConfig, resolution: int, split: str, images: np.ndarray, labels: Sequence[int],
                 captions: Sequence[str], class_names: Sequence[str], hflip: bool):
        super().__init__(cfg, resolution, split, hflip=hflip)
        n = _pool_size(cfg, len(images), cfg.name)
        keep = _split_indices(n, cfg, split, cfg.name)
        self._images = images[keep]
        self._labels = [labels[j] for j in keep]
        self._captions = [captions[j] for j in keep]
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> Dict:
        i = self._check_index(i)
        return _item(_grey_to_tensor(self._images[i], self.resolution), self._labels[i], self._captions[i])


def _faces(cfg: DataConfig, resolution: int, split: str) -> GreyImages:
    from skimage.data import lfw_subset
    faces = np.asarray(lfw_subset()[:100], dtype=np.float32)  # the first 100 are the faces
    n = len(faces)
    return GreyImages(cfg, resolution, split, faces, [-1] * n, [""] * n, [], hflip=cfg.hflip)


def _digits(cfg: DataConfig, resolution: int, split: str) -> GreyImages:
    from sklearn.datasets import load_digits
    digits = load_digits()
    labels = [int(t) for t in digits.target]
    captions = [f"a handwritten {_DIGIT_WORDS[t]}" for t in labels]
    return GreyImages(cfg, resolution, split, np.asarray(digits.images / 16.0, dtype=np.float32), labels, captions,
                      _DIGIT_WORDS, hflip=False)


# ---------------------------------------------------------------- shapes

def _shape_mask(rng: np.random.Generator, resolution: int, kind: str):
    """The pixels (bool [R, R]) of one ``kind`` shape placed by skimage's random_shapes, or None."""
    from skimage.draw import random_shapes
    with warnings.catch_warnings():  # "could not fit any shapes": we retry or leave the shape out
        warnings.simplefilter("ignore")
        img, labels = random_shapes((resolution, resolution), max_shapes=1, min_shapes=1,
                                    min_size=resolution // 4, max_size=resolution * 5 // 8, shape=kind,
                                    channel_axis=None, intensity_range=(0, 0), rng=rng)
    if not labels:
        return None
    (r0, r1), (c0, c1) = labels[0][1]  # its box; triangles near the top edge come out cut off: refused
    return img == 0 if min(r0, c0) >= 0 and max(r1, c1) <= resolution else None


def shape_scene(rng: np.random.Generator, resolution: int) -> Tuple[np.ndarray, np.ndarray, int, str]:
    """(HxWx3 uint8 image, scene int64 [R, R], label, caption) of 1-3 non-overlapping coloured shapes."""
    count = int(rng.integers(1, 4))
    kinds = rng.integers(len(_SHAPE_KINDS), size=count)
    colours = rng.choice(len(_PALETTE), size=count, replace=False)
    scene = np.zeros((resolution, resolution), dtype=np.int64)
    image = np.full((resolution, resolution, 3), 255, dtype=np.uint8)
    placed = []  # (pixels, kind, colour name)
    for kind, colour in zip(kinds, colours):
        for _ in range(_SHAPE_TRIES):
            mask = _shape_mask(rng, resolution, _SHAPE_KINDS[kind])
            if mask is not None and mask.any() and not scene[mask].any():
                scene[mask] = kind + 1
                name = list(_PALETTE)[colour]
                image[mask] = _PALETTE[name]
                placed.append((int(mask.sum()), int(kind), name))
                break
    placed.sort(key=lambda t: -t[0])  # stable: ties keep the drawing order
    words = [f"{'an' if name[0] in 'aeiou' else 'a'} {name} {_SHAPE_KINDS[kind]}" for _, kind, name in placed]
    caption = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return image, scene, placed[0][1], caption


class ShapeScenes(ImageDataset):
    """Generated scenes of coloured shapes with captions and scene maps; see the module docstring."""

    def __init__(self, cfg: DataConfig, resolution: int, split: str):
        if resolution < _MIN_SHAPES_RESOLUTION:
            raise ValueError(f"data.name='shapes' needs model.resolution >= {_MIN_SHAPES_RESOLUTION}, "
                             f"got {resolution}")
        super().__init__(cfg, resolution, split, hflip=cfg.hflip)
        total = cfg.num_images or _DEFAULT_COUNT["shapes"]
        n_hold = _holdout_count(total, cfg, "shapes")
        self._n = total - n_hold if split == "train" else n_hold
        self.class_names = list(_SHAPE_KINDS)
        self.scene_classes = ["background", *_SHAPE_KINDS]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Dict:
        rng = _item_rng(self.cfg, _SALT_SHAPES, self.split, self._check_index(i))
        image, scene, label, caption = shape_scene(rng, self.resolution)
        item = _item(_uint8_to_tensor(image), label, caption)
        item["scene"] = torch.from_numpy(scene)
        return item


# ---------------------------------------------------------------- folders

_WARNED: set = set()


def _warn_skip(path: str, exc: BaseException) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        log.warning("skipping unreadable image %s: %s: %s", path, type(exc).__name__, exc)


def scan_folder(root: str) -> List[str]:
    """Image files under ``root`` (relative, '/'-separated, sorted), hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def _header_ok(path: str) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad files
        _warn_skip(path, exc)
        return False
    return True


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB of any PIL mode: palette and grey expanded, 16-bit grey scaled, transparency composited on white."""
    if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grey PNG (older Pillow opens it as "I")
        im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257.0).round().astype(np.uint8))
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str, resolution: int) -> np.ndarray:
    """The file as RxRx3 uint8: RGB, shorter side resized to ``resolution`` (bicubic), centre-cropped."""
    with Image.open(path) as im:
        im.draft(None, (resolution, resolution))  # JPEG: decode at a reduced size >= R where possible
        im = _to_rgb(ImageOps.exif_transpose(im))
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        im = im.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)))


def _caption(path: str) -> str:
    txt = os.path.splitext(path)[0] + ".txt"
    if not os.path.isfile(txt):
        return ""
    with open(txt, encoding="utf-8", errors="replace") as f:
        return f.read().strip()


class ImageFolder(ImageDataset):
    """Images of a folder (recursive); see the module docstring."""

    def __init__(self, cfg: DataConfig, resolution: int, split: str):
        super().__init__(cfg, resolution, split, hflip=cfg.hflip)
        self.root = cfg.name
        files = scan_folder(self.root)
        if not files:
            raise ValueError(f"data.name={self.root!r}: no JPEG/PNG/WebP images in folder {self.root} "
                             f"(searched recursively)")
        readable = [f for f in files if _header_ok(os.path.join(self.root, f))]
        self.skipped = len(files) - len(readable)
        if not readable:
            raise ValueError(f"data.name={self.root!r}: none of the {len(files)} image files in folder "
                             f"{self.root} is readable")
        readable = readable[:_pool_size(cfg, len(readable), f"folder {self.root}")]
        self.class_names = sorted({f.split("/")[0] for f in readable if "/" in f})
        keep = _split_indices(len(readable), cfg, split, f"folder {self.root}")
        self.files = [readable[j] for j in keep]
        self._labels = [self.class_names.index(f.split("/")[0]) if "/" in f else -1 for f in self.files]
        self._bad: set = set()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Dict:
        """Item ``i``, or when its file does not decode, the next readable one (counted in ``skipped``)."""
        i = self._check_index(i)
        n = len(self.files)
        for j in ((i + k) % n for k in range(n)):
            if j in self._bad:
                continue
            path = os.path.join(self.root, self.files[j])
            try:
                pixels = load_image(path, self.resolution)
            except Exception as exc:  # any decoder failure: skip the file, never stop the run
                self._bad.add(j)
                self.skipped += 1
                _warn_skip(path, exc)
                continue
            return _item(_uint8_to_tensor(pixels), self._labels[j], _caption(path))
        raise RuntimeError(f"no image of the {self.split} split of folder {self.root} decodes")


# ---------------------------------------------------------------- entry points

def build_dataset(cfg: DataConfig, resolution: int, split: str) -> ImageDataset:
    """The ``split`` ("train" or "holdout") of data set ``cfg.name`` at side ``resolution``."""
    _check_args(cfg, resolution, split)
    if cfg.name == "photos":
        return PhotoCrops(cfg, resolution, split)
    if cfg.name == "faces":
        return _faces(cfg, resolution, split)
    if cfg.name == "digits":
        return _digits(cfg, resolution, split)
    if cfg.name == "shapes":
        return ShapeScenes(cfg, resolution, split)
    if os.path.isdir(cfg.name):
        return ImageFolder(cfg, resolution, split)
    what = "is a file, not a folder" if os.path.exists(cfg.name) else "is neither a built-in set nor a folder"
    raise ValueError(f"data.name={cfg.name!r} {what}; built-in sets: {', '.join(BUILTIN)}")


def describe(cfg: DataConfig) -> str:
    """One line saying what the data set is, for logs."""
    sets = {
        "photos": f"photos: {cfg.num_images or _DEFAULT_COUNT['photos']} crops (1x-{cfg.max_crop_scale:g}x scale) "
                  f"of the photos shipped with scikit-image / scikit-learn, held out: a corner square of each photo",
        "faces": "faces: the 100 grey 25x25 faces of scikit-image's lfw_subset",
        "digits": "digits: scikit-learn's 8x8 handwritten digits, bilinearly upscaled, labels and captions",
        "shapes": f"shapes: {cfg.num_images or _DEFAULT_COUNT['shapes']} scenes of 1-3 coloured shapes from "
                  f"skimage.draw.random_shapes with captions, labels and scene maps",
    }
    what = sets.get(cfg.name, f"folder {cfg.name}: JPEG/PNG/WebP images (recursive; class sub-folders, .txt captions)")
    flips = "hflip" if cfg.hflip and cfg.name != "digits" else "no flips"
    return f"{what}; {cfg.holdout_fraction:.0%} held out (seed {cfg.seed}); {flips}"


__all__ = ["BUILTIN", "ImageDataset", "build_dataset", "collate", "describe", "load_image", "photo_regions",
           "scan_folder", "shape_scene"]
