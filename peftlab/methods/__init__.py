"""Built-in methods. Each module registers itself on import (one line at its bottom)."""

from peftlab.methods import adapter, dora, full, lora  # noqa: F401
from peftlab.methods import qlora  # noqa: F401
from peftlab.methods import prefix, prompt, ptuning_v2  # noqa: F401
