"""Everything a matrix run checks before its first artifact, so that ``--dry-run`` refuses what the run would.

``validate_plan(plan)`` reads only configs, tokenizers and the (cached) corpora, never weights:

- the model exists and is a causal LM (``assets.model.check_causal_lm``);
- every target is a known lm-eval task (not a group) and reports the target's metric; ``gen_kwargs`` only on
  generative tasks;
- windows fit the model's context (lm-eval's own ``resolve_max_length``): soft-prompt training windows plus the
  prompt (when something is trained: controls are not), perplexity windows plus the longest prompt applied,
  calibration windows, and for a generative target the longest prompt plus ``max_gen_toks`` plus at least one
  context token (lm-eval cuts a longer context from the left);
- the corpora are long enough: the calibration corpus's train split for one calibration window, each soft-prompt
  source's train and validation splits for one training window, each perplexity target's test split for one
  window.

It returns the facts the dry run's estimate needs (context, parameter count).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpt_bench.compress.spec import Spec
from cpt_bench.matrix.config import ConfigError, MatrixConfig
from cpt_bench.matrix.plan import EORA, Plan, generated_tokens
from cpt_bench.tokens import corpus_stream


@dataclass(frozen=True)
class ModelFacts:
    """What the checks learned about the config's model: its context (tokens) and parameter count."""

    context_tokens: int
    parameters: int


def validate_plan(plan: Plan, manager) -> ModelFacts:
    """Run every pre-artifact check of ``plan`` (see the module docstring); raises ``ConfigError`` / ``ModelError``.

    ``manager``: lm-eval's TaskManager over our tasks (``lmeval.tasks.task_manager``).
    """
    from cpt_bench.assets.model import check_causal_lm, shared_tokenizer

    config = plan.config
    path = check_causal_lm(config.model)
    check_targets(config, manager)
    tokenizer = shared_tokenizer(path)
    facts = model_facts(path, tokenizer)
    _check_windows(plan, tokenizer, facts.context_tokens)
    _check_corpora(plan, tokenizer)
    return facts


def check_targets(config: MatrixConfig, manager) -> None:
    """Refuse unknown task names, groups (a target is one task with one metric), ``gen_kwargs`` on a task that does
    not generate and a metric the task does not report (``acc`` on a generative task: the error lists its metrics)."""
    from cpt_bench.lmeval.tasks import task_metrics

    for index, target in enumerate(config.targets):
        if target.task in manager.all_groups:
            raise ConfigError(f"targets[{index}].task: {target.task!r} is a group; list its tasks one by one")
        if target.task not in manager.all_tasks:
            raise ConfigError(f"targets[{index}].task: unknown task {target.task!r}; expected a task in tasks/ "
                              "(e.g. cpt_ppl_wikipedia, cpt_piqa) or an lm-eval built-in task")
        metrics = task_metrics(manager, target.task)
        if metrics is None:  # a task defined in Python: its metrics are checked when the cell reads its results
            continue
        if target.gen_kwargs is not None and not metrics.is_generative:
            raise ConfigError(f"targets[{index}].gen_kwargs: task {target.task!r} is not generative "
                              f"({metrics.output_type}); expected gen_kwargs only on generate_until tasks")
        if not metrics.accepts(target.metric):
            raise ConfigError(f"targets[{index}].metric: task {target.task!r} reports no metric {target.metric!r}; "
                              f"expected one of {', '.join(metrics.names())}")


def model_facts(path: str, tokenizer) -> ModelFacts:
    """Context length (``assets.model.context_tokens``) and parameter count, from the config alone (meta tensors)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_bench.assets.model import context_tokens

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # accelerate's meta patch unties them
    parameters = sum(parameter.numel() for parameter in skeleton.parameters())  # tied weights counted once
    return ModelFacts(context_tokens(path, tokenizer), int(parameters))


def _longest_prompt_tokens(config: MatrixConfig, tokenizer) -> int:
    from cpt_bench.recovery.hard import hard_prompt_text

    lengths = [len(tokenizer(hard_prompt_text(text), add_special_tokens=False)["input_ids"])
               for text in config.prompts.hard]
    if config.prompts.soft.sources:
        lengths.append(config.prompts.soft.training.n_virtual_tokens)
    if config.prompts.trivial_prefix:
        lengths.append(1)  # the trivial-prefix control
    return max(lengths, default=0)


def _check_windows(plan: Plan, tokenizer, context: int) -> None:
    from cpt_bench.assets.model import check_fits_context

    config = plan.config
    training = config.prompts.soft.training
    if any(prompt.is_learned for prompt in plan.soft_prompts):  # controls are written, not trained
        check_fits_context(training.n_virtual_tokens + training.seqlen, f"prompts.soft.training n_virtual_tokens "
                           f"{training.n_virtual_tokens} + seqlen {training.seqlen}", config.model, context)
    prompt = _longest_prompt_tokens(config, tokenizer)
    if any(target.is_perplexity for target in config.targets):
        check_fits_context(config.ppl_seqlen + prompt, f"ppl_seqlen {config.ppl_seqlen} + the longest prompt "
                           f"({prompt} tokens)", config.model, context)
    for target in config.targets:
        if target.is_generative:
            tokens = generated_tokens(target)
            check_fits_context(prompt + tokens + 1, f"targets: {target.name}: the longest prompt ({prompt} tokens) + "
                               f"max_gen_toks {tokens} + one context token", config.model, context)
    if _needs_calibration(plan):
        check_fits_context(config.compression.calibration.seqlen, "compression.calibration.seqlen", config.model,
                           context)


def _needs_calibration(plan: Plan) -> bool:
    """Whether the plan reads calibration windows: to compress a level, or to fit an EoRA adapter."""
    return (any(Spec.parse(spec).needs_calibration for spec in plan.compressed)
            or any(prompt.kind == EORA for prompt in plan.soft_prompts))


def _check_corpora(plan: Plan, tokenizer) -> None:
    from cpt_bench.compress.calibration import corpus_calibration_ids

    config = plan.config
    calibration = config.compression.calibration
    if _needs_calibration(plan):
        corpus_calibration_ids(tokenizer, calibration)  # raises CalibrationError when the split is too short
    seqlen = config.prompts.soft.training.seqlen
    for source in sorted({prompt.source for prompt in plan.soft_prompts if prompt.is_learned}):
        for split in ("train", "validation"):
            _check_length(source, split, tokenizer, seqlen, "prompts.soft.sources",
                          f"one training window (prompts.soft.training.seqlen {seqlen})")
    for target in config.targets:
        if target.is_perplexity:
            _check_length(target.domain, "test", tokenizer, config.ppl_seqlen, f"targets: {target.name}",
                          f"one perplexity window (ppl_seqlen {config.ppl_seqlen})")


def _check_length(corpus: str, split: str, tokenizer, tokens: int, where: str, what: str) -> None:
    n_tokens = len(corpus_stream(corpus, split, tokenizer))
    if n_tokens < tokens:
        raise ConfigError(f"{where}: the {split} split of {corpus!r} has {n_tokens} tokens, fewer than {what}")
