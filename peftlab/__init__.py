"""peftlab: parameter-efficient fine-tuning (LoRA, adapters, prefix/prompt tuning, QLoRA) from scratch."""

from . import _renamed, adapters, files
from .adapters import AdapterConfig, BottleneckAdapter, apply_adapters, disable_adapters
from .bitfit import BitFitConfig, apply_bitfit, load_bitfit, save_bitfit
from .doctor import doctor  # the silent failures of PEFT training, found and named
from .export import export_onnx, merged_copy, run_onnx
from .files import AdapterFileError, load_adapter, save_adapter  # one save/load: dispatch on the method / peft_type
from .ia3 import IA3Config, IA3Linear, apply_ia3, disable_ia3, load_ia3, save_ia3
from .init import loftq_init, pissa_init, pissa_to_lora  # LoRA initialised from the weight's SVD
from .inject import count_parameters, format_trainable
from .lora import (
    LoraConfig,
    LoraLinear,
    add_weighted_adapter,
    apply_lora,
    disable_lora,
    load_lora,
    merge_lora,
    save_lora,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from .mixed import mixed_batch  # row i of a batch runs LoRA adapter adapter_names[i]
from .optim import loraplus_optimizer, loraplus_param_groups  # LoRA+: lr_B = ratio * lr_A
from .prefix import PrefixConfig, PrefixTuningModel, apply_prefix, disable_prefix, load_prefix, save_prefix
from .prompt import PromptTuningConfig, PromptTuningModel, apply_prompt, disable_prompt, load_prompt, save_prompt
from .ptuning import PromptEncoder, PTuningConfig, apply_ptuning
from .quant import Linear4bit, QuantConfig, dequantize_nf4, nf4_codebook, quantize_model, quantize_nf4

_renamed.install()  # peftlab.checks_ex3, peftlab.memory, ...: the names of earlier releases

__version__ = "0.1.0"
__all__ = [
    "AdapterFileError", "files", "load_adapter", "save_adapter",
    "LoraConfig", "LoraLinear", "add_weighted_adapter", "apply_lora", "count_parameters", "disable_lora",
    "format_trainable", "load_lora", "merge_lora", "save_lora", "set_adapter", "unload_lora", "unmerge_lora",
    "PrefixConfig", "PrefixTuningModel", "apply_prefix", "disable_prefix", "load_prefix", "save_prefix",
    "PromptTuningConfig", "PromptTuningModel", "apply_prompt", "disable_prompt", "load_prompt", "save_prompt",
    "PTuningConfig", "PromptEncoder", "apply_ptuning",
    "Linear4bit", "QuantConfig", "dequantize_nf4", "nf4_codebook", "quantize_model", "quantize_nf4",
    "adapters", "AdapterConfig", "BottleneckAdapter", "apply_adapters", "disable_adapters",
    "BitFitConfig", "apply_bitfit", "load_bitfit", "save_bitfit", "export_onnx", "merged_copy", "run_onnx",
    "mixed_batch", "doctor",
    "IA3Config", "IA3Linear", "apply_ia3", "disable_ia3", "load_ia3", "save_ia3",
    "loftq_init", "pissa_init", "pissa_to_lora", "loraplus_optimizer", "loraplus_param_groups",
]
