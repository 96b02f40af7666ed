"""The model families autobuster runs, one object each, read from a checkpoint's config.json: what loading asks of
a family. Qwen2.5-VL is the one today; Qwen3.5 (the 2026 BusterX++ weights) is known, so that its checkpoints get
a clear refusal instead of a broken load."""
from dataclasses import dataclass

from transformers import Qwen2_5_VLForConditionalGeneration

from .errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json's model_type for this family
    model_class: type
    unquantised: tuple[str, ...]  # modules NF4 leaves in bf16: the vision tower and the head


QWEN2_5_VL = Family("Qwen2.5-VL", ("qwen2_5_vl",), Qwen2_5_VLForConditionalGeneration, ("model.visual", "lm_head"))
FAMILIES = (QWEN2_5_VL,)
KNOWN = {  # families met on the hub that autobuster does not run (yet), by model_type
    "qwen3_5": "Qwen3.5 (l8cv/BusterX-plusplus, the 2026 BusterX++ weights, is one)",
    "qwen2_vl": "Qwen2-VL",
    "qwen3_vl": "Qwen3-VL",
}


def family_of(config: dict, model: str) -> Family:
    """The family of the checkpoint `model` whose config.json is `config`, or one line saying what is supported."""
    model_type = config.get("model_type", "")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    what = KNOWN.get(model_type, f"model_type {model_type!r}" if model_type else "checkpoint without a model_type")
    raise UserError(f"{model} is a {what} checkpoint: autobuster runs {', '.join(f.name for f in FAMILIES)} models "
                    "(for BusterX++ on Qwen2.5-VL-7B use l8cv/BusterX_plusplus, with an underscore)")
