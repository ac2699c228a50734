"""Our lm-eval tasks: they load offline, match the built-in prompts, and score a tiny model correctly."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml

from cpt_bench.evaluate import SEEDS
from cpt_bench.lmeval.tasks import TASKS_DIR, task_manager
from cpt_bench.perplexity import TaskInputError, token_windows
from cpt_bench.tokens import token_stream

from .conftest import TINY_SEQLEN_TOKENS, build_tiny_tokenizer

PPL_TASKS = ["cpt_ppl_wikipedia", "cpt_ppl_boolq_passages", "cpt_ppl_shakespeare", "cpt_ppl_milton"]
MC_TASKS = {"cpt_piqa": "piqa/piqa.yaml", "cpt_arc_easy": "arc/arc_easy.yaml",
            "cpt_arc_challenge": "arc/arc_challenge.yaml", "cpt_hellaswag": "hellaswag/hellaswag.yaml",
            "cpt_winogrande": "winogrande/default.yaml", "cpt_boolq": "super_glue/boolq/default.yaml",
            "cpt_openbookqa": "openbookqa/openbookqa.yaml", "cpt_lambada_openai": "lambada/lambada_openai.yaml"}
PROMPT_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list")
GEN_TASKS = {"cpt_nq_open": "nq_open/nq_open.yaml", "cpt_gsm8k_cot": "gsm8k/gsm8k-cot.yaml",
             "cpt_gsm8k_cot_zeroshot": "gsm8k/gsm8k-cot-zeroshot.yaml", "cpt_triviaqa_wiki": "triviaqa/default.yaml",
             "cpt_coqa": "coqa/default.yaml"}
# What decides a generative task's requests and scores besides its prompt: all must equal the built-in task's.
GEN_FIELDS = ("output_type", "description", "target_delimiter", "fewshot_delimiter", "num_fewshot", "fewshot_config",
              "generation_kwargs", "filter_list", "metric_list", "repeats")


class _FunctionTag(str):
    """A ``!function module.name`` YAML tag, compared by its function name only."""


def _read_yaml(path: Path) -> dict:
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: _FunctionTag(ld.construct_scalar(node).split(".")[-1]))
    config = yaml.load(path.read_text(), Loader=loader)
    if "include" in config:
        config = {**_read_yaml(path.parent / config.pop("include")), **config}
    return config


def _normalise(value):
    """Our re-exports carry a prefix (``winogrande_doc_to_text``); the built-in names are bare."""
    if isinstance(value, _FunctionTag):
        return value.split("_", 1)[1] if value.startswith("winogrande_") else str(value)
    return value


@pytest.mark.parametrize("ours, builtin", MC_TASKS.items())
def test_prompts_choices_and_metrics_match_the_builtin_task(ours, builtin):
    mine = _read_yaml(TASKS_DIR / f"{ours}.yaml")
    theirs = _read_yaml(Path(lm_eval.__file__).parent / "tasks" / builtin)
    for key in PROMPT_FIELDS:
        assert _normalise(mine.get(key)) == _normalise(theirs.get(key)), key
    split_key = "test_split" if theirs.get("test_split") else "validation_split"
    assert mine.get(split_key) == theirs[split_key]


def _builtin_on_our_docs(builtin: str, ours):
    """lm-eval's built-in task from its own YAML, reading our task's documents instead of the Hub dataset."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / builtin)
    docs = next(iter(ours.dataset.values()))
    # The built-in's train split (absent offline) is only read for sampled few-shot examples, never at 0 shots.
    splits = datasets.DatasetDict({split: docs for split in {config.get("training_split") or "train",
                                                              *(ours.dataset.keys())}})
    return ConfigurableTask(config={**config, "custom_dataset": lambda **_: splits})


def _comparable(value):
    """A config value with functions as (source file, name): lm-eval loads a YAML's ``!function`` module under its
    own module object, ours imports the same file as a package module. A few-shot config loses the train split,
    which is not offline (our tasks have none; 0-shot renders never read it)."""
    import dataclasses

    from lm_eval.config.task import FewshotConfig

    if callable(value) and hasattr(value, "__code__"):
        return value.__code__.co_filename, value.__qualname__
    if isinstance(value, FewshotConfig):
        fields = {f.name: _comparable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return fields | {"split": None} if fields["split"] == "train" else fields
    return value


def _requests(task) -> list[tuple]:
    task.build_all_requests(limit=None)
    return [(instance.request_type, instance.arguments) for instance in task.instances]


@pytest.mark.parametrize("ours, builtin", GEN_TASKS.items())
def test_generative_tasks_render_and_score_as_the_builtin_task(filled_fake_cache, ours, builtin):
    """Same documents through our YAML and the built-in YAML: identical request strings (few-shot exemplars, stop
    sequences and all gen kwargs), targets, filters, metric settings and per-document scores."""
    mine = task_manager(None, TINY_SEQLEN_TOKENS).load([ours])["tasks"][ours]
    theirs = _builtin_on_our_docs(builtin, mine)
    for field in GEN_FIELDS:
        assert _comparable(getattr(mine.config, field)) == _comparable(getattr(theirs.config, field)), field
    assert (mine.config.test_split or mine.config.validation_split) == (theirs.config.test_split or
                                                                          theirs.config.validation_split)
    requests = _requests(mine)
    assert requests == _requests(theirs) and len(requests) == 6
    assert all(request_type == "generate_until" for request_type, _ in requests)
    docs = [instance.doc for instance in mine.instances]
    targets = [mine.doc_to_target(doc) for doc in docs]
    assert targets == [theirs.doc_to_target(doc) for doc in docs]
    best = [0.0] * len(docs)
    for template in (" {}", " The answer is {}.\n", " no"):
        responses = [template.format(target[0] if isinstance(target, list) else target) for target in targets]
        scores = _scores(mine, responses)
        assert scores == _scores(theirs, responses)
        first_metric = mine.config.metric_list[0]["metric"]
        best = [max(b, *(by_filter[first_metric] for by_filter in doc_scores.values()))
                for b, doc_scores in zip(best, scores, strict=True)]
    assert min(best) > 0  # every document's target, answered plainly or in the exemplars' form, scores


def _scores(task, responses: list[str]) -> list[dict[str, dict]]:
    """Per document, {filter name: process_results} for one response per request, through the task's filters."""
    for instance, response in zip(task.instances, responses, strict=True):
        instance.resps = [response]
    task.apply_filters()
    return [{key: task.process_results(instance.doc, [filtered]) for key, filtered in instance.filtered_resps.items()}
            for instance in task.instances]


def test_the_generate_group_holds_every_generative_task():
    group = _read_yaml(TASKS_DIR / "cpt_generate.yaml")
    assert sorted(group["task"]) == sorted(GEN_TASKS)


def _task_dict(names, tiny_model_dir, seqlen=TINY_SEQLEN_TOKENS):
    """Flat ``{task name: Task}`` for task or group ``names``."""
    return task_manager(str(tiny_model_dir), seqlen).load(names)["tasks"]


def test_every_task_loads_offline_from_the_cache(filled_fake_cache, tiny_model_dir):
    loaded = _task_dict(["cpt_ppl", "cpt_zeroshot"], tiny_model_dir)
    assert set(loaded) == set(PPL_TASKS) | set(MC_TASKS)
    for name, task in loaded.items():
        docs = list(task.eval_docs)
        assert docs, name
        if task.OUTPUT_TYPE == "multiple_choice":
            assert 2 <= len(task.doc_to_choice(docs[0])) <= 4, name


def test_every_task_evaluates_a_tiny_random_model(filled_fake_cache, tiny_model_dir, tiny_lm):
    results = lm_eval.simple_evaluate(model=tiny_lm, tasks=["cpt_ppl", "cpt_zeroshot"], limit=3,
                                      task_manager=task_manager(str(tiny_model_dir), TINY_SEQLEN_TOKENS), **SEEDS)
    scores = results["results"]
    for name in PPL_TASKS:
        for metric in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert math.isfinite(scores[name][f"{metric},none"]) and scores[name][f"{metric},none"] > 0
        # a random model over a ~300-token vocabulary is close to uniform
        assert 100 < scores[name]["token_perplexity,none"] < 1000
    for name in MC_TASKS:
        assert 0.0 <= scores[name]["acc,none"] <= 1.0


def test_generative_tasks_evaluate_a_tiny_random_model(filled_fake_cache, tiny_model_dir, tiny_lm):
    """The cpt_generate group runs end to end (few-shot contexts left-truncated to the tiny model's window) and
    reports the built-in tasks' metrics under their filter names."""
    results = lm_eval.simple_evaluate(model=tiny_lm, tasks=["cpt_generate"], limit=2, gen_kwargs="max_gen_toks=4",
                                      task_manager=task_manager(str(tiny_model_dir), TINY_SEQLEN_TOKENS), **SEEDS)
    scores = results["results"]
    expected = {"cpt_nq_open": ["exact_match,remove_whitespace"],
                "cpt_triviaqa_wiki": ["exact_match,remove_whitespace"],
                "cpt_gsm8k_cot": ["exact_match,strict-match", "exact_match,flexible-extract"],
                "cpt_gsm8k_cot_zeroshot": ["exact_match,strict-match", "exact_match,flexible-extract"],
                "cpt_coqa": ["em,none", "f1,none"]}
    for name, metrics in expected.items():
        for metric in metrics:
            assert 0.0 <= scores[name][metric] <= 1.0, (name, metric)
    assert len(results["samples"]["cpt_coqa"]) == 2


def test_token_perplexity_equals_a_hand_computation(filled_fake_cache, tiny_model_dir, tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manager = task_manager(str(tiny_model_dir), TINY_SEQLEN_TOKENS)
    results = lm_eval.simple_evaluate(model=tiny_lm, tasks=["cpt_ppl_wikipedia"], limit=4, task_manager=manager,
                                      **SEEDS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    docs = list(_task_dict(["cpt_ppl_wikipedia"], tiny_model_dir)["cpt_ppl_wikipedia"].eval_docs)[:4]
    total_nll, total_tokens = 0.0, 0
    for doc in docs:
        ids = tokenizer.encode(doc["text"])
        inputs = torch.tensor([[tokenizer.eos_token_id] + ids[:-1]])  # lm-eval's prefix token, then the window
        with torch.no_grad():
            logprobs = torch.log_softmax(model(inputs).logits[0].double(), dim=-1)
        total_nll -= logprobs[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        total_tokens += doc["n_tokens"]
    expected = math.exp(total_nll / total_tokens)
    assert results["results"]["cpt_ppl_wikipedia"]["token_perplexity,none"] == pytest.approx(expected, rel=1e-4)


def test_windows_are_exact_consecutive_spans():
    tokenizer = build_tiny_tokenizer()
    text = " ".join(["river stone light garden winter market"] * 40)
    windows = token_windows(token_stream([text], tokenizer, with_offsets=True), tokenizer, 16)
    assert len(windows) == len(tokenizer.encode(text)) // 16
    assert text.startswith("".join(w["text"] for w in windows))
    assert all(abs(w["n_tokens"] - 16) <= 1 for w in windows)
    assert [w["window"] for w in windows] == list(range(len(windows)))


@pytest.mark.parametrize("seqlen, message", [(0, "positive number of tokens, got 0"),
                                             (10_000, "shorter than one window of 10000")])
def test_bad_window_lengths_are_clear_errors(seqlen, message):
    with pytest.raises(TaskInputError, match=message):
        tokenizer = build_tiny_tokenizer()
        token_windows(token_stream(["river stone light"], tokenizer, with_offsets=True), tokenizer, seqlen)


def test_a_manager_for_our_tasks_alone_skips_lm_evals_index(filled_fake_cache):
    """Naming only our tasks and groups, the manager indexes tasks/ alone (lm-eval's ~14,000 files are skipped) and
    still builds them (our generative tasks call lm-eval's Python, not its YAML); naming a built-in task, both."""
    ours = task_manager(None, 1024, names=["cpt_piqa", "cpt_zeroshot", "cpt_coqa"])
    assert "cpt_coqa" in ours.all_tasks and "piqa" not in ours.all_tasks
    assert set(ours.all_tasks) == {path.stem for path in TASKS_DIR.glob("cpt_*.yaml")} | {
        name for name in ours.all_tasks if name in ours.all_groups}
    assert ours.load(["cpt_piqa"])["tasks"]["cpt_piqa"].config.task == "cpt_piqa"
    both = task_manager(None, 1024, names=["cpt_piqa", "piqa"])
    assert {"cpt_piqa", "piqa"} <= set(both.all_tasks) and both is task_manager(None, 1024)


def test_perplexity_task_without_a_tokenizer_says_what_to_pass(filled_fake_cache):
    with pytest.raises(TaskInputError, match="pass model_args pretrained="):
        task_manager(None, 1024).load(["cpt_ppl_milton"])


def test_seqlen_metadata_changes_the_windows(filled_fake_cache, tiny_model_dir):
    short = list(_task_dict(["cpt_ppl_shakespeare"], tiny_model_dir)["cpt_ppl_shakespeare"].eval_docs)
    long = list(_task_dict(["cpt_ppl_shakespeare"], tiny_model_dir, seqlen=64)["cpt_ppl_shakespeare"].eval_docs)
    assert len(long) == len(short) // 2 or len(long) == (len(short) - 1) // 2
    assert all(abs(doc["n_tokens"] - 64) <= 1 for doc in long)


def _text_folder(folder: Path, n_files: int = 20) -> Path:
    """A folder of ``n_files`` text files of three random paragraphs each (``fakes.paragraph``)."""
    import random

    from . import fakes

    folder.mkdir()
    rng = random.Random(5)
    for index in range(n_files):
        (folder / f"{index:02d}.txt").write_text("\n\n".join(fakes.paragraph(rng) for _ in range(3)))
    return folder


@pytest.mark.parametrize("names", [["cpt_ppl"], ["cpt_ppl_milton"]])
def test_a_corpus_for_a_task_with_its_own_is_refused_in_one_line(filled_fake_cache, tiny_model_dir, tmp_path, names):
    """The group, or any task with a corpus of its own, given a corpus in the metadata: only cpt_ppl_corpus takes
    one (lm-eval would otherwise fail with a TypeError over the two corpus keywords)."""
    notes = _text_folder(tmp_path / "notes")
    manager = task_manager(str(tiny_model_dir), TINY_SEQLEN_TOKENS, f"text:{notes}")
    with pytest.raises(TaskInputError, match=rf"^metadata corpus 'text:{notes}': only task cpt_ppl_corpus takes a "
                                             r"corpus; this task scores its own corpus '(wikipedia|milton)'"):
        manager.load(names)


def _corpus_task(tiny_model_dir, corpus: str, **metadata):
    """The loaded ``cpt_ppl_corpus`` task on ``corpus`` with extra run ``metadata``."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), metadata={
        "seqlen": TINY_SEQLEN_TOKENS, "pretrained": str(tiny_model_dir), "corpus": corpus, **metadata})
    return manager.load(["cpt_ppl_corpus"])["tasks"]["cpt_ppl_corpus"]


def test_the_corpus_task_says_what_it_scores_and_scores_every_document_when_asked(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """By default the test split (about a tenth of the files); ``split: all`` every document. Each load logs one
    line naming the split, its documents and tokens, through lm-eval's logger."""
    import logging

    from cpt_bench.corpus import load_split
    from cpt_bench.tokens import corpus_stream

    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    corpus = f"text:{_text_folder(tmp_path / 'notes')}"
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lm_eval.tasks.cpt_bench")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # (setLevel, not the attribute: it clears the loggers' cached decisions)
    try:
        test_docs = list(_corpus_task(tiny_model_dir, corpus).eval_docs)
        all_docs = list(_corpus_task(tiny_model_dir, corpus, split="all").eval_docs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    tokenizer = build_tiny_tokenizer()
    for split, docs, line in (("test", test_docs, lines[0]), ("all", all_docs, lines[1])):
        documents, tokens = len(load_split(corpus, split)), len(corpus_stream(corpus, split, tokenizer))
        assert line.startswith(f"perplexity of corpus {corpus}, split {split}: {documents} documents, {tokens} "
                               f"tokens; scoring {len(docs)} windows of {TINY_SEQLEN_TOKENS} tokens"), line
    assert len(lines) == 2 and lines[0].endswith('(metadata {"split": "all"} scores every document)'), lines
    assert len(load_split(corpus, "all")) == 20 and len(load_split(corpus, "test")) <= 4
    assert len(all_docs) > 4 * len(test_docs)
    assert load_split(corpus, "test")[0]["text"] in "".join(doc["text"] for doc in all_docs)


def test_a_split_that_is_not_one_is_refused_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPT_BENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TaskInputError, match=r"^metadata split 'everything': expected one of train, validation, "
                                             r"test, all \(all: every document of the corpus\)$"):
        _corpus_task(tiny_model_dir, f"text:{_text_folder(tmp_path / 'notes')}", split="everything")


def _ppl_table(cli: str, model_args: str, corpus: str, out: Path, cache: Path) -> str:
    """``cli --tasks cpt_ppl_corpus --metadata {corpus, seqlen}`` on the tiny model; the printed results table."""
    env = {**os.environ, "CPT_BENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    metadata = json.dumps({"corpus": corpus, "seqlen": TINY_SEQLEN_TOKENS})
    done = subprocess.run(
        [str(Path(sys.executable).parent / cli), "--model", model_args.split(":")[0], "--model_args",
         model_args.split(":", 1)[1], "--tasks", "cpt_ppl_corpus", "--metadata", metadata, "--include_path",
         str(TASKS_DIR), "--batch_size", "4", "--device", "cpu", "--output_path", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if f"perplexity of corpus {corpus}, split test: " in line]
    assert len(said) == 1, done.stderr[-3000:]  # what is scored, said once
    return "\n".join(line for line in done.stdout.splitlines() if line.startswith("|"))


def test_the_corpus_task_scores_a_text_folder_the_same_through_lm_eval_and_cpt_lm_eval(tiny_model_dir, tmp_path):
    """``cpt_ppl_corpus`` on a ``text:`` folder of one's own: plain lm_eval (hf), cpt-lm-eval (hf) and the cpt
    model print one table, with token perplexity among lm-eval's rolling metrics."""
    corpus, cache = f"text:{_text_folder(tmp_path / 'notes')}", tmp_path / "cache"
    plain = _ppl_table("lm_eval", f"hf:pretrained={tiny_model_dir},dtype=float32", corpus, tmp_path / "a", cache)
    ours = _ppl_table("cpt-lm-eval", f"hf:pretrained={tiny_model_dir},dtype=float32", corpus, tmp_path / "b", cache)
    adapter = _ppl_table("cpt-lm-eval", f"cpt:pretrained={tiny_model_dir},dtype=float32", corpus, tmp_path / "c",
                         cache)
    assert plain == ours == adapter
    assert "cpt_ppl_corpus" in plain and re.search(r"\|token_perplexity\s*\|↓\s*\|\s*[0-9.]+\|", plain), plain
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert metric in plain


def test_plain_lm_eval_names_the_task_that_takes_a_corpus(filled_fake_cache, tiny_model_dir, tmp_path):
    """Through plain ``lm_eval`` (no cpt_bench error policy) the last line still says what to do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={tiny_model_dir},dtype=float32", "--tasks", "cpt_ppl", "--metadata",
         json.dumps({"corpus": f"text:{_text_folder(tmp_path / 'notes')}"}), "--include_path", str(TASKS_DIR),
         "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0 and "multiple values for keyword argument" not in done.stderr
    assert re.search(r"TaskInputError: metadata corpus '.*': only task cpt_ppl_corpus takes a corpus",
                     done.stderr.strip().splitlines()[-1]), done.stderr[-3000:]


def test_coqa_metrics_follow_the_squad_definitions():
    from cpt_bench.lmeval.squad_metrics import compute_exact, compute_f1

    assert compute_exact("The Cat!", "cat") == 1 and compute_exact("a cat", "cats") == 0
    assert compute_f1("the big red dog", "Red dog, barks") == pytest.approx(2 / 3)  # precision = recall = 2/3
    assert compute_f1("", "") == 1.0 and compute_f1("an", "dog") == 0.0 and compute_f1("dog", "cat") == 0.0
