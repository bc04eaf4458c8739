"""Terminal entry point: ``python -m hypernet merge --subject A --style B --out C``, ``python -m hypernet evaluate ...``,
``python -m hypernet check-dataset DIR`` and ``python -m hypernet train ...`` (hypernet/training/command.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from . import __version__, any_family
from .base_models import LAYOUTS, SDXL
from .checkpoints import default_search_dirs, load_manifest, published_layout, resolve_hypernet
from .errors import LoraRarError, unforeseen_as_error
from .evaluation.batch import evaluate_folders, find_pairs
from .evaluation.batch_files import load_style_names
from .evaluation.judge import DEFAULT_API_KEY_ENV, PINNED_URL_ENV, ChatCompletionsJudge
from .evaluation.protocol import format_table
from .files import check_target, refuse_replacing
from .lora_io import SAVE_DTYPES as DTYPES, save_lora
from . import methods
from .merge import LAYER_POLICIES, LAYER_POLICY_HELP, Strengths, merge_loras
from .training import command as training



class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one line and exit 2, like every other error of this CLI (argparse prints the usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m hypernet", description="LoRA.rar: merge a subject LoRA and a style LoRA.")
    parser.add_argument("--version", action="version", version=f"ComfyUI-LoRA.rar {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge two LoRA files into one kohya-format LoRA")
    merge.add_argument("--subject", required=True, type=Path, help="subject (content) LoRA file")
    merge.add_argument("--style", required=True, type=Path, help="style LoRA file")
    merge.add_argument("--out", required=True, type=Path, help="merged LoRA to write (.safetensors)")
    merge.add_argument("--hypernet", default="sdxl", help=f"published name ({', '.join(load_manifest())}) or a checkpoint path")
    merge.add_argument("--method", choices=methods.names(), default="lorarar",
                       help="; ".join(f"{m.name}: {m.help}" for m in methods.all_methods()))
    for method in _cli_methods():  # each method's own parameters, e.g. --np-lora-mu
        for param in method.params:
            merge.add_argument(f"--{methods.param_key(method, param).replace('_', '-')}", type=float, default=None,
                               dest=methods.param_key(method, param), metavar=param.name.upper(),
                               help=f"{method.name} only: {param.help} (default {param.default:g}, "
                                    f"{param.minimum:g} to {param.maximum:g})")
    merge.add_argument("--layer-policy", choices=LAYER_POLICIES, default="sum", help=LAYER_POLICY_HELP)
    merge.add_argument("--base", choices=[*sorted(LAYOUTS), any_family.ANY], help="the base model the LoRAs are "
                       "for: they are checked against its layout, as the node checks them against its model; any: "
                       "a model of any family (Flux, SD3.5, ...), layers matched by the name written in the files, "
                       f"for methods {' and '.join(any_family.layout_free_methods())} (default: the hypernet's training "
                       "model; for those methods any when the files hold layers the SDXL parser does not know, else sdxl)")
    merge.add_argument("--subject-strength", type=float, default=1.0)
    merge.add_argument("--style-strength", type=float, default=1.0)
    merge.add_argument("--subject-clip-strength", type=float, default=1.0)
    merge.add_argument("--style-clip-strength", type=float, default=1.0)
    merge.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="tensor type of the written file")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument("--json", action="store_true", help="print the report as JSON")

    evaluate = commands.add_parser("evaluate", help="judge generated subject+style images with an MLLM (the paper's protocol)")
    evaluate.add_argument("--generated", required=True, type=Path, help="folder of <subject>__<style>/ folders of generated images")
    evaluate.add_argument("--subjects", required=True, type=Path, help="folder of <subject>/ folders of subject reference images")
    evaluate.add_argument("--styles", required=True, type=Path, help="folder of <style>/ folders of style reference images")
    evaluate.add_argument("--out", required=True, type=Path, help="folder for results.json, results.csv, pairs.csv, summary.png")
    evaluate.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1")
    evaluate.add_argument("--judge-model", required=True, help="model name served there (the paper used LLaVA-Critic-7B)")
    evaluate.add_argument("--api-key-env", default=DEFAULT_API_KEY_ENV, help="name of the environment variable holding the API key, if any (must start with LORARAR_); "
                          f"the key is sent only to URLs listed in ${PINNED_URL_ENV} (spaces or commas between them), or to a loopback judge when that is unset")
    evaluate.add_argument("--style-names", type=Path, help="JSON {style folder: style name}; default: folder name, _ as space, trailing digits dropped")
    evaluate.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request in all: connect, headers and the whole answer")
    evaluate.add_argument("--retries", type=int, default=3, help="extra attempts on 5xx, timeouts and refused connections (exponential backoff)")
    evaluate.add_argument("--restart", action="store_true", help="ignore results saved by an earlier run in --out and ask everything again")
    evaluate.add_argument("--json", action="store_true", help="print the per-pair and mean scores as JSON")
    training.add_parsers(commands)
    return parser


def _check_out(args: argparse.Namespace) -> dict[str, str]:
    """Refuse a bad --out before any work; returns the inputs --out must never replace, --overwrite or not."""
    inputs = {"subject LoRA": str(args.subject), "style LoRA": str(args.style)}
    if Path(args.hypernet).is_file():
        inputs["hypernet"] = args.hypernet
    refuse_replacing(check_target(args.out), inputs)
    if args.out.exists() and not args.overwrite:
        raise LoraRarError(f"{args.out}: file exists; choose another name or pass --overwrite")
    return inputs


def run_merge(args: argparse.Namespace) -> int:
    rule = methods.get(args.method)
    if rule.sampling_time:  # before any other check: no --out or input could make it work
        raise LoraRarError(f"{rule.name} {rule.unsavable}; it cannot be saved as one LoRA file; "  # the save node's words
                           "use it in ComfyUI through the merge node's MODEL output, or choose another --method")
    if args.base == any_family.ANY:  # before --out and the inputs, like the check above
        any_family.refuse_method(rule)
    strengths = Strengths(args.subject_strength, args.style_strength, args.subject_clip_strength, args.style_clip_strength)
    inputs = _check_out(args)
    params = _method_params(args)
    manifest = load_manifest()
    info = manifest.get(args.hypernet)
    hypernet = None
    if info is None and (rule.needs_hypernet or args.base is None):  # a file, local: loaded first, for the layout it
        # serves (the LoRAs are read as that model names them), also as the default of a method that does not use it
        hypernet = resolve_hypernet(args.hypernet, default_search_dirs(), manifest=manifest)
    with unforeseen_as_error(f"{args.subject} + {args.style}"):
        # the LoRAs before a published hypernet: a bad input file is named before any download is tried
        subject, style, layout, note = _read_inputs(args, rule, info, hypernet)
        if rule.needs_hypernet and hypernet is None:
            hypernet = resolve_hypernet(args.hypernet, default_search_dirs(), manifest=manifest)
        merged = merge_loras(subject, style, hypernet.net if rule.needs_hypernet else None, args.method,
                             args.layer_policy, strengths, layout=layout, params=params)
    merged.report.notes.extend([note] if note else [])
    save_lora(args.out, merged.kohya_state_dict(DTYPES[args.dtype]), merged.metadata(__version__), overwrite=args.overwrite,
              protect={**inputs, **merged.source_paths})
    print(json.dumps(merged.report.as_dict(), indent=2) if args.json else merged.report.to_text())
    print(f"wrote {args.out}")
    return 0


def _read_inputs(args: argparse.Namespace, rule, info, hypernet):
    """(subject, style, layout the LoRAs must fit or None for any family, note for the report or None).
    info: the published checkpoint --hypernet names (None for a file); hypernet: the resolved file (None for a name)."""
    if args.base == any_family.ANY:
        subject, style = any_family.read_pair(args.subject, args.style, SDXL)
        return subject, style, None, any_family.check_shared(subject, style)
    # the layout the LoRAs must fit, as the node uses its model's: named (and checked against what a trained file
    # serves), else the one the hypernet serves: the manifest's for a published name, the file's own for a file
    named = LAYOUTS[args.base] if args.base else None
    if hypernet is None:  # a published name: its base model's layout
        layout = named or published_layout(info)
    elif rule.needs_hypernet:  # a file that merges: --base is checked against what it serves, as the node checks its model
        layout = hypernet.lora_layout(named)
    else:  # a file the method does not use: its layout is only the default
        layout = named or hypernet.layout
    layout = layout or SDXL  # a file that says nothing (a hand-made checkpoint): the published family's layout
    if args.base is None and rule.layout_free:
        subject, style = any_family.read_pair(args.subject, args.style, layout)
        if any_family.needs_any(subject, style):
            return subject, style, None, any_family.check_shared(subject, style)
        return subject, style, layout, None  # only names the layout's parser knows: the layers read_lora gives
    return (any_family.read_for_layout(args.subject, layout, rule), any_family.read_for_layout(args.style, layout, rule),
            layout, None)


def _cli_methods() -> list:
    """The methods whose parameters are command-line flags: a method that needs the model (ZipLoRA's reference
    images, a calibration pass) cannot run here, so its parameters would be flags no run can use."""
    return [method for method in methods.all_methods() if not method.needs_model]


def _method_params(args: argparse.Namespace) -> dict[str, float]:
    """The chosen method's parameters given on the command line; another method's are refused, not ignored."""
    given = {}
    for method in _cli_methods():
        for param in method.params:
            value = getattr(args, methods.param_key(method, param))
            if value is None:
                continue
            if method.name != args.method:
                raise LoraRarError(f"--{methods.param_key(method, param).replace('_', '-')} belongs to method "
                                   f"{method.name}, not {args.method}")
            given[param.name] = value
    return given


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        return _evaluate(args)
    except OSError as error:  # a folder or file the checks above did not foresee: still one line, exit 2
        raise LoraRarError(f"{error.filename or args.out}: {error.strerror or type(error).__name__}") from None


def _evaluate(args: argparse.Namespace) -> int:
    # the judge first: a bad URL, key, timeout or retry count is reported before any folder is read
    judge = ChatCompletionsJudge(args.judge_url, args.judge_model, args.api_key_env, timeout=args.timeout, retries=args.retries)
    jobs = find_pairs(args.generated, args.subjects, args.styles, load_style_names(args.style_names), skip=[args.out])
    try:
        result = evaluate_folders(jobs, judge, args.out, args.judge_model, judge.endpoint, resume=not args.restart)
    except KeyboardInterrupt:
        print(f"interrupted: finished images are saved in {args.out / 'results.json'}; run again to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"pairs": [p.as_dict() for p in result.pairs], "mean": result.mean.as_dict()}, indent=2))
    else:
        print(format_table(result.pairs, result.mean))
    print(f"asked {result.questions} questions about {result.asked} images "
          f"({len(result.images) - result.asked} taken from earlier runs); wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"merge": run_merge, "evaluate": run_evaluate, "check-dataset": training.run_check_dataset,
                "train": training.run_train}[args.command](args)
    except LoraRarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, ...: the user can act on it; a traceback helps no one
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}".replace("\n", " "), file=sys.stderr)
        return 2
