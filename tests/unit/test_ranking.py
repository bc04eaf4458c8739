"""Ranking labelled images by the paper's protocol: both %, then subject %, then style %."""

import pytest

from hypernet.errors import LoraRarError
from hypernet.evaluation.ranking import format_ranking, parse_labels, rank, ranking_rows
from hypernet.evaluation.protocol import ImageResult, Vote


def _result(subject: str, style: str) -> ImageResult:
    """One judged image with one answer per reference ('y' / 'n' per character)."""
    votes = []
    for answers in (subject, style):
        vote = Vote()
        for answer in answers:
            vote.add({"y": "yes", "n": "no"}[answer])
        votes.append(vote)
    return ImageResult("image", *votes)


def test_labels_rank_by_both_then_subject_then_style():
    labels = ["style only", "subject only", "lorarar", "direct", "no LoRA"]
    results = [_result("n", "y"), _result("y", "n"), _result("y", "y"), _result("n", "n"), _result("n", "n")]
    ranked = rank(labels, results)
    assert [s.name for s in ranked] == ["lorarar", "subject only", "style only", "direct", "no LoRA"]
    rows = ranking_rows(ranked)
    assert rows[0] == {"rank": 1, "label": "lorarar", "images": 1, "subject_pct": 100.0, "style_pct": 100.0,
                       "both_pct": 100.0}
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 4]  # equal scores share a rank, in their first order


def test_images_with_one_label_are_scored_together():
    labels = ["direct", "lorarar", "direct", "lorarar"]
    results = [_result("y", "y"), _result("y", "n"), _result("n", "y"), _result("y", "y")]
    ranked = rank(labels, results)
    assert [(s.name, s.images, s.subject, s.style, s.both) for s in ranked] == [
        ("lorarar", 2, 1.0, 0.5, 0.5), ("direct", 2, 0.5, 1.0, 0.5)]  # equal both: subject decides


def test_the_text_table_lists_every_label_with_its_percentages():
    text = format_ranking(rank(["np-lora mu=0.5", "b-lora"], [_result("yyn", "n"), _result("y", "y")]))
    lines = text.splitlines()
    assert lines[0].split() == ["rank", "method", "images", "subject", "%", "style", "%", "both", "%"]
    assert lines[1].split() == ["1", "b-lora", "1", "100.0", "100.0", "100.0"]
    assert lines[2].split() == ["2", "np-lora", "mu=0.5", "1", "100.0", "0.0", "0.0"]


def test_labels_are_one_line_per_image():
    assert parse_labels("direct\nnp-lora mu=0.5\n", 2) == ["direct", "np-lora mu=0.5"]
    with pytest.raises(LoraRarError, match="labels: 1 lines for 2 images"):
        parse_labels("direct", 2)
    with pytest.raises(LoraRarError, match="labels: line 2 is blank"):
        parse_labels("direct\n \nlorarar", 3)
    with pytest.raises(LoraRarError, match="3 labels for 2 judged images"):
        rank(["a", "b", "c"], [_result("y", "y")] * 2)
