"""One comparison run (one method, one seed) in its own process: ``python -m peftlab.bench.worker SPEC``.

The runner writes a JSON spec (see :func:`peftlab.bench.runner.plan`) and starts this module
once per method and seed, so every run starts from a fresh interpreter and its memory figure is
its own. The worker loads the model, trains it through :func:`peftlab.train.train` inside one
:class:`~peftlab.bench.measure.PeakMemory` (data, ``apply`` with QLoRA's quantization, the
loop; a :class:`~peftlab.bench.probe.LoopProbe` callback measures the loop as a phase of it),
then times the adapted model (unmerged and, where the method is mergeable, merged) against a
fresh base model on the same prompts, and writes ``<method>.json``
(:class:`~peftlab.results.RunResult`) atomically. Any exception is recorded in that JSON
with ``status: "failed"``; the runner records crashes that leave no JSON (a killed or
segfaulting process).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys
import time
import traceback
from pathlib import Path

from peftlab.bench import baselines, measure, timing
from peftlab.bench.inference import overhead_ratios, time_inference
from peftlab.bench.spec import RunSpec
from peftlab.core.fileio import atomic_write_json
from peftlab.results import (
    InferenceInfo,
    LoopMemory,
    MemoryPrediction,
    MetaInfo,
    PeakMemoryInfo,
    RunInfo,
    RunResult,
    Stability,
    TrainInfo,
)

CAUSAL_PROMPTS = [
    "Sort these numbers in ascending order: 42 7 19 3",
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Translate to French: good morning",
]
CLASSIFICATION_PROMPTS = [
    "a gripping, beautifully acted film",
    "the plot is thin and the jokes fall flat",
    "an uneven but often charming comedy",
    "i would not recommend it to anyone",
]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


write_json_atomic = atomic_write_json
"""A reader (or a resumed comparison) sees either the whole result or none."""


def meta_info() -> dict:
    import torch
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 — optional; its absence is a fact to report
        bnb = None
    import peftlab

    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {
            "peftlab": peftlab.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bnb,
        },
    }


def prompt_batch(tokenizer, kind: str, max_length: int) -> dict:
    """The fixed prompts every method is timed on, tokenized and left-padded."""
    if kind == "classification":
        texts = CLASSIFICATION_PROMPTS
    else:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
            )
            if getattr(tokenizer, "chat_template", None)
            else t
            for t in CAUSAL_PROMPTS
        ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    try:
        enc = tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
    finally:
        tokenizer.padding_side = side
    return dict(enc)


def read_evals(run_dir: Path) -> list[dict]:
    """The evaluation records of the run's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if any(k.startswith("eval_") for k in r)]


def run(spec: RunSpec) -> RunResult:
    """Train and measure one method as ``spec`` says."""
    import torch

    import peftlab
    from peftlab.bench.load import snapshot
    from peftlab.bench.probe import LoopProbe
    from peftlab.core.model import adapter_configs
    from peftlab.models import load_model, load_tokenizer
    from peftlab.train import train
    from peftlab.train.config import TrainConfig
    from peftlab.train.taskdata import load_data, num_labels

    loads = {"start": snapshot().to_dict()}
    run_info = RunInfo(**spec.run_info(), start=now(), device=spec.device, argv=sys.argv)
    device = torch.device(spec.device)
    config = spec.train_config()
    tokenizer = load_tokenizer(spec.model)
    # The splits train() will make (one place decides them and the label set), read before
    # the model so its head has the data's classes; kept for the baselines.
    data = load_data(TrainConfig.from_dict(config), tokenizer, spec.kind)
    labels = num_labels(data)
    torch.manual_seed(spec.seed)
    rss_start = measure.rss_bytes()
    t0 = time.perf_counter()
    pooling = config.get("pooling", "auto")
    model = load_model(spec.model, kind=spec.kind, num_labels=labels, pooling=pooling).to(device)
    measure.own_weights(model)  # resident and counted from the start (see own_weights)
    load_s = time.perf_counter() - t0
    rss_loaded = measure.rss_bytes()
    loaded_weights = measure.tensor_bytes(model)["weights_bytes"]
    inf = spec.inference
    prompts = {
        k: v.to(device)
        for k, v in prompt_batch(tokenizer, spec.kind, inf.max_prompt_length).items()
    }

    if device.type == "cuda":
        torch.cuda.empty_cache()
    # One measurement over everything training needs: the data, apply (QLoRA's quantization
    # and its transient copies), the loop; the probe measures the loop as a phase of it.
    with measure.PeakMemory(device) as peak:
        probe = LoopProbe(peak)
        t_train = time.perf_counter()
        summary = train(config, model=model, tokenizer=tokenizer, callbacks=[probe])
        train_s = time.perf_counter() - t_train
    loads["after_train"] = snapshot().to_dict()
    if not adapter_configs(model):
        raise RuntimeError(
            "peftlab.train returned without applying the method to the model it was given"
        )

    memory = _memory(spec, config, model, probe, peak, device, (rss_start, rss_loaded))
    memory.loaded_weights_bytes = loaded_weights
    adapter_dir = Path(spec.run_dir) / "adapter"
    if not adapter_dir.is_dir():
        peftlab.save_adapter(model, adapter_dir)
    torch.manual_seed(spec.seed)  # the base model's new head (classification), reproducibly
    base = load_model(spec.model, kind=spec.kind, num_labels=labels, pooling=pooling).to(device)
    inference = _time_inference(spec, base, model, prompts)
    loads["after_inference"] = snapshot().to_dict()
    exact = "eval_exact_match" in (summary.get("eval_after") or {})
    base_metrics = _base_baseline(spec, config, base, tokenizer, data, exact)
    del base
    train_info = _train_info(spec, model, summary, probe.records, memory, inference)
    train_info.train_seconds, train_info.model_load_seconds = train_s, load_s
    train_info.adapter_bytes = measure.dir_bytes(adapter_dir)
    train_info.test = summary.get("test") or None
    train_info.baselines = baselines.record(data, base_metrics)
    train_info.timing = _timing(inference, loads, train_info.trains_base)
    run_info.end = now()
    run_info.model_config = {
        k: v for k, v in model.config.to_dict().items() if isinstance(v, int | float | str | bool)
    }
    run_info.model_class = type(model).__name__
    if spec.kind == "classification":
        run_info.num_labels = getattr(model.config, "num_labels", None)
    return RunResult(run_info, train_info, MetaInfo(**meta_info(), load=loads))


def _base_baseline(spec: RunSpec, config: dict, base, tokenizer, data, exact: bool) -> dict:
    """The untrained model's score (:func:`peftlab.bench.baselines.base_model`), shared by
    the comparison's runs of the same setting (:func:`peftlab.bench.baselines.cached`)."""
    from peftlab.train.config import TrainConfig

    cfg = TrainConfig.from_dict(config)
    batch = cfg.eval_batch_size or cfg.batch_size
    setting = {
        "model": spec.model,
        "kind": spec.kind,
        "head_seed": spec.seed if spec.kind == "classification" else None,
        "pooling": config.get("pooling", "auto"),
        "data": cfg.data_kwargs(),
        "source": cfg.data,
        "max_length": cfg.max_length,
        "exact_match": exact,
        "extractor": cfg.answer_extractor,
        "metric": cfg.metric,
        "device": spec.device,
    }
    directory = Path(spec.run_dir).parent / "baselines"
    device = next(base.parameters()).device
    kw = {"extractor": cfg.answer_extractor, "metric": cfg.metric}
    score = lambda: baselines.base_model(base, tokenizer, data, batch, device, exact, **kw)  # noqa: E731
    return baselines.cached(directory, setting, score)


def _memory(spec, config, model, probe, peak, device, rss: tuple[int, int]) -> PeakMemoryInfo:
    """``train_info.peak_memory`` from the worker's one measurement (see
    :mod:`peftlab.bench.measure`); ``rss``: RSS before and after the model loaded."""
    rss_start, rss_loaded = rss
    cpu = device.type == "cpu"
    loop = probe.memory()
    return PeakMemoryInfo(
        bytes=peak.peak_bytes - (rss_loaded if cpu else 0),
        # Peak minus the process's RSS before the model loaded (torch and transformers
        # imported): the model and everything training it needs. Not "RSS after load minus
        # weights": safetensors pages the weights in lazily, so RSS after load undercounts them.
        total_bytes=peak.peak_bytes - (rss_start if cpu else 0),
        how=peak.method + (" minus RSS after model load" if cpu else ""),
        peak_process_bytes=peak.peak_bytes,
        prediction=memory_prediction(spec, config, model, loop, device),
        loop=loop,
        rss_before_load_bytes=rss_start if cpu else None,
        rss_after_load_bytes=rss_loaded if cpu else None,
        **measure.tensor_bytes(model),
    )


def _timing(inference: InferenceInfo, loads: dict, trains_base: bool) -> dict:
    """``train_info.timing``: reliability from the load readings, the noise floor and each
    form's finding (:mod:`peftlab.bench.timing`)."""
    return {
        **timing.reliability(loads),
        "noise_floor": inference.noise_floor,
        "findings": timing.findings(
            inference.unmerged_vs_base, inference.merged_vs_base, inference.noise_floor,
            trains_base,
        ),
    }  # fmt: skip


def _train_info(
    spec: RunSpec,
    model,
    summary: dict,
    records: list[dict],
    memory: PeakMemoryInfo,
    inference: InferenceInfo,
) -> TrainInfo:
    """The measurements of a finished run (its times and adapter size aside)."""
    import peftlab
    from peftlab.core.model import adapter_configs
    from peftlab.core.registry import get_method

    # Counted by the trainer right after apply, i.e. what trained (a prefix's reparameterization
    # MLP included, even if the method folds it into a table afterwards).
    trainable, total = peftlab.trainable_parameters(model)
    after = {"trainable_params": trainable, "total_params": total}
    if summary.get("trainable_params") is not None:
        trainable, total = summary["trainable_params"], summary["total_params"]
    cfg = next(iter(adapter_configs(model).values()))
    losses = [r["loss"] for r in records]
    evals = read_evals(Path(spec.run_dir))
    return TrainInfo(
        status="ok",
        trainable_params=trainable,
        total_params=total,
        trainable_percent=100.0 * trainable / total,
        params_after_training=after,
        peak_memory=memory,
        **measure.speed(records),
        loss_curve=[[r["step"], r["loss"]] for r in records],
        eval_curve=[
            {"step": e.get("step"), **{k: v for k, v in e.items() if k.startswith("eval_")}}
            for e in evals
        ],
        final_loss=losses[-1] if losses else None,
        stability=Stability(
            loss_spikes=measure.loss_spikes(losses),
            loss_variability=measure.loss_variability(losses),
            definition=f"spike: loss > {measure.SPIKE_RATIO} x median of the previous "
            f"{measure.SPIKE_WINDOW} step losses; variability: std of step-to-step change of "
            "log-loss",
        ),
        eval={k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")},
        inference=inference,
        mergeable=type(cfg).mergeable,
        trains_base=not get_method(spec.method).param_prefix,
        method_config=cfg.to_dict(),
        train_summary=summary,
    )


def _time_inference(spec: RunSpec, base, model, prompts: dict) -> InferenceInfo:
    """Time a fresh copy of the base model and the adapted one in the same rounds (see
    :func:`~peftlab.bench.inference.time_inference`) in two phases: unmerged, then merged
    where the method merges (else the base alone). The base model timed in both phases gives
    the run's noise floor (:func:`peftlab.bench.timing.noise_floor`)."""
    import peftlab
    from peftlab.core.model import adapter_configs

    inf = spec.inference
    new_tokens = inf.new_tokens if spec.kind == "causal-lm" else 0
    measure.own_weights(base)  # like the adapted model's weights: same kind of memory
    timed = time_inference({"base": base, "unmerged": model}, prompts, new_tokens, inf.repeats)
    base_speed, unmerged = timed["base"], timed["unmerged"]
    merged = merged_base = None
    if type(next(iter(adapter_configs(model).values()))).mergeable:
        peftlab.merge(model)
        timed = time_inference({"base": base, "merged": model}, prompts, new_tokens, inf.repeats)
        merged_base, merged = timed["base"], timed["merged"]
        peftlab.unmerge(model)
        base_again = merged_base
    else:
        base_again = time_inference({"base": base}, prompts, new_tokens, inf.repeats)["base"]
    return InferenceInfo(
        prompts=len(prompts["input_ids"]),
        prompt_tokens=int(prompts["input_ids"].shape[1]),
        new_tokens=new_tokens,
        base=base_speed,
        unmerged=unmerged,
        merged=merged,
        base_in_merged_round=merged_base,
        unmerged_vs_base=overhead_ratios(base_speed, unmerged),
        merged_vs_base=overhead_ratios(merged_base, merged) if merged else None,
        base_again=base_again,
        noise_floor=timing.noise_floor(base_speed, base_again, unmerged, merged),
        how=f"median of {inf.repeats} rounds, each timing a fresh base model and the "
        "adapted one in turn on the same prompts, after a warm-up round; the base model is "
        "timed again in a second phase (with the merged model, or alone) for the noise floor, "
        "which also reads every model's round-to-round spread",
    )


def memory_prediction(
    spec: RunSpec, config: dict, model, loop: LoopMemory | None, device
) -> MemoryPrediction:
    """The estimator's predicted training peak for this very run, next to the measured one.

    Measured: the training loop's peak (``loop``: CUDA allocated bytes, or on the CPU the
    heap's live bytes) minus what was live when the loop started that is not the model's
    tensors (the runtime, loader leftovers, tokenizer and tokenized data: tens of MB, reported
    as ``other_live_bytes``) — so the weights, gradients, optimizer state, activations and
    workspace, which is what the estimator predicts.
    Predicted: :func:`peftlab.estimate_memory` for the run's model, method config, batch size,
    longest padded batch, dtype, optimizer and checkpointing.
    """
    from peftlab.select.estimator import estimate_memory

    loop = loop or LoopMemory()
    live, start = loop.live_bytes, loop.live_bytes_at_start
    live_other = start - loop.model_tensor_bytes if start is not None else None
    if device.type == "cuda":
        measured = loop.bytes
    else:
        measured = live - live_other if live is not None else None
    out = MemoryPrediction(
        measured_bytes=measured,
        other_live_bytes=live_other,
        how="training-loop peak of "
        + ("CUDA allocated bytes" if device.type == "cuda" else "live heap bytes (mallinfo2)")
        + ", less what was live at the loop's start that is not model tensors",
    )
    try:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        est = estimate_memory(
            spec.model,
            {"method": spec.method, **spec.method_args},
            batch_size=spec.batch_size,
            seq_len=int(loop.longest_batch or spec.max_length),
            dtype="float32" if dtype not in ("bfloat16", "float16") else dtype,
            optimizer=config.get("optimizer", "adamw"),
            gradient_checkpointing=bool(config.get("gradient_checkpointing", False)),
            device=device.type,
        )
    except Exception as e:  # noqa: BLE001 — a model the estimator cannot read: say so, go on
        out.error = f"{type(e).__name__}: {e}"
        return out
    out.predicted_bytes, out.seq_len, out.parts = est.peak, est.seq_len, est.to_dict()
    if measured:
        out.error_ratio = est.peak / measured - 1
    return out


def failure(spec: RunSpec, error: str, tb: str, start: str | None = None) -> RunResult:
    """The result of a run that failed: its spec, the error, and the traceback's tail."""
    run_info = RunInfo(**spec.run_info(), start=start, end=now())
    try:
        meta = MetaInfo(**meta_info())
    except Exception:  # noqa: BLE001 — a broken environment must still leave a record
        meta = MetaInfo(host=socket.gethostname())
    return RunResult(run_info, TrainInfo(status="failed", error=error, traceback=tb[-4000:]), meta)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--search":
        return _search_main(Path(argv[1]))
    if len(argv) != 1:
        print("usage: python -m peftlab.bench.worker [--search] SPEC.json", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(json.loads(Path(argv[0]).read_text()))
    import torch

    torch.set_num_threads(spec.threads or torch.get_num_threads())
    start = now()
    try:
        result = run(spec)
    except Exception as e:  # noqa: BLE001 — recorded, so the comparison goes on
        traceback.print_exc()
        result = failure(spec, f"{type(e).__name__}: {e}", traceback.format_exc(), start)
        write_json_atomic(spec.result_path, result.to_json())
        return 1
    write_json_atomic(spec.result_path, result.to_json())
    return 0


def _search_main(path: Path) -> int:
    """One method's search (:mod:`peftlab.bench.search`); a failing trial is recorded in the
    search table, a failure of the whole search in the JSON's ``search.error``."""
    import torch

    from peftlab.bench.search import SearchSpec, run_search

    search = SearchSpec.from_json(json.loads(path.read_text()))
    torch.set_num_threads(search.base.threads or torch.get_num_threads())
    try:
        found = run_search(search)
    except Exception as e:  # noqa: BLE001 — recorded, so the comparison goes on
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
        found = {
            "method": search.method,
            "fingerprint": search.fingerprint,
            "search": {"best": None, "error": error, "trials": []},
        }
    write_json_atomic(search.result_path, found)
    return 0 if found["search"]["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
