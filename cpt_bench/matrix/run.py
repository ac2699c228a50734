"""Run a matrix: build the artifacts once, evaluate every pending cell through lm-eval, write each at once.

Stages: compressed checkpoints (the shared compression cache, keyed by model, spec and calibration) ->
soft prompts (trained in the run folder, resumable from their checkpoints) and their controls -> cells, grouped
by (compression, prompt) so that each prompted model is loaded once. Every finished cell is written
atomically before the next starts, so a killed run loses at most the cell in flight and ``--resume``
redoes nothing else. Executors:

- ``local`` (default): everything in this process, in plan order.
- ``ray``: every artifact and (compression, prompt) group is a Ray task (one GPU each when the config's
  device is cuda), on a local Ray instance or the cluster at ``RAY_ADDRESS``. Tasks write into the run
  folder and the cache, so on several nodes both must be on a shared file system.

``--shard i/n`` runs a disjoint part of the plan (whole groups) into its own folder; ``merge`` joins them.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cpt_bench.errors import UserError
from cpt_bench.files import ensure_replaceable, write_json_atomic, write_text_atomic
from cpt_bench.lmeval.quiet import logging_through_tqdm, quiet_lm_eval
from cpt_bench.matrix import store
from cpt_bench.matrix.config import ConfigError, MatrixConfig, Target, load_config
from cpt_bench.matrix.lock import RunLock
from cpt_bench.matrix.paired import examples_record
from cpt_bench.matrix.plan import (
    Cell,
    Plan,
    PromptChoice,
    artifacts_of,
    describe,
    idp_members,
    make_plan,
    parse_shard,
    prompt_training,
    recovery_settings,
    safe_name,
    shard_plan,
    stored_cell,
)
from cpt_bench.matrix.validate import validate_plan
from cpt_bench.perplexity import perplexity_with_stderr
from cpt_bench.provenance import environment_record, peak_memory, reset_peak_memory
from cpt_bench.recovery import RECOVERY_KINDS
from cpt_bench.recovery.eora import METHOD as EORA
from cpt_bench.recovery.idp import SEPARATOR as IDP_SEPARATOR

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
PROMPTS_DIR = "prompts"
# lm-eval output keys not kept in a cell: per-sample logs (large; the cell's ``examples`` keep what pairing needs,
# see ``paired``) and the session's environment dump.
_DROPPED_LM_EVAL_KEYS = ("samples", "pretty_env_info")


def resolved_device(config: MatrixConfig) -> str:
    """The torch device the config asks for (``auto``: cuda when available)."""
    from cpt_bench.models import resolve_device

    return resolve_device(config.device, "device")


def task_manager(config: MatrixConfig, target: Target | None = None):
    """lm-eval's TaskManager over our tasks/ folder (and lm-eval's own when a target is one of those), with the model,
    window length and (for ``cpt_ppl_corpus`` targets) corpus our loaders need."""
    from cpt_bench.assets.model import resolve_model
    from cpt_bench.lmeval.tasks import task_manager as shared_manager

    return shared_manager(resolve_model(config.model), config.ppl_seqlen, target.corpus if target else None,
                          names=[t.task for t in config.targets])


# --- artifacts ---------------------------------------------------------------------------------------------------

def build_compressed(config: MatrixConfig, spec: str) -> str:
    """The compressed checkpoint folder of ``spec`` (compressed on first use into the shared cache)."""
    from cpt_bench.compress.checkpoints import cached_checkpoint
    from cpt_bench.compress.spec import Spec

    return str(cached_checkpoint(config.model, Spec.parse(spec), config.compression.calibration))


def prompt_folder(run_dir: Path, prompt: PromptChoice) -> Path:
    return run_dir / PROMPTS_DIR / safe_name(prompt.id)


def artifact_meta(folder: Path, kind: str) -> dict[str, Any]:
    """The metadata of a built artifact of recovery kind ``kind`` (a prompt's ``prompt.json``, an adapter's
    ``lora.json``, ...), after verifying its stored tensors against their checksum."""
    return RECOVERY_KINDS[kind].read_meta(folder)


def _artifact_complete(folder: Path, kind: str) -> bool:
    return (folder / RECOVERY_KINDS[kind].metadata_file).is_file()


def build_prompt(config: MatrixConfig, run_dir: Path, prompt: PromptChoice, compressed_folder: str | None) -> str:
    """Build prompt ``prompt`` at its level unless it is already complete: train the artifact of its learned kind
    (``RecoveryKind.train``, resuming its checkpoint) with its seed's and objective's settings, the dense model loaded
    beside it as the teacher for ``kd``, fit an EoRA adapter on the level's checkpoint from the compression's
    calibration windows (``recovery.eora.fit_checkpoint_eora``, as ``cpt-bench eora`` does), or write a control
    (``recovery.controls``)."""
    import torch

    from cpt_bench.assets.model import shared_tokenizer
    from cpt_bench.models import CheckpointFolder, load_model
    from cpt_bench.recovery.controls import write_control_prompt
    from cpt_bench.recovery.eora import fit_checkpoint_eora
    from cpt_bench.recovery.training import CHECKPOINT

    folder = prompt_folder(run_dir, prompt)
    if prompt.kind == EORA:
        if not _artifact_complete(folder, prompt.kind):  # fitted whole into a staging folder: nothing to resume
            fit_checkpoint_eora(Path(compressed_folder), config.compression.calibration, prompt.rank, folder)
        artifact_meta(folder, prompt.kind)
        return str(folder)
    if not _artifact_complete(folder, prompt.kind):
        def load(checkpoint: str | None):
            return load_model(config.model, CheckpointFolder(Path(checkpoint)) if checkpoint else None,
                              mode=config.kernels, dtype=getattr(torch, config.dtype), device=resolved_device(config),
                              tokenizer=shared_tokenizer(config.model))

        loaded = load(compressed_folder)
        model, compression = loaded.model, loaded.compression
        if prompt.eora_base is not None:  # a soft prompt trained on the model its EoRA adapter corrects
            model, compression = _with_eora(config, run_dir, prompt.eora_base, compressed_folder, loaded)
        training = prompt_training(config, prompt)
        teacher = load(None).model if training.objective == "kd" else None
        common = {"model_name": config.model, "compression": compression}
        if prompt.control:
            write_control_prompt(model, loaded.tokenizer, training, prompt.control, folder, **common)
        else:
            RECOVERY_KINDS[prompt.kind].train(model, loaded.tokenizer, training,
                                              recovery_settings(config, prompt.kind), prompt.source, folder,
                                              resume=(folder / CHECKPOINT).is_file(), teacher=teacher, **common)
    artifact_meta(folder, prompt.kind)
    if not prompt.control:  # a control is its initialisation by design
        check_prompt_trained(folder, prompt, config.prompts.soft.require_improvement)
    return str(folder)


def _with_eora(config: MatrixConfig, run_dir: Path, base: PromptChoice, compressed_folder: str | None, loaded):
    """``loaded``'s compressed model corrected by the EoRA adapter ``base`` of the run (fitted first if it is not yet:
    ``build_prompt``), applied unmerged through PEFT as the cells apply it, and its label (``gptq-w3g64 + EoRA
    r16``)."""
    folder = build_prompt(config, run_dir, base, compressed_folder)
    kind = RECOVERY_KINDS[EORA]
    applied = kind.apply(loaded.model, loaded.tokenizer, folder, kind.read(folder), config.model, False)
    return applied.model, f"{loaded.compression} + EoRA r{base.rank}"


# --- cells -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupJob:
    """Cells sharing one (compression, prompt): everything a worker needs to evaluate and write them."""

    config: MatrixConfig
    run_dir: Path
    compression: str
    prompt: PromptChoice
    cells: tuple[Cell, ...]
    compressed_folder: str | None
    prompt_folder: str | None
    idp_values: tuple[str, ...] = ()  # an IDP prompt's members as the cpt adapter's idp= names them, in set order


def metric_value(output: dict[str, Any], target: Target) -> tuple[float, float | None, bool | None]:
    """(value, stderr, higher_is_better) of the target's metric in lm-eval's output for its task.

    Perplexity tasks: token perplexity and our per-window stderr from the logged samples (lm-eval has none).
    """
    results = output["results"][target.task]
    key = target.metric if "," in target.metric else f"{target.metric},none"
    if key not in results:
        available = sorted(name.split(",")[0] for name in results if "_stderr" not in name and name != "alias")
        raise ConfigError(f"targets: task {target.task} reports no metric {target.metric!r}; available: "
                          f"{', '.join(available)}")
    higher = output.get("higher_is_better", {}).get(target.task, {}).get(key.split(",")[0])
    if target.is_perplexity:
        pairs = [tuple(sample[key.split(",")[0]]) for sample in output["samples"][target.task]]
        value, stderr = perplexity_with_stderr(pairs)
        return value, stderr, higher
    value, stderr = _value_and_stderr(results, key)
    return value, stderr, higher


def _value_and_stderr(results: dict[str, Any], key: str) -> tuple[float, float | None]:
    """(value, stderr) of ``key`` (``metric,filter``) in lm-eval's results of one task (stderr None when absent)."""
    stderr = results.get(key.replace(",", "_stderr,", 1))
    return float(results[key]), (float(stderr) if isinstance(stderr, int | float) else None)


def is_generative(output: dict[str, Any], task: str) -> bool:
    """Whether lm-eval ran ``task`` as a generative (``generate_until``) task, from its output's task config."""
    return output.get("configs", {}).get(task, {}).get("output_type") == "generate_until"


def filter_values(output: dict[str, Any], target: Target) -> dict[str, dict[str, float | None]]:
    """Per filter of the task, ``{value, stderr}`` of the target's metric (``em`` under ``none``; ``exact_match``
    under ``remove_whitespace`` ...), as lm-eval reports them: a generative cell's ``metric.filters``."""
    results = output["results"][target.task]
    name = target.metric.partition(",")[0]
    found = {}
    for key in results:
        metric, _, filter_name = key.partition(",")
        if metric == name and filter_name:
            value, stderr = _value_and_stderr(results, key)
            found[filter_name] = {"value": value, "stderr": stderr}
    return found


def _load_lm(job: GroupJob):
    """The ``cpt`` lm-eval model for a group: compressed and prompted as the group says."""
    from cpt_bench.assets.model import shared_tokenizer
    from cpt_bench.lmeval.adapter import CptLM
    from cpt_bench.models import CheckpointFolder

    prompt = job.prompt
    compression = CheckpointFolder(Path(job.compressed_folder)) if job.compressed_folder else None
    model_arg = RECOVERY_KINDS[prompt.kind].model_arg
    recovery = {model_arg: prompt.hard if prompt.hard is not None else job.prompt_folder} if model_arg else {}
    if prompt.eora_base is not None:  # the soft prompt sits on the EoRA adapter it was trained on
        recovery[RECOVERY_KINDS[EORA].model_arg] = str(prompt_folder(job.run_dir, prompt.eora_base))
    if prompt.members is not None:
        recovery = {model_arg: IDP_SEPARATOR.join(job.idp_values), "idp_rule": prompt.rule}
    return CptLM(pretrained=job.config.model, compression=compression, compression_mode=job.config.kernels,
                 batch_size=job.config.batch_size, device=resolved_device(job.config), dtype=job.config.dtype,
                 tokenizer=shared_tokenizer(job.config.model), **recovery)


def _memory_account(job: GroupJob, lm) -> dict[str, Any]:
    """The stored-bytes account of the group's compression level (dense: the fp16 checkpoint)."""
    from cpt_bench.compress.storage import dense_fp16_bytes, read_manifest

    if job.compressed_folder:
        return read_manifest(job.compressed_folder)["memory"]
    dense = dense_fp16_bytes(lm.model)
    return {"stored_bytes": dense, "compressed_bits_per_weight": 16.0, "dense_fp16_bytes": dense,
            "ratio_to_dense_fp16": 1.0}


def _prompt_block(lm, job: GroupJob) -> dict[str, Any]:
    """The prompt's provenance: what the adapter applied plus, for an artifact of a learned kind (soft prompt, LoRA
    adapter, ...), how it was trained: objective, seconds, trainable parameters, tokens seen and the training's
    peak memory.

    ``untrained``: it never beat its initialisation (see ``check_prompt_trained``); ``control``: the kind of a
    control prompt (untrained by design).
    """
    from cpt_bench.recovery.training import trained_improved

    block = dict(lm.prompt_info)
    if job.prompt.members is not None:  # per cell: idp_choices
        block.pop("chosen", None)
        block["members"] = list(job.prompt.members)
    if job.prompt_folder and job.prompt.kind == EORA:
        record = artifact_meta(Path(job.prompt_folder), EORA)["eora"]
        fitting = record.get("fitting", {})
        block.update(path=str(Path(job.prompt_folder).relative_to(job.run_dir)), trainable_parameters=0,
                     stored_parameters=record["memory"]["adapter_parameters"], fit_seconds=fitting.get("wall_seconds"),
                     fit_peak_memory_bytes=fitting.get("peak_memory_bytes"), adapter_memory=record["memory"])
    elif job.prompt_folder:
        if job.prompt.eora_base is not None:  # the EoRA adapter it sits on: its rank and memory account
            base = artifact_meta(prompt_folder(job.run_dir, job.prompt.eora_base), EORA)["eora"]
            where = str(prompt_folder(job.run_dir, job.prompt.eora_base).relative_to(job.run_dir))
            block.update(on_eora=base["rank"], adapter_memory=base["memory"],
                         corrected_by={**block["corrected_by"], "path": where})  # relative, as ``path`` is
        meta = artifact_meta(Path(job.prompt_folder), job.prompt.kind)
        block.update(path=str(Path(job.prompt_folder).relative_to(job.run_dir)),
                     source=meta["source"]["corpus"], train_seconds=round(meta["train_seconds"], 1),
                     hyperparameters=meta["hyperparameters"])
        if job.prompt.control:
            block.update(control=job.prompt.control, trainable_parameters=0)
        else:
            block.update(best_val_ppl=meta["best"]["val_ppl"], best_step=meta["best"]["step"],
                         untrained=not trained_improved(meta), objective=job.prompt.objective,
                         trainable_parameters=RECOVERY_KINDS[job.prompt.kind].trainable_parameters(meta),
                         tokens_seen=meta.get("tokens_seen"), teacher_seconds=meta.get("teacher_seconds"),
                         train_peak_memory_bytes=meta.get("peak_memory_bytes"))
    return block


def check_prompt_trained(folder: Path, prompt: PromptChoice, required: bool) -> bool:
    """Whether the learned artifact (soft prompt, LoRA adapter, ...) in ``folder`` beat its initialisation; warn when
    it did not, or, when ``required`` (``prompts.soft.require_improvement``), raise a one-line ``SoftPromptError``
    naming it."""
    from cpt_bench.recovery.training import SoftPromptError, trained_improved

    meta = artifact_meta(Path(folder), prompt.kind)
    if trained_improved(meta):
        return True
    what = RECOVERY_KINDS[prompt.kind].label
    problem = (f"{what} {prompt.id} (source {meta['source']['corpus']}, trained at {meta['compression']}) "
               f"never beat its initialisation: validation ppl {meta['curve'][0]['val_ppl']:.2f} at step 0 stayed "
               "the best")
    if required:
        raise SoftPromptError(f"{problem}; prompts.soft.require_improvement is set: raise prompts.soft.training.lr "
                              "or steps, or unset it to use the prompt flagged as untrained")
    log.warning("%s; its cells are flagged prompt.untrained", problem)
    return False


def idp_choices(lm, prompt: PromptChoice, task: str, samples: list[dict[str, Any]]) -> tuple[dict[str, int],
                                                                                              dict[int, str]]:
    """What an IDP cell chose: documents per member of ``prompt``'s set (every member, 0 included; they sum to the
    cell's documents) and the member chosen per document id, read from the adapter's choices (``CptLM.idp_chosen``,
    by its labels, which follow the set's order) for the documents of ``samples`` (lm-eval's, of ``task``)."""
    by_label = dict(zip(lm.prompt_info["prompts"], prompt.members, strict=True))
    per_item = {int(s["doc_id"]): by_label[lm.idp_chosen[(task, int(s["doc_id"]))]] for s in samples}
    chosen = dict.fromkeys(prompt.members, 0)
    for member in per_item.values():
        chosen[member] += 1
    return chosen, per_item


def evaluate_group(job: GroupJob, on_cell: Callable[[str], None] | None = None) -> list[str]:
    """Evaluate the group's cells in order, writing each cell's result as soon as it is done; returns their ids."""
    from lm_eval import simple_evaluate

    lm = _load_lm(job)
    compression = store.compression_block(job.compression, job.config.kernels, job.compressed_folder,
                                          _memory_account(job, lm))
    prompt = _prompt_block(lm, job)
    done = []
    for cell in job.cells:
        reset_peak_memory()
        started = time.perf_counter()
        manager = task_manager(job.config, cell.target)
        gen_kwargs = dict(cell.target.gen_kwargs) if cell.target.gen_kwargs else None
        with quiet_lm_eval():
            output = simple_evaluate(model=lm, tasks=[cell.target.task], task_manager=manager, limit=cell.target.limit,
                                     log_samples=True, gen_kwargs=gen_kwargs,
                                     apply_chat_template=job.config.apply_chat_template, **job.config.seeds())
        value, stderr, higher = metric_value(output, cell.target)
        generative = is_generative(output, cell.target.task)
        metric = {"name": cell.target.metric, "value": value, "stderr": stderr, "higher_is_better": higher}
        if generative:
            metric["filters"] = filter_values(output, cell.target)
        examples = examples_record(output["samples"][cell.target.task], cell.target, generative)
        cell_prompt = prompt
        if job.prompt.members is not None:
            chosen, per_item = idp_choices(lm, job.prompt, cell.target.task, output["samples"][cell.target.task])
            cell_prompt = {**prompt, "chosen": chosen}
            if examples is not None:
                examples["choices"] = [per_item[doc] for doc in examples["doc_ids"]]
        record = {"format": store.CELL_FORMAT,
                  "cell": stored_cell(cell, job.config),
                  "metric": metric,
                  "examples": examples,
                  "compression": compression, "prompt": cell_prompt,
                  "memory": {**lm.memory_record(), **peak_memory()},
                  "seconds": round(time.perf_counter() - started, 2),
                  "lm_eval": {key: item for key, item in output.items() if key not in _DROPPED_LM_EVAL_KEYS},
                  "environment": {"seeds": job.config.seeds(), "device": str(lm.device)}}
        store.write_cell(job.run_dir, record)
        done.append(cell.id)
        if on_cell:
            on_cell(cell.id)
    del lm
    gc.collect()
    return done


# --- executors ---------------------------------------------------------------------------------------------------

class LocalExecutor:
    """Runs every job in this process, in order."""

    name = "local"

    def map(self, fn: Callable, jobs: Iterable[tuple]) -> Iterator[Any]:
        for args in jobs:
            yield fn(*args)

    def run_groups(self, jobs: list[GroupJob], on_cell: Callable[[str], None]) -> None:
        for job in jobs:
            evaluate_group(job, on_cell)


class RayExecutor:
    """Runs jobs as Ray tasks (one GPU each on CUDA configs) on a local instance or the ``RAY_ADDRESS`` cluster."""

    name = "ray"

    def __init__(self, gpus_per_task: float = 0.0):
        try:
            import ray
        except ImportError:
            raise UserError("executor ray needs Ray: pip install 'ray[default]'") from None
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"CPT_BENCH_CACHE": os.environ.get("CPT_BENCH_CACHE", "")}}
                     if os.environ.get("CPT_BENCH_CACHE") else None)
        self._ray = ray
        self._gpus = gpus_per_task

    def map(self, fn: Callable, jobs: Iterable[tuple]) -> Iterator[Any]:
        remote = self._ray.remote(num_gpus=self._gpus)(fn)
        refs = [remote.remote(*args) for args in jobs]
        yield from self._ray.get(refs)

    def run_groups(self, jobs: list[GroupJob], on_cell: Callable[[str], None]) -> None:
        remote = self._ray.remote(num_gpus=self._gpus)(evaluate_group)
        pending = [remote.remote(job) for job in jobs]
        while pending:
            finished, pending = self._ray.wait(pending, num_returns=1)
            for cell_id in self._ray.get(finished[0]):
                on_cell(cell_id)


def make_executor(name: str, config: MatrixConfig):
    if name not in EXECUTORS:
        raise UserError(f"executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "ray":
        return RayExecutor(gpus_per_task=1.0 if resolved_device(config) == "cuda" else 0.0)
    return LocalExecutor()


# --- the run -----------------------------------------------------------------------------------------------------

def _pending_groups(plan: Plan, done: set[str]) -> dict[tuple[str, PromptChoice], tuple[Cell, ...]]:
    """The cells not yet done, by (compression, prompt) group; groups with nothing left are left out."""
    todo = {key: tuple(cell for cell in cells if cell.id not in done) for key, cells in plan.groups().items()}
    return {key: cells for key, cells in todo.items() if cells}


def _build_artifacts(plan: Plan, run_dir: Path, pending: set[tuple[str, PromptChoice]],
                     executor) -> tuple[dict[str, str], dict[PromptChoice, str]]:
    """Compressed checkpoints and soft prompts that the pending groups need (each built once)."""
    config = plan.config
    prompts_needed = [p for p in plan.soft_prompts
                      if any(p in artifacts_of(config, prompt) for _, prompt in pending)]
    specs = [spec for spec in plan.compressed
             if any(spec == c for c, _ in pending) or any(spec == p.trained_at for p in prompts_needed)]
    compressed = dict(zip(specs, executor.map(build_compressed, [(config, spec) for spec in specs]), strict=True))
    prompts: dict[PromptChoice, str] = {}
    for phase in (False, True):  # a soft prompt on EoRA after the adapters (each builds its own if it is missing)
        built = [p for p in prompts_needed if (p.eora_base is not None) == phase]
        jobs = [(config, run_dir, p, compressed.get(p.trained_at)) for p in built]
        prompts |= dict(zip(built, executor.map(build_prompt, jobs), strict=True))
    return compressed, prompts


def _idp_value(member: PromptChoice | str, built: dict[PromptChoice, str]) -> str:
    """An IDP member as the ``cpt`` adapter's ``idp=`` names it: a hard prompt's name or text, a built prompt's
    folder, a user's folder."""
    if isinstance(member, str):
        return member
    return member.hard if member.hard is not None else built[member]


def default_run_dir(config: MatrixConfig, shard: tuple[int, int] | None) -> Path:
    suffix = f"-shard{shard[0]}of{shard[1]}" if shard else ""
    return Path("runs") / f"{config.name}{suffix}"


def run_matrix(config_path: Path, out: Path | None = None, resume: bool = False, shard: str | None = None,
               executor: str = "local", dry_run: bool = False, plan_only: bool = False) -> Path | None:
    """Run the matrix in ``config_path``; returns the run folder. ``dry_run``: only check the plan as the run does
    first and print it; ``plan_only``: only print it (nothing looked up: for a config meant for another machine).

    When every cell of the (shard's) plan is done, writes ``summary.json`` (its report is ``cpt_bench.report``'s: the
    command line composes the two).
    """
    config = load_config(config_path)
    plan = make_plan(config)
    shard_numbers = parse_shard(shard) if shard else None
    if shard_numbers:
        plan = shard_plan(plan, *shard_numbers)
    if plan_only:
        print(describe(plan, None))
        return None
    run_dir = Path(out) if out else default_run_dir(config, shard_numbers)
    if not dry_run:  # before the plan's checks load anything
        ensure_replaceable(run_dir, store.RUN_FOLDER_KIND, "--out")
    facts = validate_plan(plan, task_manager(config))
    if dry_run:
        print(describe(plan, facts.parameters))
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        store.prepare(run_dir, config, Path(config_path).read_text(encoding="utf-8"), resume)
        started = time.perf_counter()
        session = store.start_session(run_dir, environment_record(config.seeds()) | {"shard": shard,
                                                                                    "executor": executor})
        try:
            write_text_atomic(run_dir / "plan.txt", describe(plan, facts.parameters) + "\n")
            _run_cells(plan, run_dir, make_executor(executor, config))
        finally:
            store.end_session(run_dir, session, time.perf_counter() - started)
        finish(run_dir, plan)
    return run_dir


def _run_cells(plan: Plan, run_dir: Path, executor) -> None:
    """Build what the pending cells need, then evaluate them with a progress bar over all cells."""
    pending = _pending_groups(plan, set(store.read_cells(run_dir)))
    compressed, prompts = _build_artifacts(plan, run_dir, set(pending), executor)
    jobs = [GroupJob(plan.config, run_dir, compression, prompt, cells, compressed.get(compression), prompts.get(prompt),
                     tuple(_idp_value(member, prompts) for member in idp_members(plan.config, prompt)))
            for (compression, prompt), cells in pending.items()]
    remaining = sum(len(cells) for cells in pending.values())
    with (tqdm(total=len(plan.cells), initial=len(plan.cells) - remaining, desc="cells", unit="cell") as progress,
          logging_through_tqdm()):
        executor.run_groups(jobs, lambda _cell_id: progress.update(1))


def finish(run_dir: Path, plan: Plan) -> Path | None:
    """Write ``summary.json`` if every cell of ``plan`` is in ``run_dir``; returns its path (None: cells missing).
    Warns once, with the figures, where the trivial-prefix control alone moves the dense model's perplexity by more
    than its standard error (``store.trivial_prefix_warnings``)."""
    cells = store.read_cells(run_dir)
    missing = [cell.id for cell in plan.cells if cell.id not in cells]
    if missing:
        log.warning("%d cells missing (e.g. %s); no summary written", len(missing), missing[0])
        return None
    summary = store.summarise(plan, cells, store.read_sessions(run_dir))
    path = run_dir / store.SUMMARY_FILE
    write_json_atomic(path, summary)
    if warnings := store.trivial_prefix_warnings(summary):
        log.warning("trivial-prefix control: %s; part of every prompt's gain there is a neutral token before the "
                    "window, not recovery (docs/recovery.md, 'The trivial-prefix control')", "; ".join(warnings))
    return path


def merge_runs(out: Path, inputs: list[Path]) -> Path | None:
    """Merge shard folders into ``out`` and, when complete, write its summary; returns its path (see ``finish``)."""
    ensure_replaceable(out, store.RUN_FOLDER_KIND, "merge OUT")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        store.merge(out, inputs)
        return finish(out, make_plan(store.read_run_config(out)))
