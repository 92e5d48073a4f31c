"""The tokenizer embedded in a GGUF export, under llama.cpp's metadata keys.

A GGUF carries no ``tokenizer.json``: llama.cpp (and transformers' GGUF loader) rebuild the
tokenizer from ``tokenizer.ggml.*`` metadata — the model type (``gpt2`` = byte-level BPE), the
pre-tokenizer name, the token strings, their types (1 normal, 3 control, 4 user-defined,
5 unused), the BPE merges, the special token ids, ``add_bos_token`` and the chat template.

Two sources, in this order:

1. The base model came from a GGUF file (the bundled SmolLM2, or a ``.gguf`` path): every
   ``tokenizer.*`` field is copied verbatim with its value type, so the export's tokenizer is
   exactly the source's.
2. A Hugging Face directory: the fields are built as llama.cpp's ``convert_hf_to_gguf.py``
   builds them for a byte-level BPE vocabulary (``get_vocab_base`` + ``gguf.SpecialVocab``).
   Ids the tokenizer does not use up to the model's ``vocab_size`` become ``[PAD<id>]`` unused
   tokens. The pre-tokenizer name is read from the ``tokenizer.json`` structure (the names
   llama.cpp gives those splits); a pre-tokenizer it does not recognise is refused rather
   than guessed, since a wrong name silently changes how llama.cpp splits text.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from peftlab.export.errors import ExportError

# tokenizer.json pre-tokenizer Split patterns → llama.cpp's pre-tokenizer name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
SUPPORTED_PRE = "a plain ByteLevel (gpt-2), Digits + ByteLevel (smollm), Llama-3 or Qwen2 split"


def copy_from_gguf(writer: gguf.GGUFWriter, path: Path) -> None:
    """Copy every ``tokenizer.*`` field of the GGUF at ``path`` with its value types."""
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            writer.add_key_value(key, list(field.contents()), vtype, sub_type=sub)
        else:
            writer.add_key_value(key, field.contents(), vtype)


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens that ought to be control tokens."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``."""
    steps = _pre_steps(tokenizer_json)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_NAMES:
            return SPLIT_NAMES[pattern]
    raise ExportError(
        f"the tokenizer's pre-tokenizer {kinds} is not one the GGUF writer can name for "
        f"llama.cpp (supported: {SUPPORTED_PRE}); a wrong name would change how text is split"
    )


def build_from_hf(
    writer: gguf.GGUFWriter, tokenizer, model_dir: Path, vocab_size: int
) -> dict[str, str]:
    """Write the byte-level BPE vocabulary of a Hugging Face tokenizer; returns a summary."""
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ExportError(f"{model_dir} holds no tokenizer.json; the GGUF writer needs it")
    doc = json.loads(tok_file.read_text())
    model = doc.get("model") or {}
    steps = [step.get("type") for step in _pre_steps(doc)]
    if model.get("type") != "BPE" or "ByteLevel" not in steps:
        raise ExportError(
            f"the GGUF writer embeds byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM); this "
            f"one is {model.get('type')} with pre-tokenizer {steps} (sentencepiece vocabularies "
            f"are not written yet)"
        )
    pre = pre_tokenizer_name(doc)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
            f"{vocab_size}; the embedding matrix cannot hold them"
        )
    tokens, types = _tokens(tokenizer, vocab, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ExportError(f"{tok_file} lists no BPE merges; llama.cpp needs them")
    special.add_to_gguf(writer)
    return {"model": "gpt2", "pre": pre, "tokens": str(len(tokens))}


def _pre_steps(doc: dict) -> list[dict]:
    """The pre-tokenizer steps of a ``tokenizer.json`` (a ``Sequence`` unrolled)."""
    pre = doc.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]


def _tokens(tokenizer, vocab: dict[str, int], vocab_size: int) -> tuple[list[str], list[int]]:
    """llama.cpp's ``get_vocab_base``: token strings and types for ids 0..vocab_size-1."""
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp expects control and user-defined tokens pre-normalized.
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types
