"""The comparison's pure parts: which columns a selection names, their labels, the grid's layout and picture."""

import numpy as np
import pytest
from PIL import Image

from hypernet import comparison, methods
from hypernet.comparison import Column, column_label, labels_for_images, layout, select_columns
from hypernet.errors import LoraRarError


def test_all_is_every_baseline_then_every_registered_method():
    assert select_columns("all") == [*comparison.BASELINES, *methods.names()]
    assert select_columns(" ALL ") == select_columns("all")


def test_a_new_registered_method_becomes_a_column_without_other_changes():
    class Extra(methods.MergeMethod):
        name, help = "extra-for-compare-test", "test only"
        since, position = "99.0.0", 1  # a version after every real one: listed last

    methods.register(Extra())
    try:
        assert select_columns("all")[-1] == "extra-for-compare-test"
        assert select_columns("Extra-For-Compare-Test") == ["extra-for-compare-test"]
    finally:
        methods.unregister("extra-for-compare-test")


def test_a_list_keeps_its_order_and_the_names_spelling():
    assert select_columns("np-lora, Subject Only,direct") == ["np-lora", "subject only", "direct"]


@pytest.mark.parametrize("spec, words", [
    ("direct, dierct", ["methods", "unknown 'dierct'", "subject only"]),
    ("direct,,np-lora", ["methods", "empty entry"]),
    ("", ["methods", "empty entry"]),
    ("direct, DIRECT", ["methods", "'direct' is named twice"]),
])
def test_bad_selections_are_one_line_errors_naming_the_input(spec, words):
    with pytest.raises(LoraRarError) as error:
        select_columns(spec)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


@pytest.mark.parametrize("spec", ["x" * 2_000_000, "direct,,np-lora" + " " * 2_000_000])
def test_a_huge_methods_input_is_not_echoed_whole(spec):
    """The STRING widget comes from a stranger's workflow: the whole input was repeated into the error, the
    server's log and the prompt's history (2 MB here)."""
    with pytest.raises(LoraRarError, match="methods") as error:
        select_columns(spec)
    assert len(str(error.value)) < 400 and "2000" in str(error.value)


def test_labels_carry_the_parameters_and_repeat_per_image():
    assert column_label("np-lora", {"mu": 0.5}) == "np-lora mu=0.5"
    assert column_label("subject only") == "subject only"
    columns = [Column("no LoRA", images=[_image(1)] * 2), Column("b-lora", failure="no split"),
               Column("np-lora", {"mu": 0.25}, images=[_image(2)] * 2)]
    assert labels_for_images(columns) == ["no LoRA", "no LoRA", "np-lora mu=0.25", "np-lora mu=0.25"]


def _image(shade: int, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, (shade * 40 % 256, 90, 160))


def test_one_image_per_column_wraps_into_a_near_square_grid():
    columns = [Column(f"m{i}", images=[_image(i)]) for i in range(7)] + [Column("failed", failure="why")]
    rows, cols, tiles = layout(columns)
    assert (rows, cols) == (3, 3)
    assert [(t.column, t.row, t.col) for t in tiles] == [(i, *divmod(i, 3)) for i in range(8)]
    assert tiles[-1].image is None and all(t.image == 0 for t in tiles[:-1])


def test_a_batch_gives_one_row_per_latent_and_one_column_per_method():
    columns = [Column("a", images=[_image(1), _image(2)]), Column("b", failure="why"),
               Column("c", images=[_image(3), _image(4)])]
    rows, cols, tiles = layout(columns)
    assert (rows, cols) == (2, 3)
    assert {(t.column, t.image): (t.row, t.col) for t in tiles} == {
        (0, 0): (0, 0), (0, 1): (1, 0), (2, 0): (0, 2), (2, 1): (1, 2), (1, None): (0, 1)}


def test_no_columns_is_an_error():
    with pytest.raises(LoraRarError, match="no columns"):
        layout([])


def _pixels_near(picture: np.ndarray, colour, tolerance=6) -> int:
    return int((np.abs(picture.astype(int) - np.array(colour)).max(axis=-1) <= tolerance).sum())


def test_the_grid_shows_every_image_at_tile_size_and_a_grey_tile_for_a_failure():
    red, green = (220, 30, 30), (30, 200, 60)
    columns = [Column("subject only", images=[Image.new("RGB", (64, 64), red)]),
               Column("np-lora", {"mu": 0.5}, images=[Image.new("RGB", (64, 64), green)]),
               Column("b-lora", failure="no published content/style block split for KOALA_700M")]
    picture = np.asarray(comparison.comparison_grid(columns, "subject + style, seed 1"))
    rows, cols, _ = layout(columns)
    tile = comparison.TILE_MIN  # 64 px images are drawn at the minimum tile size
    assert picture.shape[1] >= cols * tile and picture.shape[0] >= rows * tile
    # each image fills a tile (a little less at the antialiased edges), the failure tile is grey
    for colour in (red, green):
        assert tile * tile * 0.9 <= _pixels_near(picture, colour) <= tile * tile * 1.05
    assert _pixels_near(picture, (230, 230, 230), 2) > tile * tile * 0.5


def test_the_grid_keeps_the_aspect_and_caps_large_images():
    columns = [Column("direct", images=[Image.new("RGB", (1024, 768), (10, 10, 200))])]
    picture = np.asarray(comparison.comparison_grid(columns))
    assert _pixels_near(picture, (10, 10, 200)) == pytest.approx(comparison.TILE_MAX * 384, rel=0.03)
