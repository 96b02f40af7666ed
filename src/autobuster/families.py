"""The model families autobuster knows, one object each, read from a checkpoint's config.json: what loading and the
engine ask of a family. Qwen2.5-VL runs end to end. Qwen3.5 (the 2026 BusterX++ weights) decodes and updates in the
engine (and `autobuster bench --family qwen3.5` measures it), but its checkpoints are refused until its own answer
format and video input are in: scored in the 2025 format, l8cv/BusterX-plusplus would look broken."""
from dataclasses import dataclass

from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3_5ForConditionalGeneration

from .errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type for this family
    model_class: type
    unquantised: tuple[str, ...]  # modules NF4 leaves in bf16: the vision tower and the head
    norm_offset: float  # the RMSNorm scales by weight + this (Qwen3.5 stores the weight around 0)
    runs: bool  # False: known, but checkpoints are refused (see the module's docstring)
    example: str = ""  # how the refusal names it


QWEN2_5_VL = Family("Qwen2.5-VL", ("qwen2_5_vl",), Qwen2_5_VLForConditionalGeneration, ("model.visual", "lm_head"),
                    norm_offset=0.0, runs=True)
QWEN3_5 = Family("Qwen3.5", ("qwen3_5",), Qwen3_5ForConditionalGeneration, ("model.visual", "lm_head"),
                 norm_offset=1.0, runs=False, example="l8cv/BusterX-plusplus, the 2026 BusterX++ weights, is one")
FAMILIES = (QWEN2_5_VL, QWEN3_5)
OTHERS = {"qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL"}  # met on the hub, by model_type


def family_of(config: dict, model: str) -> Family:
    """The family of the checkpoint `model` whose config.json is `config`, or one line saying what is supported."""
    model_type = config.get("model_type", "")
    found = next((f for f in FAMILIES if model_type in f.model_types), None)
    if found and found.runs:
        return found
    what = (f"{found.name} ({found.example})" if found else OTHERS.get(model_type)
            or (f"model_type {model_type!r}" if model_type else "checkpoint without a model_type"))
    raise UserError(f"{model} is a {what} checkpoint: autobuster runs "
                    f"{', '.join(f.name for f in FAMILIES if f.runs)} models "
                    "(for BusterX++ on Qwen2.5-VL-7B use l8cv/BusterX_plusplus, with an underscore)")


def family_of_model(model) -> Family:
    """The family of a loaded model (peft's wrapper or not), whether or not checkpoints of it are accepted."""
    model_type = getattr(model, "get_base_model", lambda: model)().config.model_type
    return next(f for f in FAMILIES if model_type in f.model_types)
