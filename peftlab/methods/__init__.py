"""Built-in methods. Each module registers itself on import (one line at its bottom)."""

from peftlab.methods import (  # noqa: F401
    adapter,
    dora,
    full,
    ia3,
    loha,
    lokr,
    lora,
    prefix,
    prompt,
    ptuning_v2,
    qlora,
    vera,
)
