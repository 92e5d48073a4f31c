"""The docs are tested: their code runs, their numbers hold, their option tables match the code.

Conventions the docs follow (see docs/index.md, "How these docs are checked"):

* Every fenced ``python`` block in README.md and docs/**/*.md runs, each in a fresh namespace
  in a temporary working directory. A ``text`` block right after a python block is its
  expected output: every non-empty line of it must appear in what the block printed.
* Shell blocks (``bash``, ``console``): each command (``$ cmd`` in console blocks, every line
  in bash blocks) is either cheap and run here (:data:`RUN`) — its exit status must be 0 and,
  in a console block, the output shown must appear in what it printed — or listed in
  :data:`NOT_RUN` with the reason. A documented command in neither list fails the test.
* ``<!-- docs-test: skip REASON -->`` on the line before a fence skips that block (the reason
  is required); ``<!-- id: NAME -->`` names a block so docs/faq.md can point at it.
* Every number in docs/faq.md prose names its source on the same line: a citation in square
  brackets naming a section/table/figure/appendix/abstract, a command in backticks, a link to
  a file under docs/results/, or ``[run: NAME]`` pointing at a block on the page whose output
  the test checks. Block quotes (the user's document, quoted) are exempt.
* ``docs/methods/<name>.md`` exists for every registered method, its option table lists every
  config field with the default the dataclass has, and the closed-form parameter counts the
  pages state are checked against :func:`peftlab.trainable_parameters` below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import linecache
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftlab
from peftlab.core.registry import get_method
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s+(.+?)\s*-->")
BLOCK_ID = re.compile(r"<!--\s*id:\s*([\w-]+)\s*-->")

# Commands cheap enough to run here (prefixes of the command line).
RUN = ("peftlab methods", "peftlab --help", "peftlab recommend", "peftlab estimate")
RUN_HELP = re.compile(r"^peftlab( [\w-]+)? --help$")
# Commands documented but not run here, and why.
NOT_RUN = {
    "make run": "installs dependencies, then trains every method (minutes); .ci/run covers make",
    "make test": "installs dependencies, then runs the whole suite (this test included)",
    "make install": "installs packages",
    "pip install": "installs packages",
    "peftlab compare": "trains every method (minutes); tests/unit/test_compare.py runs a tiny one",
    "peftlab train": "trains on the bundled model (minutes); tests/unit/test_train.py runs tiny ones",
    "peftlab demo": "loads and generates with the bundled model; tests/integration cover it",
    "python -m pytest": "runs tests",
    "cd ": "changes directory",
    "bash docs/results/study.sh": "reruns the published study (tens of minutes of training)",
    "python benchmarks/": "benchmarks train the bundled model in many processes (minutes)",
    "python -m benchmarks.": "benchmarks train the bundled model in many processes (minutes)",
    "bash benchmarks/gpu.sh": "needs a CUDA GPU",
    "peftlab export": "merges and writes the bundled model (minutes); tests/unit/test_export.py runs tiny ones",
    "peftlab data inspect": "reads a config's data with the bundled tokenizer; the data tests run it on tiny ones",
    "python scripts/": "fault injection: trains and SIGKILLs a run a dozen times (minutes)",
}


@dataclasses.dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    skip: str | None = None
    id: str | None = None
    output: str | None = None  # the ``text`` block right after a python block

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = lines[start - 1] if start else ""
        skip, bid = SKIP.search(prev), BLOCK_ID.search(prev)
        block = Block(
            path,
            start + 1,
            lang,
            "\n".join(lines[start + 1 : j]) + "\n",
            skip.group(1) if skip else None,
            bid.group(1) if bid else None,
        )
        if lang == "text" and blocks and blocks[-1].lang == "python" and blocks[-1].output is None:
            between = lines[blocks[-1].line + blocks[-1].code.count("\n") : start]
            if all(not s.strip() or s.strip() == "```" for s in between):
                blocks[-1].output = block.code
        blocks.append(block)
        i = j + 1
    return blocks


ALL_BLOCKS = [b for f in DOC_FILES for b in parse_blocks(f)]
PY_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("bash", "sh", "console", "shell")]


def _expect_lines(expected: str, got: str, where: str) -> None:
    have = {s.strip() for s in got.splitlines()}
    missing = [s.strip() for s in expected.splitlines() if s.strip() and s.strip() not in have]
    assert not missing, f"{where}: documented output lines not printed: {missing}\n--- got:\n{got}"


@pytest.mark.parametrize("block", PY_BLOCKS, ids=str)
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch) -> None:
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    out = io.StringIO()
    # Registered with linecache so a failing assert shows the doc's line in the traceback.
    linecache.cache[str(block)] = (len(block.code), None, block.code.splitlines(True), str(block))
    with contextlib.redirect_stdout(out):
        exec(compile(block.code, str(block), "exec"), {"__name__": "__main__"})  # noqa: S102
    if block.output is not None:
        _expect_lines(block.output, out.getvalue(), str(block))


def _commands(block: Block) -> list[tuple[str, str | None]]:
    """(command, shown output or None) pairs of a shell block."""
    # A trailing backslash continues a command on the next line.
    lines = re.sub(r"\\\n\s*", " ", block.code).splitlines()
    if block.lang != "console":
        cmds = [re.sub(r"\s+#.*$", "", s).strip() for s in lines]
        return [(c, None) for c in cmds if c and not c.startswith("#")]
    out: list[tuple[str, str | None]] = []
    for s in lines:
        if s.startswith("$ "):
            out.append((s[2:].strip(), ""))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + s + "\n")
    return out


def classify(cmd: str) -> str | None:
    """None if the command runs here, else the reason it does not. Unknown: AssertionError."""
    if RUN_HELP.match(cmd) or cmd.startswith(RUN):
        return None
    for prefix, reason in NOT_RUN.items():
        if cmd.startswith(prefix):
            return reason
    raise AssertionError(
        f"documented command {cmd!r} is neither run by the docs test nor listed in NOT_RUN with "
        f"a reason; add it to one of them in tests/unit/test_docs.py"
    )


SHELL_CMDS = [(b, c, o) for b in SHELL_BLOCKS for c, o in _commands(b)]


@pytest.mark.parametrize(("block", "cmd", "shown"), SHELL_CMDS, ids=lambda x: str(x)[:60])
def test_shell_command(block: Block, cmd: str, shown: str | None, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(block.skip)
    reason = classify(cmd)
    if reason:
        pytest.skip(reason)
    argv = shlex.split(cmd)
    if argv[0] == "peftlab":
        argv = [sys.executable, "-m", "peftlab.cli", *argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{block}: `{cmd}` failed:\n{proc.stderr[-2000:]}"
    if shown:
        _expect_lines(shown, proc.stdout, f"{block}: `{cmd}`")


def test_every_documented_command_is_classified() -> None:
    for block, cmd, _ in SHELL_CMDS:
        if not block.skip:  # a skipped block says why none of its commands run
            classify(cmd)  # raises for an unknown one


def test_doc_parser_finds_blocks_and_outputs() -> None:
    """The parser itself: blocks, skip reasons, ids and expected outputs are read."""
    assert PY_BLOCKS, "no python blocks found in the docs"
    assert any(b.output for b in PY_BLOCKS), "no python block has a documented output"
    assert all(b.skip is None or b.skip.strip() for b in ALL_BLOCKS)
    with pytest.raises(AssertionError, match="neither run"):
        classify("rm -rf /")
    with pytest.raises(AssertionError, match="not printed"):
        _expect_lines("4.127\n", "4.5\n", "x")


# ---- numbers in the FAQ name their source --------------------------------------------------

NUMBER = re.compile(r"(?<![\w.§/-])\d+(?:[.,]\d+)*")
# Not claims: URLs and the year of a bibliographic reference ("Hu et al. 2021", "Li & Liang 2021").
NOT_A_CLAIM = re.compile(r"<?https?://\S+|[A-Z][a-z]+(?: et al\.)? (?:19|20)\d\d\b")
SOURCE = [
    re.compile(r"\[[^\]]*(§|Table|Fig\.|Figure|Appendix|abstract|Abstract|Eq\.)[^\]]*\]"),
    re.compile(r"`(peftlab|python|make)\b[^`]*`"),
    re.compile(r"\]\((\.\./)?results/[^)]+\)"),
    re.compile(r"\[run: [\w-]+\]"),
]


def unsourced_lines(text: str) -> list[str]:
    """Prose lines of ``text`` with a number but no source marker (fences and quotes skipped)."""
    bad, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.lstrip().startswith(">") or line.startswith("#") or "<!--" in line:
            continue
        if NUMBER.search(NOT_A_CLAIM.sub("", line)) and not any(s.search(line) for s in SOURCE):
            bad.append(line)
    return bad


def test_faq_numbers_have_sources() -> None:
    faq = ROOT / "docs" / "faq.md"
    text = faq.read_text()
    bad = unsourced_lines(text)
    assert not bad, "docs/faq.md lines with a number but no source marker:\n" + "\n".join(bad)
    ids = {b.id for b in parse_blocks(faq) if b.id}
    for ref in re.findall(r"(?<!`)\[run: ([\w-]+)\](?!`)", text):
        assert ref in ids, f"[run: {ref}] points at no block with <!-- id: {ref} --> in faq.md"
        block = next(b for b in parse_blocks(faq) if b.id == ref)
        assert block.output is not None or block.lang == "console", f"{ref}: no output shown"
    for link in re.findall(r"\]\(((?:\.\./)?results/[^)#]+)", text):
        assert (faq.parent / link).exists(), f"faq.md links to missing {link}"


def test_source_rule_catches_unsourced_numbers() -> None:
    assert unsourced_lines("QLoRA stores 4.25 bits per weight.\n")
    assert not unsourced_lines("QLoRA stores 4.127 bits [QLoRA §3, Double Quantization].\n")
    assert not unsourced_lines("> 每个参数从 16-bit 降到 4.25-bit\n")
    assert not unsourced_lines("Measured: 4.127 bits [run: qlora-bits].\n")
    assert not unsourced_lines("P-Tuning v2 and NF4 and Llama-2\n")
    assert not unsourced_lines("LoRA = Hu et al. 2021, <https://arxiv.org/abs/2106.09685>\n")
    assert unsourced_lines("Hu et al. 2021 report 10,000 times fewer parameters.\n")


# ---- method pages: every method, every option, every default --------------------------------

OPTION_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|\s*`([^`]*)`\s*\|")


@pytest.mark.parametrize("name", peftlab.methods())
def test_method_page_lists_every_option_with_its_default(name: str) -> None:
    page = ROOT / "docs" / "methods" / f"{name}.md"
    assert page.exists(), f"no docs page for registered method {name!r}: write {page}"
    cls = get_method(name).config_cls
    rows = dict(m.groups() for m in map(OPTION_ROW.match, page.read_text().splitlines()) if m)
    fields = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        fields[f.name] = repr(default)
    assert set(rows) == set(fields), (
        f"{page.name}: option table {sorted(rows)} != fields {sorted(fields)}"
    )
    wrong = {k: (rows[k], fields[k]) for k in fields if rows[k] != fields[k]}
    assert not wrong, f"{page.name}: documented default != code default: {wrong}"
    assert any(
        b.lang == "python" and "trainable_parameters" in b.code for b in parse_blocks(page)
    ), f"{page.name}: no runnable example counting parameters"


# ---- the closed forms the method pages state ------------------------------------------------


def _dims(model) -> dict[str, int]:
    c = model.config
    heads = c.num_attention_heads
    return {
        "L": c.num_hidden_layers,
        "d": c.hidden_size,
        "f": c.intermediate_size if getattr(c, "intermediate_size", None) else 4 * c.hidden_size,
        "kv": (getattr(c, "num_key_value_heads", None) or heads) * (c.hidden_size // heads),
        "V": c.vocab_size,
        "head": sum(
            p.numel() for n, p in model.named_parameters() if n.startswith(("classifier", "score"))
        ),
    }


def lora_linears(arch: str, k: dict[str, int]) -> list[tuple[int, int]]:
    """(in, out) of every layer "all-linear" targets, per the method pages."""
    d, f, kv = k["d"], k["f"], k["kv"]
    per_layer = {
        "llama": [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)],
        "gpt2": [(d, 3 * d), (d, d), (d, f), (f, d)],
        "bert": [(d, d), (d, d), (d, d), (d, d), (d, f), (f, d)],
    }[arch]
    extra = [(d, d)] if arch == "bert" else []  # BERT's pooler dense is a linear layer too
    return per_layer * k["L"] + extra


def _near_root(n: int) -> tuple[int, int]:
    """(m, n/m) with m the largest divisor of n not above √n."""
    m = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return m, n // m


def closed_form(name: str, arch: str, model, cfg) -> int:
    k = _dims(model)
    L, d = k["L"], k["d"]
    head = k["head"]  # a new classification head trains with every PEFT method here
    if name == "full":
        return sum(p.numel() for p in model.parameters())
    if name in ("lora", "dora", "qlora"):
        lin = lora_linears(arch, k)
        n = sum(cfg.r * (i + o) for i, o in lin)
        if name == "dora":
            n += sum(o for _, o in lin)
        return n + (head if cfg.modules_to_save else 0)
    if name == "adapter":
        m = d // 16
        return (2 if cfg.placement == "houlsby" else 1) * L * (2 * d * m + d + m) + (
            head if cfg.modules_to_save else 0
        )
    if name in ("prefix", "ptuning-v2"):
        p, width = cfg.num_virtual_tokens, L * 2 * k["kv"]
        n = (
            p * width
            if not cfg.reparam
            else (
                p * d
                + d * cfg.reparam_hidden
                + cfg.reparam_hidden
                + cfg.reparam_hidden * width
                + width
            )
        )
        return n + head
    if name == "prompt":
        return cfg.num_virtual_tokens * d + head
    if name == "lokr":  # W1 full, W2 low-rank unless r >= max(its sides) / 2 (lokr.md)
        n = 0
        for i, o in lora_linears(arch, k):
            (a, b), (c, d) = _near_root(o), _near_root(i)
            n += a * c + (cfg.r * (b + d) if cfg.r < max(b, d) / 2 else b * d)
        return n + (head if cfg.modules_to_save else 0)
    if name == "loha":
        return sum(2 * cfg.r * (i + o) for i, o in lora_linears(arch, k)) + (
            head if cfg.modules_to_save else 0
        )
    if name == "vera":  # the vectors b (out) and d (r) per targeted layer (vera.md)
        return sum(o + cfg.r for _, o in lora_linears(arch, k)) + (
            head if cfg.modules_to_save else 0
        )
    if name == "ia3":  # defaults: k, v (out) and down (in); GPT-2 c_attn and mlp.c_proj; BERT
        # key, value, and output.dense matching attention.output.dense too (both in)
        per = {"llama": 2 * k["kv"] + k["f"], "gpt2": 3 * d + k["f"], "bert": 3 * d + k["f"]}
        return L * per[arch] + head
    raise AssertionError(f"no closed form for {name}; add it to the docs page and here")


CONFIGS = {
    "full": lambda: peftlab.FullFinetuneConfig(),
    "lora": lambda: peftlab.LoRAConfig(r=4),
    "dora": lambda: peftlab.DoRAConfig(r=4),
    "qlora": lambda: peftlab.QLoRAConfig(r=4),
    "adapter": lambda: peftlab.AdapterConfig(placement="houlsby"),
    "prefix": lambda: peftlab.PrefixTuningConfig(num_virtual_tokens=5, reparam_hidden=16),
    "ptuning-v2": lambda: peftlab.PTuningV2Config(num_virtual_tokens=5),
    "prompt": lambda: peftlab.PromptTuningConfig(num_virtual_tokens=5),
    "ia3": lambda: peftlab.IA3Config(),
    "loha": lambda: peftlab.LoHaConfig(r=4),
    "lokr": lambda: peftlab.LoKrConfig(r=4),
    "vera": lambda: peftlab.VeRAConfig(r=4),
}


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_closed_form_parameter_count(name: str, arch: str) -> None:
    if name == "qlora" and arch != "llama":
        pytest.skip("one architecture is enough for the 4-bit path (it quantizes, slowly)")
    model = TINY[arch]()
    cfg = CONFIGS[name]()
    if arch == "bert" and name in ("lora", "dora", "qlora", "adapter", "loha", "lokr", "vera"):
        cfg = cfg.replace(modules_to_save=["classifier"])
    expected = closed_form(name, arch, model, cfg)
    peftlab.apply(model, cfg)
    trainable, _ = peftlab.trainable_parameters(model)
    assert trainable == expected, f"{name} on {arch}: closed form {expected}, counted {trainable}"


def test_every_registered_method_has_a_closed_form() -> None:
    assert set(CONFIGS) == set(peftlab.methods())


# ---- links -----------------------------------------------------------------------------------

LINK = re.compile(r"\]\(([^)\s]+)\)")
# Pages other issues own; linked ahead of their arrival. Remove an entry once the path exists.
PENDING: dict[str, str] = {}  # links to pages not written yet (none now)


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # external
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            assert rel in PENDING, f"{path.name}: link to missing {target}"
            continue
        if anchor and dest.suffix == ".md":
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            assert anchor in anchors, f"{path.name}: no heading for #{anchor} in {dest.name}"
