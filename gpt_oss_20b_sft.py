#!/usr/bin/env python
"""Fine-tune gpt-oss-20b to reason in the language you ask for, then talk to it.

    python gpt_oss_20b_sft.py                                  # train: LoRA + TRL SFT, the seed recipe
    python gpt_oss_20b_sft.py --mode infer --reasoning-language German --prompt "What is 7 x 8?"
    python gpt_oss_20b_sft.py --mode eval --adapter DIR --compare-base   # reasoning-language match, accuracy
    python gpt_oss_20b_sft.py --mode merge --adapter DIR --output merged/ # one standalone bf16 checkpoint
    python gpt_oss_20b_sft.py --demo                           # the whole pipeline offline, on CPU, tiny model
    python gpt_oss_20b_sft.py --mode train --print-config      # the resolved configuration, loads nothing
    torchrun --nproc_per_node=2 gpt_oss_20b_sft.py             # several GPUs (also deepspeed, accelerate launch)

Reads top to bottom in pipeline order: configuration, data, model, train, infer, eval, merge.
"""

import argparse
import contextlib
import fnmatch
import functools
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# Heavy libraries (torch, transformers, trl, peft, datasets) are imported inside the functions that use them,
# so --help and --print-config answer at once and the Hub check below runs before any of them reads HF_HUB_OFFLINE.

HERE = Path(__file__).resolve().parent
DEMO_DATASET = HERE / "data" / "demo_sample.jsonl"
EVAL_QUESTIONS = HERE / "data" / "eval_questions.jsonl"
DEMO_CACHE = Path(os.environ.get("GPT_OSS_SFT_CACHE", Path.home() / ".cache" / "gpt_oss_20b_sft"))
DEMO_OUTPUT_DIR = "demo_output"

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    mode: str = "train"
    demo: bool = False
    # model and data
    model: str = "openai/gpt-oss-20b"
    dataset: str = "HuggingFaceH4/Multilingual-Thinking"
    dataset_split: str = "train"
    reasoning_languages: list | None = None  # keep only rows in these reasoning languages
    max_samples: int | None = None
    output_dir: str = "gpt-oss-20b-multilingual-reasoner"
    overwrite: bool = False
    resume: bool = False
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list = None
    target_parameters: list = None  # expert tensors, e.g. mlp.experts.gate_up_proj
    # optimisation (the seed recipe)
    batch_size: int = 8
    gradient_accumulation_steps: int = 2
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    num_train_epochs: float = 3.0
    max_seq_length: int = 2048
    optim: str = "adamw_torch_fused"
    weight_decay: float = 0.01
    gradient_checkpointing: bool = True
    use_4bit: bool = False
    train_on_all_tokens: bool = False
    router_aux_loss_coef: float = 0.0
    attn_implementation: str = "auto"
    packing: bool = False  # each batch's rows in one padding-free sequence, each row masked to itself
    sampler: str = "batch_rebalance"  # how each optimizer step's rows are drawn and split into micro-batches
    chunked_loss: bool = True  # TRL's loss without the full-vocabulary logits
    # preflight / benchmark
    random_init: bool = False
    synthetic_data: int | None = None
    max_steps: int | None = None
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2
    # tracking and sharing
    report_to: str = "trackio"
    trackio_project: str = "gpt-oss-20b-sft"
    run_name: str | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    # more than one GPU (torchrun, deepspeed, accelerate launch)
    deepspeed: str | None = None  # "zero3" (the built-in preset) or a DeepSpeed JSON file
    fsdp: bool = False
    # inference
    prompt: str | None = None
    reasoning_language: str = "English"
    answer_language: str | None = None
    reasoning_effort: str = "medium"
    adapter: str | None = None
    temperature: float = 0.6
    max_new_tokens: int = 512
    raw: bool = False
    json: bool = False
    # evaluation
    eval_file: str = str(EVAL_QUESTIONS)
    question_languages: list | None = None
    limit: int | None = None  # questions per reasoning language
    full_grid: bool = False
    compare_base: bool = False
    score_file: str | None = None


# What --demo changes: a tiny random model trained on the bundled sample, so the run fits a CPU in minutes.
# The larger learning rate lets a randomly initialised model show a falling loss within a few steps.
DEMO_DEFAULTS = dict(
    dataset=str(DEMO_DATASET),
    output_dir=DEMO_OUTPUT_DIR,
    max_seq_length=512,
    learning_rate=1e-2,
    max_new_tokens=48,
    reasoning_language="German",
    prompt="What is the capital of Australia?",
)

# Evaluation is greedy (repeatable), leaves room for reasoning before the answer, and generates in larger batches.
MODE_DEFAULTS = {"eval": dict(temperature=0.0, max_new_tokens=1024, batch_size=32)}

SIZE_FIELDS = ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps", "max_seq_length",
               "max_new_tokens", "logging_steps", "save_steps", "save_total_limit", "synthetic_data", "max_steps", "limit")
RATE_FIELDS = ("learning_rate", "num_train_epochs")


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _flag(parser, name, *aliases, **kwargs):
    """Register --name with both spellings (snake_case as in the seed, kebab-case) plus aliases."""
    spellings = []
    for n in (name, *aliases):
        for s in (f"--{n}", f"--{n.replace('_', '-')}"):
            if s not in spellings:
                spellings.append(s)
    kwargs.setdefault("default", None)
    parser.add_argument(*spellings, dest=name, **kwargs)


def build_parser():
    p = OneLineParser(
        prog="gpt_oss_20b_sft.py",
        description="LoRA fine-tuning of gpt-oss-20b so it reasons in the language you ask for; inference with the "
        "result. Every flag accepts snake_case and kebab-case spellings.",
        usage="%(prog)s [--mode {train,infer,eval,merge}] [--demo] [--print-config] [options]",
    )
    d = Config()
    g = p.add_argument_group("general")
    _flag(g, "mode", choices=["train", "infer", "eval", "merge"], help=f"what to do (default {d.mode}); merge: fold "
          "--adapter into its base and write a standalone bf16 checkpoint")
    _flag(g, "demo", action="store_true", help="offline demo on CPU: tiny random gpt-oss model, bundled sample data")
    _flag(g, "print_config", action="store_true", help="print the resolved configuration as JSON and exit")
    _flag(g, "model", help=f"hub id or local directory (default {d.model}; infer: the adapter's base)")
    _flag(g, "seed", type=int, help=f"random seed (default {d.seed})")

    g = p.add_argument_group("data")
    _flag(g, "dataset", help=f"hub dataset id or a local .jsonl/.json/.parquet file (default {d.dataset})")
    _flag(g, "dataset_split", help=f"split of a hub dataset (default {d.dataset_split})")
    _flag(g, "reasoning_languages", help="train: reasoning languages to keep, e.g. French,German; eval: the "
          f"languages to evaluate (default {','.join(EVAL_REASONING_LANGUAGES)})")
    _flag(g, "max_samples", type=int, help="use only the first N rows (after filtering)")
    _flag(g, "max_seq_length", "max_length", type=int, help=f"tokens per row; longer rows are cut (default {d.max_seq_length})")
    _flag(g, "train_on_all_tokens", action="store_true",
          help="loss on every token, as the Cookbook did (default: only the assistant's analysis, final and <|return|>)")

    g = p.add_argument_group("LoRA")
    _flag(g, "lora_r", type=int, help=f"LoRA rank (default {d.lora_r})")
    _flag(g, "lora_alpha", type=int, help=f"LoRA alpha (default {d.lora_alpha})")
    _flag(g, "lora_dropout", type=float, help=f"LoRA dropout (default {d.lora_dropout})")
    _flag(g, "target_modules", help="comma-separated Linear modules to adapt (default q_proj,v_proj)")
    _flag(g, "target_parameters", help="comma-separated expert tensors to adapt, e.g. "
          "mlp.experts.gate_up_proj,mlp.experts.down_proj (default none)")

    g = p.add_argument_group("training")
    _flag(g, "output_dir", "output", help=f"where the adapter and reports go (default {d.output_dir}; demo: "
          f"{DEMO_OUTPUT_DIR}; eval: <adapter>/eval; merge: <adapter>-merged)")
    _flag(g, "overwrite", action="store_true", help="replace this mode's earlier outputs in --output_dir (never files it did not write)")
    _flag(g, "resume", action="store_true", help="continue from the last checkpoint in --output_dir")
    _flag(g, "batch_size", "per_device_train_batch_size", type=int, help=f"rows per device per step (default {d.batch_size})")
    _flag(g, "gradient_accumulation_steps", type=int, help=f"(default {d.gradient_accumulation_steps})")
    _flag(g, "learning_rate", type=float, help=f"(default {d.learning_rate}; demo {DEMO_DEFAULTS['learning_rate']})")
    _flag(g, "lr_scheduler_type", help=f"(default {d.lr_scheduler_type})")
    _flag(g, "warmup_ratio", type=float, help=f"(default {d.warmup_ratio})")
    _flag(g, "num_train_epochs", type=float, help=f"(default {d.num_train_epochs})")
    _flag(g, "optim", help=f"(default {d.optim})")
    _flag(g, "weight_decay", type=float, help=f"(default {d.weight_decay})")
    _flag(g, "gradient_checkpointing", action=argparse.BooleanOptionalAction,
          help="recompute activations in the backward pass to save memory (default on)")
    _flag(g, "use_4bit", action="store_true", help="keep the experts (91%% of the weights) in MXFP4 as shipped and "
          "dequantize one layer at a time: about 14 GB of weights instead of 42 GB, same values (train, infer, eval)")
    _flag(g, "router_aux_loss_coef", type=float,
          help="MoE load-balancing loss weight (default 0: TRL would otherwise add 0.9 x aux loss from the config)")
    _flag(g, "attn_implementation", help="auto (flex_attention on CUDA, eager otherwise), eager, flex_attention, "
          "or a hub kernel id; sdpa is not supported by gpt-oss")
    _flag(g, "packing", action=argparse.BooleanOptionalAction,
          help="put each batch's rows into one padding-free sequence, each row masked to itself (default off: exact "
          "with eager attention; not yet with flex_attention on CUDA, see the README)")
    _flag(g, "sampler", choices=["batch_rebalance", "random", "group_by_length"],
          help="how rows become micro-batches. batch_rebalance (default): each optimizer step's rows are a random "
          "draw, as with random, split into micro-batches of similar length: less padding, same loss. random: the "
          "seed's. group_by_length: steps of similar-length rows, least padding, but changes which rows train together")
    _flag(g, "chunked_loss", action=argparse.BooleanOptionalAction,
          help="TRL's loss that never builds the full-vocabulary logits (default on; off = the Cookbook's loss)")
    _flag(g, "logging_steps", type=int, help=f"(default {d.logging_steps})")
    _flag(g, "save_steps", type=int, help=f"checkpoint every N optimizer steps (default {d.save_steps})")
    _flag(g, "save_total_limit", type=int, help=f"checkpoints kept (default {d.save_total_limit})")
    _flag(g, "report_to", choices=["trackio", "none"], help=f"experiment tracking, local only (default {d.report_to})")
    _flag(g, "trackio_project", help=f"trackio project name (default {d.trackio_project})")
    _flag(g, "run_name", help="trackio run name (default: the output dir's name and a timestamp)")
    _flag(g, "push_to_hub", action="store_true", help="upload the adapter to the Hub after training")
    _flag(g, "hub_model_id", help="repo id for --push_to_hub, e.g. you/gpt-oss-20b-multilingual-reasoner")

    g = p.add_argument_group("more than one GPU: run under torchrun, deepspeed or accelerate launch (README)")
    _flag(g, "deepspeed", help="zero3 (built-in ZeRO-3 preset; the default under the deepspeed launcher) or a "
          "DeepSpeed JSON config file")
    _flag(g, "fsdp", action="store_true", help="FSDP2: shard the model over the GPUs (default under torchrun: DDP)")
    _flag(g, "local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it; ranks come from env

    g = p.add_argument_group("preflight / benchmark: will this config fit my GPU, and how fast is it?")
    _flag(g, "random_init", action="store_true", help="random bf16 weights from the model's config, built on the GPU "
          "(no weight download); speed and memory are those of the real model")
    _flag(g, "synthetic_data", type=int, help="N generated rows in the dataset schema, lengths as in "
          "Multilingual-Thinking (see README)")
    _flag(g, "max_steps", type=int, help="stop after N optimizer steps")

    g = p.add_argument_group("inference")
    _flag(g, "prompt", help="the user message (read from stdin when omitted and stdin is not a terminal)")
    _flag(g, "reasoning_language", help=f"language of the analysis channel (default {d.reasoning_language})")
    _flag(g, "answer_language", help="language of the final answer, when it should differ from the question's")
    _flag(g, "reasoning_effort", choices=["low", "medium", "high"], help=f"(default {d.reasoning_effort})")
    _flag(g, "adapter", help="LoRA adapter directory from train mode (default: the base model alone)")
    _flag(g, "temperature", type=float, help=f"0 = greedy (default {d.temperature})")
    _flag(g, "max_new_tokens", type=int, help=f"(default {d.max_new_tokens})")
    _flag(g, "raw", action="store_true", help="print the whole harmony transcript")
    _flag(g, "json", action="store_true", help="print {reasoning_language, analysis, final, tokens} as JSON")

    g = p.add_argument_group("evaluation (--mode eval): greedy, --max_new_tokens 1024 and --batch_size 32 by default")
    _flag(g, "compare_base", action=argparse.BooleanOptionalAction,
          help="also evaluate the base model (the adapter switched off) and report both side by side")
    _flag(g, "limit", type=int, help="only the first N questions (per reasoning language)")
    _flag(g, "question_languages", help="languages the questions are asked in, rotated over the questions "
          "(default: every language of the eval file)")
    _flag(g, "full_grid", action="store_true", help="ask every question in every question language x answer "
          "language instead of rotating (--answer-language takes a comma-separated list in eval)")
    _flag(g, "eval_file", help="questions (default: the bundled data/eval_questions.jsonl)")
    _flag(g, "score_file", help="score outputs generated elsewhere (.jsonl: reasoning_language, analysis; optional "
          "final, answer_language, expected, model); loads no model")
    return p


def _split_list(value):
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def resolve_config(args) -> Config:
    """Seed defaults, then the demo's changes, then the user's flags; then validate. Touches nothing on disk."""
    values = {f.name: getattr(Config(), f.name) for f in fields(Config)}
    values["target_modules"], values["target_parameters"] = ["q_proj", "v_proj"], []
    given = {k: v for k, v in vars(args).items() if v is not None and k in values}
    values.update(MODE_DEFAULTS.get(given.get("mode"), {}))
    if getattr(args, "demo", False):
        values.update(DEMO_DEFAULTS)
        values["compare_base"] = given.get("mode") == "eval" and not given.get("score_file")
    values.update(given)
    for name in ("target_modules", "target_parameters", "reasoning_languages", "question_languages"):
        values[name] = _split_list(values[name])
    if getattr(args, "local_rank", None) is not None and not values["deepspeed"] and not values["fsdp"]:
        values["deepspeed"] = "zero3"  # started by the deepspeed launcher (torchrun passes ranks in the environment)
    adapter = values["adapter"] or (DEMO_OUTPUT_DIR if values["demo"] else None)
    if values["mode"] == "eval" and "output_dir" not in given:  # the report goes next to what it evaluates
        values["output_dir"] = str(Path(adapter) / "eval") if adapter else "eval_output"
    if values["mode"] == "merge" and "output_dir" not in given and adapter:
        values["output_dir"] = str(Path(adapter)) + "-merged"
    cfg = Config(**values)

    for name in SIZE_FIELDS + ("max_samples",):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {value}")
    for name in RATE_FIELDS:
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{name} must be greater than 0, got {getattr(cfg, name)}")
    for name in ("warmup_ratio", "lora_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.weight_decay < 0 or cfg.temperature < 0 or cfg.router_aux_loss_coef < 0:
        raise UsageError("--weight_decay, --temperature and --router_aux_loss_coef cannot be negative")
    if not cfg.reasoning_language.strip():
        raise UsageError("--reasoning-language is empty: name a language, e.g. --reasoning-language German")
    if cfg.answer_language is not None and not cfg.answer_language.strip():
        raise UsageError("--answer-language is empty: name a language or leave the flag out")
    if not cfg.target_modules and not cfg.target_parameters:
        raise UsageError("nothing to train: give --target_modules and/or --target_parameters")
    if cfg.attn_implementation.startswith("sdpa"):
        raise UsageError("gpt-oss does not support sdpa attention (it cannot apply the attention sinks); "
                         "use --attn-implementation flex_attention (CUDA) or eager")
    if cfg.use_4bit and cfg.target_parameters:
        raise UsageError("--use_4bit keeps the expert weights in MXFP4, so LoRA cannot train them: drop "
                         "--target_parameters or --use_4bit")
    if cfg.use_4bit and cfg.mode == "merge":
        raise UsageError("merge writes the base in bf16 with the adapter folded in; drop --use_4bit (serve the "
                         "adapter on the MXFP4 base with --use_4bit instead)")
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise UsageError("--push_to_hub needs --hub_model_id, e.g. --hub_model_id you/gpt-oss-20b-multilingual")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pick one")
    if cfg.deepspeed and cfg.fsdp:
        raise UsageError("--deepspeed and --fsdp are two ways to shard the model: pick one")
    if cfg.deepspeed and cfg.deepspeed != "zero3":
        try:
            json.loads(Path(cfg.deepspeed).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--deepspeed {cfg.deepspeed}: not 'zero3' and not a readable DeepSpeed JSON file "
                             f"({type(e).__name__})") from None
    if cfg.use_4bit and (cfg.deepspeed or cfg.fsdp):
        raise UsageError("--use_4bit with --deepspeed/--fsdp: the MXFP4 experts are buffers, which neither shards; "
                         "run it with plain torchrun (DDP: every GPU holds the 14 GB model)")
    if cfg.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("--deepspeed needs the deepspeed package: pip install deepspeed")
    if cfg.mode != "eval" and (cfg.score_file or cfg.compare_base):
        raise UsageError("--score-file and --compare-base belong to --mode eval")
    if cfg.mode == "merge" and not (cfg.adapter or cfg.demo):
        raise UsageError("--mode merge needs --adapter (the output_dir of a train run)")
    if cfg.compare_base and not (cfg.adapter or cfg.demo):
        raise UsageError("--compare-base needs --adapter (the tuned model to compare with its base)")
    return cfg


def distributed_strategy(cfg: Config) -> str:
    """single, ddp, fsdp2, deepspeed-zero3 or deepspeed-file. Under torchrun without a flag: DDP, because the
    LoRA gradients to all-reduce are a few MB and each GPU can hold the whole model (42 GB in bf16, 14 GB with
    --use_4bit); --fsdp shards it for smaller cards. Under the deepspeed launcher without a flag: ZeRO-3 (set by
    resolve_config, which sees the launcher's --local_rank)."""
    if cfg.deepspeed:
        return "deepspeed-zero3" if cfg.deepspeed == "zero3" else "deepspeed-file"
    if cfg.fsdp:
        return "fsdp2"
    return "ddp" if world_size() > 1 else "single"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def describe_runtime(cfg: Config) -> dict:
    """What this machine turns the configuration into: device, dtype, attention."""
    import torch

    on_cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if on_cuda else "cpu",
            "dtype": "bfloat16" if on_cuda else "float32",
            "attn_implementation": resolve_attention(cfg.attn_implementation, on_cuda),
            "experts": "MXFP4, dequantized per layer" if cfg.use_4bit else "bf16",
            "packing": cfg.packing, "sampler": cfg.sampler,
            "world_size": world_size(), "strategy": distributed_strategy(cfg),
            "effective_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world_size()}


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a checkpoint without it was
    cut short (e.g. the process was killed while saving) and is skipped."""
    complete = [c for c in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", c.name)
                and (c / "trainer_state.json").is_file()]
    return max(complete, key=lambda c: int(c.name.split("-")[1]), default=None)


OWNER_FILE = ".gpt_oss_sft.json"  # written first into every folder this tool fills; names the mode that filled it
OWN_OUTPUTS = {  # what each mode writes into its folder: all that --overwrite (and the demo) may replace
    "train": ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "training_args.bin", "run_summary.json", "speed.json",
              "loss_curve.png", "README.md", "checkpoint-*", ".final.tmp*", "runs"),
    "eval": ("eval_results.json", "eval_summary.md", "eval_summary.png", ".eval_*.tmp*"),
    "merge": ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "merge_check.json"),
}


def owner_of(folder: Path) -> str | None:
    """The mode that filled this folder, from the file it wrote there first; None for a folder the tool did not fill."""
    try:
        return json.loads((folder / OWNER_FILE).read_text()).get("mode")
    except (OSError, ValueError, AttributeError):
        return None


def sort_outputs(folder: Path, mode: str) -> tuple:
    """(this mode's earlier outputs, entries this tool did not write). Another output folder of the tool inside it,
    e.g. <adapter>/eval, is neither: it stays as it is."""
    mine = owner_of(folder) == mode
    own, foreign = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name == OWNER_FILE or entry.is_dir() and owner_of(entry):
            continue
        (own if mine and any(fnmatch.fnmatch(entry.name, p) for p in OWN_OUTPUTS[mode]) else foreign).append(entry)
    return own, foreign


def protected_folder(out: Path, cfg: Config) -> str | None:
    """Why out must never be an output folder, or None: folders that hold the user's work."""
    target, here = out.expanduser().resolve(), Path.cwd().resolve()
    if target == here:
        return "is the folder you are in"
    if target in here.parents or target == Path.home().resolve():
        return "holds the folder you are in" if target in here.parents else "is your home folder"
    inputs = {"the dataset": cfg.dataset, "this script": __file__, "--eval-file": cfg.eval_file,
              "--score-file": cfg.score_file}
    for what, path in inputs.items():
        if path and Path(path).expanduser().exists() and target in Path(path).expanduser().resolve().parents:
            return f"holds {what}"
    return None


def check_output_dir(cfg: Config):
    """Refuse, before anything is loaded, an output folder this run could not write without touching the user's
    files. The tool replaces only what it wrote earlier (OWN_OUTPUTS, in a folder carrying its OWNER_FILE)."""
    out = Path(cfg.output_dir)
    reason = protected_folder(out, cfg)
    if reason:
        raise UsageError(f"--output_dir {out} {reason}; outputs go into a folder of their own, e.g. "
                         f"--output_dir {Path(Config.output_dir).name if cfg.mode == 'train' else 'eval_output'}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; pick a directory")
    own, foreign = sort_outputs(out, cfg.mode) if out.is_dir() else ([], [])
    if foreign:
        names = ", ".join(e.name + ("/" if e.is_dir() else "") for e in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(f"--output_dir {out} holds files this tool did not write ({names}); it only ever replaces its "
                         "own outputs: move them or pick another folder")
    if cfg.resume and latest_checkpoint(out) is None:
        raise UsageError(f"--resume: {out} holds no complete checkpoint to resume from; drop --resume to start afresh")
    if own and not (cfg.overwrite or cfg.resume or cfg.demo):  # the demo replaces its own outputs
        raise UsageError(f"--output_dir {out} holds an earlier {cfg.mode} run's outputs; pass --overwrite to replace "
                         "them" + (" or --resume to continue" if cfg.mode == "train" else ""))


def claim_output_dir(out: Path, mode: str, replace: bool):
    """Create out and mark it as this mode's; with replace, first delete this mode's earlier outputs (only those:
    check_output_dir has refused any folder holding something else)."""
    out.mkdir(parents=True, exist_ok=True)
    if replace:
        for entry in sort_outputs(out, mode)[0]:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    write_atomically(out / OWNER_FILE, json.dumps({"mode": mode, "tool": "gpt_oss_20b_sft.py"}) + "\n")


def write_atomically(path: Path, data: str | bytes):
    """Write beside the target, then rename: a reader never sees half a file, a crash never leaves one."""
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(staging, path)


@contextlib.contextmanager
def staged_directory(target: Path):
    """A sibling directory to write into; when the block ends without error it replaces target by one rename, so
    target is either the old one or the complete new one, never half of it."""
    staging = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for entry in target.iterdir() if target.is_dir() else ():
        if entry.is_dir() and owner_of(entry):  # another output of this tool inside, e.g. <merged>/eval: kept
            os.replace(entry, staging / entry.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


# -----------------------------------------------------------------------------
# Data

REQUIRED_FLAT_COLUMNS = ("reasoning_language", "user", "analysis", "final")
REASONING_PREFIX = "reasoning language: "


def jsonl_lines(path: Path, name: str):
    """(line number, parsed value) for each non-blank line; a line that is not JSON is a UsageError naming it."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{name} line {number} is not valid JSON ({e.msg}); one object per line") from e


def read_rows(source: str, split: str = "train") -> list:
    """Rows of a local .jsonl/.json/.parquet file or of a hub dataset, as plain dicts."""
    path = Path(source)
    looks_local = path.suffix in (".jsonl", ".json", ".parquet") or source.startswith((".", "/", "~"))
    if not path.exists():
        if looks_local:
            raise UsageError(f"dataset file {source} does not exist; give an existing .jsonl/.json/.parquet file "
                             "or a hub dataset id")
        ensure_hub_reachable(source)
        import datasets
        try:
            return datasets.load_dataset(source, split=split).to_list()
        except Exception as e:  # the hub raises many types; the user needs the message only
            raise UsageError(f"could not load dataset {source!r} split {split!r}: {str(e).splitlines()[0]}") from e
    if path.is_dir():
        raise UsageError(f"dataset {source} is a directory; give a .jsonl, .json or .parquet file")
    if path.stat().st_size == 0:
        raise UsageError(f"dataset file {source} is empty; it needs rows in the Multilingual-Thinking schema")
    if path.suffix == ".parquet":
        import datasets
        rows = datasets.Dataset.from_parquet(str(path)).to_list()
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UsageError(f"{source} is not valid JSON ({e}); expected a list of rows") from e
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
    else:
        rows = [row for _, row in jsonl_lines(path, source)]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{source} must hold a list of objects (rows), one per example")
    if not rows:
        raise UsageError(f"dataset {source} has no rows")
    return rows


def row_to_messages(row: dict, where: str = "row") -> list:
    """The chat of one row: system "reasoning language: X", user, assistant with thinking + content.

    Rows may carry `messages` (as the hub dataset does) or only the flat columns, from which the same messages are
    built. Raises UsageError naming the row and the field when the schema is wrong.
    """
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UsageError(f"{where}: messages[{i}] needs a string 'role' and a string 'content'")
            if m["role"] not in ("system", "developer", "user", "assistant"):
                raise UsageError(f"{where}: messages[{i}] has unknown role {m['role']!r}")
            message = {"role": m["role"], "content": m["content"]}
            if m["role"] == "assistant" and m.get("thinking") is not None:
                message["thinking"] = m["thinking"]
            chat.append(message)
    else:
        missing = [c for c in REQUIRED_FLAT_COLUMNS if c not in row]
        if missing:
            raise UsageError(f"{where}: missing column(s) {', '.join(missing)}; a row needs 'messages' or the "
                             f"columns {', '.join(REQUIRED_FLAT_COLUMNS)} (and optionally 'developer')")
        for column in REQUIRED_FLAT_COLUMNS + ("developer",):
            if column in row and row[column] is not None and not isinstance(row[column], str):
                raise UsageError(f"{where}: column {column!r} must be a string, got {type(row[column]).__name__}")
        system = REASONING_PREFIX + row["reasoning_language"]
        if row.get("developer"):
            system += "\n\n" + row["developer"]
        chat = [{"role": "system", "content": system}, {"role": "user", "content": row["user"]},
                {"role": "assistant", "content": row["final"], "thinking": row["analysis"]}]
    if chat[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the last message must be the assistant's answer")
    thinking = chat[-1].get("thinking")
    if not isinstance(thinking, str) or not thinking.strip():
        raise UsageError(f"{where}: the assistant turn has no 'thinking' (the analysis channel to learn from)")
    if not any(m["role"] == "user" for m in chat):
        raise UsageError(f"{where}: no user message")
    return chat


def reasoning_language_of(row: dict, chat: list) -> str | None:
    if isinstance(row.get("reasoning_language"), str):
        return row["reasoning_language"]
    for m in chat:
        if m["role"] in ("system", "developer") and m["content"].lower().startswith(REASONING_PREFIX):
            return m["content"][len(REASONING_PREFIX):].split("\n")[0].strip()
    return None


def prepare_chats(rows: list, languages: list | None = None, max_samples: int | None = None) -> list:
    """Validate every row, keep the requested reasoning languages, take the first max_samples."""
    chats = []
    for index, row in enumerate(rows):
        chat = row_to_messages(row, where=f"row {index}")
        chats.append((reasoning_language_of(row, chat), chat))
    if languages:
        wanted = {lang.lower() for lang in languages}
        present = sorted({lang for lang, _ in chats if lang})
        chats = [(lang, chat) for lang, chat in chats if lang and lang.lower() in wanted]
        if not chats:
            raise UsageError(f"no rows with reasoning language {', '.join(languages)}; the data has "
                             f"{', '.join(present) or 'no reasoning_language information'}")
    return [chat for _, chat in chats[:max_samples]]


def tokenize_chat(tokenizer, chat: list, train_on_all_tokens: bool = False) -> dict:
    """input_ids and labels of one conversation; labels are -100 outside the assistant's turn.

    TRL's training version of the gpt-oss template marks the assistant turn, from its <|start|>assistant through
    the analysis and final channels to <|return|>; the system preamble (with today's date), the developer message
    and the user turn get no loss.
    """
    from trl.chat_template_utils import get_training_chat_template

    out = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=get_training_chat_template(tokenizer))
    ids = list(out["input_ids"])
    labels = ids[:] if train_on_all_tokens else [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]
    return {"input_ids": ids, "labels": labels}


def tokenize_chats(tokenizer, chats: list, max_length: int, train_on_all_tokens: bool = False):
    """Tokenize and cut to max_length. Returns (examples, stats); rows left with no labelled token are dropped."""
    examples, truncated, dropped = [], 0, 0
    for chat in chats:
        ex = tokenize_chat(tokenizer, chat, train_on_all_tokens)
        if len(ex["input_ids"]) > max_length:
            truncated += 1
            ex = {k: v[:max_length] for k, v in ex.items()}
            if all(label == -100 for label in ex["labels"][1:]):
                dropped += 1
                continue
        examples.append(ex)
    lengths = [len(ex["input_ids"]) for ex in examples]
    stats = {
        "rows_used": len(examples),
        "rows_truncated": truncated,
        "rows_dropped_no_labels_left": dropped,
        "tokens_per_epoch": sum(lengths),
        "labelled_tokens_per_epoch": sum(sum(label != -100 for label in ex["labels"][1:]) for ex in examples),
        "longest_row_tokens": max(lengths, default=0),
    }
    return examples, stats


# Multilingual-Thinking's length profile: log-normal tokens per row with mean 1,200 and sigma 0.57 (median 1,020).
# Fitted to what was measured of the real dataset: its rows averaged 852 tokens when capped at 1,024 (this profile
# gives 853) and its 8.9 MB of text suggests 1,100-1,200 tokens per row uncapped; 11% of rows exceed 2,048.
LENGTH_PROFILE = {"mu": 6.928, "sigma": 0.57, "min": 256, "max": 8192}
SYNTHETIC_LANGUAGES = ("English", "French", "German", "Spanish", "Italian")
SYNTHETIC_WORDS = ("the of and to in is that it for on with as was at by this be are from or have an they which one "
                   "you were all there would their we him been has when who will more no if out so what up its about "
                   "into than them can only other new some could time these two may then do first any my now such "
                   "like our over even most made after also did many before must through back years where much way "
                   "well down should because each just those people how too little state good very make world still "
                   "own see work long get here between both life being under never day same another know while last "
                   "might great old year off come since against go came right used take three").split()


def synthetic_rows(n: int, seed: int = 0) -> list:
    """n rows in the dataset's flat schema, about one word per token, lengths drawn from LENGTH_PROFILE."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        total = int(min(max(rng.lognormvariate(LENGTH_PROFILE["mu"], LENGTH_PROFILE["sigma"]), LENGTH_PROFILE["min"]),
                        LENGTH_PROFILE["max"]))
        body = total - 140  # the template's system preamble, headers, developer and user turns take about 140
        words = lambda k: " ".join(rng.choice(SYNTHETIC_WORDS) for _ in range(max(k, 1)))
        rows.append({"reasoning_language": SYNTHETIC_LANGUAGES[i % len(SYNTHETIC_LANGUAGES)],
                     "developer": "You are a helpful assistant.", "user": words(30),
                     "analysis": words(int(body * 0.65)), "final": words(int(body * 0.35))})
    return rows


# -----------------------------------------------------------------------------
# Model


def ensure_hub_reachable(repo_id: str):
    """Fail in one line, in seconds, when a hub id is needed and the Hub cannot be reached.

    Without HF_HUB_OFFLINE the libraries retry for ~30 s before failing; with it set they use the local cache only,
    which is what we fall back to here so a cached model still works offline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=3).close()
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        print(f"note: the Hugging Face Hub ({host}) is unreachable; using the local cache for {repo_id}",
              file=sys.stderr)


def _hub_error(source: str, error: Exception) -> UsageError:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return UsageError(f"{source!r} is not a local directory and not in the Hugging Face cache, and the Hub is "
                          "offline; connect to the Hub once or pass a local directory")
    return UsageError(f"could not load {source!r}: {str(error).splitlines()[0]}")


def load_model_config(source: str):
    """The model's config; refuses anything that is not gpt-oss before a single weight is read."""
    from transformers import AutoConfig

    if not Path(source).is_dir():
        ensure_hub_reachable(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e
    if config.model_type != "gpt_oss":
        raise UsageError(f"{source} is a {config.model_type!r} model, not gpt-oss; this script trains gpt-oss "
                         "(openai/gpt-oss-20b or a directory with a gpt_oss config)")
    return config


def count_parameters(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e
    if "<|channel|>" not in tokenizer.get_vocab() or not tokenizer.chat_template:
        raise UsageError(f"the tokenizer of {source} lacks the harmony tokens or chat template of gpt-oss")
    return tokenizer


def resolve_attention(requested: str, on_cuda: bool) -> str:
    if requested == "auto":
        return "flex_attention" if on_cuda else "eager"
    if requested == "flex_attention" and not on_cuda:
        raise UsageError("flex_attention applies gpt-oss's attention sinks on CUDA only; use eager on CPU")
    return requested


def unquantized_config(config, **overrides):
    """A copy of the config without its quantization block (random weights are plain bf16), with overrides."""
    values = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    return type(config).from_dict({**values, **overrides})


# The checkpoint stores each expert weight in MXFP4: 4-bit e2m1 values in blocks of 32 sharing one power-of-two
# scale. --use_4bit keeps them so (about 10 GB for gpt-oss-20b's experts instead of 38 GB in bf16) and dequantizes
# one layer's experts at a time, in its forward, with transformers' own dequantizer (the values Mxfp4Config(
# dequantize=True) loads). With gradient checkpointing the backward pass recomputes, so it dequantizes again.
MXFP4_TENSORS = ("gate_up_proj", "down_proj")
# Rows of 32 values dequantized at a time. transformers' default spans a whole layer: for one gpt-oss-20b layer's
# gate_up_proj (1.06 GB in bf16) its temporaries took 2.6 GB more, in chunks of 2**21 rows 0.05 GB (CPU, measured).
MXFP4_ROWS_PER_CHUNK = 2**21


def checkpoint_quantization(config) -> str | None:
    quant = getattr(config, "quantization_config", None)
    return quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)


@functools.lru_cache(maxsize=None)
def mxfp4_experts_class():
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    class Mxfp4Experts(GptOssExperts):
        """GptOssExperts whose two weight tensors stay MXFP4 buffers and are dequantized per forward."""

        def __init__(self, config):
            super().__init__(config)
            del self.gate_up_proj, self.down_proj
            experts, hidden, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
            for name, rows, cols in (("gate_up_proj", 2 * inner, hidden), ("down_proj", hidden, inner)):
                self.register_buffer(f"{name}_blocks", torch.zeros(experts, rows, cols // 32, 16, dtype=torch.uint8))
                self.register_buffer(f"{name}_scales", torch.zeros(experts, rows, cols // 32, dtype=torch.uint8))

        def forward(self, hidden_states, router_indices=None, routing_weights=None):
            for name in MXFP4_TENSORS:
                setattr(self, name, convert_moe_packed_tensors(getattr(self, f"{name}_blocks"),
                                                               getattr(self, f"{name}_scales"),
                                                               dtype=self.gate_up_proj_bias.dtype,
                                                               rows_per_chunk=MXFP4_ROWS_PER_CHUNK))
            try:
                return super().forward(hidden_states, router_indices, routing_weights)
            finally:
                del self.gate_up_proj, self.down_proj  # the autograd graph keeps what backward needs

    return Mxfp4Experts


def checkpoint_files(source: str) -> list:
    """The safetensors files of a local directory or of a hub repo (downloaded once into the HF cache)."""
    directory = Path(source)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"]))
        except Exception as e:  # the hub raises many types; the user needs the message only
            raise _hub_error(source, e) from e
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{source} has no .safetensors weights")
    return files


def load_mxfp4_model(cfg: Config, config, device: str, dtype, attn_implementation: str):
    """gpt-oss with its experts kept in MXFP4 (--use_4bit); every other weight in dtype."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    experts_class = mxfp4_experts_class()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(unquantized_config(config), dtype=dtype,
                                                 attn_implementation=attn_implementation)
        for layer in model.model.layers:
            layer.mlp.experts = experts_class(model.config)
    if cfg.random_init:  # preflight: random weights of the real shapes, built where they will run
        model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        for name, tensor in model.state_dict().items():
            if tensor.dtype == torch.uint8:  # blocks: any nibbles; scales: 2**-5, weights of the usual size
                tensor.copy_(torch.randint(0, 256, tensor.shape, generator=generator, device=device, dtype=torch.uint8)
                             if name.endswith("_blocks") else torch.full_like(tensor, 122))
            elif name.endswith("norm.weight"):
                tensor.fill_(1.0)
            elif name.endswith("bias") or name.endswith("sinks"):
                tensor.zero_()
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
    else:
        state = {}
        for file in checkpoint_files(cfg.model):
            with safe_open(str(file), framework="pt", device=device) as shard:
                for key in shard.keys():
                    tensor = shard.get_tensor(key)
                    state[key] = tensor if tensor.dtype == torch.uint8 else tensor.to(dtype)
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise UsageError(f"{cfg.model} does not have gpt-oss's MXFP4 layout: missing "
                             f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    with torch.device(device):  # the rotary frequencies are computed, not stored: compute them on the device
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model


def quantize_to_mxfp4(weight):
    """(blocks, scales) of a [experts, in, out] weight in the checkpoint's layout: the nearest e2m1 value of each
    entry after dividing its block of 32 by the smallest power of two that fits the block's largest into +-6.
    Written by hand because transformers' quantizer needs triton kernels from the Hub; used to build test and demo
    checkpoints only."""
    import torch
    from transformers.integrations.mxfp4 import FP4_VALUES

    rows = weight.transpose(1, 2).float()  # [experts, out, in]: the checkpoint stores rows of the transposed weight
    groups = rows.reshape(*rows.shape[:-1], rows.shape[-1] // 32, 32)
    largest = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(largest / 6.0)).clamp(-127, 127)
    values = torch.tensor(FP4_VALUES)
    codes = ((groups / torch.exp2(exponent)).unsqueeze(-1) - values).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8)


def write_mxfp4_checkpoint(source: Path, target: Path) -> Path:
    """Copy a bf16/fp32 gpt-oss checkpoint with its experts quantized to MXFP4, as the hub checkpoint ships them."""
    if (target / "config.json").exists():
        return target
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import SAFE_WEIGHTS_NAME

    state = load_file(str(source / SAFE_WEIGHTS_NAME))
    out = {}
    for key, tensor in state.items():
        name = key.rsplit(".", 1)[-1]
        if name in MXFP4_TENSORS:
            out[f"{key}_blocks"], out[f"{key}_scales"] = quantize_to_mxfp4(tensor)
        else:
            out[key] = tensor.to(torch.bfloat16)
    config = AutoConfig.from_pretrained(source)
    config.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with staged_directory(target) as staging:
        save_file(out, str(staging / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    return target


def load_model(cfg: Config, config, on_cuda: bool, training: bool, dtype=None):
    """gpt-oss in bf16 on the GPU (fp32 on CPU, for tiny models, unless dtype says otherwise), MXFP4 experts
    dequantized so LoRA can train on them and merge into them."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    kwargs = dict(dtype=dtype or (torch.bfloat16 if on_cuda else torch.float32),
                  attn_implementation=resolve_attention(cfg.attn_implementation, on_cuda))
    # Each process loads onto its own GPU; under FSDP2 and ZeRO-3 the libraries place (and shard) the weights.
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if on_cuda else "cpu"
    sharded = training and distributed_strategy(cfg) not in ("single", "ddp")
    device_map = device if on_cuda and not sharded else None
    if cfg.use_4bit:
        if not cfg.random_init and checkpoint_quantization(config) != "mxfp4":
            raise UsageError(f"--use_4bit keeps the experts in MXFP4 as gpt-oss ships them, but {cfg.model}'s experts "
                             "are not MXFP4 (no mxfp4 quantization_config); drop --use_4bit")
        model = load_mxfp4_model(cfg, config, device, **kwargs)
    elif cfg.random_init:
        torch.manual_seed(cfg.seed)
        with torch.device(device_map or "cpu"):
            model = AutoModelForCausalLM.from_config(unquantized_config(config), **kwargs)
    else:
        if checkpoint_quantization(config) == "mxfp4":
            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, device_map=device_map, **kwargs)
        except OSError as e:
            raise _hub_error(cfg.model, e) from e
    model.config.use_cache = not training
    return model


def attach_document_masks(model):
    """Give each row of a padding-free batch its own causal and sliding-window mask.

    GptOssModel builds its masks without position_ids, so in a flattened batch every row would attend to the rows
    before it. transformers' own mask builders find the rows from position_ids (each row restarts at 0); this hook
    calls them and hands the model the finished masks (a flex BlockMask on CUDA, a block-diagonal mask for eager).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    decoder = model.get_decoder()

    def build_masks(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is None or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
            return None
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = module.embed_tokens(kwargs.pop("input_ids"))
        mask_kwargs = dict(config=module.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                           position_ids=position_ids)
        kwargs.update(inputs_embeds=embeds, input_ids=None, attention_mask={
            "full_attention": create_causal_mask(**mask_kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)})
        return args, kwargs

    return decoder.register_forward_pre_hook(build_masks, with_kwargs=True)


# -----------------------------------------------------------------------------
# Train


def build_lora_config(cfg: Config):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=cfg.target_modules or None, target_parameters=cfg.target_parameters or None,
                      task_type="CAUSAL_LM")


def zero3_config() -> dict:
    """The built-in --deepspeed zero3 preset; "auto" values come from the Trainer's own arguments."""
    return {
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto",
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "steps_per_print": 10**9, "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # ZeRO takes --optim's optimizer, not only its own tested Adams
    }


def fsdp2_config(cfg: Config) -> dict:
    """--fsdp: FSDP2 over the decoder layers, full state dict on save, weights loaded once on rank 0's CPU."""
    return {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["GptOssDecoderLayer"], "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True,
            "activation_checkpointing": cfg.gradient_checkpointing}


def parallel_arguments(cfg: Config) -> dict:
    """What each strategy adds to the Trainer's arguments (accelerate does the rest)."""
    strategy = distributed_strategy(cfg)
    if strategy == "fsdp2":  # FSDP's own activation checkpointing replaces the Trainer's
        return {"fsdp": True, "fsdp_config": fsdp2_config(cfg), "gradient_checkpointing": False}
    if strategy.startswith("deepspeed"):
        return {"deepspeed": zero3_config() if cfg.deepspeed == "zero3" else cfg.deepspeed}
    return {"ddp_find_unused_parameters": False} if strategy == "ddp" else {}


def build_sft_config(cfg: Config, on_cuda: bool):
    from trl import SFTConfig

    arguments = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a float below 1 as a fraction of all steps
        num_train_epochs=cfg.num_train_epochs,
        max_length=None if cfg.packing else cfg.max_seq_length,  # rows are cut to max_seq_length beforehand
        padding_free=cfg.packing,
        train_sampling_strategy=cfg.sampler,  # transformers' samplers; the loss is normalised over the whole step
        max_steps=cfg.max_steps or -1,
        optim=cfg.optim,
        weight_decay=cfg.weight_decay,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=on_cuda,
        use_cpu=not on_cuda,
        router_aux_loss_coef=cfg.router_aux_loss_coef,  # TRL's default reads 0.9 from the gpt-oss config
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (the default hides it) so the run can stop on it
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        project=cfg.trackio_project,
        run_name=cfg.run_name or f"{Path(cfg.output_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}",
        trackio_space_id=None,  # trackio logs stay on this machine
        trackio_static_space_id=False,
        push_to_hub=False,  # pushed once, explicitly, after the adapter is saved
        hub_model_id=cfg.hub_model_id,
        dataloader_num_workers=0,
    )
    return SFTConfig(**{**arguments, **parallel_arguments(cfg)})


def make_trainer(cfg: Config, model, tokenizer, train_dataset, args, callbacks=()):
    from transformers import Trainer
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl import SFTTrainer

    class SeededSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, BatchRebalanceSampler):  # transformers leaves its seed at 42 whatever --seed says;
                sampler.seed = self.args.seed  # seeded as the random sampler is, it draws the same rows for each step
            return sampler

    class FullLogitsSFTTrainer(SeededSFTTrainer):
        """The Cookbook-era loss, for the benchmark baseline: the model's own cross-entropy over full fp32 logits."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    trainer_class = SeededSFTTrainer if cfg.chunked_loss else FullLogitsSFTTrainer
    return trainer_class(model=model, args=args, train_dataset=train_dataset,
                         processing_class=tokenizer, peft_config=build_lora_config(cfg), callbacks=list(callbacks))


def make_speed_meter(model, warmup_steps: int = 2):
    """A Trainer callback timing optimizer steps after warm-up and counting the tokens they processed.

    Real tokens are the non-pad ones (the attention mask's ones, or every token of a padding-free batch); padded
    tokens are everything the model computed on. Counted by a hook on the model's forward, once per micro-batch.
    """
    import torch
    from transformers import TrainerCallback

    class SpeedMeter(TrainerCallback):
        def __init__(self):
            self.real = self.padded = 0
            self.steps = []  # (seconds, real tokens, padded tokens) per measured optimizer step

        def count(self, module, args, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if module.training and ids is not None:
                self.padded += ids.numel()
                self.real += int(mask.sum()) if isinstance(mask, torch.Tensor) else ids.numel()

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start, self.real, self.padded = time.perf_counter(), 0, 0

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps.append((time.perf_counter() - self.start, self.real, self.padded))

        def summary(self, optimizer_steps_per_run: int) -> dict:
            measured = self.steps[warmup_steps:] if len(self.steps) > warmup_steps else self.steps[-1:]
            seconds = sum(m[0] for m in measured)  # 0 when no step finished (e.g. out of memory in the first)
            step_seconds = seconds / len(measured) if measured else None
            # Counted on this process; the other ranks get batches of the same size, hence x world size.
            per_second = lambda i: round(sum(m[i] for m in measured) * world_size() / seconds, 1) if seconds else None
            on_cuda = torch.cuda.is_available()
            return {
                "gpu": torch.cuda.get_device_name() if on_cuda else "cpu",
                "processes": world_size(),
                "steps_measured": len(measured),
                "step_seconds": round(step_seconds, 3) if step_seconds is not None else None,
                "tokens_per_second": per_second(1),
                "padded_tokens_per_second": per_second(2),
                "real_token_share": round(sum(m[1] for m in measured) / max(sum(m[2] for m in measured), 1), 3),
                "peak_memory_gib": {
                    "allocated": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_cuda else None,
                    "reserved": round(torch.cuda.max_memory_reserved() / 2**30, 2) if on_cuda else None},
                "optimizer_steps_per_run": optimizer_steps_per_run,
                "projected_run_minutes": round(optimizer_steps_per_run * step_seconds / 60, 2) if measured else None,
            }

    meter = SpeedMeter()
    model.register_forward_pre_hook(meter.count, with_kwargs=True)
    return meter


def make_nonfinite_guard(output_dir: str):
    """A Trainer callback that stops the run at the first NaN or inf loss or gradient norm, before that step's
    checkpoint is written, so the checkpoints on disk are all from finite steps."""
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for name in ("loss", "grad_norm"):
                value = (logs or {}).get(name)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    last = latest_checkpoint(Path(output_dir))
                    raise RunFailed(
                        f"The training {name.replace('_', ' ')} became {value} at step {state.global_step}, so the run "
                        "stopped there and saved no adapter. "
                        + (f"The checkpoints before it are kept; the last good one runs with --adapter {last}. "
                           if last else "No checkpoint was written before it. ")
                        + f"A loss that blows up usually means the learning rate is too high (now "
                        f"{args.learning_rate:g}): start again with a lower --learning_rate and --overwrite.")

    return StopOnNonFiniteLoss()


def loss_history(log_history: list) -> list:
    return [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]


def plot_loss(history: list, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*history) if history else ((), ())
    ax.plot(steps, losses, marker="o" if len(steps) < 30 else None)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "trackio"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


class RunFailed(Exception):
    """The run started and could not finish (out of memory, NaN loss): printed as a paragraph, exit code 1."""


def gpu_memory_state() -> tuple:
    """(peak GiB allocated, GiB on the card, card name) for the out-of-memory message."""
    import torch

    return (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.get_device_properties(0).total_memory / 2**30,
            torch.cuda.get_device_name())


def out_of_memory_advice(cfg: Config, during: str, peak_gib: float, total_gib: float, device: str) -> str:
    """One paragraph: what was measured, and the flags that make this model use less memory in this mode."""
    head = f"CUDA ran out of memory during {during} (peak {peak_gib:.1f} GiB allocated of {total_gib:.1f} GiB on {device}). "
    if during == "training":
        return (head + f"To use less: --batch_size {max(cfg.batch_size // 2, 1)} --gradient_accumulation_steps "
                f"{cfg.gradient_accumulation_steps * 2} (same effective batch), --max_seq_length "
                f"{max(cfg.max_seq_length // 2, 256)}"
                + ("" if cfg.gradient_checkpointing else ", --gradient_checkpointing")
                + ("" if cfg.chunked_loss else ", --chunked-loss")
                + ("" if cfg.attn_implementation in ("auto", "flex_attention") else ", --attn-implementation flex_attention")
                + ("" if cfg.use_4bit else ", --use_4bit (experts in MXFP4: 14 GB of weights instead of 42)")
                + ". Check what fits before a real run with --random-init --synthetic-data 1000 --max-steps 4.")
    if during == "merging":
        return head + ("Merging holds the whole model in bf16 (about 42 GB for gpt-oss-20b): run it on a card with "
                       "more free memory, or on the CPU with CUDA_VISIBLE_DEVICES= in front of the command (it then "
                       "needs about 45 GB of RAM).")
    return (head + f"To use less: --max_new_tokens {max(cfg.max_new_tokens // 2, 1)}"
            + (f", --batch_size {max(cfg.batch_size // 2, 1)}" if cfg.mode == "eval" and cfg.batch_size > 1 else "")
            + ("" if cfg.use_4bit else ", --use_4bit (the weights take 14 GB instead of 42 GB for gpt-oss-20b)") + ".")


@contextlib.contextmanager
def out_of_memory_is_a_message(cfg: Config, during: str):
    """Turn CUDA out-of-memory into the one-paragraph RunFailed instead of a long traceback."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        raise RunFailed(out_of_memory_advice(cfg, during, *gpu_memory_state())) from e


def publish(staging: Path, out: Path, last: str = "adapter_config.json"):
    """Move the finished files from staging into out, each by an atomic rename, `last` at the end: a directory
    holding adapter_config.json holds a complete adapter (PEFT and infer look for that file)."""
    (out / last).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda p: p.name == last):
        os.replace(path, out / path.name)
    staging.rmdir()


def render_model_card(summary: dict) -> str:
    """The adapter's README.md: what it is, how it was trained, what training measured, how to run it."""
    cfg, data = summary["config"], summary["data"]
    codes = []
    if importlib.util.find_spec("lingua"):  # in requirements.txt; the bare GPU benchmark image lacks it
        from lingua import Language

        for name in summary.get("reasoning_languages", []):
            try:
                codes.append(Language.from_str(name).iso_code_639_1.name.lower())
            except ValueError:
                pass
    base = cfg["model"]
    on_hub = lambda source: not Path(source).exists()  # the card's metadata and links name hub ids only
    repo = cfg["hub_model_id"] or "<this adapter's directory or repo id>"
    langs = ", ".join(summary.get("reasoning_languages", []))
    yaml_list = lambda xs: "".join(f"\n- {x}" for x in xs) or " []"
    loss = lambda v: "n/a" if v is None else f"{v:.4f}"
    return f"""---
{f"base_model: {base}" if on_hub(base) else f"# base model: local directory {base}"}
library_name: peft
license: apache-2.0
datasets:{yaml_list([cfg["dataset"]] if on_hub(cfg["dataset"]) and not cfg["synthetic_data"] else [])}
language:{yaml_list(codes)}
tags:
- gpt-oss
- lora
- sft
- trl
- multilingual-reasoning
---

# {Path(cfg["output_dir"]).name}

A LoRA adapter for {f"[{base}](https://huggingface.co/{base})" if on_hub(base) else f"`{base}`"} that makes the model **reason in the language you ask
for**: with `reasoning language: German` in the system prompt, its analysis channel is written in German.
Trained with `gpt_oss_20b_sft.py` (TRL `SFTTrainer` + PEFT) on `{cfg["dataset"] if not cfg["synthetic_data"] else "synthetic rows"}`,
reasoning languages in the training data: {langs or "n/a"}.

## Use it

```bash
python gpt_oss_20b_sft.py --mode infer --adapter {repo} --reasoning-language German --prompt "What is 7 x 8?"
python gpt_oss_20b_sft.py --mode eval --adapter {repo} --compare-base
```

or with transformers and PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}", dtype="auto", device_map="auto"), "{repo}")
chat = [{{"role": "system", "content": "reasoning language: German"}}, {{"role": "user", "content": "What is 7 x 8?"}}]
inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(model.device)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=512)[0]))
```

## Training

| setting | value |
|---|---|
| LoRA | r={cfg["lora_r"]}, alpha={cfg["lora_alpha"]}, dropout={cfg["lora_dropout"]}, modules {", ".join(cfg["target_modules"]) or "none"}{", expert tensors " + ", ".join(cfg["target_parameters"]) if cfg["target_parameters"] else ""} |
| batch | {cfg["batch_size"]} per device x {cfg["gradient_accumulation_steps"]} accumulation |
| optimizer | {cfg["optim"]}, lr {cfg["learning_rate"]:g} {cfg["lr_scheduler_type"]}, warmup {cfg["warmup_ratio"]}, weight decay {cfg["weight_decay"]} |
| epochs / max length | {cfg["num_train_epochs"]:g} / {cfg["max_seq_length"]} tokens |
| loss | {"every token" if cfg["train_on_all_tokens"] else "assistant tokens only (analysis, final, <|return|>)"}; router aux loss coef {cfg["router_aux_loss_coef"]} |

## Measured in training

| measurement | value |
|---|---|
| device | {summary["device"]} |
| rows used / cut to max length | {data["rows_used"]} / {data["rows_truncated"]} |
| tokens per epoch (with loss) | {data["tokens_per_epoch"]:,} ({data["labelled_tokens_per_epoch"]:,}) |
| optimizer steps | {summary["optimizer_steps"]} |
| training loss, first / last logged | {loss(summary["train_loss_first"])} / {loss(summary["train_loss_last"])} |
| runtime | {summary["runtime_seconds"] / 60:.1f} min |
| peak GPU memory (allocated) | {"n/a" if summary["peak_gpu_memory_gib"] is None else f'{summary["peak_gpu_memory_gib"]} GiB'} |
| versions | {", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v)} |
"""


def push_adapter(out: Path, repo_id: str):
    """Upload the adapter, its model card and reports (not the checkpoints); the token comes from the usual login."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(out),
                             ignore_patterns=["checkpoint-*", "checkpoint-*/**", "eval/**", ".*"])
    print(f"pushed to {info.commit_url if hasattr(info, 'commit_url') else repo_id}")


def sampler_for(cfg: Config, rows: int, processes: int = 1) -> str:
    """The sampler to use: batch_rebalance gives every micro-batch of a step at least one row, repeating rows when the
    last step has fewer rows than micro-batches; there random, which trains each row once, takes its place."""
    micro_batches = cfg.gradient_accumulation_steps * processes
    last_step_rows = rows % (cfg.batch_size * micro_batches)
    return "random" if cfg.sampler == "batch_rebalance" and 0 < last_step_rows < micro_batches else cfg.sampler


def optimizer_steps_per_run(cfg: Config, rows: int, world_size: int = 1) -> int:
    batches = math.ceil(rows / (cfg.batch_size * world_size))
    return math.ceil(batches / cfg.gradient_accumulation_steps) * math.ceil(cfg.num_train_epochs)


def run_train(cfg: Config):
    import torch

    on_cuda = torch.cuda.is_available()
    check_output_dir(cfg)
    rows = synthetic_rows(cfg.synthetic_data, cfg.seed) if cfg.synthetic_data else read_rows(cfg.dataset, cfg.dataset_split)
    chats = prepare_chats(rows, cfg.reasoning_languages, cfg.max_samples)
    config = load_model_config(cfg.model)
    resolve_attention(cfg.attn_implementation, on_cuda)
    n_params = count_parameters(config)
    if not on_cuda and n_params > 1e9:
        raise UsageError(f"{cfg.model} has {n_params / 1e9:.1f}B parameters and there is no CUDA GPU here; training "
                         "it needs one with >= 80 GB (H100/H200). The demo (--demo) and tiny local models run on CPU")
    tokenizer = load_tokenizer(cfg.model)
    examples, data_stats = tokenize_chats(tokenizer, chats, cfg.max_seq_length, cfg.train_on_all_tokens)
    if not examples:
        raise UsageError(f"every row lost all its labelled tokens at --max_seq_length {cfg.max_seq_length}; raise it")
    print(f"data: {data_stats['rows_used']} rows, {data_stats['rows_truncated']} cut at {cfg.max_seq_length} tokens, "
          f"{data_stats['tokens_per_epoch']:,} tokens per epoch ({data_stats['labelled_tokens_per_epoch']:,} with loss)")

    from datasets import Dataset

    sampler = sampler_for(cfg, len(examples), world_size())
    if sampler != cfg.sampler:
        print(f"sampler: {sampler} instead of {cfg.sampler}, which would repeat rows to fill the last optimizer step")
        cfg = replace(cfg, sampler=sampler)
    if is_main_process():
        claim_output_dir(Path(cfg.output_dir), "train", replace=not cfg.resume)
    strategy = distributed_strategy(cfg)
    args = build_sft_config(cfg, on_cuda)  # before the model: ZeRO-3 and FSDP2 shape how it is loaded
    if strategy.startswith("deepspeed"):
        import deepspeed

        deepspeed.init_distributed()  # accelerate does this on GPUs only; ZeRO-3's loading needs it everywhere
    model = load_model(cfg, config, on_cuda, training=True)
    if strategy.startswith("deepspeed"):
        from deepspeed.utils import set_z3_leaf_modules
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        set_z3_leaf_modules(model, [GptOssMLP])  # routing is data-dependent: ZeRO-3 must fetch a layer's experts whole
    if cfg.packing:
        attach_document_masks(model)
    meter = make_speed_meter(model)
    out = Path(cfg.output_dir)
    trainer = make_trainer(cfg, model, tokenizer, Dataset.from_list(examples), args,
                           callbacks=[meter, make_nonfinite_guard(cfg.output_dir)])
    trainer.model.print_trainable_parameters()
    print(f"processes: {world_size()}, strategy: {strategy}")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    steps_per_run = optimizer_steps_per_run(cfg, len(examples), trainer.args.world_size)
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if checkpoint:
        print(f"resuming from {checkpoint}")
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as e:
        print(json.dumps({"oom": True, **meter.summary(steps_per_run)}))
        raise RunFailed(out_of_memory_advice(cfg, "training", *gpu_memory_state())) from e
    except RunFailed:
        for callback in trainer.callback_handler.callbacks:  # end the progress bar before the message, not after it
            if getattr(callback, "training_bar", None) is not None:
                callback.training_bar.close()
        raise
    speed = meter.summary(steps_per_run)

    staging = out / ".final.tmp"
    trainer.save_model(str(staging))  # every rank takes part (sharded weights are gathered); rank 0 writes
    if strategy.startswith("deepspeed"):
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # later loads in this process (the demo's inference on rank 0) are not sharded
    if not is_main_process():
        return trainer
    history = loss_history(trainer.state.log_history)
    plot_loss(history, staging / "loss_curve.png", f"{Path(cfg.model).name} LoRA r={cfg.lora_r}")
    summary = {
        "config": asdict(cfg),
        "versions": library_versions(),
        "device": torch.cuda.get_device_name() if on_cuda else f"cpu ({platform.processor() or platform.machine()})",
        "model_parameters": n_params,
        "reasoning_languages": sorted({reasoning_language_of({}, chat) or "unknown" for chat in chats}),
        "distributed": {"world_size": world_size(), "strategy": strategy},
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "data": data_stats,
        "train_loss_first": history[0][1] if history else None,
        "train_loss_last": history[-1][1] if history else None,
        "optimizer_steps": trainer.state.global_step,
        "tokens_seen": int(trainer._total_train_tokens),  # TRL's count of real (non-pad) tokens trained on
        "runtime_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
        "peak_gpu_memory_gib": speed["peak_memory_gib"]["allocated"],
        "speed": speed,
    }
    (staging / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (staging / "README.md").write_text(render_model_card(summary))
    publish(staging, out)
    print(f"saved adapter, model card (README.md), run_summary.json and loss_curve.png to {out}/ "
          f"(loss {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f})")
    if cfg.push_to_hub:
        push_adapter(out, cfg.hub_model_id)
    settings = {name: getattr(cfg, name) for name in ("packing", "sampler", "chunked_loss", "gradient_checkpointing",
                                                      "use_4bit", "batch_size", "gradient_accumulation_steps",
                                                      "max_seq_length")}
    print(json.dumps({**speed, "attn_implementation": model.config._attn_implementation,
                      "experts_implementation": model.config._experts_implementation, **settings,
                      "rows": len(examples)}))
    return trainer


# -----------------------------------------------------------------------------
# Infer


STOP_TOKENS = ["<|return|>", "<|call|>"]  # end of the assistant's turn; <|end|> only closes a channel


def build_chat(prompt: str, reasoning_language: str, answer_language: str | None = None) -> list:
    """The system line the dataset teaches ("reasoning language: X"); the template makes it the developer message."""
    system = REASONING_PREFIX + reasoning_language
    if answer_language:
        system += f"\n\nAlways write the final answer in {answer_language}."
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


# A few lines by hand because the official parser (openai-harmony) needs o200k token ids, and the demo's tiny
# tokenizer has others; tests check this split against openai-harmony on the real tokenizer.
_MESSAGE = re.compile(r"(?:<\|start\|>assistant)?<\|channel\|>(\w+)[^<]*<\|message\|>(.*?)(<\|end\|>|<\|return\|>|<\|call\|>|$)",
                      re.DOTALL)


def split_channels(completion: str) -> dict:
    """Split generated harmony text (what follows the prompt's <|start|>assistant) into its channels."""
    analysis, final, complete = [], None, False
    for channel, text, end in _MESSAGE.findall(completion):
        if channel == "analysis":
            analysis.append(text)
        elif channel == "final":
            final, complete = text, end in ("<|return|>", "<|end|>")
    return {"analysis": "\n".join(analysis), "final": final, "complete": complete}


def adapter_base(cfg: Config) -> str:
    """The base model to load: --model when given, else the one the adapter names."""
    if not cfg.adapter:
        return cfg.model
    adapter_config = Path(cfg.adapter) / "adapter_config.json"
    if not adapter_config.is_file():
        raise UsageError(f"--adapter {cfg.adapter} is not a LoRA adapter directory (no adapter_config.json); "
                         "pass the --output_dir of a train run")
    if cfg.model != Config.model:
        return cfg.model
    return json.loads(adapter_config.read_text()).get("base_model_name_or_path") or cfg.model


def load_for_inference(cfg: Config, dtype=None):
    import torch

    on_cuda = torch.cuda.is_available()
    base = adapter_base(cfg)
    cfg = Config(**{**asdict(cfg), "model": base})
    config = load_model_config(base)
    tokenizer = load_tokenizer(cfg.adapter if cfg.adapter and (Path(cfg.adapter) / "tokenizer_config.json").exists()
                               else base)
    model = load_model(cfg, config, on_cuda, training=False, dtype=dtype)
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter)
    model.eval()
    return model, tokenizer


def generate(model, tokenizer, chats: list, reasoning_effort: str, max_new_tokens: int, temperature: float,
             seed: int = 42, progress: str | None = None, batch_size: int = 8) -> list:
    """Token ids generated after each chat's prompt, in order; batches are left-padded. Each stops on <|return|> or
    <|call|> (<|end|> only closes a channel). Greedy when temperature is 0."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    set_seed(seed)
    tokenizer.padding_side = "left"  # new tokens follow every prompt directly
    stop = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    outputs = []
    for start in tqdm(range(0, len(chats), batch_size), desc=progress, disable=progress is None, unit="batch"):
        inputs = tokenizer.apply_chat_template(chats[start:start + batch_size], add_generation_prompt=True,
                                               reasoning_effort=reasoning_effort, padding=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            ends = [i for i, token in enumerate(row) if token in stop]
            outputs.append(row[:ends[0] + 1] if ends else row)
    return outputs


def read_prompt(cfg: Config) -> str:
    if cfg.prompt is not None:
        prompt = cfg.prompt
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read()
    else:
        prompt = input("prompt> ")
    if not prompt.strip():
        raise UsageError("no prompt: pass --prompt \"...\" or pipe the question on stdin")
    return prompt.strip()


def run_infer(cfg: Config) -> dict:
    prompt = read_prompt(cfg)
    model, tokenizer = load_for_inference(cfg)
    chat = build_chat(prompt, cfg.reasoning_language, cfg.answer_language)
    ids = generate(model, tokenizer, [chat], cfg.reasoning_effort, cfg.max_new_tokens, cfg.temperature, cfg.seed)[0]
    completion = tokenizer.decode(ids, skip_special_tokens=False)
    result = {"reasoning_language": cfg.reasoning_language, **split_channels(completion), "tokens": len(ids)}
    if cfg.json:
        print(json.dumps(result, ensure_ascii=False))
    elif cfg.raw:
        print(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False,
                                            reasoning_effort=cfg.reasoning_effort) + completion)
    elif not result["analysis"] and result["final"] is None:
        print(f"(no harmony channels in the output; raw text follows)\n{completion}")
    else:
        print(f"--- reasoning ({cfg.reasoning_language}) ---\n{result['analysis'].strip()}\n")
        final = result["final"] if result["final"] is not None else "(no final answer: raise --max_new_tokens)"
        print(f"--- final answer ---\n{final.strip()}")
    return result


# -----------------------------------------------------------------------------
# Eval: does the model reason in the requested language, and does it still answer correctly?

TRAINED_LANGUAGES = ("English", "French", "German", "Spanish", "Italian")  # Multilingual-Thinking's five
EVAL_REASONING_LANGUAGES = TRAINED_LANGUAGES + ("Chinese", "Japanese", "Russian")


@functools.lru_cache(maxsize=None)
def _language_detector():
    # lingua over every language it knows: the most accurate candidate on data/langid_check.jsonl (README)
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()


def canonical_language(name: str, flag: str) -> str:
    """The detector's name for a language ("german" -> "German"); a name it does not know is a UsageError."""
    from lingua import Language

    try:
        return Language.from_str(name.strip()).name.title()
    except ValueError:
        raise UsageError(f"{flag}: unknown language {name!r}; the language detector (lingua) knows "
                         f"{len(Language.all())} languages by their English names, e.g. Portuguese, Korean, Dutch") from None


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def detect_language(text: str | None) -> str | None:
    """The most likely language of the text; None when it has no letters (e.g. "56")."""
    if not text or not _has_letters(text):
        return None
    found = _language_detector().detect_language_of(text)
    return found.name.title() if found else None


_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；：])|\n+")


def language_share(text: str | None, language: str) -> float:
    """Share of the text's characters in sentences detected as `language` (reasoning often switches mid-way)."""
    sentences = [s for s in _SENTENCE_BREAK.split(text or "") if _has_letters(s)]
    total = sum(len(s) for s in sentences)
    return sum(len(s) for s in sentences if detect_language(s) == language) / total if total else 0.0


_NUMBER = re.compile(r"(?:(?<!\w)[-−])?\d+(?:[.,'’\u00a0\u202f ]\d+)*")
_SEPARATOR = re.compile(r"[.,'’\u00a0\u202f ]")


def number_readings(text: str) -> set:
    """Every value the numbers in the text can mean: "1.000" is 1000 in German and 1.0 in English, "2,5" is 2.5."""
    values = set()
    for token in _NUMBER.findall(unicodedata.normalize("NFKC", text)):
        sign = -1 if token[0] in "-−" else 1
        token = token.lstrip("-−")
        for piece in {token, *re.split(r"[\u00a0\u202f ]", token)}:  # a space groups thousands or just separates
            groups, separators = _SEPARATOR.split(piece), _SEPARATOR.findall(piece)
            if all(len(g) == 3 for g in groups[1:]):
                values.add(sign * float("".join(groups)))
            if separators and separators[-1] in ".," and all(len(g) == 3 for g in groups[1:-1]):
                values.add(sign * float("".join(groups[:-1]) + "." + groups[-1]))
    return values


def _fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


def answer_is_correct(final: str | None, expected: dict) -> bool:
    """{"number": x}: some number in the answer equals x. {"accepted": [...]}: one spelling appears as a word."""
    if final is None:
        return False
    if "number" in expected:
        return any(math.isclose(v, expected["number"], rel_tol=1e-9, abs_tol=1e-9) for v in number_readings(final))
    text = _fold(final)
    return any(re.search(rf"(?<![a-z0-9]){re.escape(_fold(a))}(?![a-z0-9])", text) for a in expected["accepted"])


def score_output(reasoning_language: str, analysis: str, final: str | None, answer_language: str | None = None,
                 expected: dict | None = None) -> dict:
    """The scores of one output. Languages are canonical names (canonical_language)."""
    detected = detect_language(analysis)
    scores = {"reasoning_language_detected": detected,
              "reasoning_language_match": detected == reasoning_language,
              "reasoning_language_share": round(language_share(analysis, reasoning_language), 4),
              "malformed": final is None}
    if answer_language is not None:
        answer_detected = detect_language(final)
        scores["answer_language_detected"] = answer_detected
        # No final answer misses the language; one without letters ("56") has none to judge.
        scores["answer_language_match"] = (False if final is None else None if answer_detected is None
                                           else answer_detected == answer_language)
    if expected is not None:
        scores["correct"] = answer_is_correct(final, expected)
    return scores


def _expected_answer(value, where: str) -> dict | None:
    if value is None or isinstance(value, dict) and (set(value) == {"number"} or set(value) == {"accepted"}):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"number": value}
    if isinstance(value, str) and value.strip():
        return {"accepted": [value]}
    if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
        return {"accepted": value}
    raise UsageError(f"{where}: 'expected' must be a number, a string, a list of strings, {{\"number\": x}} or "
                     "{\"accepted\": [...]}")


def read_jsonl(path: str, what: str) -> list:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{what} {path} does not exist")
    rows = []
    for number, row in jsonl_lines(file, path):
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {number} is not a JSON object")
        rows.append((number, row))
    if not rows:
        raise UsageError(f"{what} {path} is empty")
    return rows


def read_score_file(path: str) -> list:
    """Outputs generated elsewhere: reasoning_language and analysis per line; final, answer_language, expected,
    reasoning_tokens and model optional. Checked line by line before anything is scored."""
    items = []
    for number, row in read_jsonl(path, "--score-file"):
        where = f"{path} line {number}"
        for field in ("reasoning_language", "analysis"):
            if not isinstance(row.get(field), str):
                raise UsageError(f"{where}: needs a string {field!r}")
        for field in ("final", "answer_language", "model"):
            if row.get(field) is not None and not isinstance(row[field], str):
                raise UsageError(f"{where}: {field!r} must be a string")
        items.append({**row, "model": row.get("model") or "outputs",
                      "reasoning_language": canonical_language(row["reasoning_language"], where),
                      "answer_language": canonical_language(row["answer_language"], where)
                      if row.get("answer_language") else None,
                      "expected": _expected_answer(row.get("expected"), where)})
    return items


def read_eval_questions(path: str) -> list:
    questions = []
    for number, row in read_jsonl(path, "--eval-file"):
        where = f"{path} line {number}"
        if not isinstance(row.get("question"), dict) or not row["question"]:
            raise UsageError(f"{where}: 'question' must map languages to the question's text")
        questions.append({**row, "id": row.get("id", f"q{number}"), "expected": _expected_answer(row.get("answer"), where)})
    return questions


def eval_plan(questions: list, reasoning_languages: list, question_languages: list, answer_languages: list,
              limit: int | None = None, full_grid: bool = False) -> list:
    """Which prompts to generate. Every reasoning language gets the same questions; question and answer languages
    rotate over the questions (every combination for every question with full_grid). An answer language of None
    means "the question's own language", with no instruction in the prompt."""
    combos = [(q, a) for a in answer_languages for q in question_languages]
    plan = []
    for reasoning_language in reasoning_languages:
        for index, question in enumerate(questions[:limit]):
            for question_language, answer_language in (combos if full_grid else [combos[index % len(combos)]]):
                if question_language not in question["question"]:
                    raise UsageError(f"question {question['id']} has no {question_language} version; "
                                     f"it has {', '.join(question['question'])}")
                plan.append({"id": question["id"], "category": question.get("category"),
                             "question_language": question_language, "reasoning_language": reasoning_language,
                             "answer_language": answer_language or question_language,
                             "answer_language_instructed": answer_language is not None,
                             "prompt": question["question"][question_language], "expected": question["expected"]})
    return plan


def _mean(values: list):
    values = [float(v) for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def summarize_scores(items: list) -> list:
    """One row per model and reasoning language, then each model over all languages."""
    rows = []
    for model in dict.fromkeys(i["model"] for i in items):
        mine = [i for i in items if i["model"] == model]
        for language in [*dict.fromkeys(i["reasoning_language"] for i in mine), "all"]:
            group = [i for i in mine if language in ("all", i["reasoning_language"])]
            rows.append({"model": model, "reasoning_language": language, "n": len(group),
                         "reasoning_language_match": _mean([i["reasoning_language_match"] for i in group]),
                         "reasoning_language_share": _mean([i["reasoning_language_share"] for i in group]),
                         "answer_language_match": _mean([i.get("answer_language_match") for i in group]),
                         "accuracy": _mean([i.get("correct") for i in group]),
                         "reasoning_tokens": _mean([i.get("reasoning_tokens") for i in group]),
                         "malformed": _mean([i["malformed"] for i in group])})
    return rows


def summary_table(rows: list) -> str:
    percent = lambda v: "–" if v is None else f"{100 * v:.0f}%"
    lines = ["| reasoning language | model | n | reasoning in language | share of reasoning in language | "
             "answer in language | answer correct | reasoning tokens | no final answer |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["reasoning_language"] for r in rows))  # each language's models on adjacent rows
    for r in sorted(rows, key=lambda r: order.index(r["reasoning_language"])):
        language = r["reasoning_language"] + ("" if r["reasoning_language"] in TRAINED_LANGUAGES + ("all",) else " *")
        tokens = "–" if r["reasoning_tokens"] is None else f"{r['reasoning_tokens']:.0f}"
        lines.append(f"| {language} | {r['model']} | {r['n']} | {percent(r['reasoning_language_match'])} | "
                     f"{percent(r['reasoning_language_share'])} | {percent(r['answer_language_match'])} | "
                     f"{percent(r['accuracy'])} | {tokens} | {percent(r['malformed'])} |")
    lines.append("\n\\* not among Multilingual-Thinking's reasoning languages (unseen in training).")
    return "\n".join(lines)


def plot_match_rates(rows: list, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    languages = list(dict.fromkeys(r["reasoning_language"] for r in rows))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(languages)), 4))
    for k, model in enumerate(models):
        rate = {r["reasoning_language"]: r["reasoning_language_match"] or 0 for r in rows if r["model"] == model}
        ax.bar([i + (k - (len(models) - 1) / 2) * width for i in range(len(languages))],
               [100 * rate.get(lang, 0) for lang in languages], width, label=model)
    ax.set_xticks(range(len(languages)), languages, rotation=30)
    ax.set(ylabel="reasoning in the requested language (%)", ylim=(0, 105),
           title="Reasoning-language match per requested language")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generate_eval_outputs(cfg: Config, plan: list):
    """Generate every planned prompt with the tuned model and, with --compare-base, with the base (adapter off)."""
    model, tokenizer = load_for_inference(cfg)
    runs = [("tuned" if cfg.adapter else "base", contextlib.nullcontext())]
    if cfg.compare_base:
        runs.insert(0, ("base", model.disable_adapter()))
    chats = [build_chat(p["prompt"], p["reasoning_language"], p["answer_language"] if p["answer_language_instructed"]
                        else None) for p in plan]
    items = []
    for label, adapter_state in runs:
        with adapter_state:
            outputs = generate(model, tokenizer, chats, cfg.reasoning_effort, cfg.max_new_tokens, cfg.temperature,
                               cfg.seed, progress=f"{label} model", batch_size=cfg.batch_size)
        for p, ids in zip(plan, outputs):
            items.append({"model": label, **p, **split_channels(tokenizer.decode(ids, skip_special_tokens=False)),
                          "tokens": len(ids)})
    return items, tokenizer


def prepare_eval(cfg: Config) -> list:
    """Everything eval can check before loading a model: the output directory, the languages, the input files.
    Returns the outputs to score (--score-file) or the prompts to generate."""
    check_output_dir(cfg)
    if cfg.score_file:
        return read_score_file(cfg.score_file)
    languages = [canonical_language(x, "--reasoning-languages") for x in cfg.reasoning_languages or EVAL_REASONING_LANGUAGES]
    answer_languages = ([canonical_language(x, "--answer-language") for x in _split_list(cfg.answer_language)]
                        if cfg.answer_language else [None])
    questions = read_eval_questions(cfg.eval_file)
    question_languages = cfg.question_languages or list(questions[0]["question"])
    plan = eval_plan(questions, languages, question_languages, answer_languages, cfg.limit, cfg.full_grid)
    print(f"eval: {len(plan)} prompts per model ({min(cfg.limit or len(questions), len(questions))} questions x "
          f"{len(languages)} reasoning languages), questions in {', '.join(question_languages)}")
    return plan


def run_eval(cfg: Config, prepared: list | None = None) -> dict:
    prepared = prepared or prepare_eval(cfg)
    if cfg.score_file:
        items = prepared
        needs_tokens = any(not isinstance(i.get("reasoning_tokens"), int) for i in items)
        tokenizer = load_tokenizer(cfg.model) if needs_tokens else None
    else:
        items, tokenizer = generate_eval_outputs(cfg, prepared)
    for item in items:
        if not isinstance(item.get("reasoning_tokens"), int):
            item["reasoning_tokens"] = len(tokenizer(item["analysis"], add_special_tokens=False)["input_ids"])
        item.update(score_output(item["reasoning_language"], item["analysis"], item.get("final"),
                                 item.get("answer_language"), item.get("expected")))
    rows = summarize_scores(items)
    table = summary_table(rows)
    out = Path(cfg.output_dir)
    claim_output_dir(out, "eval", replace=False)  # each report file is replaced by an atomic write
    write_atomically(out / "eval_results.json", json.dumps({"config": asdict(cfg), "summary": rows, "items": items},
                                                           indent=2, ensure_ascii=False) + "\n")
    write_atomically(out / "eval_summary.md", table + "\n")
    plot_match_rates([r for r in rows if r["reasoning_language"] != "all"], out / "eval_summary.png")
    print(table)
    print(f"\nwrote eval_results.json, eval_summary.md and eval_summary.png to {out}/")
    return {"summary": rows, "items": items}


# -----------------------------------------------------------------------------
# Merge: the adapter folded into the base, one standard checkpoint that serving stacks load without PEFT

MERGE_CHECK_PROMPTS = (("What is 7 x 8?", "German"), ("Quelle est la capitale de l'Australie ?", "French"),
                       ("How many days are there in a leap year?", "Chinese"))


MERGE_TOLERANCE = {"relative_error": 0.05, "top1_agreement": 0.98, "adapter_kept": 0.5}


def merge_agreement(tuned, base, merged) -> dict:
    """How closely the merged model's logits follow base+adapter. Storing W + BA in bf16 rounds every weight by up
    to 2**-9 of itself: on the demo model that moves the logits by 2.2-2.4% (relative L2) and changes the top token
    at under 0.5% of positions. An adapter whose changes are smaller than that rounding is erased by it, as one
    dropped by an MXFP4 base is, so the merged logits must also sit much nearer the tuned model's than the base's."""
    relative = lambda a, b: float((a - b).norm() / b.norm())
    check = {"relative_error": relative(merged, tuned), "top1_agreement": float((merged.argmax(-1) == tuned.argmax(-1))
                                                                               .float().mean()),
             "adapter_effect": relative(tuned, base), "positions": tuned.shape[0]}
    check["adapter_kept"] = 1 - float((merged - tuned).norm() / max(float((tuned - base).norm()), 1e-30))
    check["passed"] = (check["relative_error"] <= MERGE_TOLERANCE["relative_error"]
                       and check["top1_agreement"] >= MERGE_TOLERANCE["top1_agreement"]
                       and check["adapter_kept"] >= MERGE_TOLERANCE["adapter_kept"])
    return check


def run_merge(cfg: Config) -> dict:
    import torch

    check_output_dir(cfg)
    out = Path(cfg.output_dir)
    model, tokenizer = load_for_inference(cfg, dtype=torch.bfloat16)  # MXFP4 dequantized: expert LoRA merges too
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template([build_chat(prompt, language) for prompt, language in MERGE_CHECK_PROMPTS],
                                          add_generation_prompt=True, padding=True, return_tensors="pt",
                                          return_dict=True).to(model.device)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        tuned = model(**batch).logits.float()[real]
        with model.disable_adapter():
            base = model(**batch).logits.float()[real]
        merged = model.merge_and_unload()
        after = merged(**batch).logits.float()[real]
    check = merge_agreement(tuned, base, after)
    numbers = (f"relative difference {check['relative_error']:.2%} (at most {MERGE_TOLERANCE['relative_error']:.0%}), "
               f"same top token at {check['top1_agreement']:.1%} of {check['positions']} positions (at least "
               f"{MERGE_TOLERANCE['top1_agreement']:.0%}); the adapter moves the logits by "
               f"{check['adapter_effect']:.1%} and the merge keeps {check['adapter_kept']:.0%} of that (at least "
               f"{MERGE_TOLERANCE['adapter_kept']:.0%})")
    if not check["passed"]:
        raise RunFailed(f"The merged model does not match base+adapter on {len(MERGE_CHECK_PROMPTS)} check prompts "
                        f"({numbers}), so nothing was written. Serve the adapter unmerged instead (vLLM and "
                        "transformers load LoRA adapters), or train it further if its effect is below bf16 rounding.")
    print(f"verified: merged logits equal base+adapter within bf16 tolerance on {len(MERGE_CHECK_PROMPTS)} prompts: "
          + numbers)

    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config  # the weights are plain bf16 now
    stops = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    eos = merged.generation_config.eos_token_id
    merged.generation_config.eos_token_id = list(dict.fromkeys([*(eos if isinstance(eos, list) else [eos]), *stops]))
    with staged_directory(out) as staging:  # out is empty, or holds an earlier merge that --overwrite replaces
        claim_output_dir(staging, "merge", replace=False)
        merged.save_pretrained(staging, max_shard_size="5GB")
        tokenizer.save_pretrained(staging)
        (staging / "merge_check.json").write_text(json.dumps({**check, "base": adapter_base(cfg),
                                                              "adapter": cfg.adapter, "dtype": "bfloat16"},
                                                             indent=2) + "\n")
    print(f"wrote the merged model to {out}/ (safetensors, config, generation config, tokenizer)")
    return check


# -----------------------------------------------------------------------------
# The offline demo: a tiny random gpt-oss with a small tokenizer that has the harmony tokens and the real template

HARMONY_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                          "<|start|>", "<|end|>", "<|message|>", "<|call|>", "<|endofprompt|>"]


def build_demo_model(directory: Path = DEMO_CACHE / "tiny-gpt-oss") -> Path:
    """Write (once) a tiny gpt-oss checkpoint: 2 layers, 4 experts, a 1k byte-level BPE trained on the sample."""
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast
    from trl.chat_template_utils import gptoss_chat_template

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [json.dumps(row, ensure_ascii=False) for row in read_rows(str(DEMO_DATASET))]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=HARMONY_SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|startoftext|>", eos_token="<|return|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = gptoss_chat_template
    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 4096},
        router_aux_loss_coef=0.9, output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config)
    pretrain_demo_model(model, tokenizer)
    with staged_directory(directory) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return directory


def pretrain_demo_model(model, tokenizer, steps: int = 60):
    """A few seconds of full training on the sample, in English reasoning only, so the demo's base model writes
    harmony-shaped text and its LoRA run starts from a model that already knows the format (as gpt-oss does)."""
    import torch

    rows = [{**row, "reasoning_language": "English"} for row in read_rows(str(DEMO_DATASET))
            if row["reasoning_language"] == "English"]
    batch = [tokenize_chat(tokenizer, row_to_messages(row), train_on_all_tokens=True)["input_ids"] for row in rows]
    width = max(map(len, batch))
    ids = torch.tensor([b + [tokenizer.pad_token_id] * (width - len(b)) for b in batch])
    labels = torch.where(ids == tokenizer.pad_token_id, -100, ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def run_demo(cfg: Config):
    cfg.model = str(build_demo_model())
    if cfg.use_4bit:  # the demo model as gpt-oss ships: experts in MXFP4
        cfg.model = str(write_mxfp4_checkpoint(Path(cfg.model), DEMO_CACHE / "tiny-gpt-oss-mxfp4"))
    if cfg.mode in ("eval", "merge"):
        prepared = prepare_eval(cfg) if cfg.mode == "eval" else check_output_dir(cfg)
        if cfg.adapter is None and not cfg.score_file:  # the demo's adapter, trained first when there is none yet
            if not (Path(DEMO_OUTPUT_DIR) / "adapter_config.json").exists():
                run_train(Config(**{**asdict(cfg), **DEMO_DEFAULTS, "mode": "train", "model": cfg.model,
                                    "batch_size": Config.batch_size}))
                print()
            cfg.adapter = DEMO_OUTPUT_DIR
        run_eval(cfg, prepared) if cfg.mode == "eval" else run_merge(cfg)
        return
    if cfg.mode == "train":
        run_train(cfg)
        if not is_main_process():
            return
        print()
        cfg.adapter = cfg.output_dir
    elif cfg.adapter is None and (Path(cfg.output_dir) / "adapter_config.json").exists():
        cfg.adapter = cfg.output_dir
    print(f"> {cfg.prompt}  [reasoning language: {cfg.reasoning_language}]")
    run_infer(cfg)
    print("\n(The demo model is tiny and random: its words are noise. The point is that every step ran.)")


# -----------------------------------------------------------------------------


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
        if args.print_config:
            print(json.dumps({**asdict(cfg), "runtime": describe_runtime(cfg)}, indent=2))
            return 0
        if not is_main_process():
            sys.stdout = open(os.devnull, "w")  # under a launcher every rank runs this script; rank 0 speaks
            if cfg.mode != "train":
                return 0  # inference, eval and merge run on rank 0 alone
        if cfg.demo:
            os.environ["HF_HUB_OFFLINE"] = "1"
        run = run_demo if cfg.demo else {"train": run_train, "infer": run_infer, "eval": run_eval, "merge": run_merge}[cfg.mode]
        during = {"train": "training", "infer": "inference", "eval": "evaluation", "merge": "merging"}[cfg.mode]
        with out_of_memory_is_a_message(cfg, during):
            run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"\n{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
