"""Our GPTQ / SparseGPT against a reference implementation (llmcompressor) on the same model and calibration data.

One session, one machine, the same threads: the calibration windows are drawn once by our
``calibration.corpus_calibration_ids`` (train split, GPTQ-style seeded random starts) and saved to a
safetensors file that both sides read, so both compress on identical token ids. Our side runs
``compress_model`` in this process twice: true-sequential (our default) and one-pass (every Hessian of a decoder
layer from one forward, as the reference does); the reference runs llmcompressor's ``oneshot`` (GPTQModifier or
SparseGPTModifier, sequential pipeline per decoder layer) in a subprocess of a separate virtual environment,
because llmcompressor 0.14 pins ``transformers<=5.17`` while ours is newer. The reference writes the
compressed (dequantized / pruned) decoder-layer Linear weights; they are loaded into a fresh fp32 copy of
the dense model here, so dense, ours and reference are scored by the same code: token perplexity over the
first ``--eval-windows`` non-overlapping ``--eval-seqlen``-token windows of the wikipedia test split (joined
with "\\n\\n", no special tokens; each window scores its ``seqlen - 1`` next-token predictions, as
``benchmarks/kernels_memory.py``). Compression seconds are the wall time of the compression call alone on
a model already loaded (ours: ``compress_model``; reference: ``oneshot`` with a ready DataLoader, so its
tracing and pipeline set-up count); ours is broken down by phase (``sequential.PHASES``). Targets from the
issue, reported, not asserted: perplexity within 2% of the reference, time at most 0.8x. GPTQModel, the other
reference, was not run: its kernels and quantization loop need CUDA, and this machine has none.

Reference environment (once; ~1.5 GB; pin torch, or pip pulls a multi-GB CUDA build)::

    python3 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 'llmcompressor==0.14.*'

Full run (CPU-heavy, minutes to tens of minutes on 2 cores)::

    CPT_BENCH_CACHE=... nice -n 10 .venv/bin/python benchmarks/reference_compression.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

DEFAULT_SPECS = "gptq-w4g64,sparsegpt-50,sparsegpt-50+gptq-w4g64"
DEFAULT_OUT = "runs/bench-reference-compression.json"
DEFAULT_REFERENCE_PYTHON = ".venv-ref/bin/python"
OUR_PACKAGES = ("cpt_bench", "torch", "transformers", "accelerate", "safetensors")
REFERENCE_PACKAGES = ("llmcompressor", "compressed-tensors", "torch", "transformers", "accelerate", "safetensors")
PPL_RATIO_TARGET = 1.02  # ours / reference perplexity at most this
TIME_RATIO_TARGET = 0.8  # ours / reference seconds at most this
IDS_KEY = "input_ids"
LAYERS_PREFIX = "model.layers."
STDERR_TAIL_CHARS = 3000


# ---------------------------------------------------------------------------------------------------------------
# Reference side: runs under --reference-python, which has torch, transformers, safetensors and llmcompressor only.
# ---------------------------------------------------------------------------------------------------------------


def reference_modifier(request: dict):
    """The llmcompressor modifier for a spec request (``spec_request``), a list of two (SparseGPT, then GPTQ) for a
    joint one; ``lm_head`` is left dense as ours."""
    if request["method"] == "joint":
        return [reference_modifier(request["pruning"]), reference_modifier(request["quantization"])]
    if request["method"] == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(sparsity=request["sparsity"], mask_structure=request["mask_structure"],
                                 block_size=request["block_size"], dampening_frac=request["dampening"],
                                 targets=["Linear"], ignore=["re:.*lm_head"])
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    group = request["group_size"]
    weights = QuantizationArgs(num_bits=request["bits"], type="int", symmetric=request["symmetric"],
                               strategy="group" if group else "channel", group_size=group,
                               observer="memoryless_minmax")
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["re:.*lm_head"], actorder=None,
                        block_size=request["block_size"], dampening_frac=request["dampening"])


def decoder_linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.layers.<i>.<name>.weight`` of every Linear inside the decoder layers, contiguous fp32."""
    return {f"{name}.weight": module.weight.detach().float().contiguous()
            for name, module in model.named_modules()
            if name.startswith(LAYERS_PREFIX) and isinstance(module, torch.nn.Linear)}


def grid_error(model: torch.nn.Module) -> float | None:
    """Max ``|w - fake_quantize(w)|`` over quantized Linears (0 when GPTQ left every weight on its grid);
    None when no Linear carries quantization parameters."""
    from compressed_tensors.quantization import fake_quantize

    worst = None
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(module, "weight_scale"):
            continue
        weight = module.weight.detach()
        again = fake_quantize(weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                              scheme.weights)
        error = (weight - again).abs().max().item()
        worst = error if worst is None else max(worst, error)
    return worst


def run_reference_worker(args: argparse.Namespace) -> None:
    """Compress ``--model-folder`` with llmcompressor on the saved calibration ids; write the decoder Linear
    weights to ``--weights-out`` and a JSON record (seconds, versions, hardware) to ``--result-out``."""
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    request = json.loads(args.request)
    ids = load_file(args.calibration)[IDS_KEY]
    loader = torch.utils.data.DataLoader([{IDS_KEY: row} for row in ids], batch_size=1, shuffle=False)
    model = AutoModelForCausalLM.from_pretrained(args.model_folder, dtype=torch.float32).eval()
    modifier = reference_modifier(request)
    started = time.perf_counter()
    oneshot(model=model, recipe=modifier, dataset=loader, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - started
    save_file(decoder_linear_weights(model), args.weights_out)
    record = {"seconds": seconds, "grid_error": grid_error(model), "modifier": repr(modifier),
              "environment": environment(REFERENCE_PACKAGES)}
    Path(args.result_out).write_text(json.dumps(record, default=str))


def environment(packages: tuple[str, ...]) -> dict:
    """Python, the given packages' versions and the hardware of this interpreter (no cpt_bench import)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "missing"
    return {"python": sys.version.split()[0], "executable": sys.executable, "versions": versions,
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------------------------
# Our side: the benchmark driver (our venv).
# ---------------------------------------------------------------------------------------------------------------


def spec_request(text: str, dampening: float, block_size: int) -> dict:
    """What the reference must run for one of our specs; ``ValueError`` for specs it cannot match.

    Supported: ``gptq-w<bits>[g<group>][-sym]``, ``sparsegpt-<percent>|<n>:<m>`` and the two joined
    (``sparsegpt-50+gptq-w4g64``: llmcompressor runs a SparseGPT and a GPTQ modifier in one recipe, where ours
    prunes and quantizes in one sweep). Refused: ``-actorder`` (llmcompressor's orderings differ from ours).
    """
    from cpt_bench.compress import Spec

    spec = Spec.parse(text)
    common = {"spec": str(spec), "dampening": dampening, "block_size": block_size}
    quant, pruning = spec.quantization, spec.pruning
    if quant and (quant.method != "gptq" or quant.act_order):
        raise ValueError(f"spec {spec}: only gptq-* quantization without -actorder has a matching llmcompressor "
                         "modifier")
    if pruning and pruning.method != "sparsegpt":
        raise ValueError(f"spec {spec}: only sparsegpt-* pruning has a matching llmcompressor modifier")
    gptq = quant and common | {"method": "gptq", "bits": quant.bits, "group_size": quant.group_size,
                               "symmetric": quant.symmetric}
    sparsegpt = pruning and common | {"method": "sparsegpt", "sparsity": pruning.fraction,
                                      "mask_structure": f"{pruning.n}:{pruning.m}" if pruning.m else "0:0"}
    if gptq and sparsegpt:
        return common | {"method": "joint", "pruning": sparsegpt, "quantization": gptq}
    return gptq or sparsegpt


def option_differences(request: dict) -> list[str]:
    """Where the two implementations knowingly differ for this request (they match in everything else:
    data, dampening relative to mean(diag H), block size, min-max asymmetric grids containing 0, no act-order,
    decoder-layer Linears only, lm_head dense)."""
    notes = ["ours true-sequential calibrates a decoder layer's Linears group by group (q,k,v -> o -> gate,up -> "
             "down, each group on the outputs of the compressed earlier ones); llmcompressor collects every Hessian "
             "of the layer in one pass over the uncompressed layer, as ours one-pass does"]
    if request["method"] == "joint":
        notes.append("joint: ours prunes and quantizes each column in one GPTQ/SparseGPT sweep (pruned weights stay "
                     "exactly zero); llmcompressor applies SparseGPT, then GPTQ, as two modifiers on each layer, and "
                     "GPTQ's error updates may refill pruned weights (see sparsity)")
        return list(dict.fromkeys(notes + option_differences(request["pruning"])
                                  + option_differences(request["quantization"])))
    if request["method"] == "gptq":
        notes.append("group grids: ours fits each group's min-max grid when GPTQ reaches its first column, on the "
                     "error-updated weights (GPTQ reference code); llmcompressor fits all grids once on the original "
                     "weights before GPTQ (memoryless_minmax observer, 'static groups'); no option changes either")
        notes.append("scales: ours rounds them to fp16 (as stored); llmcompressor keeps the model dtype (fp32)")
    else:
        notes.append("mask size: ours prunes exactly round(sparsity * count) weights per 128-column block; "
                     "llmcompressor prunes every weight scoring <= the int(sparsity * count)-th smallest "
                     "(one more, plus ties)")
    return notes


def evaluation_ids(tokenizer, windows: int, seqlen: int) -> torch.Tensor:
    """``[windows, seqlen]``: the first non-overlapping windows of the wikipedia test split (``"\\n\\n"``-joined,
    no special tokens), as ``benchmarks/kernels_memory.py``."""
    from cpt_bench.tokens import corpus_stream

    tokens = corpus_stream("wikipedia", "test", tokenizer).ids
    if len(tokens) < windows * seqlen:
        raise ValueError(f"the wikipedia test split has {len(tokens)} tokens, fewer than {windows} x {seqlen}")
    return tokens[: windows * seqlen].reshape(windows, seqlen)


def token_perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood) over every window's ``seqlen - 1`` predictions."""
    total = 0.0
    with torch.inference_mode():
        for window in ids:
            logits = model(window[None], use_cache=False).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    return math.exp(total / (ids.shape[0] * (ids.shape[1] - 1)))


def dense_model(folder: Path) -> torch.nn.Module:
    """A fresh fp32 copy of the dense model, in eval mode."""
    from cpt_bench.models import load_model

    return load_model(str(folder), dtype=torch.float32, device="cpu").model


def sparsity(model: torch.nn.Module) -> float:
    """Fraction of exactly-zero weights over the decoder-layer Linears."""
    weights = decoder_linear_weights(model).values()
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_ours(folder: Path, spec: str, calibration: torch.Tensor, settings, eval_ids: torch.Tensor) -> dict:
    """Compress a fresh dense model with our ``compress_model`` on the shared ids; seconds, ppl, sparsity."""
    from cpt_bench.compress import Spec, compress_model

    model = dense_model(folder)
    started = time.perf_counter()
    result = compress_model(model, Spec.parse(spec), calibration, settings, progress=False)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "algorithm_seconds": result.seconds, "phase_seconds": result.phase_seconds,
            "ppl": token_perplexity(model, eval_ids), "sparsity": sparsity(model)}


def run_reference(folder: Path, request: dict, calibration_file: Path, args: argparse.Namespace,
                  eval_ids: torch.Tensor, workdir: Path) -> dict:
    """Compress in the reference environment, load its weights into a fresh dense model and score it.

    A failing reference yields ``{"error": ...}`` (its stderr's tail) instead of raising.
    """
    weights_file, result_file = workdir / "reference-weights.safetensors", workdir / "reference-result.json"
    command = [args.reference_python, str(Path(__file__).resolve()), "--reference-worker",
               "--model-folder", str(folder), "--calibration", str(calibration_file), "--request", json.dumps(request),
               "--weights-out", str(weights_file), "--result-out", str(result_file), "--threads", str(args.threads)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"reference exited {done.returncode}: {done.stderr[-STDERR_TAIL_CHARS:]}"}
    record = json.loads(result_file.read_text())
    model = load_reference_weights(dense_model(folder), weights_file)
    weights_file.unlink()
    return record | {"ppl": token_perplexity(model, eval_ids), "sparsity": sparsity(model)}


def load_reference_weights(model: torch.nn.Module, weights_file: Path) -> torch.nn.Module:
    """Put the reference's decoder Linear weights into ``model``; they must cover exactly our compressible
    Linears."""
    from safetensors.torch import load_file

    from cpt_bench.compress.sequential import compressible_linears

    weights = load_file(str(weights_file))
    expected = {f"{name}.weight" for name in compressible_linears(model)}
    if set(weights) != expected:
        raise ValueError(f"reference weights cover {len(weights)} tensors, ours {len(expected)}: "
                         f"{sorted(set(weights) ^ expected)[:3]}")
    model.load_state_dict(weights, strict=False)
    return model


OUR_MODES = {"true-sequential": True, "one-pass": False}  # label -> CalibrationSettings.true_sequential


def ratios(ours: dict, reference: dict) -> dict:
    """ours / reference for perplexity and seconds, and whether the issue's targets are met (None on error)."""
    if "error" in reference:
        return {"ppl_ratio": None, "time_ratio": None, "ppl_target_met": None, "time_target_met": None}
    ppl_ratio, time_ratio = ours["ppl"] / reference["ppl"], ours["seconds"] / reference["seconds"]
    return {"ppl_ratio": ppl_ratio, "time_ratio": time_ratio, "ppl_target_met": ppl_ratio <= PPL_RATIO_TARGET,
            "time_target_met": time_ratio <= TIME_RATIO_TARGET}


def table(dense_ppl: float, results: list[dict]) -> str:
    """The results as a text table: the reference's row, then one row per mode of ours with its ratios."""
    from tabulate import tabulate

    def mark(met: bool | None) -> str:
        return "-" if met is None else ("met" if met else "NOT met")

    rows = [["dense", "-", f"{dense_ppl:.3f}", "-", "-", "-", "-"]]
    for entry in results:
        reference = entry["reference"]
        failed = "error" in reference
        rows.append([entry["spec"], "llmcompressor", "error" if failed else f"{reference['ppl']:.3f}",
                     "-" if failed else f"{reference['seconds']:.1f}", "", "", ""])
        for mode, ours in entry["ours"].items():
            if failed:
                rows.append([entry["spec"], f"ours, {mode}", f"{ours['ppl']:.3f}", f"{ours['seconds']:.1f}", "-", "-",
                             "-"])
                continue
            rows.append([entry["spec"], f"ours, {mode}", f"{ours['ppl']:.3f}", f"{ours['seconds']:.1f}",
                         f"{ours['ppl_ratio']:.4f}", f"{ours['time_ratio']:.3f}",
                         f"ppl {mark(ours['ppl_target_met'])}, time {mark(ours['time_target_met'])}"])
    headers = ["spec", "implementation", "token ppl", "compress s", "ppl ours/ref", "time ours/ref",
               f"targets (ppl <= x{PPL_RATIO_TARGET}, time <= x{TIME_RATIO_TARGET})"]
    return tabulate(rows, headers=headers, disable_numparse=True)


def phase_table(results: list[dict]) -> str:
    """Where our compression time went, per spec and mode: seconds and share of each phase (``sequential.PHASES``)."""
    from tabulate import tabulate

    from cpt_bench.compress.sequential import PHASES

    rows = []
    for entry in results:
        for mode, ours in entry["ours"].items():
            phases, total = ours["phase_seconds"], ours["seconds"]
            rows.append([entry["spec"], mode, *(f"{phases[p]:.1f} ({phases[p] / total:.0%})" for p in PHASES),
                         f"{total - sum(phases.values()):.1f}", f"{total:.1f}"])
    return "ours, seconds per phase:\n" + tabulate(rows, headers=["spec", "mode", *PHASES, "other", "total"],
                                                    disable_numparse=True)


def compare_spec(spec: str, folder: Path, calibration: torch.Tensor, calibration_file: Path, settings,
                 eval_ids: torch.Tensor, args: argparse.Namespace, workdir: Path) -> dict:
    """The reference, then ours in each mode of ``OUR_MODES`` (its ratios to the reference beside it), with the
    known option differences."""
    request = spec_request(spec, settings.dampening, settings.block_size)
    print(f"[{spec}] llmcompressor ...", flush=True)
    reference = run_reference(folder, request, calibration_file, args, eval_ids, workdir)
    if "error" in reference:
        print(f"[{spec}] reference failed:\n{reference['error']}", file=sys.stderr)
    ours = {}
    for mode, true_sequential in OUR_MODES.items():
        print(f"[{spec}] ours, {mode} ...", flush=True)
        run = run_ours(folder, spec, calibration, replace(settings, true_sequential=true_sequential), eval_ids)
        ours[mode] = run | ratios(run, reference)
    return {"spec": spec, "request": request, "reference": reference, "ours": ours,
            "option_differences": option_differences(request)}


def run_benchmark(args: argparse.Namespace) -> None:
    """Draw the shared calibration and evaluation ids, score dense, compare every spec, print and save."""
    from safetensors.torch import save_file

    from cpt_bench.assets.model import load_tokenizer, model_folder
    from cpt_bench.compress import CalibrationSettings
    from cpt_bench.compress.calibration import corpus_calibration_ids
    from cpt_bench.files import write_json_atomic
    from cpt_bench.provenance import hardware

    torch.set_num_threads(args.threads)
    args.reference_python = os.path.abspath(args.reference_python)  # not resolve(): keep the venv's own path
    if not Path(args.reference_python).is_file():
        raise SystemExit(f"reference python {args.reference_python} not found; create it as in this file's docstring")
    specs = args.specs.split(",")
    settings = CalibrationSettings(args.n_windows, args.seqlen, args.seed, args.dampening, args.block_size)
    for spec in specs:  # refuse unsupported specs before any work
        spec_request(spec, settings.dampening, settings.block_size)
    folder = model_folder(args.model)
    tokenizer = load_tokenizer(str(folder))
    calibration = corpus_calibration_ids(tokenizer, settings)
    eval_ids = evaluation_ids(tokenizer, args.eval_windows, args.eval_seqlen)
    dense_ppl = token_perplexity(dense_model(folder), eval_ids)
    with tempfile.TemporaryDirectory(prefix="cpt-reference-") as tmp:
        workdir = Path(tmp)
        calibration_file = workdir / "calibration.safetensors"
        save_file({IDS_KEY: calibration.contiguous()}, str(calibration_file))
        results = [compare_spec(spec, folder, calibration, calibration_file, settings, eval_ids, args, workdir)
                   for spec in specs]
    print(table(dense_ppl, results))
    print(phase_table(results))
    ours_env = environment(OUR_PACKAGES)
    reference_envs = [entry["reference"].pop("environment", None) for entry in results]
    reference_env = next((env for env in reference_envs if env), None)
    payload = {
        "reference": "llmcompressor",
        "model": args.model, "model_folder": str(folder),
        "calibration": asdict(settings),
        "evaluation": {"corpus": "wikipedia", "split": "test", "windows": args.eval_windows,
                       "seqlen": args.eval_seqlen, "dtype": "float32", "metric": "token perplexity"},
        "targets": {"ppl_ratio_max": PPL_RATIO_TARGET, "time_ratio_max": TIME_RATIO_TARGET},
        "dense": {"ppl": dense_ppl},
        "results": results,
        "environments": {"ours": ours_env, "reference": reference_env},
        "hardware": hardware(),
        "argv": sys.argv,
    }
    write_json_atomic(Path(args.out), payload)
    print(f"wrote {args.out}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--specs", default=DEFAULT_SPECS, help="comma-separated gptq-* / sparsegpt-* specs")
    parser.add_argument("--n-windows", type=int, default=32, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window tokens")
    parser.add_argument("--seed", type=int, default=0, help="calibration window seed")
    parser.add_argument("--dampening", type=float, default=0.01, help="fraction of mean(diag H) added to diag H")
    parser.add_argument("--block-size", type=int, default=128, help="GPTQ/SparseGPT lazy-update block")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (wikipedia test)")
    parser.add_argument("--eval-seqlen", type=int, default=1024, help="evaluation window tokens")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON,
                        help="python of the llmcompressor virtual environment")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results (written atomically)")
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    for name in ("--model-folder", "--calibration", "--request", "--weights-out", "--result-out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.reference_worker:
        run_reference_worker(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
