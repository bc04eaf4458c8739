"""Data-driven merge methods (``needs_model``): the merge hands them the host's model (hypernet/calibration.py) and
they run it before merging. Without ComfyUI: a toy two-layer model and a toy calibration stand in for the host's
(the host tests run ComfyUI's, through the ZipLoRA node)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from hypernet import __version__, methods
from hypernet.errors import LoraRarError
from hypernet.lora_io import LoraFile, LowRankLayer
from hypernet.lowrank import weighted_sum
from hypernet.merge import merge_loras
from hypernet.methods import Claim, MergedLayer, MergeMethod
from hypernet.methods.zip_lora import LEARNING_RATE, SIMILARITY_LAMBDA, STEPS, STOP_SIMILARITY
from hypernet.runtime import RuntimeBranch
from hypernet.ziplora import DEFAULT_LAMBDA, ZipLoraMerge, optimise

WIDTHS = {"lora_unet_a": (6, 5), "lora_unet_b": (4, 6)}  # layer -> (d_out, d_in): x (5) -> a -> relu -> b (4)


def _layer(name: str, rank: int, seed: int) -> LowRankLayer:
    d_out, d_in = WIDTHS[name]
    generator = torch.Generator().manual_seed(seed)
    return LowRankLayer(torch.randn(d_out, rank, generator=generator) * 0.3,
                        torch.randn(rank, d_in, generator=generator) * 0.3, 1.0)


@pytest.fixture
def pair() -> tuple[LoraFile, LoraFile]:
    subject = {"lora_unet_a": _layer("lora_unet_a", 2, 1), "lora_unet_b": _layer("lora_unet_b", 3, 2),
               "lora_te_only": LowRankLayer(torch.ones(3, 1), torch.ones(1, 3), 1.0)}
    style = {"lora_unet_a": _layer("lora_unet_a", 3, 3), "lora_unet_b": _layer("lora_unet_b", 1, 4)}
    return LoraFile("dog.safetensors", "s" * 64, subject), LoraFile("ink.safetensors", "t" * 64, style)


def draw(side: str, generator: torch.Generator) -> torch.Tensor:
    """A toy model input x (1, 5), each side at its own scale."""
    return torch.randn(1, 5, generator=generator) * (1.0 if side == "subject" else 3.0)


class ToyRun:
    """The toy model loaded with a branch: x -> a -> relu -> b, each layer plus the branch's addition."""

    def __init__(self, model: dict[str, torch.nn.Linear], branch: RuntimeBranch):
        self.model, self.branch = model, branch

    def draw(self, side: str, generator: torch.Generator, pixels: int | None = None) -> torch.Tensor:
        return draw(side, generator)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("lora_unet_a", "lora_unet_b"):
            out = self.model[name](x)
            extra = self.branch.extra(name, x) if name in self.branch.layer_names() else None
            x = out + extra if extra is not None else out
            x = F.relu(x) if name == "lora_unet_a" else x
        return x


class ToyCalibration:
    """What a host gives a data-driven method (hypernet.calibration.Calibration), on the toy model."""

    def __init__(self, references: bool, seed: int = 3):
        generator = torch.Generator().manual_seed(0)
        self.model = {}
        for name, (d_out, d_in) in WIDTHS.items():
            linear = torch.nn.Linear(d_in, d_out)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(d_out, d_in, generator=generator))
                linear.bias.copy_(torch.randn(d_out, generator=generator))
            self.model[name] = linear.requires_grad_(False)
        self.references, self.seed, self.describe = references, seed, "toy inputs"
        self.runs = 0

    @contextlib.contextmanager
    def running(self, branch: RuntimeBranch):
        self.runs += 1
        yield ToyRun(self.model, branch)

    def reuse(self, what: tuple, make):
        return make()


class InputScale(MergeMethod):
    """A toy calibration pass (the shape SSR-Merge will have): one model call per side records the mean |x| each layer
    sees, and each side's update is divided by it."""

    name = "toy-input-scale"
    help = "test only"
    since, position = __version__, 99
    needs_model = True

    class Recorder(RuntimeBranch):
        def __init__(self, names):
            self.names, self.seen = list(names), {}

        def layer_names(self):
            return self.names

        def extra(self, name, x):
            self.seen[name] = float(x.abs().mean())
            return None

    def claim(self, name, subject, style, ctx):
        return Claim("scaled") if subject is not None and style is not None else None

    def calibrate(self, jobs, ctx):
        recorder = self.Recorder(job.name for job in jobs)
        generator = torch.Generator().manual_seed(ctx.calibration.seed)
        scales = {}
        with ctx.calibration.running(recorder) as run:
            for side in ("subject", "style"):
                run.predict(run.draw(side, generator))
                scales[side] = dict(recorder.seen)
        for job in jobs:
            job.calibrated = (scales["subject"][job.name], scales["style"][job.name])

    def merge(self, job, ctx):
        subject_scale, style_scale = job.calibrated
        return MergedLayer(weighted_sum([(job.subject, job.subject_weight / subject_scale),
                                         (job.style, job.style_weight / style_scale)], ctx.device, job.dtype))


@pytest.fixture
def input_scale():
    methods.register(InputScale())
    yield
    methods.unregister(InputScale.name)


def _dense(layer: LowRankLayer) -> torch.Tensor:
    return layer.up.double() @ layer.down.double() * layer.scale


def test_a_calibration_pass_method_runs_the_model_once_per_pair_and_merges_from_it(pair, input_scale):
    subject, style = pair
    calibration = ToyCalibration(references=False)
    merged = merge_loras(subject, style, None, method="toy-input-scale", calibration=calibration)
    assert calibration.runs == 1 and merged.report.as_dict()["layers"] == {"scaled": 2, "kept (subject)": 1}

    generator = torch.Generator().manual_seed(calibration.seed)  # the test's own pass: the layers' inputs per side
    seen = {}
    for side in ("subject", "style"):
        x = draw(side, generator)
        seen[side] = {"lora_unet_a": float(x.abs().mean())}
        seen[side]["lora_unet_b"] = float(F.relu(calibration.model["lora_unet_a"](x)).abs().mean())
    for name in WIDTHS:
        expected = (_dense(subject.layers[name]) / seen["subject"][name] + _dense(style.layers[name]) / seen["style"][name])
        torch.testing.assert_close(_dense(merged.layers[name]), expected, rtol=1e-5, atol=1e-7)


def test_a_data_driven_method_without_a_model_is_refused_in_one_line(pair, input_scale):
    with pytest.raises(LoraRarError) as error:
        merge_loras(*pair, None, method="toy-input-scale")
    assert str(error.value).startswith("toy-input-scale: it runs the model before it merges")
    assert "\n" not in str(error.value)


def test_zip_lora_is_registered_with_the_parameters_the_ziplora_node_shows():
    method = methods.get("zip-lora")
    assert method.needs_model and method.needs_references
    assert method.params == (STEPS, LEARNING_RATE, SIMILARITY_LAMBDA, STOP_SIMILARITY)
    assert methods.resolve_params(method, {}) == {"steps": 100.0, "learning_rate": 0.01, "similarity_lambda": 0.01,
                                                  "stop_similarity": 0.001}
    assert DEFAULT_LAMBDA == SIMILARITY_LAMBDA.default  # the method's default is the core's


@pytest.mark.parametrize("calibration", [None, ToyCalibration(references=False)])
def test_zip_lora_without_reference_images_is_refused_naming_what_is_missing(pair, calibration):
    with pytest.raises(LoraRarError) as error:
        merge_loras(*pair, None, method="zip-lora", calibration=calibration)
    message = str(error.value)
    assert message.startswith("zip-lora: needs reference images and prompts of the subject and the style")
    assert "LoRA.rar ZipLoRA node" in message and "\n" not in message


def test_zip_lora_through_the_merge_is_the_ziplora_optimisation(pair):
    """The registered method with a calibration holding references: the same coefficients and merged layers as the
    optimisation run directly (hypernet.ziplora.optimise, what the ZipLoRA node runs) with the same seed."""
    subject, style = pair
    params = {"steps": 4, "learning_rate": 0.05, "similarity_lambda": 0.01, "stop_similarity": 0.0}
    merged = merge_loras(subject, style, None, method="zip-lora", calibration=ToyCalibration(references=True),
                         params=params)
    assert merged.report.as_dict()["layers"] == {"ziplora": 2, "kept (subject)": 1}  # text encoder: layer policy

    direct = ZipLoraMerge({n: subject.layers[n] for n in WIDTHS}, {n: style.layers[n] for n in WIDTHS})
    toy = ToyCalibration(references=True)
    with torch.enable_grad(), toy.running(direct) as run:
        done = optimise(direct, run, 4, 0.05, 0.01, 0.0, toy.seed)
    assert len(done.history) == 4 and done.end["total"] < done.start["total"]
    for name, layer in direct.layers.items():
        torch.testing.assert_close(merged.coefficients[name], torch.stack([m.detach() for m in layer.coefficients()], 1))
        torch.testing.assert_close(_dense(merged.layers[name]), _dense(layer.merged_layer()))
    assert all(not torch.equal(c, torch.ones_like(c)) for c in merged.coefficients.values())  # it did optimise
