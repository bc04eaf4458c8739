"""devkit/quality_world.py: the shapes-in-styles world is deterministic and split as documented, its renders are
real pictures, and a (tiny, quick) judge trains, predicts, saves and loads. The full judges' 98 % gate is the
lab run's (``python devkit/quality_world.py --out DIR``), not this file's."""

import json
import re

import numpy as np
import pytest
import torch

from devkit import quality_world as qw

ENGLISH = set(qw.SHAPE_NAMES) | set(qw.STYLE_NAMES)


@pytest.fixture(autouse=True)
def one_thread():
    """The training here is tiny; one thread keeps it cheap beside other work and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return qw.World(0)


def _some_pairs(world, n=12):
    return [(world.shapes[i % 16], world.styles[(5 * i + 3) % 16]) for i in range(n)]


def test_same_seed_same_world_and_renders(world):
    again = qw.World(0)
    assert again.describe() == world.describe()
    assert again.shapes == world.shapes and again.styles == world.styles
    pairs = _some_pairs(world)
    assert world.batch(pairs, 3).tobytes() == again.batch(pairs, 3).tobytes()
    assert not np.array_equal(world.batch(pairs, 3), world.batch(pairs, 4))


def test_other_seed_other_splits_same_pictures(world):
    other = qw.World(1)
    assert other.describe()["splits"] != world.describe()["splits"]
    # a render depends on (shape, style, generator) alone, not on the world's seed
    shape, style = world.shapes[4], world.styles[9]
    a = world.render(shape, style, np.random.default_rng(11))
    b = other.render(other.shapes[4], other.styles[9], np.random.default_rng(11))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_splits_are_disjoint_and_cover_every_concept(seed):
    world = qw.World(seed)
    for kind in qw.KINDS:
        parts = {part: [c.index for c in world.split(kind, part)] for part in qw.PARTS}
        assert {part: len(ix) for part, ix in parts.items()} == {"base": 6, "lora_train": 8, "held_out": 2}
        assert sorted(sum(parts.values(), [])) == list(range(16))
        for part, ix in parts.items():
            assert all(world.part_of(world.concepts(kind)[i]) == part for i in ix)
    with pytest.raises(ValueError):
        world.split("shape", "train")


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_tokens_are_words_for_base_and_rare_otherwise(seed):
    world = qw.World(seed)
    tokens = [c.token for c in world.shapes + world.styles]
    assert len(set(tokens)) == 32
    for concept in world.shapes + world.styles:
        assert concept.name in ENGLISH
        if world.part_of(concept) == "base":
            assert concept.token == concept.name
        else:
            assert concept.token not in ENGLISH
            assert re.fullmatch(r"[b-df-hj-np-tv-xz]{3}", concept.token), concept.token  # no vowel, no y
    assert all(c.kind == "shape" for c in world.shapes) and all(c.kind == "style" for c in world.styles)
    assert [c.index for c in world.shapes] == list(range(16))


def test_captions(world):
    shape, style = world.split("shape", "base")[0], world.split("style", "lora_train")[0]
    assert world.caption(shape, style) == f"a {shape.name} in {style.token} style"
    shape = world.split("shape", "held_out")[1]
    assert world.caption(shape, style) == f"a {shape.token} in {style.token} style"


def test_describe_is_json(world):
    described = json.loads(json.dumps(world.describe()))
    assert described["seed"] == 0 and described["size"] == qw.SIZE
    assert len(described["shapes"]) == 16 and {row["split"] for row in described["styles"]} == set(qw.PARTS)


def test_renders_are_pictures_with_pose(world):
    style = world.styles[0]
    pictures = world.batch([(shape, style) for shape in world.shapes], seed=5)
    assert pictures.shape == (16, qw.SIZE, qw.SIZE, 3) and pictures.dtype == np.uint8
    for picture in pictures:
        assert picture.std() > 10  # a shape on a background, not a flat colour
    # every two shapes in one style differ (same seed: the same pose draws)
    flat = pictures.reshape(16, -1).astype(np.int32)
    distance = np.abs(flat[:, None] - flat[None]).mean(axis=2)
    assert (distance + np.eye(16) * 1e9).min() > 1.0
    # two draws of one pair from one generator differ (pose), and the same seed repeats
    rng = np.random.default_rng(2)
    first, second = world.render(world.shapes[3], style, rng), world.render(world.shapes[3], style, rng)
    assert not np.array_equal(first, second)
    assert np.array_equal(first, world.render(world.shapes[3], style, np.random.default_rng(2)))


def test_every_style_renders_every_shape_visibly(world):
    pictures = world.batch(world.all_pairs(), seed=0)
    backgrounds = pictures[:, 0, 0].astype(np.int32)  # corners are background (the shape never reaches them)
    changed = (np.abs(pictures.astype(np.int32) - backgrounds[:, None, None]).sum(axis=3) > 60).mean(axis=(1, 2))
    assert changed.min() > 0.04, changed.min()  # at least ~40 px differ clearly from the background


def test_augment_and_blur_keep_shape_and_range():
    x = torch.rand(6, 3, 32, 32)
    assert torch.allclose(qw.gaussian_blur(x, 0.0), x, atol=1e-5)
    blurred = qw.gaussian_blur(x, 0.8)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    out = qw.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, qw.augment(x, torch.Generator().manual_seed(0)))


def test_quick_judges_predict_save_and_load(world, tmp_path):
    pool = qw.render_pool(world, 1, (0, 1))
    shape = qw.train_judge(world, "shape", 0, steps=8, width=4, pool=pool)
    style = qw.train_judge(world, "style", 0, steps=40, width=4, pool=pool)
    assert isinstance(shape, qw.ShapeJudge) and isinstance(style, qw.StyleJudge)
    images, shapes, styles = qw.render_pool(world, 1, (0, 2))
    probabilities = style.probabilities(images)
    assert probabilities.shape == (256, 16) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    predicted = style.predict(images)
    assert predicted.shape == (256,) and predicted.dtype == np.int64 and predicted.min() >= 0 and predicted.max() < 16
    assert (predicted == styles).mean() > 0.25  # far above chance (1/16) after 40 tiny steps: colour is easy
    assert np.array_equal(style.predict(qw.as_tensor(images)), predicted)  # float (N, 3, H, W) reads the same
    assert style.predict(images[0]).shape == (1,)  # one (H, W, 3) picture
    with pytest.raises(ValueError, match="32 px"):
        style.predict(np.zeros((1, 16, 16, 3), np.uint8))

    judges = qw.Judges(shape, style, world.seed, world.size)
    judges.save(tmp_path / "judges.safetensors", extra={"note": "quick"})
    loaded = qw.load_judges(tmp_path / "judges.safetensors")
    assert (loaded.world_seed, loaded.size) == (0, qw.SIZE)
    assert np.allclose(loaded.style.probabilities(images), probabilities, atol=1e-6)
    shape_idx, style_idx = loaded.classify(images)
    assert np.array_equal(shape_idx, shape.predict(images)) and np.array_equal(style_idx, predicted)
    accuracies = loaded.evaluate(world, (0, 3), per_pair=1)
    assert set(accuracies) == {"shape", "style"} and set(accuracies["style"]) == {"clean", "blurred"}


def test_training_is_deterministic(world):
    pool = qw.render_pool(world, 1, (0, 1))
    a = qw.train_judge(world, "style", 3, steps=5, width=4, pool=pool)
    b = qw.train_judge(world, "style", 3, steps=5, width=4, pool=pool)
    for (name, p), q in zip(a.net.state_dict().items(), b.net.state_dict().values()):
        assert torch.equal(p, q), name


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "kohya"})
    with pytest.raises(ValueError, match="not a quality-world judges file"):
        qw.load_judges(tmp_path / "other.safetensors")


def test_cli_writes_contact_sheet_and_world(tmp_path):
    summary = qw.main(["--out", str(tmp_path), "--no-judges"])
    assert (tmp_path / "contact_sheet.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "world.json").read_text())["world"] == summary["world"]
