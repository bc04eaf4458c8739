"""A trained hypernet file: new_hypernet, save_hypernet, hypernet_metadata, and the published .pth still loading.

Metadata is free text from whoever made the file: huge, non-JSON or wrongly typed values must not break loading,
must not show up unbounded in a message, and must not pass for what they are not.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hypernet import __version__
from hypernet.errors import LoraRarError, LoraRarFileExists
from hypernet.model import (PUBLISHED_HIDDEN, LoraRarHypernet, describe_training, hypernet_metadata, new_hypernet,
                            save_hypernet)
from devkit.loras import SD15
from devkit.weights import shared_hypernet
from hypernet.base_models import UNetLayout

SD15_WIDTHS = (320, 640, 1280)
TRAINED = {"lorarar_model_classes": ["SD15"], "lorarar_pairs": ["dog+watercolour", "cat+oil"],
           "lorarar_recipe": {"lr": 0.01, "weight_decay": 1e-4, "lambda": 0.01, "clip": 1.0},
           "lorarar_steps": 12, "lorarar_base_model": "v1-5-pruned-emaonly.safetensors",
           "lorarar_unet_layout": SD15.as_dict()}


def _bare_file(path, metadata, widths=(640,)):
    """A hypernet written by hand (not through save_hypernet), with whatever metadata strings a stranger chose."""
    net = LoraRarHypernet({f"input_{k}": 2 * w for k, w in enumerate(widths, start=1)}, hidden=8)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=metadata)
    return path


def test_new_hypernet_has_one_input_layer_per_width_ascending_and_the_published_hidden_size():
    net = new_hypernet([1280, 320, 640])
    assert PUBLISHED_HIDDEN == LoraRarHypernet.from_state_dict(
        torch.load(shared_hypernet("sdxl"), map_location="cpu", weights_only=True)).hidden
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {"input_1.weight": (128, 640), "input_1.bias": (128,), "input_2.weight": (128, 1280),
                      "input_2.bias": (128,), "input_3.weight": (128, 2560), "input_3.bias": (128,),
                      "output.1.weight": (2, 128), "output.1.bias": (2,)}
    assert net.widths == {320: "input_1", 640: "input_2", 1280: "input_3"}
    assert net.training and all(p.requires_grad for p in net.parameters())


def test_new_hypernet_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    first, again, other = new_hypernet(SD15_WIDTHS, seed=1), new_hypernet(SD15_WIDTHS, seed=1), new_hypernet(SD15_WIDTHS, seed=2)
    assert torch.equal(torch.rand(3), expected_next)
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key])
    assert not torch.equal(first.input_1.weight, other.input_1.weight)
    with pytest.raises(LoraRarError, match="widths"):
        new_hypernet([])


def test_save_then_load_round_trips_tensors_and_metadata(tmp_path):
    net = new_hypernet(SD15_WIDTHS, hidden=16, seed=3)
    path = save_hypernet(net, tmp_path / "sd15.safetensors", TRAINED)
    loaded = LoraRarHypernet.load(path)
    for key, tensor in net.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key])
    meta = hypernet_metadata(path)
    assert meta == {"lorarar_model_classes": ("SD15",), "lorarar_widths": SD15_WIDTHS,
                    "lorarar_pairs": TRAINED["lorarar_pairs"], "lorarar_recipe": TRAINED["lorarar_recipe"],
                    "lorarar_steps": 12, "lorarar_pack_version": __version__,
                    "lorarar_base_model": "v1-5-pruned-emaonly.safetensors", "lorarar_unet_layout": SD15,
                    "unreadable": ()}
    assert loaded.model_classes == ("SD15",) and loaded.training_metadata == meta
    line = loaded.describe("sd15.safetensors")
    for text in ("SD15", "320, 640, 1280", "2 pairs", "12 steps", f"LoRA.rar {__version__}", "v1-5-pruned-emaonly"):
        assert text in line, line
    # already-encoded strings are taken as they are (checked)
    encoded = {k: (",".join(v) if k == "lorarar_model_classes" else json.dumps(v) if isinstance(v, (list, dict))
                   else str(v)) for k, v in TRAINED.items()}
    assert hypernet_metadata(save_hypernet(net, tmp_path / "again.safetensors", encoded)) == meta


def test_the_published_pth_files_still_load():
    for name in ("sdxl", "koala-700m"):
        net = LoraRarHypernet.load(shared_hypernet(name))
        assert sorted(net.widths) == [640, 1280] and net.training_metadata == {} and net.model_classes == ()
        assert "no training metadata" in net.describe(name)


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    path = save_hypernet(new_hypernet([640], seed=0), tmp_path / "h.safetensors", {})
    before = path.read_bytes()
    with pytest.raises(LoraRarFileExists, match="h.safetensors: file exists"):
        save_hypernet(new_hypernet([640], seed=1), path, {})
    assert path.read_bytes() == before
    save_hypernet(new_hypernet([640], seed=1), path, {}, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["h.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_and_nothing_is_written(tmp_path, value):
    net = new_hypernet([640, 1280])
    with torch.no_grad():
        net.input_2.weight[3, 5] = value
    with pytest.raises(LoraRarError, match=r"bad\.safetensors: hypernet tensor input_2\.weight holds NaN or Inf"):
        save_hypernet(net, tmp_path / "bad.safetensors", TRAINED)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata,match", [
    ({"lorarar_steps": "many"}, "lorarar_steps would not read back"),
    ({"lorarar_steps": -3}, "lorarar_steps would not read back"),
    ({"lorarar_steps": 2.5}, "lorarar_steps is a float; expected a string or an int"),
    ({"lorarar_pairs": "not json"}, "lorarar_pairs would not read back"),
    ({"lorarar_pairs": [1, 2]}, "lorarar_pairs would not read back"),
    ({"lorarar_recipe": ["lr", 0.01]}, "lorarar_recipe would not read back"),
    ({"lorarar_recipe": {"lr": object()}}, "lorarar_recipe is not JSON-serialisable"),
    ({"lorarar_widths": [640]}, "lorarar_widths 640 does not match the network's input layers"),
    ({"lorarar_base_model": "a\nb"}, "lorarar_base_model would not read back"),
    ({"lorarar_pack_version": "1.0\u202e"}, "lorarar_pack_version would not read back"),
    ({"steps": 3}, "metadata key 'steps' is not a lorarar_\\* key"),
    ({"lorarar_model_classes": ["SD15", "SDXL,SD3"]}, "'SDXL,SD3' is not a ComfyUI model class name"),
    ({"lorarar_model_classes": []}, "is not a ComfyUI model class name"),
    ({"lorarar_unet_layout": {**SD15.as_dict(), "num_res_blocks": [10**9] * 4}}, "lorarar_unet_layout would not read back"),
    ({"lorarar_unet_layout": {**SD15.as_dict(), "transformer_depth": [1]}}, "lorarar_unet_layout would not read back"),
    ({"lorarar_unet_layout": {**SD15.as_dict(), "name": "a\nb"}}, "lorarar_unet_layout would not read back"),
    ({"lorarar_unet_layout": [1, 2]}, "lorarar_unet_layout is a list; expected a string or a UNetLayout"),
])
def test_metadata_that_would_not_read_back_is_refused(tmp_path, metadata, match):
    with pytest.raises(LoraRarError, match=match):
        save_hypernet(new_hypernet([320, 640]), tmp_path / "m.safetensors", metadata)
    assert list(tmp_path.iterdir()) == []


def test_other_suffixes_are_refused(tmp_path):
    with pytest.raises(LoraRarError, match=r"h\.pth: a hypernet is saved as \.safetensors"):
        save_hypernet(new_hypernet([640]), tmp_path / "h.pth", {})


def test_hostile_metadata_loads_parsed_as_unreadable_and_shows_bounded(tmp_path):
    huge = "x" * 3_000_000
    path = _bare_file(tmp_path / "hostile.safetensors", {
        "lorarar_model_classes": "SD15,\x1b[31m" + "Y" * 500_000, "lorarar_pairs": json.dumps([huge]),  # valid, but huge
        "lorarar_recipe": "{not json", "lorarar_steps": "1e9", "lorarar_pack_version": "9" * 100_000,
        "lorarar_base_model": "evil\x1b[2J\nsecond line", "lorarar_widths": "640", "other": huge})
    meta = hypernet_metadata(path)
    assert meta["lorarar_model_classes"][0] == "SD15" and len(meta["lorarar_model_classes"]) == 2
    assert meta["lorarar_widths"] == (640,)
    assert set(meta["unreadable"]) == {"lorarar_pairs", "lorarar_recipe", "lorarar_steps", "lorarar_pack_version",
                                       "lorarar_base_model"}
    assert all(meta[key] is None for key in meta["unreadable"])
    net = LoraRarHypernet.load(path)  # the weights are fine: it loads, and says what it could not read
    line = net.describe("hostile.safetensors")
    assert len(line) < 400 and "\n" not in line and "\x1b" not in line
    assert "unreadable metadata: lorarar_pairs" in line
    with pytest.raises(LoraRarError) as error:
        net.check_fits("hostile.safetensors", "SDXL", {640})
    assert len(str(error.value)) < 400 and "this model is SDXL" in str(error.value)


def test_wrong_types_in_metadata_read_as_unreadable(tmp_path):
    path = _bare_file(tmp_path / "types.safetensors", {
        "lorarar_pairs": json.dumps({"dog": "oil"}), "lorarar_recipe": json.dumps([1, 2]), "lorarar_steps": "-4",
        "lorarar_widths": "640,abc"})
    meta = hypernet_metadata(path)
    assert set(meta["unreadable"]) == {"lorarar_pairs", "lorarar_recipe", "lorarar_steps", "lorarar_widths"}
    assert "unreadable metadata" in describe_training(meta, {640: "input_1"})


def test_json_metadata_nested_too_deeply_reads_as_unreadable(tmp_path):
    """A stranger's recipe or layout nested deeper than Python's JSON decoder recurses: unreadable, not a
    RecursionError traceback from the loader (the command line printed one)."""
    deep = "[" * 200_000 + "]" * 200_000  # under the 1 MiB parse limit
    path = _bare_file(tmp_path / "deep.safetensors", {"lorarar_model_classes": "SD15", "lorarar_recipe": deep,
                                                      "lorarar_unet_layout": deep, "lorarar_pairs": deep})
    meta = hypernet_metadata(path)
    assert set(meta["unreadable"]) == {"lorarar_recipe", "lorarar_unet_layout", "lorarar_pairs"}
    assert "unreadable metadata" in LoraRarHypernet.load(path).describe("deep.safetensors")


def test_a_model_class_of_invisible_characters_only_is_shown_escaped(tmp_path):
    net = LoraRarHypernet.load(_bare_file(tmp_path / "blank.safetensors", {"lorarar_model_classes": "\x00\u202e"}))
    with pytest.raises(LoraRarError, match=r"trained for '\\x00\\u202e' models; this model is SDXL") as error:
        net.check_fits("blank.safetensors", "SDXL", {640})
    assert "\x00" not in str(error.value) and "\u202e" not in str(error.value)


def test_metadata_widths_other_than_the_tensors_are_refused_at_load(tmp_path):
    path = _bare_file(tmp_path / "liar.safetensors", {"lorarar_widths": "320,640"}, widths=(640,))
    with pytest.raises(LoraRarError, match=r"liar\.safetensors: metadata lorarar_widths says widths 320, 640 but "
                                           r"the tensors serve 640"):
        LoraRarHypernet.load(path)


def test_a_file_that_is_no_safetensors_gives_one_line(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(64))
    with pytest.raises(LoraRarError, match=r"junk\.safetensors: cannot read the hypernet file's metadata"):
        hypernet_metadata(path)


def test_check_fits_names_the_file_the_families_and_the_widths(tmp_path):
    net = LoraRarHypernet.load(save_hypernet(new_hypernet(SD15_WIDTHS), tmp_path / "mine.safetensors", TRAINED))
    net.check_fits("mine.safetensors", "SD15", {320, 640, 1280})
    with pytest.raises(LoraRarError, match=r"^mine\.safetensors: this hypernet was trained for SD15 models; this "
                                           r"model is KOALA_700M"):
        net.check_fits("mine.safetensors", "KOALA_700M", {640, 1280})
    unnamed = LoraRarHypernet.load(save_hypernet(new_hypernet([640, 1280]), tmp_path / "x.safetensors", {}))
    with pytest.raises(LoraRarError, match=r"^x\.safetensors: this hypernet has input layers for attention widths "
                                           r"640, 1280; this SD15 model has attention widths 320, 640, 1280 "
                                           r"\(none for 320\)"):
        unnamed.check_fits("x.safetensors", "SD15", {320, 640, 1280})
    unnamed.check_fits("x.safetensors", "Flux", None)  # not a UNet: the merge methods decide


def test_saved_tensors_are_float32_and_exactly_the_network(tmp_path):
    net = new_hypernet([640, 1280]).half()
    tensors = load_file(str(save_hypernet(net, tmp_path / "h.safetensors", {})))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert set(tensors) == set(net.state_dict())
