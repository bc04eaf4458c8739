"""ComfyUI nodes of the pack: thin adapters around hypernet/."""

from .coefficients import LoraRarCoefficientPicture
from .compare import LoraRarCompare
from .evaluate import LoraRarEvaluate
from .loader import LoraRarHypernetLoader
from .merge import LoraRarMerge
from .save import LoraRarSaveMergedLora
from .ziplora import LoraRarZipLora

NODE_CLASS_MAPPINGS = {
    "LoraRarHypernetLoader": LoraRarHypernetLoader,
    "LoraRarMerge": LoraRarMerge,
    "LoraRarSaveMergedLora": LoraRarSaveMergedLora,
    "LoraRarEvaluate": LoraRarEvaluate,
    "LoraRarCoefficientPicture": LoraRarCoefficientPicture,
    "LoraRarCompare": LoraRarCompare,
    "LoraRarZipLora": LoraRarZipLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoraRarHypernetLoader": "LoRA.rar Hypernet Loader",
    "LoraRarMerge": "LoRA.rar Merge (subject + style)",
    "LoraRarSaveMergedLora": "LoRA.rar Save Merged LoRA",
    "LoraRarEvaluate": "LoRA.rar Evaluate (MLLM judge)",
    "LoraRarCoefficientPicture": "LoRA.rar Coefficient Picture (subject vs style per block)",
    "LoraRarCompare": "LoRA.rar Compare Methods (grid)",
    "LoraRarZipLora": "LoRA.rar ZipLoRA (optimise merge)",
}
