"""The protocol's pure parts: answer parsing, the strict majority vote, resizing, aggregation, files, pictures."""

import json
import os

import pytest
import torch
from PIL import Image

from hypernet.evaluation import batch, batch_files, pictures, protocol
from hypernet.errors import LoraRarError
from hypernet.evaluation.protocol import ImageResult, Vote, majority, parse_answer


class ScriptedJudge:
    """An in-process judge (the HTTP client is tested against a real server in test_evaluate_judge.py)."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def ask(self, question, images):
        self.asked.append((question, [image.size for image in images]))
        return self.answer(question) if callable(self.answer) else self.answer


@pytest.mark.parametrize("text, verdict", [
    ("Yes", "yes"), ("yes.", "yes"), ("  YES, it is the same dog", "yes"), ("No", "no"), ("no.", "no"),
    ("No, the colours differ", "no"), ("Yes and no", "yes"),  # the paper: an answer containing yes is yes
    ("I cannot tell.", "unparsed"), ("", "unparsed"), ("eyes and nose", "unparsed"),  # whole words only
    ("The answer is: yes", "yes"), ("Nope", "unparsed"),
])
def test_parse_answer(text, verdict):
    assert parse_answer(text) == verdict


@pytest.mark.parametrize("verdicts, passed", [
    (["yes"], True), (["no"], False), (["unparsed"], False),
    (["yes", "no"], False),                       # exactly one half is not a majority
    (["yes", "yes", "no", "no"], False), (["yes", "yes", "no"], True),
    (["yes", "yes", "unparsed", "unparsed"], False),  # unparsed answers do not approve
    (["yes", "yes", "yes", "unparsed"], True),
])
def test_majority_is_strictly_above_half(verdicts, passed):
    assert majority(verdicts) is passed


def test_majority_needs_answers():
    with pytest.raises(LoraRarError, match="at least one reference"):
        majority([])


@pytest.mark.parametrize("size, expected", [((1024, 768), (512, 384)), ((300, 900), (171, 512)),
                                            ((512, 512), (512, 512)), ((200, 100), (200, 100))])
def test_resize_long_side(size, expected):
    out = protocol.resize_long_side(Image.new("RGBA", size, (10, 20, 30, 255)))
    assert out.size == expected and out.mode == "RGB"


_LETTERS = {"y": "yes", "n": "no", "u": "unparsed"}


def _result(name, subject, style):
    """An ImageResult from letters: "yyn" = yes, yes, no."""
    votes = [[_LETTERS[c] for c in letters] for letters in (subject, style)]
    return ImageResult(name, Vote(votes[0], votes[0]), Vote(votes[1], votes[1]))


def test_judge_image_asks_one_question_per_reference_with_both_images():
    judge = ScriptedJudge("yes")
    image = Image.new("RGB", (64, 48))
    subject_refs = [Image.new("RGB", (32, 32))] * 3
    style_refs = [Image.new("RGB", (16, 16))] * 2
    ticks = []
    result = protocol.judge_image(judge, "a.png", image, subject_refs, style_refs, "oil painting",
                                  before_question=lambda: ticks.append("before"), after_question=lambda: ticks.append("after"))
    assert len(judge.asked) == 5 == protocol.question_count(1, 3, 2)
    assert [sizes for _, sizes in judge.asked] == [[(64, 48), (32, 32)]] * 3 + [[(64, 48), (16, 16)]] * 2
    assert all("oil painting" in q for q, _ in judge.asked[3:]) and "oil painting" not in judge.asked[0][0]
    assert ticks == ["before", "after"] * 5
    assert len(result.subject.verdicts) == 3 and len(result.style.verdicts) == 2


def test_cancel_before_a_question_stops_asking():
    judge = ScriptedJudge("yes")

    def cancel_after_two():
        if len(judge.asked) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        protocol.judge_image(judge, "a", Image.new("RGB", (8, 8)), [Image.new("RGB", (8, 8))] * 3,
                             [Image.new("RGB", (8, 8))] * 3, "x", before_question=cancel_after_two)
    assert len(judge.asked) == 2


def test_unparsed_answers_are_recorded_and_reported():
    result = protocol.judge_image(ScriptedJudge("Hard to say."), "a", Image.new("RGB", (8, 8)),
                                  [Image.new("RGB", (8, 8))] * 2, [Image.new("RGB", (8, 8))], "x")
    data = result.as_dict()
    assert data["unparsed"] == 3 and data["subject"]["unparsed"] == 2 and data["subject"]["no"] == 0
    assert data["subject"]["answers"] == ["Hard to say."] * 2 and not data["both"]
    assert ImageResult.from_dict(json.loads(json.dumps(data))).as_dict() == data


def test_scores_average_per_pair_then_over_pairs():
    # pair a: 4 images, 3 subject, 2 style, 1 both; pair b: 1 image, passes everything
    pair_a = [_result("1", "yy", "yy"), _result("2", "yy", "nn"), _result("3", "yyn", "nny"), _result("4", "nn", "yyn")]
    pair_b = [_result("1", "y", "y")]
    a, b = protocol.score("a", pair_a), protocol.score("b", pair_b)
    assert (a.images, a.subject, a.style, a.both) == (4, 0.75, 0.5, 0.25)
    mean = protocol.mean_over_pairs([a, b])
    assert (mean.images, mean.subject, mean.style, mean.both) == (5, 0.875, 0.75, 0.625)  # not 4/5, 3/5, 2/5
    table = protocol.format_table([a, b], mean)
    lines = table.splitlines()
    assert lines[0].split() == ["pair", "images", "subject", "%", "style", "%", "both", "%"]
    assert lines[1].split() == ["a", "4", "75.0", "50.0", "25.0"]
    assert lines[-1].split() == ["mean", "5", "87.5", "75.0", "62.5"]


def test_clip_i_is_the_mean_cosine_to_the_references():
    generated = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    references = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(protocol.mean_cosine(generated, references),
                               torch.tensor([(1 + 2 ** -0.5) / 2, (0 + 2 ** -0.5) / 2]))


def test_annotated_grid_and_summary_chart():
    results = [_result("1", "yy", "yy"), _result("2", "yn", "yy"), _result("3", "u", "y")]
    tiles = [pictures.annotate(Image.new("RGB", (128, 96), "white"), r) for r in results]
    assert tiles[0].getpixel((0, 0)) == pictures.PASS_COLOUR and tiles[1].getpixel((0, 0)) == pictures.FAIL_COLOUR
    picture = pictures.grid(tiles)
    assert picture.size == (2 * 128 + 4, 2 * 96 + 4)
    pairs = [protocol.score("dog8__oil_painting2", results), protocol.score("cat2__glowing", results[:1])]
    chart = pictures.summary_chart(pairs, protocol.mean_over_pairs(pairs))
    assert chart.mode == "RGB" and chart.width >= 420
    colours = {colour for _, colour in chart.getcolors(maxcolors=1 << 16)}
    assert {(66, 133, 244), (251, 140, 0), (52, 168, 83)} <= colours  # subject, style and both bars drawn


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "results.json"
    batch_files.atomic_write(target, "first")
    batch_files.atomic_write(target, b"second")
    assert target.read_text() == "second" and os.listdir(target.parent) == ["results.json"]

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(LoraRarError, match=r"results.json: cannot write it \(No space left on device\)"):
        batch_files.atomic_write(target, "third, never complete")
    assert target.read_text() == "second" and os.listdir(target.parent) == ["results.json"]


@pytest.mark.parametrize("folder, name", [("watercolor_painting3", "watercolor painting"), ("3d_rendering4", "3d rendering"),
                                          ("glowing", "glowing"), ("flat_cartoon_illustration", "flat cartoon illustration"),
                                          ("2024", "2024")])
def test_style_name_from_folder(folder, name):
    assert batch.derive_style_name(folder) == name


def test_find_pairs_names_what_is_wrong(tmp_path):
    (tmp_path / "gen" / "dog8").mkdir(parents=True)
    (tmp_path / "subjects" / "dog8").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "subjects" / "dog8" / "ref.png")
    (tmp_path / "styles").mkdir()
    with pytest.raises(LoraRarError, match=r"dog8: pair folders must be named <subject>__<style>"):
        batch.find_pairs(tmp_path / "gen", tmp_path / "subjects", tmp_path / "styles")
    (tmp_path / "gen" / "dog8").rename(tmp_path / "gen" / "dog8__glowing")
    with pytest.raises(LoraRarError, match=r"styles/glowing: no reference images for pair dog8__glowing"):
        batch.find_pairs(tmp_path / "gen", tmp_path / "subjects", tmp_path / "styles")
    with pytest.raises(LoraRarError, match="nowhere: not a folder"):
        batch.find_pairs(tmp_path / "nowhere", tmp_path / "subjects", tmp_path / "styles")
