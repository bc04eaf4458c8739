"""The merge-method registry: a method is one plug-in, and the CLI offers what the registry holds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devkit.loras import SD15, random_lora, write_lora
from hypernet import __version__, cli, methods
from hypernet.errors import LoraRarError
from hypernet.lora_io import read_lora
from hypernet.lowrank import weighted_sum
from hypernet.merge import merge_loras
from hypernet.methods import Claim, MergedLayer, MergeMethod, Param
from hypernet.runtime import RuntimePart

REPO = Path(__file__).resolve().parents[2]
MODULES = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_k"]
# the methods' parameter inputs as the nodes and saved 0.2.0 workflows have them, in order
PUBLISHED_PARAMS = ["np_lora_mu", "k_lora_alpha", "k_lora_beta", "k_lora_linear_alpha", "k_lora_linear_beta"]


def next_position() -> int:
    """The position a method added now declares: the next free one of this pack version."""
    return 1 + max((method.position for method in methods.all_methods() if method.since == __version__), default=0)


class ScaledSubject(MergeMethod):
    """A toy method with a parameter: keeps gain * dW_subject on to_q layers, declines the rest."""

    name = "toy-scaled"
    help = "gain times the subject, for the registry test"
    since, position = __version__, next_position()
    params = (Param("gain", 0.5, 0.0, 4.0, "how much of the subject to keep"),)

    def claim(self, name, subject, style, ctx):
        return Claim("scaled", "toy rule") if name.endswith("to_q") and subject is not None else None

    def merge(self, job, ctx):
        return MergedLayer(weighted_sum([(job.subject, job.subject_weight * ctx.params["gain"])], ctx.device, job.dtype))


@pytest.fixture
def toy_method():
    methods.register(ScaledSubject())
    yield methods.get("toy-scaled")
    methods.unregister("toy-scaled")


@pytest.fixture
def pair(tmp_path):
    subject = write_lora(tmp_path / "dog.safetensors", random_lora(rank=4, seed=1, modules=MODULES))
    style = write_lora(tmp_path / "ink.safetensors", random_lora(rank=3, seed=2, modules=MODULES))
    return subject, style


# the published methods and where saved workflows expect them: (name, since, position), in listed order. A method
# added later comes after all of these (tests below), so this list only grows when a release publishes new ones.
PUBLISHED = [("lorarar", "0.1.0", 1), ("direct", "0.1.0", 2), ("np-lora", "0.2.0", 1), ("b-lora", "0.2.0", 2),
             ("k-lora", "0.2.0", 3), ("k-lora-linear", "0.2.0", 4), ("zip-lora", "0.2.0", 5)]


def test_the_published_methods_keep_their_places():
    """Every published method is still registered at its declared place, they lead the list in that order, and
    their parameter inputs keep their positions; methods added since may follow, whatever their names."""
    listed = [(method.name, method.since, method.position) for method in methods.all_methods()]
    assert listed[:len(PUBLISHED)] == PUBLISHED
    assert _param_keys()[:len(PUBLISHED_PARAMS)] == PUBLISHED_PARAMS
    assert all(method.help for method in methods.all_methods())


def _param_keys() -> list[str]:
    return [methods.param_key(method, param) for method in methods.all_methods() for param in method.params]


class FirstByName(MergeMethod):
    """A method added now whose name sorts before every other one, with parameters."""

    name = "aaa-toy"
    help = "sorts first by name"
    since, position = __version__, next_position()
    params = (Param("zeta", 1.0, 0.0, 2.0, "first parameter"), Param("alpha", 0.0, 0.0, 1.0, "second parameter"))


def test_a_new_method_is_listed_after_every_existing_one_whatever_its_name():
    """Saved workflows hold the parameter widgets by position: a new method's go after all existing ones."""
    before_names, before_params = methods.names(), _param_keys()
    assert before_params[:len(PUBLISHED_PARAMS)] == PUBLISHED_PARAMS
    methods.register(FirstByName())
    try:
        assert methods.names() == (*before_names, "aaa-toy")
        assert _param_keys() == [*before_params, "aaa_toy_zeta", "aaa_toy_alpha"]  # its own in declared order
    finally:
        methods.unregister("aaa-toy")
    assert methods.names() == before_names


def test_the_order_is_declared_not_the_order_of_registration():
    """Registered in reverse (another import order), the methods are listed as before."""
    registered = methods.all_methods()
    for method in registered:
        methods.unregister(method.name)
    try:
        for method in reversed(registered):
            methods.register(method)
        assert methods.all_methods() == registered
    finally:
        for method in methods.all_methods():
            methods.unregister(method.name)
        for method in registered:
            methods.register(method)
    assert methods.all_methods() == registered


@pytest.mark.parametrize("since, position, message", [("", 1, "must name the pack version"),
                                                      ("0.2", 0, "must name the pack version"),
                                                      ("0.1.0", 2, "position 2 is taken by direct")])
def test_a_method_without_its_own_place_is_refused(since, position, message):
    class Misplaced(FirstByName):
        name = "misplaced"

    Misplaced.since, Misplaced.position = since, position
    with pytest.raises(ValueError, match=message):
        methods.register(Misplaced())
    assert "misplaced" not in methods.names()


def test_a_plugged_in_method_merges_with_its_parameter_and_the_plan_reports_it(toy_method, pair):
    subject, style = (read_lora(path) for path in pair)
    merged = merge_loras(subject, style, None, method="toy-scaled", params={"gain": 2.0})
    q = next(name for name in merged.layers if name.endswith("to_q"))
    expected = 2.0 * subject.layers[q].up @ subject.layers[q].down
    torch.testing.assert_close(merged.layers[q].up @ merged.layers[q].down, expected)
    assert merged.report.as_dict()["layers"] == {"scaled": 1, "summed": 1}  # to_k: declined, layer policy sum
    assert merged.report.params == {"gain": 2.0} and "toy-scaled, gain=2" in merged.report.to_text()
    assert json.loads(merged.metadata("test")["lorarar_report"])["params"] == {"gain": 2.0}


@pytest.mark.parametrize("params, message", [({"gain": 9.0}, "between 0 and 4"), ({"gain": float("nan")}, "between"),
                                             ({"mu": 1.0}, "has no parameter mu")])
def test_bad_method_parameters_are_one_line(toy_method, pair, params, message):
    subject, style = (read_lora(path) for path in pair)
    with pytest.raises(LoraRarError, match=message):
        merge_loras(subject, style, None, method="toy-scaled", params=params)


def test_the_cli_offers_each_method_and_its_parameters(toy_method, pair, tmp_path, capsys):
    subject, style = pair
    out = tmp_path / "toy.safetensors"
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    help_text = capsys.readouterr().out
    assert "toy-scaled" in help_text and "--toy-scaled-gain" in help_text and "how much of the subject" in help_text
    assert cli.main(["merge", "--subject", str(subject), "--style", str(style), "--out", str(out),
                     "--method", "toy-scaled", "--toy-scaled-gain", "3", "--json"]) == 0
    assert '"gain": 3.0' in capsys.readouterr().out
    assert cli.main(["merge", "--subject", str(subject), "--style", str(style), "--out", str(tmp_path / "x.safetensors"),
                     "--method", "direct", "--toy-scaled-gain", "3"]) == 2
    assert "belongs to method toy-scaled" in capsys.readouterr().err


def test_the_cli_refuses_what_the_node_refuses_whatever_the_method(tmp_path):
    """--base names the layout the LoRAs must fit, for every method: SD1.5 LoRAs are refused for sdxl."""
    subject = write_lora(tmp_path / "sd15_a.safetensors", random_lora(SD15, rank=4, seed=4))
    style = write_lora(tmp_path / "sd15_b.safetensors", random_lora(SD15, rank=4, seed=5))
    result = subprocess.run([sys.executable, "-m", "hypernet", "merge", "--method", "direct", "--base", "sdxl",
                             "--subject", str(subject), "--style", str(style), "--out", str(tmp_path / "m.safetensors")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not (tmp_path / "m.safetensors").exists()
    assert "sd15_a.safetensors: cross-attention reads a 768-wide text context" in result.stderr
    assert "another base model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


class SwitchedToy(MergeMethod):
    """A toy sampling-time method with its own reason no file holds its merges, and a runtime part carrying it."""

    name = "toy-switch"
    help = "the subject, then the style, per sampling step"
    since, position = __version__, next_position()
    sampling_time = True
    unsavable = "swaps the LoRAs while the model samples"

    def claim(self, name, subject, style, ctx):
        return Claim("switched") if subject is not None and style is not None else None

    def merge(self, job, ctx):
        return MergedLayer(None, runtime=job.subject)

    def finish(self, runtime, params):
        class Part(RuntimePart):
            method = self.name
        return Part() if runtime else None


def test_a_sampling_time_method_is_refused_as_a_file_with_its_own_reason(pair, tmp_path, capsys):
    """The CLI (before anything is read) and the save node's check (MergedLora) say the method's own reason."""
    methods.register(SwitchedToy())
    try:
        subject, style = pair
        out = tmp_path / "switch.safetensors"
        assert cli.main(["merge", "--subject", str(subject), "--style", str(style), "--out", str(out),
                         "--method", "toy-switch"]) == 2 and not out.exists()
        wording = "toy-switch swaps the LoRAs while the model samples; it cannot be saved as one LoRA file"
        assert wording in capsys.readouterr().err
        merged = merge_loras(read_lora(subject), read_lora(style), None, method="toy-switch")
        with pytest.raises(LoraRarError, match=wording):
            merged.kohya_state_dict()
    finally:
        methods.unregister("toy-switch")


class KeepSubject(MergeMethod):
    """A toy method saying through its attributes, not its name, that it needs no layout and takes every layer."""

    name = "toy-keep"
    help = "the subject's layer where it has one, else the style's"
    since, position = __version__, next_position()
    claims_every_layer = True
    layout_free = True

    def claim(self, name, subject, style, ctx):
        return Claim.keep("subject" if subject is not None else "style", "toy rule")

    def merge(self, job, ctx):
        side = (job.subject, job.subject_weight) if job.sides == ("subject",) else (job.style, job.style_weight)
        return MergedLayer(weighted_sum([side], ctx.device, job.dtype))


@pytest.fixture
def keep_method():
    methods.register(KeepSubject())
    yield methods.get("toy-keep")
    methods.unregister("toy-keep")


def test_a_plugged_in_method_says_itself_whether_it_merges_any_family(keep_method):
    """--base any asks the method (layout_free, its own unsupported()), so adding a method edits no list."""
    from hypernet import any_family

    assert any_family.layout_free_methods() == ("direct", "np-lora", "toy-keep")
    any_family.refuse_method(keep_method)  # accepted
    with pytest.raises(LoraRarError) as refused:
        any_family.refuse_method(methods.get("b-lora"))
    assert "no published content/style block split for an unknown base model" in str(refused.value)
    assert "published for SDXL only" in str(refused.value) and "methods that can: direct, np-lora, toy-keep" in str(refused.value)


def test_a_method_that_claims_every_layer_keeps_the_plain_side_beside_an_adapter_it_cannot_merge(keep_method, tmp_path):
    """pipeline asks MergeMethod.claims_every_layer (direct, the toy), not the method's name."""
    from hypernet.methods import MergeContext
    from hypernet.pipeline import plan_layer

    stem = "lora_unet_input_blocks_4_1_proj_in"
    plain = {f"{stem}.lora_up.weight": torch.ones(640, 2), f"{stem}.lora_down.weight": torch.ones(2, 640)}
    loha = {f"{stem}.hada_w1_a": torch.ones(640, 2), f"{stem}.hada_w1_b": torch.ones(2, 640)}
    subject = read_lora(write_lora(tmp_path / "plain.safetensors", plain)).layers[stem]
    style = read_lora(write_lora(tmp_path / "loha.safetensors", loha)).layers[stem]
    ctx = MergeContext(None, torch.device("cpu"))
    for method, action in (("toy-keep", "kept (subject)"), ("direct", "kept (subject)"), ("np-lora", "skipped")):
        plan = plan_layer(stem, subject, style, methods.get(method), "skip", {"subject": 1.0, "style": 1.0},
                          torch.float32, ctx)
        assert (plan.action, plan.sides) == (action, ("subject",) if action != "skipped" else ()), method


def test_a_layer_kept_from_one_lora_names_that_file_alone(tmp_path):
    """MergedLora.files_of reads the plan's sides, not the report's words."""
    from hypernet.base_models import SDXL

    modules = ["output_blocks.0.1.transformer_blocks.0.attn1.to_q", "output_blocks.1.1.transformer_blocks.0.attn1.to_q",
               "input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    subject = read_lora(write_lora(tmp_path / "dog.safetensors", random_lora(rank=2, seed=1, modules=modules)))
    style = read_lora(write_lora(tmp_path / "ink.safetensors", random_lora(rank=2, seed=2, modules=modules)))
    merged = merge_loras(subject, style, None, method="b-lora", layout=SDXL)
    content, style_block, other = ("lora_unet_" + module.replace(".", "_") for module in modules)
    assert merged.report.actions[content] == "kept (subject)" and merged.files_of(content) == ["dog.safetensors"]
    assert merged.report.actions[style_block] == "kept (style)" and merged.files_of(style_block) == ["ink.safetensors"]
    assert merged.report.actions[other] == "summed" and merged.files_of(other) == ["dog.safetensors", "ink.safetensors"]
    toy = read_lora(write_lora(tmp_path / "toy.safetensors", random_lora(rank=2, seed=3, modules=modules[:1])))
    direct = merge_loras(toy, style, None, method="direct", layout=SDXL)
    assert direct.files_of(style_block) == ["ink.safetensors"] and direct.files_of(content) == ["toy.safetensors", "ink.safetensors"]
