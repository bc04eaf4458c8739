"""The quality lab's scores: per seed over every pair, then Student's t over the seeds (bench/quality_lab.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from dataclasses import replace  # noqa: E402

from quality_lab import FULL, column_scores, gate_rows, seed_value  # noqa: E402


def test_column_scores_pool_the_pairs_per_seed_then_average_the_seeds():
    # counts per seed: [subject hits, style hits, both hits, images]
    per_pair = {"a x b": [[4, 2, 2, 4], [3, 4, 3, 4], [4, 4, 4, 4]],
                "c x d": [[0, 4, 0, 4], [1, 2, 1, 4], [2, 0, 0, 4]]}
    scores = column_scores(per_pair)
    subject = np.array([4 / 8, 4 / 8, 6 / 8]) * 100
    assert scores["subject"][0] == pytest.approx(subject.mean())
    assert scores["subject"][1] == pytest.approx(subject.std(ddof=1) * 4.30 / np.sqrt(3))  # t(0.975, df 2)
    both = np.array([2 / 8, 4 / 8, 4 / 8]) * 100
    assert scores["both"][0] == pytest.approx(both.mean())


def test_one_seed_has_no_interval():
    scores = column_scores({"a x b": [[1, 1, 1, 2]]})
    assert scores["style"][0] == 50.0 and np.isnan(scores["style"][1])


def test_a_gate_below_its_threshold_is_a_failure_naming_it():
    judge = {"shape": {"clean": 0.99}, "style": {"clean": 0.97}}
    rows, failures = gate_rows(judge, {"base shape": 0.95, "base style": 0.9, "samples": 216}, {"shape ell (pxv)": 0.5})
    assert rows["style judge on held-out renders"] == ("97.0%", ">= 98%")
    assert failures == ["style judge on held-out renders: 97.0% < 98%", "LoRA alone: shape ell (pxv): 50.0% < 80%"]


def test_a_change_upstream_changes_every_key_built_from_it():
    """A retrained base must not be paired with the old LoRAs, dataset or hypernet (the keys chain)."""
    stages = ("autoencoder_key", "base_key", "lora_key", "dataset_key", "hypernet_key")
    keys = {stage: getattr(FULL, stage)() for stage in stages}
    for change, first_changed in ((dict(base_lr=5e-4), "base_key"), (dict(autoencoder_batch=8), "autoencoder_key"),
                                  (dict(lora_steps=60), "lora_key"), (dict(held_out=1), "dataset_key"),
                                  (dict(family="other"), "autoencoder_key")):
        changed = replace(FULL, **change)
        index = stages.index(first_changed)
        assert all(getattr(changed, stage)() == keys[stage] for stage in stages[:index]), change
        assert all(getattr(changed, stage)() != keys[stage] for stage in stages[index:]), change


def test_a_seed_outside_what_numpy_and_torch_take_is_refused():
    assert seed_value("4294967295") == 2**32 - 1
    for text in ("-1", "4294967296"):
        with pytest.raises(Exception, match="2\\*\\*32"):
            seed_value(text)
