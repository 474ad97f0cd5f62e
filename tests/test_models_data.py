"""models.data: the built-in offline sets, image folders, splits, augmentation and bad input."""

import dataclasses
import logging
import re
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from models import data as md
from models.config import DataConfig
from models.data import BUILTIN, build_dataset, collate, describe

torch.set_num_threads(1)

SMALL = {"photos": 60, "faces": 0, "digits": 200, "shapes": 40}  # num_images per set (0: all)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing in models.data may reach the network."""
    def refuse(*args, **kwargs):
        raise AssertionError("models.data tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _cfg(name, **kw):
    return DataConfig(**{"name": name, "num_images": SMALL.get(name, 0), **kw})


def _splits(cfg, resolution=32):
    return build_dataset(cfg, resolution, "train"), build_dataset(cfg, resolution, "holdout")


def _rgb(t):
    """[3, H, W] in [-1, 1] -> HxWx3 uint8."""
    return ((t.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- every built-in set

@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_items_shapes_ranges_and_determinism(name):
    cfg = _cfg(name)
    train, hold = _splits(cfg)
    assert len(train) > 0 and len(hold) > 0
    expected_total = {"faces": 100, "digits": 200}.get(name, cfg.num_images)
    assert len(train) + len(hold) == expected_total
    assert len(hold) == round(0.1 * expected_total)
    again = build_dataset(cfg, 32, "train")
    for i in (0, 1, len(train) - 1):
        item = train[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert isinstance(item["label"], int) and isinstance(item["caption"], str)
        assert -1 <= item["label"] < max(1, len(train.class_names))
        other = again[i]
        assert torch.equal(item["image"], other["image"]) and item["label"] == other["label"]
        assert item["caption"] == other["caption"]
        assert ("scene" in item) == (name == "shapes")
    batch = collate([train[0], train[1], hold[0]])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["label"].dtype == torch.int64
    assert len(batch["caption"]) == 3
    assert ("scene" in batch) == (name == "shapes")
    assert not torch.equal(train[0]["image"], train[1]["image"])
    with pytest.raises(IndexError):
        train[len(train)]
    line = describe(cfg)
    assert name in line and "\n" not in line


@pytest.mark.parametrize("name", BUILTIN)
def test_seed_changes_the_set(name):
    a = build_dataset(_cfg(name), 32, "holdout")
    b = build_dataset(_cfg(name, seed=1), 32, "holdout")
    assert any(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(min(len(a), len(b))))


def test_resolution_is_honoured():
    for name in BUILTIN:
        item = build_dataset(_cfg(name), 48, "train")[0]
        assert item["image"].shape == (3, 48, 48)
        if name == "shapes":
            assert item["scene"].shape == (48, 48)


# ---------------------------------------------------------------- photos

def _intersects(a, b):
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def _inside(box, region):
    return region[0] <= box[0] and box[1] <= region[1] and region[2] <= box[2] and box[3] <= region[3]


def test_photos_holdout_shares_no_pixel_with_training():
    cfg = dataclasses.replace(_cfg("photos"), num_images=400)
    train, hold = _splits(cfg)
    n_photos = len(md._photos())
    assert len(train.class_names) == n_photos
    for p in range(n_photos):
        t_boxes = [b for q, b in train.boxes if q == p]
        h_boxes = [b for q, b in hold.boxes if q == p]
        assert len(t_boxes) == 2 and len(h_boxes) == 1
        assert not any(_intersects(t, h) for t in t_boxes for h in h_boxes)
        # the held-out square and the training bands cover the photo together
        height, width = md._photos()[p][1].shape[:2]
        covered = np.zeros((height, width), bool)
        for r0, r1, c0, c1 in t_boxes + h_boxes:
            covered[r0:r1, c0:c1] = True
        assert covered.all()
    for ds, other in ((train, hold), (hold, train)):
        for i in range(len(ds)):
            p, box = ds.crop_box(i)
            assert any(_inside(box, b) for q, b in ds.boxes if q == p)
            assert not any(_intersects(box, b) for q, b in other.boxes if q == p)


def test_photo_crops_are_the_photo_pixels_they_claim():
    train = build_dataset(_cfg("photos"), 32, "train")
    sides = []
    for i in range(len(train)):
        p, (r0, r1, c0, c1) = train.crop_box(i)
        photo = Image.fromarray(md._photos()[p][1][r0:r1, c0:c1])
        want = np.asarray(photo.resize((32, 32), Image.Resampling.BICUBIC))
        item = train[i]
        assert item["label"] == p
        assert np.array_equal(_rgb(item["image"]), want)
        sides.append(r1 - r0)
    assert min(sides) >= 32 and max(sides) > 64  # several scales, never upsampled at 32 px
    assert len({train.crop_box(i)[0] for i in range(len(train))}) > 5


def test_photo_holdout_square_is_at_least_the_largest_window():
    train, hold = _splits(_cfg("photos"), resolution=16)
    for p, (r0, r1, c0, c1) in hold.boxes:
        height, width = md._photos()[p][1].shape[:2]
        assert r1 - r0 == c1 - c0 >= min(64, min(height, width) // 2)
        assert (r1 - r0) ** 2 >= 0.1 * height * width - 2 * (r1 - r0)


# ---------------------------------------------------------------- faces and digits

def test_faces_are_the_lfw_faces_and_splits_partition_them():
    from skimage.data import lfw_subset
    faces = lfw_subset()[:100]
    train, hold = _splits(_cfg("faces"), resolution=25)  # native size: no resampling
    found = []
    for ds in (train, hold):
        for i in range(len(ds)):
            grey = (ds[i]["image"][0].numpy() + 1) / 2
            assert np.allclose(ds[i]["image"][0], ds[i]["image"][2])
            diffs = np.abs(faces - grey).reshape(100, -1).max(1)
            assert diffs.min() < 1e-5
            found.append(int(diffs.argmin()))
    assert sorted(found) == list(range(100))  # disjoint and complete


def test_digits_labels_captions_and_pixels():
    from sklearn.datasets import load_digits
    digits = load_digits()
    train, hold = _splits(_cfg("digits"), resolution=8)
    assert train.class_names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    seen = []
    for ds in (train, hold):
        for i in range(len(ds)):
            item = ds[i]
            assert item["caption"] == f"a handwritten {ds.class_names[item['label']]}"
            grey = ((item["image"][0] + 1) / 2 * 16).numpy()
            j = int(np.abs(digits.images[:200] - grey).reshape(200, -1).max(1).argmin())
            assert np.allclose(digits.images[j], grey, atol=1e-4) and digits.target[j] == item["label"]
            seen.append(j)
    assert len(set(seen)) == len(seen) == 200


def _bilinear_matrix(n_in, n_out):
    """[n_out, n_in] weights of half-pixel-centred linear interpolation (edges clamped)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (x - lo))
    np.add.at(m, (np.arange(n_out), hi), x - lo)
    return m


def test_digits_upscaling_is_bilinear():
    native = build_dataset(_cfg("digits"), 8, "train")
    big = build_dataset(_cfg("digits"), 32, "train")
    m = _bilinear_matrix(8, 32)
    for i in range(5):
        digit = (native[i]["image"][0].double().numpy() + 1) / 2
        want = m @ digit @ m.T
        got = (big[i]["image"].double().numpy() + 1) / 2
        assert np.abs(got - want).max() < 1e-5


def test_digits_are_never_flipped():
    ds = build_dataset(_cfg("digits", hflip=True), 32, "train")
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        assert torch.equal(ds.augment(ds[i], g)["image"], ds[i]["image"])


# ---------------------------------------------------------------- shapes

_PHRASE = re.compile(r"an? (\w+) (\w+)")


def test_shapes_captions_labels_and_scene_maps_match_the_pixels():
    ds = build_dataset(_cfg("shapes", num_images=80), 32, "train")
    assert ds.scene_classes == ["background", "rectangle", "circle", "triangle", "ellipse"]
    assert ds.class_names == ds.scene_classes[1:]
    counts = set()
    for i in range(len(ds)):
        item = ds[i]
        image, scene = _rgb(item["image"]), item["scene"].numpy()
        assert item["scene"].dtype == torch.int64 and scene.min() >= 0 and scene.max() <= 4
        assert (image[scene == 0] == 255).all()  # background is white, shapes are not
        assert not (image[scene > 0] == 255).all(axis=-1).any()
        phrases = _PHRASE.findall(item["caption"])
        assert item["caption"] == ", ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {k}" for c, k in phrases[:-1]) \
            + (" and " if len(phrases) > 1 else "") + "{} {} {}".format(
                "an" if phrases[-1][0][0] in "aeiou" else "a", *phrases[-1])
        assert 1 <= len(phrases) <= 3 and len({c for c, _ in phrases}) == len(phrases)
        counts.add(len(phrases))
        areas = []
        for colour, kind in phrases:
            pixels = (image == np.array(md._PALETTE[colour], np.uint8)).all(axis=-1)
            assert pixels.any()
            assert (scene[pixels] == ds.scene_classes.index(kind)).all()
            areas.append(pixels.sum())
        assert sum(areas) == (scene > 0).sum()  # every shape pixel is named by the caption
        assert areas == sorted(areas, reverse=True)
        assert ds.class_names[item["label"]] == phrases[0][1]
    assert counts == {1, 2, 3}


def test_shapes_need_a_usable_resolution():
    with pytest.raises(ValueError, match="model.resolution >= 16"):
        build_dataset(_cfg("shapes"), 8, "train")


def test_shapes_splits_differ():
    train, hold = _splits(_cfg("shapes"))
    held = {hold[i]["image"].numpy().tobytes() for i in range(len(hold))}
    assert not any(train[i]["image"].numpy().tobytes() in held for i in range(len(train)))


# ---------------------------------------------------------------- augmentation

def test_augment_replays_from_the_generator_and_flips_scene_with_image():
    ds = build_dataset(_cfg("shapes"), 32, "train")
    items = [ds[i] for i in range(16)]
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        runs.append([ds.augment(it, g) for it in items])
    flipped = 0
    for it, a, b in zip(items, *runs):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["scene"], b["scene"])
        if not torch.equal(a["image"], it["image"]):
            flipped += 1
            assert torch.equal(a["image"], it["image"].flip(-1)) and torch.equal(a["scene"], it["scene"].flip(-1))
        else:
            assert torch.equal(a["scene"], it["scene"])
        assert a["caption"] == it["caption"] and a["label"] == it["label"]
    assert 0 < flipped < 16


def test_augment_without_flips_still_draws_exactly_one_number():
    ds = build_dataset(_cfg("photos", hflip=False), 32, "train")
    g, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i in range(8):
        assert torch.equal(ds.augment(ds[i], g)["image"], ds[i]["image"])
        torch.rand((), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# ---------------------------------------------------------------- folders

def _png(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, **kw).save(path)


@pytest.fixture
def folder(tmp_path):
    """A class-folder tree with every image kind and three bad files; returns (root, {file: expected})."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 200
    _png(root / "cats" / "a.png", red)
    (root / "cats" / "a.txt").write_text("  a red square \n")
    grey = np.full((16, 16), 77, np.uint8)
    _png(root / "cats" / "deep" / "b.PNG", grey)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:8, :, 3] = 255  # top half opaque green, bottom half transparent
    _png(root / "dogs" / "c.png", rgba)
    pal = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L").convert("P")
    pal.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
    pal.save(root / "dogs" / "d.png")
    _png(root / "dogs" / "e.png", np.full((16, 16), 65535 // 2, np.uint16))  # 16-bit grey
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "dogs" / "f.JPG", quality=95)
    Image.fromarray(red).save(root / "g.webp", lossless=True)  # at the root: no class
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"not even an image")
    # bad files: garbage, a truncated PNG (caught at build), a truncated JPEG (caught when decoded)
    (root / "dogs" / "garbage.jpg").write_bytes(b"\x00garbage" * 20)
    png = (root / "cats" / "a.png").read_bytes()
    (root / "cats" / "h_truncated.png").write_bytes(png[: len(png) // 2])
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "dogs" / "t.jpg")
    jpg = (root / "dogs" / "t.jpg").read_bytes()
    (root / "dogs" / "t.jpg").write_bytes(jpg[: len(jpg) // 2])
    return root


def _by_file(cfg, resolution=16):
    """{relative path: (dataset, index)} over both splits."""
    out = {}
    for split in ("train", "holdout"):
        ds = build_dataset(cfg, resolution, split)
        out.update({f: (ds, i) for i, f in enumerate(ds.files)})
    return out


def test_folder_labels_captions_and_conversions(folder):
    files = _by_file(DataConfig(name=str(folder), holdout_fraction=0.3))
    assert sorted(files) == ["cats/a.png", "cats/deep/b.PNG", "dogs/c.png", "dogs/d.png", "dogs/e.png",
                             "dogs/f.JPG", "dogs/t.jpg", "g.webp"]

    def item(name):
        ds, i = files[name]
        assert ds.class_names == ["cats", "dogs"] and ds.skipped == 2
        return ds[i]

    a = item("cats/a.png")
    assert a["label"] == 0 and a["caption"] == "a red square"
    assert (_rgb(a["image"]) == (200, 0, 0)).all()
    b = item("cats/deep/b.PNG")
    assert b["label"] == 0 and b["caption"] == "" and (_rgb(b["image"]) == 77).all()
    c = _rgb(item("dogs/c.png")["image"])
    assert (c[:8] == (0, 255, 0)).all() and (c[8:] == 255).all()  # transparency composited on white
    d = item("dogs/d.png")
    want = np.array([(i, 0, 255 - i) for i in range(256)], np.uint8).reshape(16, 16, 3)
    assert d["label"] == 1 and np.array_equal(_rgb(d["image"]), want)
    assert (np.abs(_rgb(item("dogs/e.png")["image"]).astype(int) - 127) <= 1).all()
    f = item("dogs/f.JPG")
    assert f["image"].shape == (3, 16, 16) and f["label"] == 1
    g = item("g.webp")
    assert g["label"] == -1 and (_rgb(g["image"]) == (200, 0, 0)).all()


def test_folder_split_is_deterministic_disjoint_and_seeded(folder):
    cfg = DataConfig(name=str(folder), holdout_fraction=0.3)
    train, hold = _splits(cfg, resolution=16)
    assert not set(train.files) & set(hold.files) and len(hold.files) == 2
    assert train.files == build_dataset(cfg, 16, "train").files
    splits = {tuple(build_dataset(dataclasses.replace(cfg, seed=s), 16, "holdout").files) for s in range(6)}
    assert len(splits) > 1


def test_folder_bad_files_are_skipped_counted_and_never_raise(folder, caplog):
    files = _by_file(DataConfig(name=str(folder), holdout_fraction=0.3))
    ds, j = files["dogs/t.jpg"]  # its header is fine; decoding fails
    n = len(ds)
    with caplog.at_level(logging.WARNING, logger="models.data"):
        first = ds[j]
        again = ds[j]
        every = [ds[i] for i in range(n)]
    assert ds.skipped == 3  # garbage.jpg and the truncated PNG at build, t.jpg now, once
    assert torch.equal(first["image"], ds[(j + 1) % n]["image"]) and torch.equal(again["image"], first["image"])
    assert len(every) == n
    assert sum("t.jpg" in r.getMessage() for r in caplog.records) == 1


def test_folder_resizes_shorter_side_and_centre_crops(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :, 0] = np.arange(40) * 6  # every column different
    for k in range(3):
        _png(tmp_path / f"{k}.png", arr)
    cfg = DataConfig(name=str(tmp_path), holdout_fraction=0.3)
    assert np.array_equal(_rgb(build_dataset(cfg, 20, "train")[0]["image"]), arr[:, 10:30])  # no resampling
    small = _rgb(build_dataset(cfg, 10, "train")[0]["image"])
    assert small.shape == (10, 10, 3) and 60 < small[:, 0, 0].mean() < small[:, -1, 0].mean() < 180


def test_folder_num_images_keeps_the_first_files(folder):
    cfg = DataConfig(name=str(folder), num_images=4, holdout_fraction=0.25)
    files = _by_file(cfg)
    assert sorted(files) == ["cats/a.png", "cats/deep/b.PNG", "dogs/c.png", "dogs/d.png"]


# ---------------------------------------------------------------- bad configuration

def test_empty_and_unreadable_folders_raise_naming_the_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no JPEG/PNG/WebP images in folder .*empty"):
        build_dataset(DataConfig(name=str(empty)), 32, "train")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of the 1 image files in folder .*bad"):
        build_dataset(DataConfig(name=str(bad)), 32, "train")


def test_unknown_names_and_files_list_the_builtins(tmp_path):
    with pytest.raises(ValueError, match="photos, faces, digits, shapes"):
        build_dataset(DataConfig(name="imagenet"), 32, "train")
    path = tmp_path / "x.png"
    _png(path, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="is a file, not a folder"):
        build_dataset(DataConfig(name=str(path)), 32, "train")


@pytest.mark.parametrize("resolution", [0, -8, 2.5, True, "32"])
def test_nonsense_resolution_names_the_option(resolution):
    with pytest.raises(ValueError, match="model.resolution"):
        build_dataset(_cfg("photos"), resolution, "train")


@pytest.mark.parametrize("update, option", [({"holdout_fraction": 0.0}, "data.holdout_fraction"),
                                            ({"holdout_fraction": 1.0}, "data.holdout_fraction"),
                                            ({"num_images": -1}, "data.num_images"),
                                            ({"max_crop_scale": 0.5}, "data.max_crop_scale"),
                                            ({"name": "digits", "num_images": 5000}, "data.num_images"),
                                            ({"num_images": 1}, "held-out split would take everything"),
                                            ({"num_images": 2, "holdout_fraction": 0.9}, "would take everything")])
def test_bad_data_options_raise_naming_them(update, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        build_dataset(dataclasses.replace(_cfg("photos"), **update), 32, "train")


def test_bad_split_name():
    with pytest.raises(ValueError, match="train, holdout"):
        build_dataset(_cfg("faces"), 32, "test")


def test_two_items_always_give_a_nonempty_holdout(tmp_path):
    for k in range(2):
        _png(tmp_path / f"{k}.png", np.full((8, 8, 3), k * 100, np.uint8))
    cfg = DataConfig(name=str(tmp_path), holdout_fraction=0.01)
    train, hold = _splits(cfg, resolution=8)
    assert len(train) == 1 and len(hold) == 1 and train.files != hold.files
