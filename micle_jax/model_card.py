"""The model card of an exported classifier: DIR/model_card.md and DIR/model_card.json.

`build_card` gathers, from the fine-tuning run's workdir alone, what a user of
an exported model needs to know:

  - the architecture (config.model) and its parameter count;
  - how the weights were pre-trained: the chain of `config.init.checkpoint`
    through each init workdir's config.json (SimCLR, MICLe or supervised; data,
    steps, batch size), ending at scratch, at released weights brought in by
    `python -m micle_jax.import_weights` (a config.json with `imported_from`),
    or at a workdir that can no longer be read (recorded as unknown);
  - the fine-tuning data (dataset, source, label fraction, classes);
  - the metrics of the exported checkpoint with their 95% bootstrap
    intervals, as WORKDIR/results.json holds them (rundir.write_results);
  - the intended use (research only), and each dataset's licence and citation
    from its records' dataset_info.json. Data under a non-commercial licence
    (HAM10000: CC BY-NC 4.0) puts a warning at the top of the card.

`write_card` writes both files: the Markdown for people, the JSON (the same
facts, NaN as null) for programs.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from micle_jax import models, rundir
from micle_jax.data import records
from micle_jax.task import TaskInfo

CARD_MARKDOWN = "model_card.md"
CARD_JSON = "model_card.json"

INTENDED_USE = (
    "Research on self-supervised pre-training for medical image classification. "
    "This model is not a medical device, has not been validated for clinical use, and must "
    "not be used to diagnose, treat or triage patients. Its metrics hold for the evaluation "
    "data named below only; other populations, sites and imaging devices may differ."
)
NON_COMMERCIAL_WARNING = (
    "NON-COMMERCIAL USE ONLY: this model was trained on data licensed for non-commercial "
    "use ({datasets}). Neither the model nor its outputs may be used commercially."
)
# Licences of datasets known by name, for records converted without one.
KNOWN_LICENSES = {
    "ham10000": "CC BY-NC 4.0, NON-COMMERCIAL research use only (Tschandl et al., Sci. Data 2018)",
}
# 'NC' as its own token (CC BY-NC, CC BY-NC-SA) or the words.
_NON_COMMERCIAL = re.compile(r"(?<![A-Za-z])NC(?![A-Za-z])|non-?commercial", re.IGNORECASE)
_METHODS = {"simclr": "SimCLR", "micle": "MICLe", "supervised": "supervised"}
_MAX_STAGES = 16  # a longer init chain is a cycle
_NUMBERS = ("value", "ci_low", "ci_high")


def is_non_commercial(license_text: str) -> bool:
    """Whether a licence text restricts use to non-commercial purposes (e.g. 'CC BY-NC 4.0')."""
    return bool(_NON_COMMERCIAL.search(license_text or ""))


def describe_data(source: str) -> dict[str, Any]:
    """What a `config.data.source` string names, with its licence and citation.

    Records folders are described by their dataset_info.json (the path as the
    run gave it: relative paths are relative to the current folder). A missing
    folder leaves the licence unknown, not an error, except for datasets known
    by name (KNOWN_LICENSES: HAM10000 is CC BY-NC 4.0 wherever it lives).

    Returns:
      {'source', 'name', 'license', 'citation', 'non_commercial': bool, 'note'}.
    """
    kind, _, arg = str(source).partition(":")
    name, license_text, citation, note = "", "", "", ""
    if kind == "records" and arg:
        name = os.path.basename(os.path.normpath(arg))
        try:
            info = records.load_info(arg)
            name, license_text, citation = info.name or name, info.license, info.citation
        except (FileNotFoundError, ValueError) as e:
            note = f"dataset_info.json not readable here ({e})"
    elif kind == "synthetic":
        name, license_text = "synthetic", "generated in memory by micle_jax (no licence needed)"
    elif kind == "tfds":
        name = arg.partition("?")[0]
        note = "a TFDS dataset: see its licence in the TFDS catalogue"
    else:
        name = os.path.basename(arg or kind)
    # A dataset known by name keeps its terms even when converted without a licence.
    known = next((v for k, v in KNOWN_LICENSES.items() if k in f"{name} {arg}".lower()), "")
    return {
        "source": str(source),
        "name": name,
        "license": license_text or known or "unknown",
        "citation": citation,
        "non_commercial": is_non_commercial(license_text) or is_non_commercial(known),
        "note": note,
    }


def _workdir_of(checkpoint_path: str) -> str | None:
    """The run folder (holding config.json) of an init checkpoint path, or None.

    An init path may be WORKDIR, WORKDIR/best, WORKDIR/checkpoints[/<step>[/state]]
    (checkpoint.resolve), so up to four parents are tried.
    """
    path = pathlib.Path(checkpoint_path).expanduser().absolute()
    for folder in [path, *path.parents][:5]:
        if (folder / rundir.CONFIG_FILE).is_file():
            return str(folder)
    return None


def _trained_steps(workdir: str, config: Mapping) -> int | None:
    """The steps a run trained (run_status.json), else its config's total_steps."""
    try:
        status = rundir.read_status(workdir) or {}
    except ValueError:
        status = {}
    return status.get("step", config.get("total_steps"))


def _stage(checkpoint_path: str) -> tuple[dict[str, Any], str]:
    """One pre-training stage from its init checkpoint path: (description, its own init)."""
    stage: dict[str, Any] = {"checkpoint": checkpoint_path, "workdir": None, "method": "unknown"}
    workdir = _workdir_of(checkpoint_path)
    try:
        config = rundir.read_config(workdir) if workdir else None
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        stage["note"] = "its workdir or config.json could not be read"
        return stage, ""
    stage["workdir"] = workdir
    stage["model"] = _architecture(config.get("model") or {})
    if isinstance(config.get("imported_from"), Mapping):
        stage.update(method="imported", imported_from=dict(config["imported_from"]))
        return stage, ""
    data = config.get("data") or {}
    mode = data.get("mode", "")  # 'supervised' for a fine-tuning run (a supervised baseline)
    stage.update(
        method=_METHODS.get(mode, f"unknown ({mode!r})"),
        trainer=config.get("trainer", ""),
        data=describe_data(data.get("source", "")),
        steps=_trained_steps(workdir, config),
        total_epochs=config.get("total_epochs"),
        batch_size=config.get("batch_size"),
    )
    return stage, str((config.get("init") or {}).get("checkpoint") or "")


def pretraining_chain(config: Mapping) -> list[dict[str, Any]]:
    """The stages the fine-tuned weights came from, nearest first; [] = trained from scratch.

    Args:
      config: the fine-tuning run's config (dict of config.json); its
        `init.checkpoint` starts the chain, each stage's own config.json
        continues it.

    Returns:
      [{'checkpoint', 'workdir', 'method': 'SimCLR' | 'MICLe' | 'supervised' |
        'imported' | 'unknown', 'data', 'steps', 'batch_size', 'model', ...}].
    """
    chain: list[dict[str, Any]] = []
    init = str((config.get("init") or {}).get("checkpoint") or "")
    seen = set()
    while init:
        key = _workdir_of(init) or init
        if len(chain) >= _MAX_STAGES or key in seen:
            chain.append({"checkpoint": init, "method": "unknown", "note": "the init chain loops"})
            break
        seen.add(key)
        stage, init = _stage(init)
        chain.append(stage)
    return chain


def _architecture(model: Mapping) -> dict[str, Any]:
    """The architecture fields of a config.model block."""
    keys = ("name", "depth", "width", "sk_ratio", "proj_layers", "proj_dim", "head_input")
    return {k: model[k] for k in keys if k in model}


def _finite(value: Any) -> float | None:
    """A float for the card's JSON, None for NaN (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def exported_metrics(workdir: str, state_dir: str) -> tuple[list[dict[str, Any]], str]:
    """results.json rows of the exported checkpoint, and a note when there are none.

    The rows that name the checkpoint ('final' or 'best', rundir.checkpoint_label)
    and its step; only evaluation rows, which carry ci_low / ci_high.
    """
    path = os.path.join(workdir, rundir.RESULTS_FILE)
    state = pathlib.Path(state_dir).resolve()
    if not state.is_relative_to(pathlib.Path(workdir).resolve()):
        return [], "the exported checkpoint is not one of this run's, so it has no results"
    if not os.path.isfile(path):
        return [], f"{path} does not exist: the run did not finish its final evaluation"
    with open(path) as f:
        rows = json.load(f).get("results", [])
    label = rundir.checkpoint_label(state)
    step = int(state.parent.name) if state.parent.name.isdigit() else None
    keys = ("eval", "metric", "split", "dataset", "step", "checkpoint")
    kept = [
        {**{k: row.get(k) for k in keys}, **{k: _finite(row[k]) for k in _NUMBERS}}
        for row in rows
        if "ci_low" in row and row.get("checkpoint") == label and row.get("step") == step
    ]
    note = "" if kept else f"results.json has no evaluation of checkpoint {label!r} step {step}"
    return kept, note


def build_card(
    workdir: str,
    config: Mapping,
    task: TaskInfo,
    params: Any,
    checkpoint: Mapping[str, Any],
    serving: Mapping[str, Any],
) -> dict[str, Any]:
    """The card's facts (what model_card.json holds).

    Args:
      workdir: the fine-tuning run.
      config: its config.json as a dict.
      task: its micle_jax.task.TaskInfo.
      params: the exported parameters (arrays or shape structs), for the count.
      checkpoint: {'which', 'path' (the state folder), 'step'} of the export.
      serving: {'signatures': {...}, 'outputs': {...}, 'platforms': [...]}.
    """
    finetune_data = describe_data(config.get("data", {}).get("source", ""))
    chain = pretraining_chain(config)
    metrics, metrics_note = exported_metrics(workdir, checkpoint["path"])
    trained_on = [{"used_for": "fine-tuning", **finetune_data}] + [
        {"used_for": f"pre-training stage {i + 1}", **stage["data"]}
        for i, stage in enumerate(chain)
        if stage.get("data")
    ]
    evaluated_on = sorted(
        {
            str((entry.get("data") or {}).get("source") or finetune_data["source"])
            for entry in (config.get("evals") or {}).values()
        }
        - {finetune_data["source"]}
    )
    licenses = trained_on + [{"used_for": "evaluation", **describe_data(s)} for s in evaluated_on]
    # The weights carry the terms of the data they were trained on, not of the evaluation data.
    non_commercial = sorted({d["name"] for d in trained_on if d["non_commercial"]})
    return {
        "model": {
            **_architecture(config.get("model") or {}),
            "parameters": models.count_params(params),
            "image_size": task.image_size,
            "label_type": task.label_type,
            "num_classes": task.num_classes,
            "class_names": list(task.class_names),
        },
        "export": {"workdir": os.path.abspath(workdir), "checkpoint": dict(checkpoint), **serving},
        "pretraining": chain,
        "finetuning": {
            "dataset": task.dataset,
            "data": finetune_data,
            "label_fraction": config.get("data", {}).get("label_fraction", 1.0),
            "fine_tune_after_block": config.get("model", {}).get("fine_tune_after_block"),
            "steps": _trained_steps(workdir, config),
            "batch_size": config.get("batch_size"),
        },
        "metrics": metrics,
        "metrics_note": metrics_note,
        "intended_use": INTENDED_USE,
        "non_commercial": bool(non_commercial),
        "non_commercial_datasets": non_commercial,
        "licenses": licenses,
    }


def _stage_line(i: int, stage: Mapping[str, Any]) -> str:
    """One Markdown list item of the pre-training chain."""
    where = f"`{stage['checkpoint']}`"
    if stage["method"] == "imported":
        src = stage["imported_from"]
        what = f"released weights imported from `{src.get('source', '?')}`"
        what += f" ({src['format']})" if src.get("format") else ""
        what += f", SimCLR model {src['simclr_name']}" if src.get("simclr_name") else ""
        return f"{i}. {what}: {where}"
    if stage["method"].startswith("unknown"):
        return f"{i}. unknown: {where} ({stage.get('note', stage['method'])})"
    data = stage["data"]
    steps, epochs = stage.get("steps"), stage.get("total_epochs")
    size = f"{steps} steps" if steps is not None else f"{epochs} epochs" if epochs else "? steps"
    return (
        f"{i}. {stage['method']} on {data['name']} (`{data['source']}`), {size} of batch "
        f"{stage.get('batch_size')}: {where}"
    )


def _ci(row: Mapping[str, Any]) -> str:
    low, high = row["ci_low"], row["ci_high"]
    return "n/a" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown (what model_card.md holds)."""
    m, ft, export = card["model"], card["finetuning"], card["export"]
    lines = [f"# Model card: {ft['dataset']} classifier", ""]
    if card["non_commercial"]:
        datasets = ", ".join(card["non_commercial_datasets"])
        lines += [f"> **{NON_COMMERCIAL_WARNING.format(datasets=datasets)}**", ""]
    lines += ["## Intended use", "", card["intended_use"], ""]
    lines += [
        "## Model",
        "",
        f"- Architecture: ResNet-{m.get('depth')} width {m.get('width')} sk_ratio "
        f"{m.get('sk_ratio')}, {m.get('proj_layers')}-layer projection head; the "
        f"classifier reads projection layer {m.get('head_input')} (0 = backbone features)",
        f"- Parameters: {m['parameters']:,}",
        f"- Input: {m['image_size']} x {m['image_size']} RGB after the evaluation "
        "preprocessing (centre crop of 87.5%, bicubic resize), inside the SavedModel",
        f"- Output: {m['num_classes']} classes ({m['label_type']}), in this order: "
        + ", ".join(f"`{c}`" for c in m["class_names"]),
        f"- Checkpoint: {export['checkpoint']['which']} (step {export['checkpoint']['step']}) "
        f"of `{export['workdir']}`",
        "",
        "## Serving signatures",
        "",
    ]
    for name, sig in export["signatures"].items():
        inputs = "; ".join(f"`{k}`: {v}" for k, v in sig["inputs"].items())
        lines.append(f"- `{name}`: {inputs}")
    lines += [f"- output `{k}`: {v}" for k, v in export["outputs"].items()]
    lines += ["", "## Pre-training", ""]
    if card["pretraining"]:
        lines += [_stage_line(i + 1, s) for i, s in enumerate(card["pretraining"])]
    else:
        lines.append("None: trained from scratch (config.init.checkpoint was empty).")
    data = ft["data"]
    lines += [
        "",
        "## Fine-tuning data",
        "",
        f"- Dataset: {data['name']} (`{data['source']}`)",
        f"- Classes: {m['num_classes']} ({m['label_type']})",
        f"- Label fraction: {ft['label_fraction']} of the training cases",
        f"- Trained {ft['steps']} steps of batch {ft['batch_size']}; exported: step "
        f"{export['checkpoint']['step']} ({export['checkpoint']['which']})",
        "",
        "## Metrics (95% bootstrap intervals over cases)",
        "",
    ]
    if card["metrics"]:
        lines += ["| eval | split | dataset | metric | value | 95% CI |", "|---" * 6 + "|"]
        lines += [
            f"| {r['eval']} | {r['split']} | {r['dataset']} | {r['metric']} | "
            f"{'n/a' if r['value'] is None else format(r['value'], '.4f')} | {_ci(r)} |"
            for r in card["metrics"]
        ]
    else:
        lines.append(f"None: {card['metrics_note']}.")
    lines += ["", "## Data licences", ""]
    for d in card["licenses"]:
        cite = f"; cite: {d['citation']}" if d["citation"] else ""
        lines.append(f"- {d['used_for']}: {d['name']} (`{d['source']}`): {d['license']}{cite}")
    return "\n".join(lines) + "\n"


def write_card(folder: str, card: Mapping[str, Any]) -> list[str]:
    """Writes FOLDER/model_card.md and FOLDER/model_card.json; returns their paths."""
    md, js = os.path.join(folder, CARD_MARKDOWN), os.path.join(folder, CARD_JSON)
    with rundir.atomic_open(md) as f:
        f.write(render_markdown(card))
    with rundir.atomic_open(js) as f:
        json.dump(card, f, indent=1, allow_nan=False, default=str)
        f.write("\n")
    return [md, js]
