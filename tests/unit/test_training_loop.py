"""The training loop's bookkeeping without a model: which pairs each rank draws, the per-slot draws, the recipe's
resume rule, checkpoints (weights_only) with every RNG state, and the output file's tensors and metadata; and
what it refuses: non-finite settings, a non-.safetensors --out, a checkpoint pickled to run code or cut short,
and a run whose weights turn NaN."""

import json
import os
import random
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open

from hypernet.model import LoraRarHypernet
from hypernet.training.distributed import World
from hypernet.model import new_hypernet, save_hypernet
from hypernet.training.output import refuse_existing, training_metadata
from hypernet.training.recipe import Recipe, resume_mismatch
from hypernet.training.state import (STATE_FILE, Checkpoint, load_checkpoint, restore_rng_states, rng_states,
                                     save_checkpoint)
from hypernet.training.trainer import Trainer, draw_generator, epoch_pairs, rank_pairs
from hypernet.errors import LoraRarError, LoraRarFileExists

PAIRS = [(s, t) for s in ("dog", "cat", "can") for t in ("oil", "flat")]


@pytest.mark.parametrize("world_size,batch", [(2, 1), (4, 1), (2, 2)])
def test_ranks_together_see_the_pairs_one_process_with_the_same_effective_batch_sees(world_size, batch):
    one = Recipe(batch_pairs=world_size * batch, steps_per_pair=3)
    many = Recipe(batch_pairs=batch, steps_per_pair=3)
    for step in range(12):
        single = rank_pairs(PAIRS, one, World(), step)
        split = [slot for rank in range(world_size) for slot in rank_pairs(PAIRS, many, World(rank, world_size), step)]
        assert split == single
        assert len({pair for _, pair in single}) == len(single)  # distinct while there are enough pairs
    # one pair per epoch: the same for every step of the epoch, another epoch draws again
    firsts = [rank_pairs(PAIRS, Recipe(), World(), step)[0][1] for step in range(0, 500, 5)]
    assert all(rank_pairs(PAIRS, Recipe(), World(), step)[0][1] == firsts[step // 5] for step in range(0, 500, 7))
    assert len(set(firsts)) == len(PAIRS)


def test_more_slots_than_pairs_draw_with_replacement():
    assert len(epoch_pairs(0, 3, 2, 5)) == 5 and set(epoch_pairs(0, 3, 2, 5)) <= {0, 1}


def test_draws_depend_on_seed_step_and_slot_only():
    def draw(*key):
        return torch.randn(4, generator=draw_generator(*key))

    assert torch.equal(draw(0, 7, 1), draw(0, 7, 1))
    assert not torch.equal(draw(0, 7, 1), draw(0, 7, 0)) and not torch.equal(draw(0, 7, 1), draw(1, 7, 1))


def test_resume_allows_more_epochs_and_refuses_other_numbers():
    saved = Recipe(epochs=10)
    assert resume_mismatch(saved, Recipe(epochs=20), 1, 1) is None
    assert resume_mismatch(Recipe(batch_pairs=2), Recipe(batch_pairs=1), 1, 2) is None  # same effective batch
    assert "effective batch" in resume_mismatch(Recipe(), Recipe(), 1, 2)
    assert resume_mismatch(saved, Recipe(epochs=10, fixed_style_prompt="x"), 1, 1).startswith("fixed_style_prompt was None")
    assert Recipe.from_json(Recipe(seed=3, mixed_precision="bf16").to_json()) == Recipe(seed=3, mixed_precision="bf16")
    with pytest.raises(LoraRarError, match="mixed precision 'fp8'"):
        Recipe(mixed_precision="fp8")


def test_checkpoint_round_trip_with_weights_only_restores_every_rng(tmp_path):
    net = new_hypernet([320, 640, 1280], hidden=8, seed=1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=1e-4)
    sum(p.sum() for p in net.parameters()).backward()
    optimizer.step()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    checkpoint = Checkpoint(3, net.state_dict(), optimizer.state_dict(), {}, rng_states(), Recipe().to_json(), 1,
                            [list(p) for p in PAIRS])
    save_checkpoint(tmp_path, checkpoint)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded = load_checkpoint(tmp_path)  # torch.load(weights_only=True) inside
    restore_rng_states(loaded.rng)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert loaded.step == 3 and loaded.pairs == [list(p) for p in PAIRS]
    again = torch.optim.AdamW(net.parameters(), lr=0.01)
    again.load_state_dict(loaded.optimizer)
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(LoraRarError, match="not a readable training checkpoint"):
        load_checkpoint(tmp_path)


def test_output_file_loads_as_a_hypernet_with_its_metadata(tmp_path):
    net = new_hypernet([1280, 320, 640], seed=0)
    assert sorted(net.widths) == [320, 640, 1280] and net.widths[320] == "input_1" and net.hidden == 128
    assert torch.equal(new_hypernet([320, 640, 1280], seed=0).input_1.weight, net.input_1.weight)
    metadata = training_metadata(model_classes=["SD15"], widths=[1280, 320, 640], pairs=PAIRS[:2],
                                 recipe_json=Recipe().to_json(), steps=500, base_model="sd15.safetensors")
    path = save_hypernet(net, tmp_path / "net.safetensors", metadata)
    loaded = LoraRarHypernet.load(path)
    assert loaded.model_classes == ("SD15",) and sorted(loaded.widths) == [320, 640, 1280]
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["lorarar_widths"] == "320,640,1280" and json.loads(meta["lorarar_pairs"]) == ["dog+oil", "dog+flat"]
    assert json.loads(meta["lorarar_recipe"])["learning_rate"] == 0.01 and meta["lorarar_steps"] == "500"
    with pytest.raises(LoraRarFileExists):
        save_hypernet(net, path, metadata)


def test_the_cli_defaults_follow_the_device_mixed_precision_and_checkpointing_on_a_gpu_only(monkeypatch):
    import argparse

    from hypernet.training import command

    parser = argparse.ArgumentParser()
    command.add_parsers(parser.add_subparsers())
    base = ["train", "--dataset", "d", "--base", "b.safetensors", "--out", "o.safetensors"]
    for gpu, expected in ((False, ("no", False)), (True, ("fp16", True))):
        monkeypatch.setattr(command, "_cuda_available", lambda gpu=gpu: gpu)
        recipe = command.recipe_from(parser.parse_args(base))
        assert (recipe.mixed_precision, recipe.gradient_checkpointing) == expected
    recipe = command.recipe_from(parser.parse_args(base + ["--mixed-precision", "bf16", "--no-gradient-checkpointing"]))
    assert (recipe.mixed_precision, recipe.gradient_checkpointing) == ("bf16", False)


def test_training_gives_h_exactly_the_layers_the_merge_gives_h(tmp_path):
    """One rule for the layers H serves (hypernet/methods/lorarar.py HYPERNET_ROLES): the layers training computes
    coefficients for are the layers the lorarar merge reports as merged by the hypernet."""
    from devkit.loras import SD15, random_lora, write_lora
    from hypernet.lora_io import read_lora
    from hypernet.merge import merge_loras
    from hypernet.training.trainer import pair_merge

    subject = read_lora(write_lora(tmp_path / "s.safetensors", random_lora(SD15, rank=2, seed=1)), SD15)
    style = read_lora(write_lora(tmp_path / "t.safetensors", random_lora(SD15, rank=2, seed=2)), SD15)
    net = new_hypernet([320, 640, 1280], hidden=8)

    class Task:
        device = torch.device("cpu")

        def layers(self, kind, name):
            return (subject if kind == "subjects" else style).layers

    trained = pair_merge(Task(), net, "s", "t").hypernet_layers
    merged = merge_loras(subject, style, net, layout=SD15)
    assert trained and sorted(trained) == sorted(n for n, a in merged.report.actions.items() if a == "hypernet")
    assert len(trained) == len(subject.layers) // 2  # to_q and to_out.0 of every attention; to_k / to_v summed


# --- hostile settings, checkpoints and weights

@pytest.mark.parametrize("setting", ["learning_rate", "weight_decay", "similarity_lambda", "grad_clip"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_settings_are_refused(setting, value):
    with pytest.raises(LoraRarError, match="must be a finite number"):
        Recipe(**{setting: value})


def test_out_of_another_suffix_is_refused_before_any_work(tmp_path):
    with pytest.raises(LoraRarError, match=r"net\.pt: the hypernet is written as \.safetensors"):
        refuse_existing(tmp_path / "net.pt", resume=False, overwrite=False)
    refuse_existing(tmp_path / "net.safetensors", resume=False, overwrite=False)  # the right suffix passes


def test_a_checkpoint_pickled_to_run_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 1, "step": Payload()}, tmp_path / STATE_FILE)
    with pytest.raises(LoraRarError) as raised:
        load_checkpoint(tmp_path)
    text = str(raised.value)
    assert text.startswith(f"{tmp_path / STATE_FILE}: not a readable training checkpoint") and "\n" not in text
    assert "refused (only weights_only=True loads)" in text and "weights_only` set to `False`" not in text
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    torch.save({"format": 1, "hypernet": {"w": torch.zeros(1000)}}, tmp_path / STATE_FILE)
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraRarError, match="not a readable training checkpoint") as raised:
        load_checkpoint(tmp_path)
    assert len(str(raised.value)) < 400


def test_weights_turning_nan_stop_the_run_before_anything_is_written(tmp_path):
    net = new_hypernet([8, 16], hidden=4)
    task = types.SimpleNamespace(device=torch.device("cpu"))  # train_step below replaces the model side
    trainer = Trainer(net, task, [("a", "b")], [], Recipe(epochs=3, steps_per_pair=1), tmp_path / "run",
                      checkpoint_every=1, validate_every=0)

    def diverging_step():
        trainer.step += 1
        if trainer.step == 2:
            with torch.no_grad():
                net.output[1].weight.fill_(float("nan"))
        return {"total": 1.0, "subject": 0.5, "style": 0.5, "similarity": 0.0, "grad_norm": 1.0, "pairs": ["a+b"]}

    trainer.train_step = diverging_step
    with pytest.raises(LoraRarError, match=r"step 2: hypernet weights output\.1\.weight became NaN or Inf"):
        trainer.run()
    kept = load_checkpoint(tmp_path / "run")  # step 1's checkpoint, finite, is the one left
    assert kept.step == 1 and all(bool(torch.isfinite(v).all()) for v in kept.hypernet.values())
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 1
