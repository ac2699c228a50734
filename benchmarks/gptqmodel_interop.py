"""Does our GPTQ-format export load in GPTQModel, and compute what our simulated model computes?

Our side (this environment): the cached ``--spec`` checkpoint of the embedded model, exported with
``compress.export.export_gptq`` (``--checkpoint-format gptq_v2`` by default: GPTQModel's own format; it refuses an
asymmetric auto-gptq v1 file it did not write itself), and the logits of our simulated
model (dequantized weights, fp32) on the first ``--windows`` ``--seqlen``-token Wikipedia test windows. GPTQModel's
side runs in a subprocess of its own virtual environment (GPTQModel pins torch and transformers apart from ours):
``GPTQModel.load(export, device="cpu", backend=TORCH)``, its pure-torch dequantizing kernel, on the same ids.
Printed: the max and mean absolute logit difference, the relative error ``||a - b|| / ||b||``, the share of positions
whose top-1 token agrees, and both token perplexities. Tolerance (stated, not asserted): relative logit error below
``TOLERANCE`` (the kernel computes in ``--dtype``; bf16 rounding alone gives ~1e-2).

This check is a benchmark, not a CI test: GPTQModel needs its own environment of ~1 GB (torch, torchao) that CI's
two-core machine would build from source on every run. Environment (once)::

    python3 -m venv .venv-gptq
    .venv-gptq/bin/pip install torch==2.13.0 gptqmodel==7.5.0   # 7.6+ needs torch >= 2.14

Run::

    CPT_BENCH_CACHE=... python benchmarks/gptqmodel_interop.py --spec gptq-w4g64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import torch

TOLERANCE = 0.02
DEFAULT_PYTHON = ".venv-gptq/bin/python"
IDS, LOGITS = "input_ids", "logits"


def gptqmodel_worker(args: argparse.Namespace) -> None:
    """GPTQModel's side (its environment): load the export on CPU with the torch backend, write its logits."""
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    ids = load_file(args.ids)[IDS]
    model = GPTQModel.load(args.export, device="cpu", backend=BACKEND.TORCH, dtype=getattr(torch, args.dtype))
    with torch.inference_mode():
        logits = torch.cat([model(input_ids=window[None]).logits.float() for window in ids])
    save_file({LOGITS: logits.contiguous()}, args.logits_out)
    import gptqmodel

    print(json.dumps({"gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
                      "kernels": sorted({type(m).__name__ for m in model.modules()
                                  if type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")}),
                      "quantized_linears": sum(type(m).__module__.startswith("gptqmodel.nn_modules.qlinear")
                                               for m in model.modules())}))


def token_perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of ``ids [k, seqlen]`` under ``logits [k, seqlen, vocab]``."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return math.exp(nll.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--spec", default="gptq-w4g64")
    parser.add_argument("--n-windows", type=int, default=32, help="calibration windows of the checkpoint")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="calibration window tokens")
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows")
    parser.add_argument("--seqlen", type=int, default=512, help="evaluation window tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="GPTQModel's compute dtype (its torch kernel takes these two only)")
    parser.add_argument("--checkpoint-format", default="gptq_v2", choices=["gptq_v2", "gptq"],
                        help="export format: GPTQModel loads asymmetric (sym=False) v1 files only if it wrote them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gptqmodel-python", default=DEFAULT_PYTHON)
    parser.add_argument("--out", type=Path, help="write the comparison as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--export", "--ids", "--logits-out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        gptqmodel_worker(args)
        return
    compare(args)


def compare(args: argparse.Namespace) -> None:
    """Export, score ours, run GPTQModel's side, print and save the comparison."""
    from safetensors.torch import load_file, save_file

    from cpt_bench.assets.model import load_tokenizer
    from cpt_bench.compress import CalibrationSettings, Spec, cached_checkpoint
    from cpt_bench.compress.checkpoints import load_checkpoint
    from cpt_bench.compress.export import export_gptq
    from cpt_bench.files import write_json_atomic
    from cpt_bench.tokens import corpus_stream

    torch.set_num_threads(args.threads)
    python = os.path.abspath(args.gptqmodel_python)
    if not Path(python).is_file():
        raise SystemExit(f"GPTQModel python {python} not found; create it as in this file's docstring")
    folder = cached_checkpoint(args.model, Spec.parse(args.spec), CalibrationSettings(args.n_windows,
                                                                                      args.calib_seqlen))
    ids = corpus_stream("wikipedia", "test", load_tokenizer(str(folder))).ids[: args.windows * args.seqlen]
    ids = ids.reshape(args.windows, args.seqlen)
    model, _ = load_checkpoint(folder, "simulated", torch.float32)
    with torch.inference_mode():
        ours = torch.cat([model(input_ids=window[None]).logits.float() for window in ids])
    with tempfile.TemporaryDirectory(prefix="cpt-gptqmodel-") as tmp:
        export = export_gptq(folder, Path(tmp) / "export", checkpoint_format=args.checkpoint_format)
        save_file({IDS: ids.contiguous()}, f"{tmp}/ids.safetensors")
        command = [python, str(Path(__file__).resolve()), "--worker", "--export", str(export), "--ids",
                   f"{tmp}/ids.safetensors", "--logits-out", f"{tmp}/logits.safetensors", "--dtype", args.dtype,
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        if done.returncode:
            raise SystemExit(f"GPTQModel failed to load or run the export:\n{done.stderr[-4000:]}")
        theirs = load_file(f"{tmp}/logits.safetensors")[LOGITS]
        worker = json.loads(done.stdout.strip().splitlines()[-1])
    difference = (theirs - ours).abs()
    relative = ((theirs - ours).norm() / ours.norm()).item()
    record = {"spec": args.spec, "checkpoint_format": args.checkpoint_format, "windows": args.windows,
              "seqlen": args.seqlen, "dtype": args.dtype,
              "max_abs_logit_difference": difference.max().item(),
              "mean_abs_logit_difference": difference.mean().item(),
              "relative_logit_error": relative, "tolerance": TOLERANCE, "within_tolerance": relative < TOLERANCE,
              "top1_agreement": (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(),
              "ppl_ours": token_perplexity(ours, ids), "ppl_gptqmodel": token_perplexity(theirs, ids),
              "gptqmodel": worker, "load_average": os.getloadavg()}
    for key, value in record.items():
        print(f"{key}: {value}")
    if args.out:
        write_json_atomic(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
