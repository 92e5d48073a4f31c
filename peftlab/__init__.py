"""peftlab: parameter-efficient fine-tuning for Hugging Face transformers — apply, train,
compare, choose.

    import peftlab
    model = peftlab.apply(model, peftlab.LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    peftlab.trainable_parameters(model)        # (trainable, total)
    peftlab.save_adapter(model, "out/")        # peft-compatible adapter directory
"""

# The built-in methods register themselves on import; this comes first so that every later
# import (and every user of peftlab.core) finds them in the registry.
import peftlab.methods  # noqa: F401  isort: skip
from peftlab.bench import compare
from peftlab.combine import CombineResult, combine
from peftlab.core.config import ConfigError, MethodConfig, config_from_dict, load_config
from peftlab.core.io import AdapterFileError, load_adapter, read_adapter_config, save_adapter
from peftlab.core.model import (
    active_adapters,
    apply,
    disable_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from peftlab.core.registry import methods as _methods
from peftlab.core.remove import delete_adapter
from peftlab.hotswap import hotswap_adapter
from peftlab.methods.adapter import AdapterConfig
from peftlab.methods.dora import DoRAConfig
from peftlab.methods.full import FullFinetuneConfig
from peftlab.methods.ia3 import IA3Config
from peftlab.methods.loha import LoHaConfig
from peftlab.methods.lokr import LoKrConfig
from peftlab.methods.lora import LoRAConfig
from peftlab.methods.prefix import PrefixTuningConfig, fold_prefix
from peftlab.methods.prompt import PromptTuningConfig
from peftlab.methods.ptuning_v2 import PTuningV2Config
from peftlab.methods.qlora import QLoRAConfig
from peftlab.methods.vera import VeRAConfig
from peftlab.mixed import adapter_rows
from peftlab.select.estimator import estimate_memory
from peftlab.select.recommend import recommend
from peftlab.train.loss import chunked_lm_loss

__version__ = "0.1.0"

# ``peftlab.methods`` is also the name of the subpackage that holds the methods; importing it
# (above) binds the module to that attribute, so the public function is bound last.
methods = _methods

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "CombineResult",
    "ConfigError",
    "DoRAConfig",
    "FullFinetuneConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoRAConfig",
    "MethodConfig",
    "PTuningV2Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QLoRAConfig",
    "VeRAConfig",
    "active_adapters",
    "adapter_rows",
    "apply",
    "chunked_lm_loss",
    "combine",
    "compare",
    "config_from_dict",
    "delete_adapter",
    "disable_adapters",
    "estimate_memory",
    "fold_prefix",
    "hotswap_adapter",
    "load_adapter",
    "load_config",
    "merge",
    "merge_and_unload",
    "methods",
    "read_adapter_config",
    "recommend",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge",
]
