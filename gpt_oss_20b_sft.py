#!/usr/bin/env python
"""Fine-tune gpt-oss-20b to reason in the language you ask for, then talk to it.

    python gpt_oss_20b_sft.py                                  # train: LoRA + TRL SFT, the seed recipe
    python gpt_oss_20b_sft.py --config recipes/cookbook.yaml   # the OpenAI Cookbook's recipe instead
    python gpt_oss_20b_sft.py --mode infer --reasoning-language German --prompt "What is 7 x 8?"
    python gpt_oss_20b_sft.py --mode chat --adapter DIR        # talk to it: the model loads once, answers stream
    python gpt_oss_20b_sft.py --mode eval --adapter DIR --compare-base   # reasoning-language match, accuracy
    python gpt_oss_20b_sft.py --mode grpo --adapter DIR --reasoning-languages Chinese   # add a language by RL
    python gpt_oss_20b_sft.py --mode merge --adapter DIR       # one standalone checkpoint for serving
    python gpt_oss_20b_sft.py --demo                           # the whole pipeline offline, on CPU, tiny model
    python gpt_oss_20b_sft.py --print-config                   # the resolved settings (YAML), loads nothing
    torchrun --nproc_per_node=2 gpt_oss_20b_sft.py             # several GPUs (also deepspeed, accelerate launch)

Reads top to bottom: the modes and main(), their settings, train (the recipe), the data and the model it reads and
loads, what makes training quicker or smaller (speed and memory), infer, chat, eval, merge, the demo, and last the
machinery the chapters use: errors, processes and files. Each mode's chapter opens with its settings and its Mode.
"""

import argparse
import atexit
import contextlib
import copy
import csv
import difflib
import errno
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import types
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_type_hints

from trl import TrlParser  # TRL's copy of transformers' HfArgumentParser: it imports no model library

# Heavy libraries (torch, transformers, peft, datasets) are imported inside the functions that use them, so --help
# answers at once and the offline decision is made before any of them reads HF_HUB_OFFLINE.

HERE = Path(__file__).resolve().parent
DEMO_DATASET = HERE / "data" / "demo_sample.jsonl"
DEMO_PRETRAIN = HERE / "data" / "demo_pretrain.jsonl"
DEMO_QUESTIONS = HERE / "data" / "demo_eval_questions.jsonl"
EVAL_QUESTIONS = HERE / "data" / "eval_questions.jsonl"
LANGUAGES_FILE = HERE / "data" / "languages.tsv"
# the tool's own files, kept between runs: the demo's models, and the record of the files chat's /save wrote
CACHE = Path(os.environ.get("GPT_OSS_SFT_CACHE", Path.home() / ".cache" / "gpt_oss_20b_sft"))
DEFAULT_MODEL = "openai/gpt-oss-20b"
DEFAULT_OUTPUT_DIR = "gpt-oss-20b-multilingual-reasoner"
DEMO_OUTPUT_DIR = "demo_output"


# -----------------------------------------------------------------------------
# The modes, and main: parse, derive, validate, then print the settings or run


class Mode:
    """What a mode is, for main(), the parser, the folder record, the offline decision and the out-of-memory message:
    each mode's chapter opens with its own (a subclass, registered in MODES). What is written here holds unless the
    mode says otherwise."""

    name: str  # --mode's value
    summary: str  # what it does, in --mode's help
    settings: type  # its settings: one frozen dataclass of the groups it reads (a run gets no other field)
    during: str  # what the out-of-memory message calls it
    defaults: dict = {}  # settings that differ in this mode (the demo's come on top)
    demo_defaults: dict = {}  # what --demo changes in this mode, on top of DEMO_DEFAULTS
    outputs: str | None = None  # the exact names of the files it writes (None: it writes nothing); see sort_outputs
    output_help: str | None = None  # its default --output_dir, as --help says it
    takes_adapter = True  # --adapter is the adapter it runs (under --demo, where none is given: the demo's)
    streams_model = False  # reads the checkpoint tensor by tensor instead of loading the model
    every_rank = False  # under a launcher every process runs it; otherwise rank 0 alone
    resumes = False  # --resume continues it from its last complete checkpoint

    def run(self, cfg, runtime):
        raise NotImplementedError

    def reads_model(self, cfg) -> bool:
        """Whether this run reads --model at all."""
        return True

    def as_shipped(self, cfg) -> bool:
        """Whether it reads the checkpoint as gpt-oss ships it, experts in MXFP4 (the demo gives it that copy)."""
        return self.streams_model

    def output_dir(self, cfg, adapter: str | None) -> str | None:
        """--output_dir where none is given."""
        return None

    def derive(self, cfg) -> dict:
        """Its settings that follow from others, where the user left them unset (derive() fills model, adapter and
        output_dir)."""
        return {}

    def check(self, cfg):
        """Its rules beyond each field's own (validate() holds every run to those and to what all modes share)."""

    def inputs(self, cfg) -> dict:
        """The files it reads, by the name an error calls them: its output folder must not hold them."""
        return {}

    def strategy(self, cfg, world_size: int) -> str:
        """How the processes of a launch share the run (Runtime.strategy): rank 0 alone, unless the mode says."""
        return "single"

    def describe(self, cfg, runtime) -> dict:
        """What this machine makes of its settings, for --print-config."""
        return {}

    def use_less_memory(self, cfg) -> str:
        """The out-of-memory message's advice: the flags that make it use less."""
        return ""

    def hub_repos(self, cfg) -> list:
        """The Hub repos it reads or writes besides --model."""
        return []

    def check_hub(self, cfg, reads_hub: bool):
        """Refuse at start-up what it would need from the Hub later, when the Hub is offline."""

    def after_demo(self, cfg, runtime):
        """What --demo shows once it has run."""


MODES = {}  # name -> Mode, in the order of their chapters below: --mode's choices, in that order


def register(mode: type) -> type:
    """@register above a mode's class puts its one instance into MODES."""
    MODES[mode.name] = mode()
    return mode


@dataclass(frozen=True)
class Runtime:
    """What this process runs on, found once (find_runtime, in main) and passed down, so no chapter asks again."""
    on_cuda: bool  # a CUDA GPU is there
    device: str  # where this process's model goes: cuda:<local rank> or cpu
    device_name: str  # the GPU's name, or "cpu"
    dtype: object  # the torch dtype weights load in: bf16 on a GPU, fp32 on CPU (for tiny models)
    world_size: int  # processes in the launch, 1 without a launcher
    rank: int  # rank 0 writes and speaks
    strategy: str  # single, ddp, fsdp2, deepspeed-zero3 or deepspeed-file (the mode's strategy())

    @property
    def device_map(self) -> str | None:
        """Each process loads onto its own GPU; under FSDP2 and ZeRO-3 the libraries place (and shard) the weights."""
        return self.device if self.on_cuda and self.strategy in ("single", "ddp") else None


def find_runtime(cfg) -> Runtime:
    import torch  # imports no Hugging Face library

    on_cuda, processes = torch.cuda.is_available(), world_size()
    return Runtime(on_cuda=on_cuda, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if on_cuda else "cpu",
                   device_name=torch.cuda.get_device_name() if on_cuda else "cpu",
                   dtype=torch.bfloat16 if on_cuda else torch.float32, world_size=processes,
                   rank=int(os.environ.get("RANK", "0")), strategy=MODES[cfg.mode].strategy(cfg, processes))


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):  # an ASCII terminal (C locale) shows other letters escaped, not a traceback
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    cfg = mode = None
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        cfg = parse_config(argv)
        mode, runtime = MODES[cfg.mode], find_runtime(cfg)
        if cfg.print_config:
            print(render_config(cfg, runtime))
            sys.stdout.flush()
            return 0
        if runtime.rank:
            sys.stdout = open(os.devnull, "w")  # under a launcher every rank runs this script; rank 0 speaks
            if not mode.every_rank:
                return 0
        decide_offline(cfg)
        quiet_library_warnings(runtime.on_cuda)
        note = gpu_note(cfg, runtime.on_cuda)
        if note:
            print(f"note: {note}")
        if cfg.demo:
            ensure_demo_model(cfg)
        with out_of_memory_is_a_message(cfg):
            if cfg.demo:
                ensure_demo_adapter(cfg)
            mode.run(cfg, runtime)
            if cfg.demo:
                mode.after_demo(cfg, runtime)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (| head): end quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"\n{e}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"\n{e if isinstance(e, Interrupted) else 'interrupted; nothing half-written was left behind'}",
              file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"\n{e}", file=sys.stderr)
        return 143
    except Exception as e:
        if not out_of_room(e):
            raise
        out = Path(cfg.output_dir) if cfg and mode and mode.outputs and cfg.output_dir else None
        if out and is_main_process():
            with contextlib.suppress(OSError):  # the record's own rewrite may find no room either
                remove_unfinished(out)
        filename = getattr(e, "filename", None)
        where = Path(filename or out or ".").absolute()
        disk = next(p for p in (where, *where.parents) if p.is_dir())
        what = filename or (f"the outputs into {out}" if out else "a file")
        print(f"\nWriting {what} failed: {no_room_reason(e)}; {human_size(shutil.disk_usage(disk).free)} free now on "
              f"the disk that holds {disk}. What was being written was removed; nothing half-written is left. Make "
              "room and run the same command again" + (
                  ", with --resume to continue from the last checkpoint" if mode and mode.resumes else "") + ".",
              file=sys.stderr)
        return 1
    finally:
        release_folders()
        end_process_group()
    return 0


# -----------------------------------------------------------------------------
# Settings: a group of fields for each mode and for what modes share, each field once with its default, one help
# line, other spellings and the rule it must meet; a run gets its mode's groups and no other field


def setting(default=None, help="", *aliases, check=None, factory=None, section=None):
    """A settings field: its default, its --help line, other flag names (each in both spellings), the name of the
    rule validate() holds it to, and the heading --help shows above it, where a group is long."""
    names = list(dict.fromkeys(s for a in aliases for s in (f"--{a}", f"--{a.replace('_', '-')}")))
    metadata = {"help": help, "aliases": names, "check": check, "section": section}
    return field(default_factory=factory, metadata=metadata) if factory else field(default=default, metadata=metadata)


@dataclass(frozen=True)
class CommonSettings:
    """what to run (every mode)"""
    mode: "Literal[tuple(MODES)]" = setting(  # the registered modes' names, read when the parser is built
        "train", "{modes}; --mode X --help lists X's settings")
    demo: bool = setting(False, "the whole pipeline offline on CPU: a tiny gpt-oss, the bundled rows, base vs tuned at the end")
    print_config: bool = setting(False, "print the resolved settings as YAML (--json: JSON) and exit; they work as a --config")
    json: bool = setting(False, "print JSON: --print-config's settings, infer's answer ({reasoning_language, analysis, "
                                "final, complete, tokens})")
    model: str | None = setting(None, f"hub id or local directory (default {DEFAULT_MODEL}; with --adapter: its base)")
    adapter: str | None = setting(None, "a LoRA adapter directory from train mode ({adapter_modes}; train refuses it: "
                                        "--resume continues a run)")
    output_dir: str | None = setting(None, "where outputs go (default: {output_dirs}; {no_outputs} write nothing)",
                                     "output")
    overwrite: bool = setting(False, "replace this mode's earlier outputs in --output_dir (never files it did not write)")
    local_rank: int | None = setting(None, argparse.SUPPRESS)  # the deepspeed launcher passes it to every mode


@dataclass(frozen=True)
class ModelSettings:
    """the model and what it is told ({readers}; merge streams the checkpoint)"""
    use_4bit: bool = setting(False, "keep the experts in MXFP4 as shipped, dequantized one layer at a time: 14 GB of "
                                    "weights instead of 42")
    attn_implementation: Literal["auto", "eager", "flex_attention"] = setting(
        "auto", "auto: flex_attention on CUDA, eager on CPU (sdpa and flash-attention cannot apply gpt-oss's sinks)")
    reasoning_effort: Literal["low", "medium", "high"] = setting(
        "medium", "the system prompt's 'Reasoning:' level: train renders it, infer, chat and eval ask with it")
    allow_any_language: bool = setting(False, "send a language name the detector does not know as typed (train, infer, "
                                              "chat; eval's detector must know the language)")
    seed: int = setting(42, "random seed", check="seed")


class ModelMode(Mode):
    """A mode that loads the model and runs it (train, infer, chat, eval): what its model settings add."""

    def as_shipped(self, cfg) -> bool:
        return cfg.use_4bit

    def any_language(self, cfg) -> bool:
        """Whether a language name the table does not know goes through as typed."""
        return cfg.allow_any_language

    def describe(self, cfg, runtime) -> dict:
        return dict(attn_implementation=resolve_attention(cfg.attn_implementation, runtime.on_cuda),
                    experts="MXFP4, dequantized per layer" if cfg.use_4bit else "bf16")


@dataclass(frozen=True)
class GenerationSettings:
    """generation ({readers})"""
    answer_languages: list[str] | None = setting(None, "language of the final answer (eval: several, rotated)",
                                                 "answer_language")
    temperature: float = setting(0.6, "sampling temperature; 0 = greedy", check="not_negative")
    max_new_tokens: int = setting(512, "tokens to generate at most", check="positive")


class GenerationMode(ModelMode):
    """A mode that generates answers (infer, chat, eval): what its generation settings add."""

    def derive(self, cfg) -> dict:
        return dict(answer_languages=language_names(cfg.answer_languages, "--answer-language", self.any_language(cfg)))

    def check(self, cfg):
        if cfg.answer_languages is not None and not cfg.answer_languages:
            raise UsageError("--answer-language is empty: name a language or leave the flag out")

    def use_less_memory(self, cfg, smaller_batches: str = "") -> str:
        return (f"To use less: --max_new_tokens {max(cfg.max_new_tokens // 2, 1)}{smaller_batches}"
                + ("" if cfg.use_4bit else ", --use_4bit (the weights take 14 GB instead of 42 GB for gpt-oss-20b)") + ".")


@dataclass(frozen=True)
class PreflightSettings:
    """preflight: will this fit my GPU, and how fast is it? ({readers}; speed.json has the numbers)"""
    random_init: bool = setting(False, "random weights of the model's shapes, built on the GPU (no download)")
    synthetic_data: int | None = setting(None, "N generated rows with Multilingual-Thinking's lengths instead of "
                                               "--dataset", check="positive")


# What --demo changes, each for a reason (each mode takes the ones among its settings): its rows and questions, written
# for a 2-layer model (data/make_demo_data.py); a learning rate and passes that teach a tiny model the instruction in a
# minute of CPU (NOTES.md); no gradient checkpointing, which saves memory a tiny model does not need and costs CPU
# time; room for its three-sentence reasoning and the answer (at 96 tokens 24% of the tuned toy's held-out answers
# were cut off before the final channel, 16% at 224: the rest are loops that no length ends; NOTES.md).
DEMO_DEFAULTS = dict(dataset=str(DEMO_DATASET), max_seq_length=512, learning_rate=3e-2, num_train_epochs=10,
                     gradient_checkpointing=False, max_new_tokens=224, eval_file=str(DEMO_QUESTIONS),
                     reasoning_language="German")
DEMO_QUESTION = "What is 7 plus 8?"  # infer's, where no question is piped in; none of the demo's data asks it (a test)


class HelpFormatter(argparse.HelpFormatter):
    """One line of help per flag, with its default after the mode's and the demo's layers (none where it is worked
    out from other settings; the help line says how)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        return f"{action.help} (default: {str(shown).replace('%', '%%')})"

    def _format_action_invocation(self, action):
        """The snake_case names once (the kebab-case twins work too), then what the flag takes."""
        names = [s for s in action.option_strings if "-" not in s.lstrip("-")] or action.option_strings[:1]
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{names[0]}, --no-{names[0][2:].replace('_', '-')}"
        if action.nargs == 0:
            return ", ".join(names)
        takes = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices else "A,B" if action.nargs == "+"
                 else {"int": "N", "float": "X"}.get(getattr(action.type, "__name__", ""), "TEXT"))
        return f"{', '.join(names)} {takes}"


class OneLineErrors:
    """argparse's errors as one line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class FirstPass(OneLineErrors, argparse.ArgumentParser):
    """Reads what picks the groups and the layers of defaults (--mode, --demo, --config) before the full parse."""


class Parser(OneLineErrors, TrlParser):
    """TRL's parser over one mode's groups of settings (both spellings of every flag, help from the fields, YAML
    recipes with --config, the command line winning), with one-line errors, no abbreviations (--lr is no flag),
    --x/--no-x for every switch and the help in sections, one per group."""

    def __init__(self, mode: str):
        # an unknown mode is refused by --mode's choices (a recipe's: parse)
        mode = mode if mode in MODES else CommonSettings.mode
        super().__init__(MODES[mode].settings.__bases__[::-1], prog="gpt_oss_20b_sft.py", allow_abbrev=False,
                         formatter_class=HelpFormatter,
                         usage=f"%(prog)s [--mode {{{','.join(MODES)}}}] [--demo] [--config FILE.yaml] "
                               "[--print-config] [options]",
                         description=f"LoRA fine-tuning of gpt-oss-20b so it reasons in the language you ask for, and "
                                     f"what comes after. These are --mode {mode}'s settings (--mode X --help: X's). "
                                     "Every flag takes snake_case and kebab-case spellings.")
        self.add_argument("--config", metavar="FILE.yaml", help="a recipe: settings in YAML (see recipes/); flags on "
                          "the command line win")

    # private: _add_dataclass_arguments, _parse_dataclass_field (HfArgumentParser); checked against transformers 5.23.0
    def _add_dataclass_arguments(self, dtype):
        group, hints = self.add_argument_group(with_modes(dtype.__doc__, dtype)), get_type_hints(dtype)
        for f in fields(dtype):
            group = self.add_argument_group(f.metadata["section"]) if f.metadata["section"] else group
            f.type, text = hints[f.name], with_modes(f.metadata["help"], dtype)
            if f.type in (bool, bool | None):
                group.add_argument(*dict.fromkeys((f"--{f.name}", f"--{f.name.replace('_', '-')}")),
                                   action=argparse.BooleanOptionalAction, default=f.default, help=text)
            else:  # the check is for validate() and the section for the line above, not for argparse
                plain = copy.copy(f)
                plain.metadata = {**{k: v for k, v in f.metadata.items() if k not in ("check", "section")}, "help": text}
                self._parse_dataclass_field(group, plain)

    def knows(self, flag: str) -> str | None:
        """The field a flag (any of its spellings, --no-x included) sets in this mode, or None."""
        # private: argparse's _option_string_actions; checked against Python 3.11.7
        action = self._option_string_actions.get(flag)
        return action.dest if action and action.dest != "help" else None


def with_modes(text: str, group: type) -> str:
    """A help text with the modes' facts put in from MODES, so that a mode shows in --help by being registered:
    {modes} what each does, {readers} the modes that read this group, {adapter_modes} those that take --adapter,
    {output_dirs} their default output folders and {no_outputs} those that write nothing."""
    summaries = [mode.summary for mode in MODES.values()]
    readers = [name for name, mode in MODES.items() if group in mode.settings.__mro__]
    facts = {"{modes}": ", ".join(summaries[:-1]) + " or " + summaries[-1],
             "{readers}": f"--mode {readers[0]}" if len(readers) == 1 else ", ".join(readers),
             "{adapter_modes}": ", ".join(name for name, mode in MODES.items() if mode.takes_adapter),
             "{output_dirs}": ", ".join(mode.output_help for mode in MODES.values() if mode.outputs),
             "{no_outputs}": listed([name for name, mode in MODES.items() if not mode.outputs])}
    for placeholder, fact in facts.items():
        text = text.replace(placeholder, fact)
    return text


def readers(flag: str) -> str | None:
    """The modes that read a flag, as a phrase ("an infer, chat and eval"), or None where none does."""
    modes = listed([mode for mode in MODES if Parser(mode).knows(flag)])
    return modes and ("an " if modes[0] in "aeiou" else "a ") + modes


def listed(names: list) -> str | None:
    """["a", "b", "c"] -> "a, b and c"; None for none."""
    return names and (", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) or None


def parse(argv: list) -> CommonSettings:
    """Defaults in layers, each over the last: the fields', the mode's, the demo's, a --config recipe's; then the
    command line. The mode (--mode, else the recipe's) picks the groups of settings; a setting of another mode, on
    the command line or in the recipe, is refused with the modes that read it."""
    first = FirstPass(add_help=False, allow_abbrev=False)
    first.add_argument("--mode")
    first.add_argument("--demo", action=argparse.BooleanOptionalAction)
    first.add_argument("--config")
    picked, _ = first.parse_known_args(argv)
    recipe = read_recipe(picked.config) if picked.config else {}
    mode = picked.mode or recipe.get("mode", CommonSettings.mode)
    if not picked.mode and not (isinstance(mode, str) and mode in MODES):  # the command line's: --mode's choices
        raise UsageError(f"--mode: {mode!r} is not a valid value; choose from {', '.join(MODES)}")
    demo = picked.demo if picked.demo is not None else recipe.get("demo", False)
    parser, run = Parser(mode), MODES.get(mode, MODES[CommonSettings.mode]).settings
    names = [f.name for f in fields(run)]
    for key in (k for k in recipe if k not in names):
        if parser.knows(f"--{key}"):  # an old name of a field, e.g. eval's max_samples, now max_questions
            raise UsageError(f"--config {picked.config}: {key} is {parser.knows(f'--{key}')} in --mode {mode}: "
                             "rename it")
        if readers(f"--{key}"):  # e.g. a recipe printed before the settings were split by mode, which held them all
            raise UsageError(f"--config {picked.config}: {key} is {readers(f'--{key}')} setting; --mode {mode} does "
                             "not read it: drop it")
        close = difflib.get_close_matches(key, [n for n in names if n != "local_rank"], n=1)  # hidden flag
        raise UsageError(f"--config {picked.config}: unknown setting {key!r}"
                         + (f" (did you mean {close[0]}?)" if close else "; --help lists them"))
    parser.set_defaults_with_config(**{**(MODES[mode].defaults if mode in MODES else {}),
                                       **(DEMO_DEFAULTS | MODES.get(mode, Mode).demo_defaults if demo else {}), **recipe})
    namespace, unknown = parser.parse_known_args(argv)
    for flag in (arg.split("=")[0] for arg in unknown if arg.startswith("--")):
        if readers(flag):
            parser.error(f"{flag} is {readers(flag)} setting; --mode {mode} does not read it")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return run(**{name: getattr(namespace, name) for name in names})


def read_recipe(path: str) -> dict:
    """A --config file: a YAML mapping of settings (what --print-config prints)."""
    import yaml

    try:
        recipe = yaml.safe_load(read_text_file(path, "--config"))
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {path} must be a YAML mapping of settings, e.g. 'learning_rate: 2.0e-4'")
    recipe.pop("runtime", None)  # what --print-config --json adds about the machine; not a setting
    for key, value in recipe.items():  # nothing nests: YAML anchors nested in lists could expand to gigabytes
        if isinstance(value, dict) or isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            raise UsageError(f"--config {path}: {key} holds nested values; a setting is a number, a string or a list "
                             "of strings")
    return recipe


def parse_config(argv: list | None = None) -> CommonSettings:
    """The settings of this run: parsed in layers, derived, validated, then frozen."""
    return validate(derive(parse(list(sys.argv[1:] if argv is None else argv))))


def _flat(values):
    """Comma- or space-separated values as one list: --target_modules q_proj,v_proj = --target_modules q_proj v_proj."""
    if values is None:
        return None
    return [v.strip() for value in ([values] if isinstance(values, str) else values) for v in str(value).split(",")
            if v.strip()]


@functools.lru_cache(maxsize=None)
def known_languages() -> dict:
    """Every spelling of the detector's 75 languages, casefolded: English name, ISO code, own name -> the English
    name every mode writes. Read from data/languages.tsv (made from lingua and langcodes, checked by a test), so that
    only eval, which detects languages, needs lingua, and no mode needs langcodes."""
    spellings = {}
    for line in read_text_file(LANGUAGES_FILE, "the language table").splitlines()[1:]:
        name, codes, names = line.split("\t")
        spellings.update({s.casefold(): name for s in (name, *codes.split(), *filter(None, names.split("|")))})
    return spellings


def language_name(name: str, flag: str, any_language: bool = False, detected: bool = False) -> str:
    """One rule for every mode: "german", " GERMAN ", "de", "deu", "de-CH", "Deutsch" -> "German", the name the
    training rows use (a different name is a different token: " german" is not " German"). `detected`: the mode
    reads the language with the detector, so only the names it knows will do (no --allow-any-language)."""
    if not isinstance(name, str):  # a row's value can be anything JSON holds
        raise UsageError(f"{flag}: {name!r} is not a language name (write it as text, e.g. \"German\")")
    return _language_name(name, flag, any_language, detected)


@functools.lru_cache(maxsize=None)
def _language_name(name: str, flag: str, any_language: bool, detected: bool) -> str:
    text = " ".join(name.split())
    if not text:
        raise UsageError(f"{flag} is empty: name a language, e.g. {flag} German")
    spellings, key = known_languages(), text.casefold()
    # the language of a BCP 47 tag (pt-BR, zh-Hant) or of a name with its variant (Chinese (Traditional))
    variant = re.fullmatch(r"([a-z]{2,3})(?:[-_][a-z0-9]{1,8})+|(.+?) ?\(.*\)", key)
    known = spellings.get(key) or variant and spellings.get(variant.group(1) or variant.group(2))
    if known or any_language:
        return known or text
    names = sorted(set(spellings.values()))
    close = difflib.get_close_matches(text.title(), names, n=3, cutoff=0.6)
    raise UsageError(f"{flag}: unknown language {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else "")
                     + f" ({len(names)} languages are known by English name, ISO code or native name; "
                       + ("the language detector knows no other)" if detected
                          else "--allow-any-language sends another name as typed)"))


PATHS = ("model", "adapter", "compare_adapter", "output_dir", "dataset", "eval_file", "score_file", "deepspeed")  # settings naming a file


def derive(cfg: CommonSettings) -> CommonSettings:
    """Fill the settings that follow from others, where the user left them unset (None), group by group. A value
    given is kept, so --print-config's output, fed back with --config, resolves to the same settings."""
    for name, value in asdict(cfg).items():
        if name in PATHS and isinstance(value, str) and not value.strip():  # e.g. an unset shell variable
            raise UsageError(f"--{name} is empty: give a path, or leave the flag out for the default")
    mode = MODES[cfg.mode]
    adapter = cfg.adapter or (DEMO_OUTPUT_DIR if cfg.demo and mode.takes_adapter and mode.reads_model(cfg) else None)
    model = cfg.model or (str(demo_model_dir(mode.as_shipped(cfg))) if cfg.demo
                          else adapter_base(adapter) if adapter else None) or DEFAULT_MODEL
    return replace(cfg, adapter=adapter, model=model, output_dir=cfg.output_dir or mode.output_dir(cfg, adapter),
                   **mode.derive(cfg))


def language_names(names, flag: str, any_language: bool, detected: bool = False) -> list | None:
    """Comma- or space-separated language names, each by the one rule (language_name), each once; none is an error."""
    if names is None:
        return None
    named = list(dict.fromkeys(language_name(n, flag, any_language, detected) for n in _flat(names)))
    if not named:
        raise UsageError(f"{flag} names no language: name one, e.g. {flag} German, or leave the flag out")
    return named


RULES = {"positive": (lambda v: v > 0, "must be a positive integer"),
         "above_zero": (lambda v: v > 0, "must be greater than 0"),
         "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
         "not_negative": (lambda v: v >= 0, "cannot be negative"),
         "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)")}  # what numpy's seeding takes


def _is(value, kind) -> bool:
    """Whether a value (a recipe's YAML can hold anything) has a field's type."""
    for option in kind.__args__ if isinstance(kind, types.UnionType) else (kind,):
        origin = getattr(option, "__origin__", None)
        if (value is None if option is type(None) else value in option.__args__ if origin is Literal
                else isinstance(value, list) and all(isinstance(v, str) for v in value) if origin is list
                else isinstance(value, (int, float)) and not isinstance(value, bool) if option is float
                else isinstance(value, option) and not (option is int and isinstance(value, bool))):
            return True
    return False


def validate(cfg: CommonSettings) -> CommonSettings:
    """Every rule the settings must meet, checked before anything is loaded or written; each error names its flag.
    The rules of a group apply where the run has that group."""
    hints, values = get_type_hints(type(cfg)), asdict(cfg)
    for f in fields(cfg):
        value, flag = values[f.name], f"--{f.name}"
        if not _is(value, hints[f.name]):
            raise UsageError(f"{flag}: {value!r} is not a valid value"
                             + (f"; choose from {', '.join(hints[f.name].__args__)}"
                                if getattr(hints[f.name], "__origin__", None) is Literal else ""))
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        rule = f.metadata["check"]
        if rule and value is not None and not RULES[rule][0](value):
            also = ", ".join(a for a in f.metadata["aliases"] if "-" not in a.lstrip("-"))  # what was typed
            raise UsageError(f"{flag}{f' ({also})' if also else ''} {RULES[rule][1]}, got {value}")
    mode = MODES[cfg.mode]
    if not mode.outputs and (cfg.output_dir or cfg.overwrite):
        raise UsageError(f"--mode {cfg.mode} writes nothing: --output_dir and --overwrite are for "
                         + listed([name for name, other in MODES.items() if other.outputs]))
    mode.check(cfg)
    if mode.reads_model(cfg) and not cfg.demo and looks_local(cfg.model) and not Path(cfg.model).expanduser().is_dir():
        raise UsageError(f"model directory {cfg.model} does not exist; give a local gpt-oss directory or a hub id")
    if cfg.adapter and not cfg.demo and not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {cfg.adapter} is not a LoRA adapter directory (no adapter_config.json); "
                         "pass the --output_dir of a train run")
    return cfg


def render_config(cfg: CommonSettings, runtime: Runtime) -> str:
    """--print-config: the settings (a recipe --config reads back) and what this machine makes of them."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("print_config", "local_rank")}
    runtime = describe_runtime(cfg, runtime)
    if cfg.json:
        return json.dumps({**settings, "runtime": runtime}, indent=2)
    import yaml

    return (yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
            + "# on this machine: " + json.dumps(runtime) + "\n")


def gpu_note(cfg: CommonSettings, on_cuda: bool) -> str | None:
    """One line, before anything else fails, for a machine with no GPU asked to run a hub model (full size: every
    gpt-oss is 20B or more; local models are counted once their config is read)."""
    mode = MODES[cfg.mode]
    if on_cuda or cfg.demo or mode.streams_model or not mode.reads_model(cfg) or looks_local(cfg.model):
        return None
    return (f"there is no CUDA GPU here and {cfg.model} is a full-size model: training needs a GPU with >= 80 GB"
            " and inference one with >= 24 GB (--use_4bit); on CPU, --demo and tiny local models run")


def describe_runtime(cfg: CommonSettings, runtime: Runtime) -> dict:
    """What this machine turns the settings into: device and dtype; attention and experts where a model is loaded;
    batching and strategy where one is trained."""
    described = {"device": runtime.device_name, "dtype": str(runtime.dtype).removeprefix("torch."),
                 **MODES[cfg.mode].describe(cfg, runtime)}
    return {**described, **({"note": note} if (note := gpu_note(cfg, runtime.on_cuda)) else {})}


# -----------------------------------------------------------------------------
# Train (the options that make it quicker or smaller live in "Speed and memory", after Model)


@dataclass(frozen=True)
class TrainSettings:
    """data ({readers})"""
    dataset: str = setting("HuggingFaceH4/Multilingual-Thinking", "hub dataset id or a local .jsonl/.json/.parquet file")
    dataset_split: str = setting("train", "split of a hub dataset")
    reasoning_languages: list[str] | None = setting(None, "keep only the rows reasoning in these languages (default: all)")
    max_samples: int | None = setting(None, "only the first N rows", "limit", check="positive")
    max_seq_length: int = setting(2048, "tokens per row; longer rows are cut", "max_length", check="positive")
    train_on_all_tokens: bool = setting(False, "loss on every token, as the Cookbook did (default: the assistant's "
                                               "analysis, final and <|return|> only)")
    lora_r: int = setting(16, "LoRA rank", check="positive", section="LoRA")
    lora_alpha: int = setting(16, "LoRA alpha (the update is scaled by alpha / r)", check="positive")
    lora_dropout: float = setting(0.0, "LoRA dropout", check="fraction")
    target_modules: list[str] = setting(help="Linear layers to adapt (comma or space separated)",
                                        factory=lambda: ["q_proj", "v_proj"])
    target_parameters: list[str] = setting(help="expert tensors to adapt, e.g. mlp.experts.gate_up_proj,"
                                                "mlp.experts.down_proj", factory=list)
    resume: bool = setting(False, "continue from the newest complete checkpoint in --output_dir", section="training")
    batch_size: int = setting(8, "rows per device per micro-batch", "per_device_train_batch_size", check="positive")
    gradient_accumulation_steps: int = setting(2, "micro-batches per optimizer step", check="positive")
    learning_rate: float = setting(2e-5, "peak learning rate", check="above_zero")
    lr_scheduler_type: str = setting("cosine", "learning-rate schedule, one of transformers' (cosine, linear, "
                                               "cosine_with_min_lr, ...)")
    min_lr_rate: float | None = setting(None, "cosine_with_min_lr: the last learning rate as a fraction of the peak",
                                        check="fraction")
    warmup_ratio: float = setting(0.1, "share of the steps spent warming up", check="fraction")
    num_train_epochs: float = setting(3.0, "passes over the data", check="above_zero")
    max_steps: int | None = setting(None, "stop after N optimizer steps", check="positive")
    eval_split: float | None = setting(None, "hold out this fraction of the rows for an evaluation loss after each "
                                             "epoch", check="fraction")
    optim: str = setting("adamw_torch_fused", "optimizer, one of transformers' names")
    weight_decay: float = setting(0.01, "weight decay", check="not_negative")
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass to save memory")
    recompute_every_nth_layer: int = setting(1, "with --gradient-checkpointing: recompute every N-th decoder layer "
                                                "only, the others keep their activations (2+: quicker steps on GPUs "
                                                "with memory to spare; --checkpoint-every is its old name)",
                                             "checkpoint_every", check="positive")
    router_aux_loss_coef: float = setting(0.0, "MoE load-balancing loss weight (TRL would add 0.9 x the config's)",
                                          check="not_negative")
    compile: bool = setting(False, "torch.compile each decoder layer's MoE block (router and experts), dynamic shapes")
    packing: bool = setting(False, "each micro-batch's rows in one padding-free sequence, each masked to itself")
    sampler: Literal["batch_rebalance", "random", "group_by_length"] = setting(
        "batch_rebalance", "how rows become micro-batches: batch_rebalance draws each step as random does, with less "
                           "padding")
    chunked_loss: bool = setting(True, "TRL's loss without the full-vocabulary logits (off: the Cookbook's)")
    logging_steps: int = setting(1, "log every N optimizer steps", check="positive")
    save_steps: int = setting(50, "checkpoint every N optimizer steps", check="positive")
    save_total_limit: int = setting(2, "checkpoints kept", check="positive")
    report_to: Literal["trackio", "wandb", "tensorboard", "none"] = setting(
        "trackio", "experiment tracking (trackio logs stay local)")
    trackio_project: str = setting("gpt-oss-20b-sft", "trackio project")
    run_name: str | None = setting(None, "run name in the tracker (default: the output folder's name and the time)")
    push_to_hub: bool = setting(False, "upload the adapter to the Hub after training")
    hub_model_id: str | None = setting(None, "repo for --push_to_hub, e.g. you/gpt-oss-20b-multilingual-reasoner")
    fsdp: bool = setting(False, "FSDP2: shard the model over the GPUs (default under a launcher: DDP)",
                         section="several GPUs: run the script under torchrun, deepspeed or accelerate launch (README)")
    deepspeed: str | None = setting(None, "zero3 (the built-in ZeRO-3 preset; default under the deepspeed launcher) or "
                                          "a DeepSpeed JSON file")


# One frozen object per run: the fields of its mode's groups and no others. A dataclass lays out the fields of its
# bases from the last base to the first, so the common settings come first (and --help shows the groups so).
@dataclass(frozen=True)
class TrainRun(PreflightSettings, TrainSettings, ModelSettings, CommonSettings):
    """--mode train"""


# What a Trainer run of this tool leaves (train's and grpo's): the adapter, its tokenizer, the summary and card, the
# checkpoints and staging folder; the last five are what the Trainer writes into a checkpoint
TRAINER_OUTPUTS = (r"adapter_model\.safetensors|adapter_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|"
                   r"chat_template\.jinja|training_args\.bin|run_summary\.json|README\.md|checkpoint-\d+|\.final\.tmp|"
                   r"optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|trainer_state\.json")


@register
class Train(ModelMode):
    """--mode train: a LoRA adapter trained on the rows with TRL's SFTTrainer."""

    name, settings, during = "train", TrainRun, "training"
    summary = "train an adapter"
    output_help = f"train {DEFAULT_OUTPUT_DIR}, demo {DEMO_OUTPUT_DIR}"
    outputs = TRAINER_OUTPUTS + r"|speed\.json|loss_curve\.png"
    takes_adapter = False  # it makes one
    every_rank = resumes = True

    def run(self, cfg, runtime):
        return run_train(cfg, runtime)

    def output_dir(self, cfg, adapter):
        return DEMO_OUTPUT_DIR if cfg.demo else DEFAULT_OUTPUT_DIR

    def derive(self, cfg):
        return dict(target_modules=_flat(cfg.target_modules), target_parameters=_flat(cfg.target_parameters),
                    reasoning_languages=language_names(cfg.reasoning_languages, "--reasoning-languages",
                                                       self.any_language(cfg)),
                    deepspeed=cfg.deepspeed or ("zero3" if cfg.local_rank is not None and not cfg.fsdp else None))

    def check(self, cfg):
        if cfg.adapter:
            raise UsageError(f"--adapter is for {listed([n for n, m in MODES.items() if m.takes_adapter])}: train makes "
                             "a new adapter from --model (to continue a run, pass its --output_dir with --resume)")
        if not cfg.target_modules and not cfg.target_parameters:
            raise UsageError("nothing to train: give --target_modules and/or --target_parameters")
        if (cfg.lr_scheduler_type == "cosine_with_min_lr") != (cfg.min_lr_rate is not None):
            raise UsageError("--lr_scheduler_type cosine_with_min_lr and --min_lr_rate go together (the last learning "
                             "rate as a fraction of the peak, e.g. 0.1)")
        if cfg.use_4bit and cfg.target_parameters:
            raise UsageError("--use_4bit keeps the expert weights in MXFP4, so LoRA cannot train them: drop "
                             "--target_parameters or --use_4bit")
        check_training_run(cfg)
        if cfg.push_to_hub and not cfg.hub_model_id:
            raise UsageError("--push_to_hub needs --hub_model_id, e.g. --hub_model_id you/gpt-oss-20b-multilingual")
        if cfg.recompute_every_nth_layer > 1 and not cfg.gradient_checkpointing:
            raise UsageError("--recompute-every-nth-layer chooses which layers --gradient-checkpointing recomputes: "
                             "drop one of them")
        if cfg.recompute_every_nth_layer > 1 and cfg.fsdp:
            raise UsageError("--recompute-every-nth-layer applies to the Trainer's checkpointing; under --fsdp FSDP "
                             "checkpoints every layer itself: drop --recompute-every-nth-layer")
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

    def inputs(self, cfg):
        return {"the dataset": cfg.dataset}

    def strategy(self, cfg, world_size):
        return distributed_strategy(cfg, world_size)

    def describe(self, cfg, runtime):
        return {**super().describe(cfg, runtime), "packing": cfg.packing, "sampler": cfg.sampler,
                "world_size": runtime.world_size, "strategy": runtime.strategy,
                "effective_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * runtime.world_size}

    def use_less_memory(self, cfg):
        return (f"To use less: --batch_size {max(cfg.batch_size // 2, 1)} --gradient_accumulation_steps "
                f"{cfg.gradient_accumulation_steps * 2} (same effective batch), --max_seq_length "
                f"{max(cfg.max_seq_length // 2, 256)}"
                + ("" if cfg.gradient_checkpointing else ", --gradient_checkpointing")
                + ("" if cfg.chunked_loss else ", --chunked-loss")
                + ("" if cfg.attn_implementation in ("auto", "flex_attention") else ", --attn-implementation flex_attention")
                + ("" if cfg.use_4bit else ", --use_4bit (experts in MXFP4: 14 GB of weights instead of 42)")
                + ". Check what fits before a real run with --random-init --synthetic-data 1000 --max-steps 4.")

    def hub_repos(self, cfg):
        dataset = [] if cfg.synthetic_data or Path(cfg.dataset).expanduser().exists() else [cfg.dataset]
        return dataset + ([cfg.hub_model_id] if cfg.push_to_hub else [])

    def check_hub(self, cfg, reads_hub):
        """--push_to_hub is checked here, not after the training it would follow."""
        if not cfg.push_to_hub:
            return
        if hub_offline():
            raise UsageError(f"--push_to_hub: the Hugging Face Hub is {'unreachable' if reads_hub else 'offline'} "
                             "(HF_HUB_OFFLINE or no network); train without it and upload the folder later")
        from huggingface_hub import get_token

        if not get_token():
            raise UsageError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")

    def after_demo(self, cfg, runtime):
        # a preflight (random weights or synthetic rows) ends with its measurement: nothing to answer with
        if runtime.rank == 0 and not (cfg.random_init or cfg.synthetic_data):
            demo_answer(cfg)


def check_training_run(cfg):
    """The rules of a Trainer run's own flags, train's and grpo's."""
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise UsageError(f"--report_to {cfg.report_to} needs its package: pip install {cfg.report_to} (or --report_to none)")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pick one")


def distributed_strategy(cfg: TrainRun, world_size: int) -> str:
    """single, ddp, fsdp2, deepspeed-zero3 or deepspeed-file. Under a launcher without a flag: DDP, because the
    LoRA gradients to all-reduce are a few MB and one GPU holds the whole model; --fsdp and --deepspeed shard it."""
    if cfg.deepspeed:
        return "deepspeed-zero3" if cfg.deepspeed == "zero3" else "deepspeed-file"
    if cfg.fsdp:
        return "fsdp2"
    return "ddp" if world_size > 1 else "single"


def run_train(cfg: TrainRun, runtime: Runtime | None = None):
    """main() passes the runtime; a run started by other code (the demo's steps, the tests) finds it."""
    import torch

    runtime = runtime or find_runtime(cfg)
    on_cuda = runtime.on_cuda
    check_output_dir(cfg)
    chats = training_chats(cfg)
    config = load_model_config(cfg.model)
    resolve_attention(cfg.attn_implementation, on_cuda)
    check_loadable(cfg.model, config, cfg.use_4bit, cfg.random_init)
    shape = trainable_here(cfg.model, config, on_cuda)
    n_params = sum(p.numel() for p in shape.parameters())
    check_training_names(cfg, shape)
    tokenizer = load_tokenizer(cfg.model)
    dataset, held_out, stats = training_dataset(cfg, tokenizer, chats)
    steps_per_run = optimizer_steps_per_run(cfg, len(dataset), runtime.world_size)
    if finished_run(cfg, steps_per_run):
        return None
    sampler = sampler_for(cfg, len(dataset), runtime.world_size)
    if sampler != cfg.sampler:
        print(f"sampler: {sampler} instead of {cfg.sampler}, which would repeat rows to fill the last optimizer step")
    if runtime.rank == 0:
        claim_output_dir(Path(cfg.output_dir), "train", replace_own=not cfg.resume, settings=run_settings(cfg))
        if cfg.demo and not cfg.resume:  # its table measured the adapter this run replaces: gone with it, even if
            remove_output_folder(Path(cfg.output_dir) / "eval")  # this run is stopped before its own table
    args = build_sft_config(cfg, runtime, sampler)  # before the model: ZeRO-3 and FSDP2 shape how it is loaded
    model = training_model(cfg, config, runtime)
    meter = make_speed_meter(model, runtime)
    callbacks = [meter, make_nonfinite_guard(cfg.output_dir), make_sigterm_stop()] + [
        make_checkpoint_recorder(cfg.output_dir)] * (runtime.rank == 0)
    trainer = make_trainer(cfg, model, tokenizer, dataset, args, callbacks, held_out)
    trainer.model.print_trainable_parameters()
    print(f"processes: {runtime.world_size}, strategy: {runtime.strategy}")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, trainer, meter, steps_per_run)
    summary = save_run(cfg, runtime, trainer, result, meter, chats, stats, n_params, sampler)
    if runtime.rank:
        return trainer
    print(f"saved adapter, model card (README.md), run_summary.json, speed.json and loss_curve.png to {cfg.output_dir}/ "
          f"(loss {summary['train_loss_first']:.3f} -> {summary['train_loss_last']:.3f}; {stats['rows_truncated']} of "
          f"{stats['rows_used']} rows cut at {cfg.max_seq_length} tokens)")
    if cfg.push_to_hub:
        push_adapter(Path(cfg.output_dir), cfg.hub_model_id)
    print(json.dumps(summary["speed"]))  # also in speed.json, which bench/benchmark.sh reads
    return trainer


def training_chats(cfg: TrainRun) -> list:
    """The conversations to train on, every row checked before anything is loaded."""
    rows = (synthetic_rows(cfg.synthetic_data, cfg.seed, cfg.max_seq_length) if cfg.synthetic_data
            else read_rows(cfg.dataset, cfg.dataset_split))
    return prepare_chats(rows, cfg.reasoning_languages, cfg.max_samples, cfg.allow_any_language)


def training_dataset(cfg: TrainRun, tokenizer, chats: list) -> tuple:
    """(rows to train on, rows held out by --eval_split or None, statistics): token ids and labels, rows cut at
    --max_seq_length."""
    from datasets import Dataset

    examples, stats = tokenize_chats(tokenizer, chats, cfg.max_seq_length, cfg.train_on_all_tokens,
                                     cfg.reasoning_effort)
    if not examples:
        raise UsageError(f"every row lost all its labelled tokens at --max_seq_length {cfg.max_seq_length}; raise it")
    print(f"data: {stats['rows_used']} rows, {stats['rows_truncated']} cut at {cfg.max_seq_length} tokens, "
          f"{stats['tokens_per_epoch']:,} tokens per epoch ({stats['labelled_tokens_per_epoch']:,} with loss)")
    dataset = Dataset.from_list(examples)
    if not cfg.eval_split:
        return dataset, None, stats
    held_out = round(len(dataset) * cfg.eval_split)
    if not 1 <= held_out < len(dataset):
        raise UsageError(f"--eval_split {cfg.eval_split} of {len(dataset)} rows holds out {held_out}; it must leave at "
                         "least one row on each side")
    split = dataset.train_test_split(test_size=held_out, seed=cfg.seed)
    print(f"held out {held_out} rows for the evaluation loss")
    return split["train"], split["test"], {**stats, "rows_used": len(split["train"]), "rows_held_out": held_out}


def optimizer_steps_per_run(cfg, rows: int, world_size: int = 1) -> int:
    """Train's over its rows, grpo's over its completions (a row each)."""
    batches = math.ceil(rows / (cfg.batch_size * world_size))
    return math.ceil(batches / cfg.gradient_accumulation_steps) * math.ceil(cfg.num_train_epochs)


def build_sft_config(cfg: TrainRun, runtime: Runtime, sampler: str | None = None):
    from trl import SFTConfig

    on_cuda, settings = runtime.on_cuda, asdict(cfg)
    arguments = dict(
        {name: settings[name] for name in (  # the settings SFTConfig takes under the same name
            "output_dir", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "num_train_epochs",
            "optim", "weight_decay", "seed", "logging_steps", "save_steps", "save_total_limit", "hub_model_id",
            "router_aux_loss_coef")},  # router_aux_loss_coef: TRL's default would read 0.9 from the gpt-oss config
        per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_kwargs={} if cfg.min_lr_rate is None else {"min_lr_rate": cfg.min_lr_rate},
        warmup_steps=cfg.warmup_ratio,  # transformers 5 reads a float below 1 as a fraction of all steps
        max_length=None if cfg.packing else cfg.max_seq_length,  # rows are cut to max_seq_length beforehand
        padding_free=cfg.packing,
        pad_to_multiple_of=FLEX_BLOCK if not cfg.packing and (cfg.attn_implementation, on_cuda) in (
            ("flex_attention", True), ("auto", True)) else None,  # length buckets: a flex shape and cached mask each
        train_sampling_strategy=sampler or cfg.sampler,  # transformers' own; the loss is normalised over the step
        max_steps=cfg.max_steps or -1,
        eval_strategy="epoch" if cfg.eval_split else "no",
        per_device_eval_batch_size=cfg.batch_size,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5.23's name; gradient_checkpointing warns
        activation_checkpointing_kwargs={"every_n_layers": cfg.recompute_every_nth_layer},
        bf16=on_cuda,
        use_cpu=not on_cuda,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (the default hides it) so the run can stop on it
        save_strategy="steps",
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        project=cfg.trackio_project,
        run_name=cfg.run_name or f"{Path(cfg.output_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}",
        trackio_space_id=None,  # trackio logs stay on this machine
        trackio_static_space_id=False,
        push_to_hub=False,  # pushed once, explicitly, after the adapter is saved
        dataloader_num_workers=0,
    )
    return SFTConfig(**{**arguments, **parallel_arguments(cfg, runtime.strategy)})


def parallel_arguments(cfg: TrainRun, strategy: str) -> dict:
    """What each strategy adds to the Trainer's arguments (accelerate does the rest)."""
    if strategy == "fsdp2":  # FSDP's own activation checkpointing replaces the Trainer's
        return {"fsdp": True, "fsdp_config": fsdp2_config(cfg), "activation_checkpointing": False}
    if strategy.startswith("deepspeed"):
        return {"deepspeed": zero3_config() if cfg.deepspeed == "zero3" else cfg.deepspeed}
    return {"ddp_find_unused_parameters": False} if strategy == "ddp" else {}


def fsdp2_config(cfg: TrainRun) -> dict:
    """--fsdp: FSDP2 over the decoder layers, full state dict on save, weights loaded once on rank 0's CPU."""
    return {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["GptOssDecoderLayer"], "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": True,
            "activation_checkpointing": cfg.gradient_checkpointing}


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


def training_model(cfg: TrainRun, config, runtime: Runtime):
    """The model to train, placed (and under ZeRO-3 partitioned) as the strategy wants it."""
    deepspeed = runtime.strategy.startswith("deepspeed")
    if deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # accelerate does this on GPUs only; ZeRO-3's loading needs it everywhere
    model = load_model(cfg.model, config, runtime.dtype, resolve_attention(cfg.attn_implementation, runtime.on_cuda),
                       runtime.device, runtime.device_map, use_4bit=cfg.use_4bit, random_init=cfg.random_init,
                       seed=cfg.seed, training=True)
    if deepspeed:
        from deepspeed.utils import set_z3_leaf_modules
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        set_z3_leaf_modules(model, [GptOssMLP])  # routing is data-dependent: ZeRO-3 must fetch a layer's experts whole
    # private: config._attn_implementation; checked against transformers 5.23.0
    if cfg.packing or model.config._attn_implementation == "flex_attention":
        attach_document_masks(model)
    if cfg.compile:  # regional: 24 copies of one small graph compile once, where the whole model would take minutes
        for layer in model.model.layers:
            layer.mlp.compile(dynamic=True)
    if runtime.on_cuda or cfg.compile:
        watch_recompiles()
    return model


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


def make_sigterm_stop():
    """A Trainer callback for SIGTERM (what SLURM and Kubernetes send before they kill a job): the step under way
    ends, a checkpoint is saved, and the run stops there (stopped_by_sigterm then says so)."""
    from transformers import TrainerCallback

    class StopOnSigterm(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            TRAINING.set()

        def on_step_end(self, args, state, control, **kwargs):
            if TERMINATED.is_set():
                control.should_save = control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            TRAINING.clear()

    return StopOnSigterm()


def stopped_by_sigterm(trainer):
    """After trainer.train(): a run that SIGTERM stopped ends here, with its checkpoint and one line (exit 143)."""
    if TERMINATED.is_set():
        last = latest_checkpoint(Path(trainer.args.output_dir))
        raise Terminated(f"terminated (SIGTERM) at step {trainer.state.global_step}; the last checkpoint is {last}: run "
                         "the same command with --resume to continue from it")


def make_checkpoint_recorder(output_dir: str):
    """A Trainer callback adding each checkpoint to the output folder's record: as being written when its save is due,
    with its files once saved (a run killed in between leaves it recorded as cut short)."""
    from transformers import TrainerCallback

    out = Path(output_dir)

    class RecordCheckpoints(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                record(out, out / f"checkpoint-{state.global_step}", pending=True)

        def on_save(self, args, state, control, **kwargs):
            folder = out / f"checkpoint-{state.global_step}"
            was = (read_marker(out) or {}).get("written", {}).get(folder.name)
            record(out, folder, since=was[1] if isinstance(was, list) and was[0] == "pending" else None)

    return RecordCheckpoints()


def make_trainer(cfg: TrainRun, model, tokenizer, train_dataset, args, callbacks=(), eval_dataset=None):
    from transformers import Trainer
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl import SFTTrainer

    class SeededSFTTrainer(SFTTrainer):
        def create_model_card(self, *args, **kwargs):
            """Nothing: TRL's card would land in the output folder at each checkpoint, outside any record; the run
            writes its own (render_model_card) with the adapter."""

        # private: Trainer._get_train_sampler, BatchRebalanceSampler; checked against transformers 5.23.0
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, BatchRebalanceSampler):  # transformers 5.23 leaves its seed at 42 whatever --seed is;
                sampler.seed = self.args.seed  # seeded as the random sampler is, it draws the same rows for each step
            return sampler

    class FullLogitsSFTTrainer(SeededSFTTrainer):
        """The Cookbook-era loss, for the benchmark baseline: the model's own cross-entropy over full fp32 logits.
        TRL 1.16 always fuses the LM head (its loss_type picks nll or dft only), so this needs its own compute_loss."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    trainer_class = SeededSFTTrainer if cfg.chunked_loss else FullLogitsSFTTrainer
    return trainer_class(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=build_lora_config(cfg), callbacks=list(callbacks))


def build_lora_config(cfg: TrainRun):
    from peft import LoraConfig

    modules = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules or None  # PEFT's spelling
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=modules, target_parameters=cfg.target_parameters or None,
                      task_type="CAUSAL_LM")


def finished_run(cfg, steps_per_run: int) -> bool:
    """With --resume, whether the run trained all its steps and saved its adapter: then there is nothing to do (said
    so). One that stopped before saving its adapter goes on: train() takes the adapter from the last checkpoint."""
    done = trained_steps(Path(cfg.output_dir)) if cfg.resume else 0
    if not cfg.resume or done < (cfg.max_steps or steps_per_run):
        return False
    if (Path(cfg.output_dir) / "adapter_config.json").is_file():  # moved in last: the adapter is whole
        print(f"{cfg.output_dir} holds a finished run ({done} steps): nothing to resume; --overwrite trains it "
              "again (a longer run is a new run: another --output_dir)")
        return True
    print(f"{cfg.output_dir}: the run trained all {done} steps and stopped before its adapter was saved; saving it "
          "from the last checkpoint")
    return False


def train(cfg, trainer, meter=None, steps_per_run: int = 0):
    """trainer.train(), resumed from the newest complete checkpoint with --resume; out of memory and a stop on NaN
    end the progress bar first and become RunFailed; Ctrl-C and SIGTERM say where the run stopped. Train's and
    grpo's (cfg needs output_dir, resume and save_steps; a speed meter prints its numbers on out of memory)."""
    import torch

    checkpoint = latest_checkpoint(Path(cfg.output_dir)) if cfg.resume else None
    if checkpoint:
        cut = [c.name for c in Path(cfg.output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", c.name)
               and int(c.name[11:]) > int(checkpoint.name[11:])]
        print(f"resuming from {checkpoint}" + (f" (skipping {', '.join(sorted(cut))}: cut short while being saved, "
                                               "or missing files)" if cut else ""))
    if checkpoint and trained_steps(Path(cfg.output_dir)) >= (cfg.max_steps or steps_per_run) and not (
            trainer.is_deepspeed_enabled):  # ZeRO-3 holds the weights partitioned until train() gathers them
        return finished_checkpoint(trainer, checkpoint)
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as e:
        if meter:
            print(json.dumps({"oom": True, **meter.summary(steps_per_run)}))
        raise RunFailed(out_of_memory_advice(cfg, *gpu_memory_state())) from e
    except (RunFailed, KeyboardInterrupt) as e:
        trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)  # closes the progress bar
        if isinstance(e, RunFailed):
            raise
        last = latest_checkpoint(Path(cfg.output_dir))
        raise Interrupted(f"interrupted at step {trainer.state.global_step}; " + (
            f"the last checkpoint is {last}: run the same command with --resume to continue from it" if last
            else f"no checkpoint was written yet (one every --save_steps {cfg.save_steps})")) from None
    except Exception as e:
        if out_of_room(e):  # the progress bar ends before main's paragraph, not after it
            trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
        raise
    stopped_by_sigterm(trainer)
    return result


def finished_checkpoint(trainer, checkpoint: Path):
    """The adapter and the state of a checkpoint at the run's last step, put into the trainer without training:
    transformers 5.23, resumed at max_steps inside an epoch, trains one step more before it checks."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return TrainOutput(trainer.state.global_step, 0.0, {})


def save_run(cfg: TrainRun, runtime: Runtime, trainer, result, meter, chats, stats, n_params: int, sampler: str) -> dict:
    """The adapter, tokenizer, run_summary.json, speed.json, loss_curve.png and model card, moved into the output
    folder file by file with adapter_config.json last. Every rank takes part in saving (sharded weights are
    gathered); rank 0 writes the rest and returns the summary."""
    import torch

    out, staging = Path(cfg.output_dir), Path(cfg.output_dir) / ".final.tmp"
    if runtime.rank == 0:
        record(out, staging, pending=True)
    trainer.save_model(str(staging))
    if runtime.strategy.startswith("deepspeed"):
        # private: transformers.integrations.deepspeed.unset_hf_deepspeed_config; checked against transformers 5.23.0
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # later loads in this process (the demo's inference on rank 0) are not sharded
    if runtime.rank:
        return {}
    history = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and "step" in e]
    # private: config._attn_implementation and _experts_implementation; checked against transformers 5.23.0
    settings = asdict(cfg)
    speed = {**meter.summary(optimizer_steps_per_run(cfg, stats["rows_used"], runtime.world_size)),
             "attn_implementation": trainer.model.config._attn_implementation,
             "experts_implementation": trainer.model.config._experts_implementation, "sampler": sampler,
             **{name: settings[name] for name in ("packing", "chunked_loss", "gradient_checkpointing",
                                                      "recompute_every_nth_layer", "compile", "use_4bit", "batch_size",
                                                      "gradient_accumulation_steps", "max_seq_length")},
             "rows": stats["rows_used"]}
    summary = {
        "config": settings,
        "sampler_used": sampler,
        "versions": library_versions(),
        "device": runtime.device_name if runtime.on_cuda else f"cpu ({platform.processor() or platform.machine()})",
        "model_parameters": n_params,
        "reasoning_languages": sorted({reasoning_language_of({}, chat) or "unknown" for chat in chats}),
        "distributed": {"world_size": runtime.world_size, "strategy": runtime.strategy},
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "data": stats,
        "train_loss_first": history[0][1] if history else None,
        "train_loss_last": history[-1][1] if history else None,
        "eval_loss": [round(e["eval_loss"], 4) for e in trainer.state.log_history if "eval_loss" in e],
        "optimizer_steps": trainer.state.global_step,
        "tokens_seen": next((int(e["num_tokens"]) for e in reversed(trainer.state.log_history) if "num_tokens" in e), 0),
        "runtime_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
        "peak_gpu_memory_gib": speed["peak_memory_gib"]["allocated"],
        "speed": speed,
    }
    plot_loss(history, staging / "loss_curve.png", f"{Path(cfg.model).name} LoRA r={cfg.lora_r}")
    (staging / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (staging / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    (staging / "README.md").write_text(render_model_card(summary))
    move_staged_into_place(staging, out)
    return summary


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "trackio"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def plot_loss(history: list, path: Path, title: str):
    from matplotlib.figure import Figure  # no pyplot: no backend to pick, no figure to close

    ax = Figure(figsize=(7, 4)).subplots()
    steps, losses = zip(*history) if history else ((), ())
    ax.plot(steps, losses, marker="o" if len(steps) < 30 else None)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)


def render_model_card(summary: dict) -> str:
    """The adapter's README.md: what it is, how it was trained, what training measured, how to run it."""
    cfg, data = summary["config"], summary["data"]
    iso = {}
    for spelling, name in known_languages().items():  # each language's ISO 639-1 code comes first in the table
        if len(spelling) == 2:
            iso.setdefault(name, spelling)
    codes = [iso[name] for name in summary.get("reasoning_languages", []) if name in iso]
    from huggingface_hub import ModelCardData

    base = cfg["model"]
    on_hub = lambda source: not Path(source).exists()  # the card's metadata and links name hub ids only
    repo = cfg["hub_model_id"] or "<this adapter's directory or repo id>"
    langs = ", ".join(summary.get("reasoning_languages", []))
    loss = lambda v: "n/a" if v is None else f"{v:.4f}"
    metadata = ModelCardData(base_model=base if on_hub(base) else None, library_name="peft", license="apache-2.0",
                             datasets=[cfg["dataset"]] if on_hub(cfg["dataset"]) and not cfg["synthetic_data"] else None,
                             language=codes or None, tags=["gpt-oss", "lora", "sft", "trl", "multilingual-reasoning"])
    return f"""---
{"" if on_hub(base) else f"# base model: local directory {base}{chr(10)}"}{metadata.to_yaml()}
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
| system prompt | `Reasoning: {cfg["reasoning_effort"]}` (ask with `--reasoning_effort {cfg["reasoning_effort"]}`, `reasoning_effort="{cfg["reasoning_effort"]}"` in `apply_chat_template`) |

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


# -----------------------------------------------------------------------------
# Data (--synthetic-data's generated rows live in "Speed and memory", after Model)

REQUIRED_FLAT_COLUMNS = ("reasoning_language", "user", "analysis", "final")
REASONING_PREFIX = "reasoning language: "


def jsonl_lines(path: Path, what: str):
    """(line number, parsed value) for each non-blank line; a line that is not JSON, or names a key twice, is a
    UsageError naming it."""
    for number, line in enumerate(read_text_file(path, what).splitlines(), 1):
        if line.strip():
            try:
                value = json.loads(line, object_pairs_hook=one_value_per_key)
            except json.JSONDecodeError as e:
                raise UsageError(f"{what} {path} line {number} is not valid JSON ({e.msg}); one object per line") from e
            except UsageError as e:
                raise UsageError(f"{what} {path} line {number}: {e}") from None
            yield number, value


def one_value_per_key(pairs: list) -> dict:
    """json's object hook: a key given twice is an error (json.loads would keep the last value without a word)."""
    keys = [key for key, _ in pairs]
    twice = next((key for key in keys if keys.count(key) > 1), None)
    if twice is not None:
        raise UsageError(f"the key {twice!r} is given twice; which value is meant?")
    return dict(pairs)


DATA_FILES = (".jsonl", ".json", ".parquet", ".csv")  # what read_rows reads


def looks_local(source: str) -> bool:
    """A path rather than a hub id: a hub id is "name" or "owner/name", without a file suffix."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).suffix.lower() in (
        *DATA_FILES, ".txt", ".tsv", ".xlsx", ".arrow", ".yaml", ".safetensors")


def read_rows(source: str, split: str = "train") -> list:
    """Rows of a local .jsonl/.json/.parquet/.csv file or of a hub dataset, as plain dicts."""
    path = Path(source).expanduser()
    if not path.exists():
        if looks_local(source):
            raise UsageError(f"dataset file {source} does not exist; give an existing {'/'.join(DATA_FILES)} file "
                             "or a hub dataset id")
        import datasets
        try:
            return datasets.load_dataset(source, split=split).to_list()
        except Exception as e:  # the hub raises many types; the user needs the message only
            raise _hub_error(source, e) if hub_offline() else UsageError(
                f"could not load dataset {source!r} split {split!r}: {str(e).splitlines()[0]}") from e
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in DATA_FILES:
        kind = "a directory" if path.is_dir() else f"a {suffix or 'suffix-less'} file"
        raise UsageError(f"dataset {source} is {kind}; datasets are read from {', '.join(DATA_FILES)} files")
    if not os.access(path, os.R_OK):
        raise UsageError(f"dataset file {source} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise UsageError(f"dataset file {source} is empty; it needs rows in the Multilingual-Thinking schema")
    if suffix == ".parquet":
        import pyarrow.parquet  # datasets' dependency; datasets itself would cache a copy and print progress bars

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises many types
            raise UsageError(f"dataset file {source} could not be read as parquet: {str(e).splitlines()[0]}") from e
    elif suffix == ".csv":  # the csv module keeps every value a string ("4" stays "4"); datasets would make it 4
        rows = list(csv.DictReader(io.StringIO(read_text_file(path, "dataset file"), newline="")))
    elif suffix == ".json":
        try:
            rows = json.loads(read_text_file(path, "dataset file"), object_pairs_hook=one_value_per_key)
        except json.JSONDecodeError as e:
            raise UsageError(f"{source} is not valid JSON ({e}); expected a list of rows") from e
        except UsageError as e:
            raise UsageError(f"dataset file {source}: {e}") from None
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
    else:
        rows = []
        for number, row in jsonl_lines(path, "dataset file"):
            if not isinstance(row, dict):
                raise UsageError(f"dataset file {source} line {number} is {json.dumps(row)[:40]}, not an object "
                                 "(a row): one object per line")
            rows.append(row)
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
            # "reasoning language: X\n\n" with no developer text renders as the flat columns do, without the blank end
            content = m["content"].rstrip() if m["role"] in ("system", "developer") else m["content"]
            message = {"role": m["role"], "content": content}
            if m["role"] == "assistant" and m.get("thinking") is not None:
                message["thinking"] = m["thinking"]
            chat.append(message)
    else:
        missing = [c for c in REQUIRED_FLAT_COLUMNS if c not in row]
        if missing:
            raise UsageError(f"{where}: missing column(s) {', '.join(missing)}; a row needs 'messages' or the "
                             f"columns {', '.join(REQUIRED_FLAT_COLUMNS)} (and optionally 'developer')")
        for column in REQUIRED_FLAT_COLUMNS + ("developer",):
            if column in row and not isinstance(row[column], str) and (row[column] is not None or column not in (
                    "developer", "analysis")):  # a null analysis gets the message about missing reasoning below
                raise UsageError(f"{where}: column {column!r} must be a string, got "
                                 f"{'null' if row[column] is None else type(row[column]).__name__}")
        system = REASONING_PREFIX + row["reasoning_language"]
        if row.get("developer"):
            system += "\n\n" + row["developer"]
        chat = [{"role": "system", "content": system}, {"role": "user", "content": row["user"]},
                {"role": "assistant", "content": row["final"], "thinking": row["analysis"]}]
    if chat[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the last message must be the assistant's answer")
    thinking = chat[-1].get("thinking")
    if thinking is not None and not isinstance(thinking, str):
        raise UsageError(f"{where}: the assistant turn's 'thinking' must be a string, got {type(thinking).__name__}")
    if not isinstance(thinking, str) or not thinking.strip():
        raise UsageError(f"{where}: the assistant turn has no 'thinking' (the analysis channel to learn from)")
    if not chat[-1]["content"].strip():
        raise UsageError(f"{where}: the assistant turn's final answer is empty (nothing to learn to answer)")
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


def with_language(chat: list, name: str) -> list:
    """The chat with its "reasoning language: X" line naming the language as name."""
    for i, m in enumerate(chat):
        if m["role"] in ("system", "developer") and m["content"].lower().startswith(REASONING_PREFIX):
            _, newline, rest = m["content"][len(REASONING_PREFIX):].partition("\n")
            return [*chat[:i], {**m, "content": REASONING_PREFIX + name + newline + rest}, *chat[i + 1:]]
    return chat


def prepare_chats(rows: list, languages: list | None = None, max_samples: int | None = None,
                  any_language: bool = False) -> list:
    """Validate every row, name its reasoning language by the rule of the flags (language_name), keep the requested
    languages, take the first max_samples."""
    chats = []
    for index, row in enumerate(rows):
        where = f"row {index + 1}"  # counted from 1, as lines are
        chat = row_to_messages(row, where=where)
        language = reasoning_language_of(row, chat)
        if language is not None:
            try:
                language = language_name(language, "reasoning_language", any_language)
            except UsageError as e:
                raise UsageError(f"{where}: {e}") from None
            chat = with_language(chat, language)
        chats.append((language, chat))
    if languages:
        wanted = {language_name(lang, "--reasoning-languages", True) for lang in languages}
        present = sorted({lang for lang, _ in chats if lang})
        chats = [(lang, chat) for lang, chat in chats if lang in wanted]  # lang went through language_name above
        if not chats:
            raise UsageError(f"no rows with reasoning language {', '.join(languages)}; the data has "
                             f"{', '.join(present) or 'no reasoning_language information'}")
    return [chat for _, chat in chats[:max_samples]]


ESCAPED_CONTROL = "\U000f0000\U000f0001"  # stands for "<|" inside message text while the template renders (same length)


@functools.lru_cache(maxsize=None)
def _added_tokens(tokenizer) -> re.Pattern:
    return re.compile("(" + "|".join(map(re.escape, sorted(tokenizer.added_tokens_encoder, key=len, reverse=True))) + ")")


def encode_chat(tokenizer, chat: list, chat_template: str | None = None, assistant_mask: bool = False,
                where: str = "row", **template_kwargs) -> dict:
    """input_ids (and the assistant mask) of one chat, with any "<|end|>", "<|return|>", ... inside its text encoded as
    plain text, as openai-harmony does, so a question about a token or an answer quoting one cannot end a turn.
    By hand because transformers' sanitize_control_tokens encodes such a string apart from the text around it
    (" <|end|>" as " ", "<|"... where harmony has " <|", ...) and cannot return the assistant mask (5.23)."""
    from jinja2 import TemplateError
    # private: transformers.utils.chat_template_utils' render_jinja_template; checked against transformers 5.23.0
    from transformers.utils.chat_template_utils import render_jinja_template

    escaped = [{k: v.replace("<|", ESCAPED_CONTROL) if isinstance(v, str) else v for k, v in m.items() if v is not None}
               for m in chat]
    try:
        rendered, spans = render_jinja_template(
            [escaped], chat_template=chat_template or tokenizer.chat_template,
            return_assistant_tokens_mask=assistant_mask, **{**tokenizer.special_tokens_map, **template_kwargs})
    except TemplateError as e:
        raise UsageError(f"{where}: the chat template refuses it: {e}") from None
    text, spans = rendered[0], spans[0] if spans else []
    ids, starts, position = [], [], 0
    for piece in _added_tokens(tokenizer).split(text):  # the template's own control tokens, and the text between
        if piece in tokenizer.added_tokens_encoder:
            ids.append(tokenizer.added_tokens_encoder[piece])
            starts.append(position)
        elif piece:
            out = tokenizer(piece.replace(ESCAPED_CONTROL, "<|"), add_special_tokens=False, split_special_tokens=True,
                            return_offsets_mapping=True)
            ids += out["input_ids"]
            starts += [position + a for a, _ in out["offset_mapping"]]
        position += len(piece)
    mask = [int(any(a <= start < b for a, b in spans)) for start in starts] if assistant_mask else None
    return {"input_ids": ids, "assistant_masks": mask}


def tokenize_chat(tokenizer, chat: list, train_on_all_tokens: bool = False, where: str = "row",
                  reasoning_effort: str = "medium") -> dict:
    """input_ids and labels of one conversation; labels are -100 outside the assistant's turn.

    TRL's training version of the gpt-oss template marks the assistant turn, from its <|start|>assistant through
    the analysis and final channels to <|return|>; the system preamble (with today's date), the developer message
    and the user turn get no loss.
    """
    from trl.chat_template_utils import get_training_chat_template

    out = encode_chat(tokenizer, chat, get_training_chat_template(tokenizer), assistant_mask=True, where=where,
                      reasoning_effort=reasoning_effort)
    ids = out["input_ids"]
    labels = ids[:] if train_on_all_tokens else [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]
    return {"input_ids": ids, "labels": labels}


@functools.lru_cache(maxsize=None)
def longest_token(tokenizer) -> int:
    """The most characters one token spans: its vocabulary form's length (bytes, for a byte-level BPE)."""
    return max(map(len, tokenizer.get_vocab()))


def tokenize_chats(tokenizer, chats: list, max_length: int, train_on_all_tokens: bool = False,
                   reasoning_effort: str = "medium"):
    """Tokenize and cut to max_length, keeping the start as TRL does. Returns (examples, stats); rows left with no
    labelled token are dropped."""
    # each text is first cut to twice what max_length tokens can span: a 50 MB row is never tokenized whole, and the
    # tokens kept are those of the whole row (the cut can reach them only through one word that long)
    keep = 2 * max_length * longest_token(tokenizer)
    examples, truncated, dropped = [], 0, 0
    for index, chat in enumerate(chats):
        chat = [{k: v[:keep] if isinstance(v, str) else v for k, v in m.items()} for m in chat]
        ex = tokenize_chat(tokenizer, chat, train_on_all_tokens, f"training example {index + 1}", reasoning_effort)
        if len(ex["input_ids"]) > max_length:
            truncated += 1
            ex = {k: v[:max_length] for k, v in ex.items()}
            if all(label == -100 for label in ex["labels"][1:]):
                dropped += 1
                continue
        examples.append(ex)
    lengths = [len(ex["input_ids"]) for ex in examples]
    labelled = sum(sum(label != -100 for label in ex["labels"][1:]) for ex in examples)
    return examples, {"rows_used": len(examples), "rows_truncated": truncated, "rows_dropped_no_labels_left": dropped,
                      "tokens_per_epoch": sum(lengths), "labelled_tokens_per_epoch": labelled,
                      "longest_row_tokens": max(lengths, default=0)}


# -----------------------------------------------------------------------------
# Model (--use_4bit's MXFP4 experts and the masks of --packing and flex attention live in "Speed and memory", next)


def load_model_config(source: str):
    """The model's config; refuses anything that is not gpt-oss before a single weight is read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(source, e) from e
    if config.model_type != "gpt_oss":
        raise UsageError(f"{source} is a {config.model_type!r} model, not gpt-oss; this script trains gpt-oss "
                         "(openai/gpt-oss-20b or a directory with a gpt_oss config)")
    return config


def meta_model(config):
    """The model's modules with no weights behind them: parameter counts and layer names without loading."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(unquantized_config(config))


def trainable_here(source: str, config, on_cuda: bool):
    """The model's shape (meta_model); a model of over 1B parameters is refused on a machine without CUDA."""
    shape = meta_model(config)
    n_params = sum(p.numel() for p in shape.parameters())
    if not on_cuda and n_params > 1e9:
        raise UsageError(f"{source} has {n_params / 1e9:.1f}B parameters and there is no CUDA GPU here; training "
                         "it needs one with >= 80 GB (H100/H200). The demo (--demo) and tiny local models run on CPU")
    return shape


def check_training_names(cfg: TrainRun, model):
    """What PEFT and transformers would reject after loading, refused before: LoRA targets that are not in the model,
    optimizer and schedule names transformers does not know."""
    from torch import nn
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for flag, value, known in (("--optim", cfg.optim, [o.value for o in OptimizerNames]),
                               ("--lr_scheduler_type", cfg.lr_scheduler_type, [t.value for t in SchedulerType])):
        if value not in known:
            close = difflib.get_close_matches(value, known, n=3)
            raise UsageError(f"{flag} {value!r} is not one of transformers' names"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and name != "lm_head"})
    unknown = [t for t in cfg.target_modules if t != "all-linear" and t not in linear]
    if unknown:
        raise UsageError(f"--target_modules {','.join(unknown)}: no such Linear layer in {cfg.model}; it has "
                         f"{','.join(linear)} (or all-linear)")
    parameters = [name for name, _ in model.named_parameters()]
    for target in cfg.target_parameters:
        if not any(name.endswith("." + target) for name in parameters):
            raise UsageError(f"--target_parameters {target}: no such parameter in {cfg.model}; e.g. "
                             "mlp.experts.gate_up_proj,mlp.experts.down_proj")


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


def checkpoint_quantization(config) -> str | None:
    quant = getattr(config, "quantization_config", None)
    return quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)


def checkpoint_dir(source: str) -> Path:
    """A local directory, or a hub repo's weights and configs (downloaded once into the HF cache)."""
    directory = Path(source)
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(source, allow_patterns=["model*.safetensors", "*.json"]))
        except Exception as e:  # the hub raises many types; the user needs the message only
            raise _hub_error(source, e) from e
    return directory


def checkpoint_files(source: str) -> list:
    """The safetensors files of a local directory or of a hub repo."""
    files = sorted(checkpoint_dir(source).glob("*.safetensors"))
    if not files:
        raise UsageError(f"{source} has no .safetensors weights")
    return files


def load_model(source: str, config, dtype, attention: str, device: str, device_map: str | None,
               use_4bit: bool = False, random_init: bool = False, seed: int = 0, training: bool = False):
    """gpt-oss from source (a local directory or a hub id) in dtype, onto device_map (None: where the launcher's
    library places it); with use_4bit the experts stay MXFP4 (random_init: random weights on device), otherwise MXFP4
    experts are dequantized so LoRA can train on them and merge into them."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    kwargs = dict(dtype=dtype, attn_implementation=attention)
    check_loadable(source, config, use_4bit, random_init)
    if use_4bit:
        model = load_mxfp4_model(source, config, device, random_init, seed, **kwargs)
    elif random_init:
        torch.manual_seed(seed)
        with torch.device(device_map or "cpu"):
            model = AutoModelForCausalLM.from_config(unquantized_config(config), **kwargs)
    else:
        if checkpoint_quantization(config) == "mxfp4":
            kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, device_map=device_map, **kwargs)
        except OSError as e:
            raise _hub_error(source, e) from e
    model.config.use_cache = not training
    return model


def check_loadable(source: str, config, use_4bit: bool, random_init: bool = False):
    """What load_model refuses in the config alone; a training run asks before it claims its folder."""
    if use_4bit and not random_init and checkpoint_quantization(config) != "mxfp4":
        raise UsageError(f"--use_4bit keeps the experts in MXFP4 as gpt-oss ships them, but {source}'s experts "
                         "are not MXFP4 (no mxfp4 quantization_config); drop --use_4bit")


# -----------------------------------------------------------------------------
# Speed and memory: what makes a training step quicker or a model fit, kept apart from the recipe. The sampler
# (batch_rebalance), the speed meter behind speed.json, --synthetic-data's rows for a preflight (with --random-init: will
# this fit my GPU, and how fast is it?), --use_4bit's MXFP4 experts, and the masks of --packing and flex attention


def sampler_for(cfg: TrainRun, rows: int, processes: int = 1) -> str:
    """The sampler to use: batch_rebalance gives every micro-batch of a step at least one row, repeating rows when the
    last step has fewer rows than micro-batches; there random, which trains each row once, takes its place."""
    micro_batches = cfg.gradient_accumulation_steps * processes
    last_step_rows = rows % (cfg.batch_size * micro_batches)
    return "random" if cfg.sampler == "batch_rebalance" and 0 < last_step_rows < micro_batches else cfg.sampler


def make_speed_meter(model, runtime: Runtime, warmup_steps: int = 2):
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
            if runtime.on_cuda:
                torch.cuda.synchronize()
            self.start, self.real, self.padded = time.perf_counter(), 0, 0

        def on_step_end(self, args, state, control, **kwargs):
            if runtime.on_cuda:
                torch.cuda.synchronize()
            self.steps.append((time.perf_counter() - self.start, self.real, self.padded))

        def summary(self, optimizer_steps_per_run: int) -> dict:
            measured = self.steps[warmup_steps:] if len(self.steps) > warmup_steps else self.steps[-1:]
            seconds = sum(m[0] for m in measured)  # 0 when no step finished (e.g. out of memory in the first)
            step_seconds = seconds / len(measured) if measured else None
            # Counted on this process; the other ranks get batches of the same size, hence x world size.
            per_second = lambda i: round(sum(m[i] for m in measured) * runtime.world_size / seconds, 1) if seconds else None
            gib = lambda peak: round(peak() / 2**30, 2) if runtime.on_cuda else None
            return {"gpu": runtime.device_name, "processes": runtime.world_size,
                    "steps_measured": len(measured),
                    "step_seconds": round(step_seconds, 3) if step_seconds is not None else None,
                    "tokens_per_second": per_second(1), "padded_tokens_per_second": per_second(2),
                    "real_token_share": round(sum(m[1] for m in measured) / max(sum(m[2] for m in measured), 1), 3),
                    "peak_memory_gib": {"allocated": gib(torch.cuda.max_memory_allocated),
                                        "reserved": gib(torch.cuda.max_memory_reserved)},
                    "optimizer_steps_per_run": optimizer_steps_per_run,
                    "projected_run_minutes": round(optimizer_steps_per_run * step_seconds / 60, 2) if measured else None}

    meter = SpeedMeter()
    model.register_forward_pre_hook(meter.count, with_kwargs=True)
    return meter


# Multilingual-Thinking's tokens per row, log-normal (mean 1,200); NOTES.md says how it was fitted
LENGTH_PROFILE = {"mu": 6.928, "sigma": 0.57, "min": 256, "max": 8192}


SYNTHETIC_LANGUAGES = ("English", "French", "German", "Spanish", "Italian")


SYNTHETIC_WORDS = ("the of and to in is that it for on with as was at by this be are from or have an they which one "
                   "you were all there would their we him been has when who will more no if out so what up its about "
                   "into than them can only other new some could time these two may then do first any my now such "
                   "like our over even most made after also did many before must through back years where much way "
                   "well down should because each just those people how too little state good very make world still "
                   "own see work long get here between both life being under never day same another know while last "
                   "might great old year off come since against go came right used take three").split()


def synthetic_rows(n: int, seed: int = 0, max_tokens: int | None = None) -> list:
    """n rows in the dataset's flat schema, about one word per token, lengths drawn from LENGTH_PROFILE and capped at
    max_tokens (what a run at that --max_seq_length keeps of a real row)."""
    import random

    rng = random.Random(seed)
    longest = min(LENGTH_PROFILE["max"], max_tokens or LENGTH_PROFILE["max"])
    rows = []
    for i in range(n):
        total = int(min(max(rng.lognormvariate(LENGTH_PROFILE["mu"], LENGTH_PROFILE["sigma"]), LENGTH_PROFILE["min"]),
                        longest))
        body = total - 140  # the template's system preamble, headers, developer and user turns take about 140
        words = lambda k: " ".join(rng.choice(SYNTHETIC_WORDS) for _ in range(max(k, 1)))
        rows.append({"reasoning_language": SYNTHETIC_LANGUAGES[i % len(SYNTHETIC_LANGUAGES)],
                     "developer": "You are a helpful assistant.", "user": words(30),
                     "analysis": words(int(body * 0.65)), "final": words(int(body * 0.35))})
    return rows


# The checkpoint stores each expert weight in MXFP4: 4-bit e2m1 values in blocks of 32 sharing one power-of-two
# scale. --use_4bit keeps them so and dequantizes one layer's experts at a time, in its forward, to the values
# Mxfp4Config(dequantize=True) loads (bit for bit, tested); checkpointing recomputes, so it dequantizes again.
MXFP4_TENSORS = ("gate_up_proj", "down_proj")


MXFP4_ROWS_PER_CHUNK = 2**21  # rows of 32 values per step: transformers' default, a whole layer, takes GBs of temporaries


def dequantize_mxfp4(blocks, scales, dtype, rows_per_chunk: int = MXFP4_ROWS_PER_CHUNK):
    """[experts, rows, groups, 16] bytes and [experts, rows, groups] scales -> [experts, groups * 32, rows] in dtype:
    transformers' convert_moe_packed_tensors (same lookup table, same ldexp), written straight into the transposed
    layout the expert matmuls read, where it builds [experts, rows, cols] and then copies it transposed."""
    import torch
    # private: transformers.integrations.mxfp4's FP4_VALUES; checked against transformers 5.23.0
    from transformers.integrations.mxfp4 import FP4_VALUES

    experts, rows, groups, _ = blocks.shape
    out = torch.empty(experts, groups * 32, rows, dtype=dtype, device=blocks.device)
    codes = torch.arange(256, device=blocks.device).unsqueeze(1)
    pairs = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)[torch.cat([codes & 15, codes >> 4], 1)]
    step = max(1, rows_per_chunk // (rows * groups))  # whole experts per step, about rows_per_chunk rows of 32
    for e0 in range(0, experts, step):
        e1 = min(e0 + step, experts)
        values = pairs[blocks[e0:e1].int()].view(e1 - e0, rows, groups, 32)  # byte -> (low, high) nibble values
        exponents = scales[e0:e1].int().sub_(127).unsqueeze(-1)
        torch.ldexp(values, exponents, out=out[e0:e1].transpose(1, 2).view(e1 - e0, rows, groups, 32))
    return out


@functools.lru_cache(maxsize=None)
def mxfp4_experts_class():
    import torch
    # private: GptOssExperts' weight attributes and forward's arguments; checked against transformers 5.23.0
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
                setattr(self, name, dequantize_mxfp4(getattr(self, f"{name}_blocks"), getattr(self, f"{name}_scales"),
                                                     self.gate_up_proj_bias.dtype, MXFP4_ROWS_PER_CHUNK))
            try:
                return super().forward(hidden_states, router_indices, routing_weights)
            finally:
                del self.gate_up_proj, self.down_proj  # the autograd graph keeps what backward needs

    return Mxfp4Experts


def load_mxfp4_model(source: str, config, device: str, random_init: bool, seed: int, dtype, attn_implementation: str):
    """gpt-oss with its experts kept in MXFP4 (--use_4bit); every other weight in dtype."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    experts_class = mxfp4_experts_class()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(unquantized_config(config), dtype=dtype,
                                                 attn_implementation=attn_implementation)
        for layer in model.model.layers:
            layer.mlp.experts = experts_class(model.config)
    if random_init:  # preflight: random weights of the real shapes, built where they will run
        model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
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
        state = {key: tensor if tensor.dtype == torch.uint8 else tensor.to(dtype) for file in
                 checkpoint_files(source) for key, tensor in load_file(str(file), device=device).items()}
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise UsageError(f"{source} does not have gpt-oss's MXFP4 layout: missing "
                             f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    with torch.device(device):  # the rotary frequencies are computed, not stored: compute them on the device
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model


FLEX_BLOCK = 128  # flex attention's block: padded batches are padded to a multiple of it, one compiled shape per bucket


RECOMPILE_LIMIT = 64  # torch's default 8 < max_seq_length 2048 / 128 buckets


def attach_document_masks(model):
    """Give each row of a padding-free batch its own causal and sliding-window mask, and right-padded flex batches
    masks without the padding term.

    GptOssModel builds its masks without position_ids, so in a flattened batch every row would attend to the rows
    before it. transformers' own mask builders find the rows from position_ids (each row restarts at 0); this hook
    calls them for eager's block-diagonal masks and builds flex's BlockMasks from the boundaries
    (document_block_mask), once per forward: the layers and the checkpoint recompute get the same masks. A
    right-padded flex batch gets padded_block_masks, cached by length.
    """
    from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask,
                                            create_sliding_window_causal_mask, flex_attention_mask)

    decoder = model.get_decoder()

    def build_masks(module, args, kwargs):
        position_ids, padding = kwargs.get("position_ids"), kwargs.get("attention_mask")
        # private: config._attn_implementation, GptOssModel.forward's keywords; checked against transformers 5.23.0
        flex = ALL_MASK_ATTENTION_FUNCTIONS[module.config._attn_implementation] is flex_attention_mask
        if kwargs.get("past_key_values") is not None:
            return None
        if flex and getattr(padding, "ndim", 0) == 2 and bool((padding[:, 1:] <= padding[:, :-1]).all()):  # right-padded
            kwargs["attention_mask"] = padded_block_masks(padding.shape[1], module.config.sliding_window,
                                                          str(padding.device))
            return args, kwargs
        if position_ids is None or padding is not None:
            return None
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = module.embed_tokens(kwargs.pop("input_ids"))
        mask_kwargs = dict(config=module.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                           position_ids=position_ids)
        if flex and len(embeds) == 1:
            masks = {"full_attention": document_block_mask(position_ids),
                     "sliding_attention": document_block_mask(position_ids, module.config.sliding_window)}
        else:
            masks = {"full_attention": create_causal_mask(**mask_kwargs),
                     "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        kwargs.update(inputs_embeds=embeds, input_ids=None, attention_mask=masks)
        return args, kwargs

    return decoder.register_forward_pre_hook(build_masks, with_kwargs=True)


def document_block_mask(position_ids, sliding_window: int | None = None, block: int = 128):
    """The flex BlockMask of one packed row (documents where position_ids restart), built from the boundaries.

    transformers 5.23 builds it with torch.compile(create_block_mask) over the dense [tokens, tokens] mask, and the
    compiled argsort of a 70-137-block row can take minutes (pytorch#182060). Each query attends to one interval of
    keys, [its document's start (or the window's), itself], and the starts only grow, so each pair of 128-token
    blocks is full or partly visible by comparing block ends: the same tables as create_block_mask, no dense mask.
    """
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    positions = position_ids[0]
    length, device = len(positions), positions.device
    index = torch.arange(length, device=device)
    new_document = torch.diff(positions, prepend=positions[:1] - 1) != 1  # transformers' find_packed_sequence_indices
    document = new_document.cumsum(0)
    first_key = torch.where(new_document, index, 0).cummax(0).values
    if sliding_window is not None:
        first_key = torch.maximum(first_key, index - sliding_window + 1)
    starts = torch.arange(0, length, block, device=device)
    ends = (starts + block).clamp(max=length) - 1
    q0, q1, k0, k1 = starts[:, None], ends[:, None], starts[None, :], ends[None, :]
    visible = (q1 >= k0) & (first_key[torch.maximum(q0, k0).clamp(max=length - 1)] <= k1)
    whole = (ends - starts + 1 == block)
    full = (first_key[q1] <= k0) & (q0 >= k1) & whole[:, None] & whole[None, :]

    def ordered(blocks):  # create_block_mask's own (count, indices) form, argsort uncompiled on [blocks, blocks]
        blocks = blocks.to(torch.int32)[None, None]
        return blocks.sum(-1).to(torch.int32), torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(batch, head, q, kv):  # any batch index: one mask for every row
        same = (document[q] == document[kv]) & (positions[kv] <= positions[q])
        return same if sliding_window is None else same & (positions[kv] > positions[q] - sliding_window)

    return BlockMask.from_kv_blocks(*ordered(visible & ~full), *ordered(full), BLOCK_SIZE=(block, block),
                                    mask_mod=mask_mod, seq_lengths=(length, length))


@functools.lru_cache(maxsize=64)
def padded_block_masks(length: int, sliding_window: int, device: str) -> dict:
    """flex's masks for a right-padded batch of this length: causal, without the padding term, one for every row.
    No real token attends to a pad after it, so real tokens' outputs and the loss are unchanged; only pads' (labelled
    -100) see other pads. One mask per length, shared by every batch of it, instead of one compiled build each."""
    import torch

    positions = torch.arange(length, device=device)[None]
    return {"full_attention": document_block_mask(positions),
            "sliding_attention": document_block_mask(positions, sliding_window)}


def watch_recompiles(limit: int = RECOMPILE_LIMIT):
    """flex attention (and --compile) compile per shape: one per length bucket and batch size until torch makes the
    sizes dynamic. Raise torch's limit of 8 and say in one line when it is hit: past it, that code runs uncompiled."""
    import logging

    import torch._dynamo

    # private: torch._dynamo's config.recompile_limit and its convert_frame logger; checked against torch 2.13.0
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)

    class RecompileLimitNote(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                print(f"note: torch.compile hit its recompile limit ({torch._dynamo.config.recompile_limit}); later "
                      "shapes of that function run uncompiled, slower (TORCH_LOGS=recompiles shows why)", file=sys.stderr)

    dynamo_log = logging.getLogger("torch._dynamo.convert_frame")
    if not any(type(h).__name__ == "RecompileLimitNote" for h in dynamo_log.handlers):
        dynamo_log.addHandler(RecompileLimitNote())


# -----------------------------------------------------------------------------
# Infer


@dataclass(frozen=True)
class InferSettings:
    """one answer or a conversation ({readers})"""
    prompt: str | None = setting(None, "the user message (infer; default: stdin)")
    reasoning_language: str = setting("English", "language of the analysis channel (chat: /lang changes it)")
    stream: bool | None = setting(None, "print the answer while it is generated (default: when stdout is a terminal; "
                                        "chat: on)")
    raw: bool = setting(False, "print the whole harmony transcript (infer)")

    @property
    def answer_language(self) -> str | None:
        """The one language infer and chat answer in: the first --answer-language names (eval rotates them all)."""
        return (self.answer_languages or [None])[0]


@dataclass(frozen=True)
class InferRun(InferSettings, GenerationSettings, ModelSettings, CommonSettings):
    """--mode infer and --mode chat"""


@register
class Infer(GenerationMode):
    """--mode infer: one answer to one prompt."""

    name, settings, during = "infer", InferRun, "inference"
    summary = "infer (answer one prompt)"

    def run(self, cfg, runtime):
        return run_infer(cfg, runtime)

    def derive(self, cfg):
        return {**super().derive(cfg),
                "reasoning_language": language_name(cfg.reasoning_language, "--reasoning-language",
                                                    self.any_language(cfg)),
                "stream": cfg.stream if cfg.stream is not None else sys.stdout.isatty() and not (cfg.json or cfg.raw)}

    def check(self, cfg):
        super().check(cfg)
        if cfg.json and cfg.raw:
            raise UsageError("--json and --raw are two output formats: pick one")
        if cfg.stream and (cfg.json or cfg.raw):
            raise UsageError(f"--stream prints text as it is generated, --{'json' if cfg.json else 'raw'} the whole "
                             "output at the end: pick one")


def run_infer(cfg: InferRun, runtime: Runtime | None = None) -> dict:
    prompt = read_prompt(cfg)
    chat = build_chat(prompt, cfg.reasoning_language, cfg.answer_language)
    model, tokenizer = load_for_inference(cfg, runtime or find_runtime(cfg), chat=chat)
    printer = AnswerPrinter(tokenizer, cfg.reasoning_language, sys.stdout, styled(sys.stdout)) if cfg.stream else None
    try:
        ids = generate(model, tokenizer, [chat], cfg.reasoning_effort, cfg.max_new_tokens, cfg.temperature, cfg.seed,
                       streamer=printer)[0]
    finally:
        if printer:
            printer.close()  # a Ctrl-C leaves the terminal's text plain
    completion = tokenizer.decode(ids, skip_special_tokens=False)
    result = {"reasoning_language": cfg.reasoning_language, **split_channels(ids, tokenizer), "tokens": len(ids)}
    if cfg.json:
        print(json.dumps(result, ensure_ascii=False))
    elif cfg.raw:
        print(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False,
                                            reasoning_effort=cfg.reasoning_effort) + completion)
    elif not cfg.stream:
        print(format_answer(result, completion, cfg.reasoning_language), end="")
    return result


def read_prompt(cfg: InferRun) -> str:
    if cfg.prompt is not None:
        prompt = cfg.prompt
    elif sys.stdin is None:  # closed (0<&-)
        prompt = ""
    elif not sys.stdin.isatty():
        try:
            prompt = sys.stdin.read()
            prompt.encode("utf-8")  # where stdin escapes bytes it cannot decode, they come as surrogates
        except UnicodeError:
            raise UsageError("the prompt on stdin is not UTF-8 text: pipe text, or pass --prompt") from None
    else:  # at a terminal the demo asks its own question; a question piped into it wins
        prompt = DEMO_QUESTION if cfg.demo else input("prompt> ")
    if not prompt.strip() and cfg.demo:
        prompt = DEMO_QUESTION
    if not prompt.strip():
        raise UsageError("no prompt: pass --prompt \"...\" or pipe the question on stdin")
    return prompt.strip()


def build_chat(prompt: str, reasoning_language: str, answer_language: str | None = None) -> list:
    """The system line the dataset teaches ("reasoning language: X"); the template makes it the developer message."""
    system = REASONING_PREFIX + reasoning_language
    if answer_language:
        system += f"\n\nAlways write the final answer in {answer_language}."
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def load_for_inference(cfg: CommonSettings, runtime: Runtime, chat: list | None = None):
    """The model (--model, with --adapter on top) and its tokenizer, in eval mode. A chat (infer's prompt) that does
    not fit the model's context with --max_new_tokens is refused before the model loads."""
    from safetensors import SafetensorError, safe_open

    try:  # its header and sizes, before the model loads: a truncated file is one line, not PEFT's traceback
        if cfg.adapter:
            with safe_open(str(Path(cfg.adapter) / "adapter_model.safetensors"), "pt"):
                pass
    except (OSError, SafetensorError) as e:
        raise UsageError(f"--adapter {cfg.adapter}: adapter_model.safetensors cannot be read ({e}); train it again "
                         "or pass one of its checkpoints") from None
    trained = trained_effort(cfg.adapter)
    if trained and trained != cfg.reasoning_effort:
        print(f"warning: the adapter trained with 'Reasoning: {trained}'; --reasoning_effort {cfg.reasoning_effort} "
              "sends a system prompt it never saw", file=sys.stderr)
    config = load_model_config(cfg.model)
    tokenizer = load_tokenizer(tokenizer_source(cfg.model, cfg.adapter))
    length = chat and len(encode_chat(tokenizer, chat, add_generation_prompt=True,
                                      reasoning_effort=cfg.reasoning_effort, where="prompt")["input_ids"])
    if chat and length + cfg.max_new_tokens > config.max_position_embeddings:
        raise UsageError(f"the prompt is {length:,} tokens and --max_new_tokens {cfg.max_new_tokens:,} more, over the "
                         f"{config.max_position_embeddings:,} tokens of {cfg.model}'s context: shorten the prompt "
                         "or lower --max_new_tokens")
    model = load_model(cfg.model, config, runtime.dtype, resolve_attention(cfg.attn_implementation, runtime.on_cuda),
                       runtime.device, runtime.device_map, use_4bit=cfg.use_4bit)
    return with_adapter(model, cfg.adapter), tokenizer


def trained_effort(adapter: str | None) -> str | None:
    """The reasoning effort an adapter of this tool trained with (its run_summary.json); None for other adapters."""
    try:
        return json.loads((Path(adapter) / "run_summary.json").read_text())["config"].get("reasoning_effort", "medium")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def adapter_base(adapter: str) -> str | None:
    """The base model an adapter names (PEFT writes it into adapter_config.json); None where there is no such file.
    A garbled one is said to be so, not taken for an adapter without a base (whose error would be the model's)."""
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    except OSError:
        return None
    except ValueError as e:
        raise UsageError(f"--adapter {adapter}: adapter_config.json is not valid JSON ({e}); the adapter folder is "
                         "damaged: train it again or copy it anew") from None
    if not isinstance(config, dict):
        raise UsageError(f"--adapter {adapter}: adapter_config.json is not a JSON object; the adapter folder is damaged")
    return config.get("base_model_name_or_path")


def tokenizer_source(model: str, adapter: str | None) -> str:
    """Where the tokenizer is: the adapter's folder, where training saved one, else the model's."""
    return adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else model


def with_adapter(model, adapter: str | None):
    """The model with the LoRA adapter on top (none: as it is), in eval mode."""
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


DIM, PLAIN = "\x1b[2m", "\x1b[0m"  # ANSI: faint text, then back to normal


def styled(stream) -> bool:
    """Whether the reasoning may be dimmed: a terminal that understands ANSI codes, and no NO_COLOR."""
    return stream.isatty() and os.environ.get("TERM") != "dumb" and "NO_COLOR" not in os.environ


class AnswerPrinter:
    """A streamer for generate(): prints the answer while it is generated, the text format_answer gives the whole
    output, the reasoning dimmed on a terminal. Token ids come in (put, end: transformers' BaseStreamer interface,
    not subclassed so that importing this file imports no Hugging Face library), are read by ChannelReader, and each
    message's text is decoded anew from its ids, so a character split over several tokens is printed once whole.
    Also records the prompt and the output ids. The one difference from format_answer: a model that reasons again
    after its final answer (gpt-oss does not) gets a second reasoning label here, where format_answer joins it to
    the first."""

    def __init__(self, tokenizer, reasoning_language: str, out=None, dim: bool = False, stop=None):
        self.tokenizer, self.language, self.out, self.dim, self.stop = tokenizer, reasoning_language, out, dim, stop
        self.reader = ChannelReader(tokenizer)
        self.prompt, self.ids = None, []
        self.section = None  # "analysis" or "final" once its label is printed
        self.count = {"analysis": 0, "final": 0}  # messages of each channel opened so far
        self.shown = 0  # characters of the open message already passed on
        self.dimmed = False

    def write(self, text: str):
        if self.out is not None and text:
            self.out.write(text)
            self.out.flush()

    def put(self, value):
        """The prompt's ids first, then each new token (batch size 1)."""
        if self.prompt is None:
            self.prompt = value.reshape(-1).tolist()
            return
        for token in value.reshape(-1).tolist():
            self.ids.append(token)
            self.feed(token)

    def feed(self, token: int | None):
        closed = len(self.reader.messages)
        was_open = self.reader.body is not None
        self.reader.feed(token)
        if len(self.reader.messages) > closed:  # a message ended: the rest of its text
            name, text, _ = self.reader.messages[-1]
            self.text(name, text[self.shown:])
            self.shown = 0
        if self.reader.body is not None and not was_open:
            self.open(self.reader.name)
        elif self.reader.body:
            text = self.reader.text()
            if not text.endswith("\ufffd"):  # wait for the rest of a character split over tokens
                self.text(self.reader.name, text[self.shown:])
                self.shown = len(text)

    def open(self, name: str):
        """A message starts: messages of one channel are joined by a newline, as split_channels joins them."""
        if name not in self.count:
            return
        self.count[name] += 1
        if name == "final" and self.section != "final":
            self.label("final")
        if self.count[name] > 1:
            self.text(name, "\n")

    def text(self, name: str, text: str):
        if name not in self.count or not text:
            return
        if self.section != name:
            self.label(name)
        self.trimmed.add(text)

    def label(self, name: str):
        if name == "final":
            if self.section is None:
                self.label("analysis")
            self.end_reasoning()
            self.write("--- final answer ---\n")
        else:
            self.write(f"--- reasoning ({self.language}) ---\n" if self.section is None
                       else f"\n\n--- reasoning ({self.language}) ---\n")
            self.write(DIM if self.dim else "")
            self.dimmed = self.dim
        self.section, self.trimmed = name, Trimmed(self.write)

    def end_reasoning(self):
        self.close()
        self.write("\n\n")

    def close(self):
        """Back to plain text (also where generation was cut short)."""
        if self.dimmed:
            self.write(PLAIN)
            self.dimmed = False

    def end(self):
        self.feed(None)
        if self.stop is not None and self.stop.is_set():  # Ctrl-C in a chat, which says so
            self.close()
            self.write("\n")
        elif self.section is None:
            self.write(format_answer({"analysis": "", "final": None}, self.tokenizer.decode(self.ids), self.language))
        elif self.section == "analysis":
            self.end_reasoning()
            self.write(f"--- final answer ---\n{NO_FINAL}\n")
        else:
            self.write("\n")


class Trimmed:
    """Passes text on as text.strip() would end up, while it arrives: leading whitespace is dropped, trailing
    whitespace held back until more text follows it."""

    def __init__(self, write):
        self.write, self.started, self.held = write, False, ""

    def add(self, text: str):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        body = text.rstrip()
        if body:
            self.write(self.held + body)
            self.held = ""
        self.held += text[len(body):]


def generate(model, tokenizer, chats: list, reasoning_effort: str, max_new_tokens: int, temperature: float,
             seed: int = 42, progress: str | None = None, batch_size: int = 8, streamer=None, stop=None) -> list:
    """Token ids generated after each chat's prompt, in order; batches are left-padded. Each stops on <|return|> or
    <|call|> (<|end|> only closes a channel). Greedy when temperature is 0. A streamer (one chat) gets the tokens as
    they come; setting the threading.Event stop ends generation after the next token."""
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList, set_seed

    class Stopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    set_seed(seed)
    tokenizer.padding_side = "left"  # new tokens follow every prompt directly
    end = tokenizer.convert_tokens_to_ids(STOP_TOKENS)
    outputs = []
    for start in tqdm(range(0, len(chats), batch_size), desc=progress, disable=progress is None, unit="batch"):
        prompts = [encode_chat(tokenizer, chat, add_generation_prompt=True, reasoning_effort=reasoning_effort,
                               where="prompt")["input_ids"] for chat in chats[start:start + batch_size]]
        inputs = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                 eos_token_id=end, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                                 stopping_criteria=StoppingCriteriaList([Stopped()] if stop else []))
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            ends = [i for i, token in enumerate(row) if token in end]
            outputs.append(row[:ends[0] + 1] if ends else row)
    return outputs


STOP_TOKENS = ["<|return|>", "<|call|>"]  # end of the assistant's turn; <|end|> only closes a channel


def split_channels(ids: list, tokenizer) -> dict:
    """The channels of a whole generated output (ChannelReader's rules)."""
    return read_harmony(ids, tokenizer).channels()


def read_harmony(ids: list, tokenizer) -> "ChannelReader":
    """A ChannelReader fed a whole generated output: its messages and channels()."""
    reader = ChannelReader(tokenizer)
    for token in [*ids, None]:
        reader.feed(token)
    return reader


# By hand because the official parser (openai-harmony) needs o200k token ids and the demo's tiny tokenizer has
# others; tests check it against openai-harmony on the real tokenizer.
class ChannelReader:
    """The channels of generated harmony tokens (what follows the prompt's <|start|>assistant), read one token at a
    time, so a stream shows each channel as it is written and split_channels applies the same rules afterwards. The
    text never holds a control token; a message ends at <|end|>, <|return|> or <|call|>, or unclosed where a new
    header starts or the output stops (a model that repeats a header inside its answer leaves the first one open)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.start, self.channel, self.message = tokenizer.convert_tokens_to_ids(["<|start|>", "<|channel|>", "<|message|>"])
        self.ends = set(tokenizer.convert_tokens_to_ids(["<|end|>", "<|return|>", "<|call|>"]))
        self.messages, self.header, self.body, self.name = [], [], None, None  # body is None while a header is read

    def text(self) -> str:
        """The open message's text so far."""
        return self.tokenizer.decode(self.body, skip_special_tokens=True)

    def feed(self, token: int | None):
        """One generated token; None where the output stops."""
        if self.body is not None and (token is None or token in self.ends or token in (self.start, self.channel)):
            self.messages.append((self.name, self.text(), token in self.ends))
            self.header, self.body = [], None
            if token not in (self.start, self.channel):
                return
        if self.body is not None:
            self.body.append(token)
        elif token == self.message:
            name = self.header[len(self.header) - self.header[::-1].index(self.channel):] if self.channel in self.header else []
            words = self.tokenizer.decode(name, skip_special_tokens=True).split()
            self.name, self.body = words[0] if words else "", []
        elif token is not None:
            self.header.append(token)

    def channels(self) -> dict:
        """analysis (all analysis messages, joined by newlines), final (likewise; None without one) and complete
        (every final message was closed by <|return|> or <|end|>)."""
        finals = [(text, closed) for name, text, closed in self.messages if name == "final"]
        return {"analysis": "\n".join(text for name, text, _ in self.messages if name == "analysis"),
                "final": "\n".join(text for text, _ in finals) if finals else None,
                "complete": bool(finals) and all(closed for _, closed in finals)}


def format_answer(result: dict, completion: str, reasoning_language: str) -> str:
    """What infer prints (without --json or --raw) once generation has finished; AnswerPrinter prints the same text
    while it is generated."""
    if not result["analysis"] and result["final"] is None:
        return f"(no harmony channels in the output; raw text follows)\n{completion}\n"
    final = result["final"] if result["final"] is not None else NO_FINAL
    return (f"--- reasoning ({reasoning_language}) ---\n{result['analysis'].strip()}\n\n"
            f"--- final answer ---\n{final.strip()}\n")


NO_FINAL = "(no final answer: raise --max_new_tokens)"


# -----------------------------------------------------------------------------
# Chat: the model loads once, each answer streams, the history is kept in harmony's way


@register
class Chat(Infer):
    """--mode chat: a conversation, the model loaded once; infer's settings."""

    name, during = "chat", "chat"
    summary = "chat (talk to it)"
    defaults = dict(stream=True)

    def run(self, cfg, runtime):
        return run_chat(cfg, runtime)

    def check(self, cfg):
        if cfg.json or cfg.raw:
            raise UsageError("--mode chat prints text; --json and --raw are --mode infer's formats")
        if cfg.prompt is not None:
            raise UsageError("--mode chat reads your questions as you type them; --prompt is --mode infer's")
        super().check(cfg)


def run_chat(cfg: InferRun, runtime: Runtime | None = None, ask=input) -> "ChatSession":
    """Questions in a loop, the model loaded once; /commands change the session (CHAT_HELP)."""
    if sys.stdin is None:
        raise UsageError("--mode chat reads your questions on stdin, which is closed")
    session = ChatSession(cfg.reasoning_language, cfg.answer_language, cfg.reasoning_effort,
                          any_language=cfg.allow_any_language)  # derive() has made the names canonical
    model, tokenizer = load_for_inference(cfg, runtime or find_runtime(cfg))
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    print(f"chat with {cfg.adapter or cfg.model}, reasoning in {session.reasoning_language}. /help lists the "
          "commands; Ctrl-C stops an answer, Ctrl-D leaves.")
    while True:
        try:
            line = ask("you> ").strip()
        except EOFError:
            print()
            return session
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit leaves)")
            continue
        if line.startswith("/"):
            following, message = handle_command(line, session)
            if following is None:
                return session
            session = following
            print(message)
        elif line:
            session, _ = chat_turn(cfg, model, tokenizer, session, line)


@dataclass(frozen=True)
class ChatSession:
    """What a chat carries from turn to turn: the settings its commands change, the conversation since the last
    /clear and every kept turn as a dataset row."""
    reasoning_language: str
    answer_language: str | None
    reasoning_effort: str
    history: tuple = ()  # user and assistant messages; an assistant's analysis stays, the template drops it
    rows: tuple = ()
    any_language: bool = False  # --allow-any-language: /lang and /answer take names the detector does not know

    def messages(self, question: str) -> list:
        """The next turn's chat: the system line of the current languages, the conversation, the question."""
        system = build_chat(question, self.reasoning_language, self.answer_language)
        return [system[0], *self.history, system[1]]

    def answered(self, question: str, analysis: str, final: str) -> "ChatSession":
        """The session with this turn kept."""
        chat = self.messages(question) + [{"role": "assistant", "content": final, "thinking": analysis}]
        row = {"reasoning_language": self.reasoning_language,
               "developer": chat[0]["content"].partition("\n\n")[2], "user": question, "analysis": analysis,
               "final": final, "messages": chat, "written_by": WRITTEN_BY}
        return replace(self, history=tuple(chat[1:]), rows=self.rows + (row,))


def handle_command(line: str, session: ChatSession) -> tuple:
    """(session, what to print) after one /command; a bad one leaves the session as it was. None: leave."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    try:
        if name in ("/exit", "/quit"):
            return None, ""
        if name == "/help":
            return session, CHAT_HELP
        if name == "/clear":
            return replace(session, history=()), "new conversation (the earlier turns stay in /save)"
        if name in ("/lang", "/effort", "/save") and not arg:
            raise UsageError(f"{name} needs a value: " + {"/lang": "/lang French", "/effort": "/effort high",
                                                          "/save": "/save chat.jsonl"}[name])
        if name == "/lang":
            session = replace(session, reasoning_language=language_name(arg, "/lang", session.any_language))
            return session, f"reasoning language: {session.reasoning_language}"
        if name == "/answer":
            session = replace(session, answer_language=language_name(arg, "/answer", session.any_language) if arg
                              else None)
            return session, f"answer language: {session.answer_language or 'not set'}"
        if name == "/effort":
            if arg not in ("low", "medium", "high"):
                raise UsageError(f"/effort {arg}: choose low, medium or high")
            return replace(session, reasoning_effort=arg), f"reasoning effort: {arg}"
        if name == "/save":
            return session, save_chat(arg, session.rows)
        raise UsageError(f"unknown command {name}; /help lists them")
    except UsageError as e:
        return session, f"error: {e}"
    except OSError as e:  # e.g. a name the file system refuses: one line, and the chat and its turns go on
        return session, f"error: {line.strip()}: {(e.strerror or str(e)).lower()}"


CHAT_HELP = """/lang X        reason in language X
/answer Y      answer in language Y (/answer alone: no instruction)
/effort LEVEL  reasoning effort: low, medium or high
/clear         start a new conversation (/save still writes the earlier turns)
/save FILE     write the turns as .jsonl rows in the dataset's schema: --mode train reads them, --score-file too
/help          this list
/exit          leave (so does Ctrl-D); Ctrl-C stops an answer"""


def save_chat(path: str, rows: tuple) -> str:
    """Write the rows as JSONL, whole or not at all, beside the file then renamed into place; an existing file is
    replaced only when /save wrote it and it is unchanged since, never through a symbolic link."""
    file = Path(path).expanduser()
    kept = [row for row in rows if row["analysis"].strip()]  # train refuses a row without reasoning to learn from
    if not kept:
        raise UsageError("/save: no answer with reasoning yet")
    if file.suffix.lower() != ".jsonl":
        raise UsageError(f"/save {path}: name a .jsonl file (what --mode train reads)")
    if file.is_symlink() or file.is_dir() or not file.parent.is_dir():
        raise UsageError(f"/save {path}: " + ("is a symbolic link; /save writes only a file of its own, name another"
                                              if file.is_symlink() else "is a folder" if file.is_dir()
                                              else f"no folder {file.parent}"))
    try:
        saved = json.loads(SAVED_CHATS.read_text())
    except (OSError, ValueError):
        saved = {}
    key = os.path.realpath(file)
    if os.path.lexists(file) and saved.get(key) != entry_state(file):
        raise UsageError(f"/save {path}: the file exists and this chat did not write it as it is now (changed since?); "
                         "name another file")
    staging = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8")
        if os.path.lexists(file):
            os.replace(staging, file)
        else:
            os.link(staging, file)  # fails where a file appeared meanwhile, which then stays as it is
        saved[key] = entry_state(file)
    except FileExistsError:
        raise UsageError(f"/save {path}: a file of that name appeared meanwhile; name another file") from None
    except OSError as e:
        raise UsageError(f"/save {path}: {(e.strerror or str(e)).lower()}") from None
    finally:
        staging.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # without the record the file is kept as the user's: never replaced
        SAVED_CHATS.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(SAVED_CHATS, json.dumps(saved) + "\n")
    left_out = f" ({len(rows) - len(kept)} without reasoning left out)" if len(kept) < len(rows) else ""
    return f"saved {len(kept)} turn{'s' * (len(kept) != 1)} to {path}{left_out}"


WRITTEN_BY = "gpt_oss_20b_sft.py --mode chat"  # in every row /save writes: where the row came from


SAVED_CHATS = CACHE / "saved_chats.json"  # every file /save wrote, as it wrote it: the only files it replaces


def chat_turn(cfg: InferRun, model, tokenizer, session: ChatSession, question: str) -> tuple:
    """One question answered (streamed unless --no-stream): (the session, with the turn kept when it has a final
    answer and was not stopped; the printer, which holds the prompt's and the answer's ids)."""
    stop = threading.Event()
    printer = AnswerPrinter(tokenizer, session.reasoning_language, sys.stdout if cfg.stream else None,
                            styled(sys.stdout), stop)
    with ctrl_c_sets(stop):
        try:
            generate(model, tokenizer, [session.messages(question)], session.reasoning_effort, cfg.max_new_tokens,
                     cfg.temperature, cfg.seed, streamer=printer, stop=stop)
        finally:
            printer.close()
    result = split_channels(printer.ids, tokenizer)
    if not cfg.stream and not stop.is_set():
        print(format_answer(result, tokenizer.decode(printer.ids), session.reasoning_language), end="")
    if stop.is_set():
        print("[stopped: this answer is not kept]")
    elif result["final"] is None:
        print("[not kept in the conversation: no final answer]")
    else:
        session = session.answered(question, result["analysis"], result["final"])
    print()
    return session, printer


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event):
    """While it lasts, Ctrl-C sets event instead of raising KeyboardInterrupt: generation stops after its next
    token and the chat goes on."""
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -----------------------------------------------------------------------------
# Eval: does the model reason in the requested language, and does it still answer correctly?


@dataclass(frozen=True)
class EvalSettings:
    """evaluation ({readers})"""
    eval_reasoning_languages: list[str] | None = setting(None, "reasoning languages to ask for (default: 8)",
                                                         "reasoning_languages")
    question_languages: list[str] | None = setting(None, "languages the questions are asked in (default: all, rotated)")
    max_questions: int | None = setting(None, "only the first N questions, each asked in every reasoning language",
                                        "limit", "max_samples", check="positive")
    full_grid: bool = setting(False, "every question in every question x answer language instead of rotating")
    eval_file: str = setting(str(EVAL_QUESTIONS), "the questions (.jsonl)")
    eval_batch_size: int = setting(32, "prompts per generation batch", check="positive")
    compare_base: bool | None = setting(None, "also evaluate the base model, adapter off (default: on in the demo)")
    compare_adapter: str | None = setting(None, "also evaluate this LoRA adapter of the same base, in the same table")
    score_file: str | None = setting(None, "score outputs made elsewhere (.jsonl); loads no model")


@dataclass(frozen=True)
class EvalRun(EvalSettings, GenerationSettings, ModelSettings, CommonSettings):
    """--mode eval"""


@register
class Eval(GenerationMode):
    """--mode eval: the reasoning's language and the answers scored, base against tuned."""

    name, settings, during = "eval", EvalRun, "evaluation"
    summary = "eval (reasoning-language match)"
    output_help = "eval <adapter>/eval"
    defaults = dict(temperature=0.0, max_new_tokens=1024)  # greedy (repeatable), with room for the reasoning
    outputs = r"eval_results\.json|eval_summary\.md|eval_summary\.png"

    def run(self, cfg, runtime):
        return run_eval(cfg, runtime)

    def reads_model(self, cfg):
        return not cfg.score_file  # scores outputs made elsewhere: no model, no adapter

    def any_language(self, cfg):
        return False  # it scores with the detector, so its languages must be ones the detector knows

    def output_dir(self, cfg, adapter):
        return str(Path(adapter) / "eval") if adapter else "eval_output"

    def derive(self, cfg):
        if cfg.allow_any_language:  # before the names are read: their error would advise this very flag
            raise UsageError("--allow-any-language: eval scores the reasoning with the language detector, which knows "
                             "only its 75 languages; drop it")
        languages = lambda names, flag: language_names(names, flag, False, detected=True)  # noqa: E731
        return {**super().derive(cfg),
                "eval_reasoning_languages": languages(cfg.eval_reasoning_languages, "--reasoning-languages"),
                "question_languages": languages(cfg.question_languages, "--question-languages"),
                "compare_base": cfg.compare_base if cfg.compare_base is not None else cfg.demo and not cfg.score_file}

    def check(self, cfg):
        super().check(cfg)
        if importlib.util.find_spec("lingua") is None:  # the other modes do without it
            raise UsageError("--mode eval detects the languages with lingua: pip install lingua-language-detector")
        if cfg.compare_base and not cfg.adapter:
            raise UsageError("--compare-base needs --adapter (the tuned model to compare with its base)")
        if cfg.compare_adapter:
            check_compared_adapter(cfg)

    def inputs(self, cfg):
        return {"--eval-file": cfg.eval_file, "--score-file": cfg.score_file, "--compare-adapter": cfg.compare_adapter}

    def use_less_memory(self, cfg):
        return super().use_less_memory(
            cfg, f", --eval_batch_size {max(cfg.eval_batch_size // 2, 1)}" if cfg.eval_batch_size > 1 else "")


def run_eval(cfg: EvalRun, runtime: Runtime | None = None) -> dict:
    check_output_dir(cfg)
    if cfg.score_file:
        items = read_score_file(cfg.score_file)
        tokenizer = None
        if any(not isinstance(i.get("reasoning_tokens"), int) for i in items):
            with contextlib.suppress(UsageError):  # scoring needs no model; the tokenizer only counts tokens
                tokenizer = load_tokenizer(cfg.model)
            if tokenizer is None:
                print(f"note: reasoning tokens not counted: the tokenizer of {cfg.model} is not on this machine "
                      "(give --model a local gpt-oss directory, or reasoning_tokens per line)")
    else:
        items, tokenizer = generate_eval_outputs(cfg, runtime or find_runtime(cfg), eval_plan_of(cfg))
    for item in items:
        if not isinstance(item.get("reasoning_tokens"), int):
            item["reasoning_tokens"] = tokenizer and len(tokenizer(item["analysis"], add_special_tokens=False)["input_ids"])
        item.update(score_output(item["reasoning_language"], item["analysis"], item.get("final"),
                                 item.get("answer_language"), item.get("expected")),
                    stopped_thinking=stopped_thinking(item["analysis"], item["reasoning_tokens"]))
    rows = summarize_scores(items)
    table = summary_table(rows)
    out = Path(cfg.output_dir)
    claim_output_dir(out, "eval", replace_own=False)  # each report file is replaced by an atomic write
    write_files_atomically(out, {  # the three together: a full disk leaves none of them, not a table without its plot
        "eval_results.json": json.dumps({"config": asdict(cfg), "summary": rows, "items": items}, indent=2,
                                        ensure_ascii=False) + "\n",
        "eval_summary.md": table + "\n",
        "eval_summary.png": plot_match_rates([r for r in rows if r["reasoning_language"] != "all"])})
    record(out, *(out / name for name in ("eval_results.json", "eval_summary.md", "eval_summary.png")))
    print(table)
    print(f"\nwrote eval_results.json, eval_summary.md and eval_summary.png to {out}/")
    return {"summary": rows, "items": items}


def read_score_file(path: str) -> list:
    """Outputs generated elsewhere: reasoning_language and analysis per line; final, answer_language, expected,
    reasoning_tokens and model optional. Checked line by line before anything is scored."""
    items = []
    for number, row in read_jsonl(path, "--score-file"):
        where = f"{path} line {number}"
        for key in ("reasoning_language", "analysis"):
            if not isinstance(row.get(key), str):
                raise UsageError(f"{where}: needs a string {key!r}")
        for key in ("final", "answer_language", "model"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise UsageError(f"{where}: {key!r} must be a string")
        items.append({**row, "model": row.get("model") or "outputs",
                      "reasoning_language": language_name(row["reasoning_language"], where, detected=True),
                      "answer_language": language_name(row["answer_language"], where, detected=True)
                      if row.get("answer_language") else None,
                      "expected": _expected_answer(row.get("expected"), where)})
    return items


def read_jsonl(path: str, what: str) -> list:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{what} {path} " + ("is a folder: name a .jsonl file" if file.is_dir() else "does not exist"))
    rows = []
    for number, row in jsonl_lines(file, what):
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {number} is not a JSON object")
        rows.append((number, row))
    if not rows:
        raise UsageError(f"{what} {path} is empty")
    return rows


def _expected_answer(value, where: str) -> dict | None:
    """An expected answer in the form answer_is_correct reads: {"number": x} or {"accepted": [spellings]}."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    spellings = lambda v: isinstance(v, list) and v and all(isinstance(a, str) and a.strip() for a in v)  # noqa: E731
    if value is None or isinstance(value, dict) and (set(value) == {"number"} and number(value["number"])
                                                      or set(value) == {"accepted"} and spellings(value["accepted"])):
        return value
    if number(value):
        return {"number": value}
    if isinstance(value, str) and value.strip():
        return {"accepted": [value]}
    if spellings(value):
        return {"accepted": value}
    raise UsageError(f"{where}: 'expected' must be a number, a string, a list of strings, {{\"number\": x}} or "
                     "{\"accepted\": [...]}" + f", not {json.dumps(value, default=str)[:60]}")


def eval_plan_of(cfg: EvalRun) -> list:
    """The prompts to generate: the questions, languages and rotation the flags ask for."""
    # the demo's 2-layer model learns the five languages it trains on; an unseen one is not expected of it
    languages = cfg.eval_reasoning_languages or list(TRAINED_LANGUAGES if cfg.demo else EVAL_REASONING_LANGUAGES)
    answer_languages = cfg.answer_languages or [None]
    questions = read_eval_questions(cfg.eval_file)
    question_languages = cfg.question_languages or list(questions[0]["question"])
    plan = eval_plan(questions, languages, question_languages, answer_languages, cfg.max_questions, cfg.full_grid)
    print(f"eval: {len(plan)} prompts per model ({min(cfg.max_questions or len(questions), len(questions))} questions x "
          f"{len(languages)} reasoning languages), questions in {', '.join(question_languages)}")
    return plan


TRAINED_LANGUAGES = ("English", "French", "German", "Spanish", "Italian")  # Multilingual-Thinking's five


EVAL_REASONING_LANGUAGES = TRAINED_LANGUAGES + ("Chinese", "Japanese", "Russian")


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


def check_compared_adapter(cfg: EvalRun):
    """--compare-adapter: a LoRA adapter other than --adapter, trained on the same base."""
    if not cfg.adapter:
        raise UsageError("--compare-adapter needs --adapter (the tuned model to compare it with)")
    if not Path(cfg.compare_adapter).is_dir():
        raise UsageError(f"--compare-adapter {cfg.compare_adapter} " + ("is a file: name the adapter's folder" if
                         Path(cfg.compare_adapter).exists() else "does not exist"))
    if Path(cfg.compare_adapter).resolve() == Path(cfg.adapter).resolve():
        raise UsageError(f"--compare-adapter {cfg.compare_adapter} is --adapter itself: name another adapter")
    config, _ = read_lora_adapter(cfg.compare_adapter, "--compare-adapter")  # one line, not PEFT's traceback
    bases = adapter_base(cfg.adapter), config.get("base_model_name_or_path")
    if bases[0] and bases[1] and Path(bases[0]).name != Path(bases[1]).name:
        raise UsageError(f"--compare-adapter {cfg.compare_adapter} was trained on {bases[1]}, --adapter on "
                         f"{bases[0]}: one table compares adapters of one base")


def generate_eval_outputs(cfg: EvalRun, runtime: Runtime, plan: list):
    """Generate every planned prompt with the tuned model and, with --compare-base, with the base (adapter off), and
    with --compare-adapter, with that adapter instead of --adapter. With two adapters, each row is named by its
    folder."""
    model, tokenizer = load_for_inference(cfg, runtime)
    runs = [("tuned" if cfg.adapter else "base", contextlib.nullcontext())]
    if cfg.compare_adapter:
        model.load_adapter(cfg.compare_adapter, adapter_name="compared")
        runs = [(cfg.compare_adapter, active_adapter(model, "compared")), (cfg.adapter, contextlib.nullcontext())]
    if cfg.compare_base:
        runs.insert(0, ("base", model.disable_adapter()))
    chats = [build_chat(p["prompt"], p["reasoning_language"], p["answer_language"] if p["answer_language_instructed"]
                        else None) for p in plan]
    items = []
    for label, adapter_state in runs:
        with adapter_state:
            outputs = generate(model, tokenizer, chats, cfg.reasoning_effort, cfg.max_new_tokens, cfg.temperature,
                               cfg.seed, progress=f"{label} model", batch_size=cfg.eval_batch_size)
        for p, ids in zip(plan, outputs):
            items.append({"model": label, **p, **split_channels(ids, tokenizer),
                          "tokens": len(ids)})
    return items, tokenizer


@contextlib.contextmanager
def active_adapter(model, name: str):
    """PEFT's model with adapter `name` active instead of the default one, for the block."""
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")


def score_output(reasoning_language: str, analysis: str, final: str | None, answer_language: str | None = None,
                 expected: dict | None = None) -> dict:
    """The scores of one output. Languages are canonical names (language_name)."""
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


# Reasoning this short is none to speak of: the model "stopped thinking" and jumped to its answer, what users report
# after LoRA on gpt-oss when the analysis channel goes missing. Uncounted (no tokenizer), 16 characters stand in.
STOPPED_THINKING_TOKENS = 8


def stopped_thinking(analysis: str | None, reasoning_tokens: int | None) -> bool:
    """Whether the reasoning is empty or only a few tokens long."""
    if isinstance(reasoning_tokens, int):
        return reasoning_tokens < STOPPED_THINKING_TOKENS
    return len("".join((analysis or "").split())) < 2 * STOPPED_THINKING_TOKENS


def detect_language(text: str | None) -> str | None:
    """The most likely language of the text; None when it has no letters (e.g. "56")."""
    if not text or not _has_letters(text):
        return None
    found = _language_detector().detect_language_of(text)
    return found.name.title() if found else None


@functools.lru_cache(maxsize=None)
def _language_detector():
    # lingua over every language it knows: the most accurate candidate on data/langid_check.jsonl (NOTES.md)
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_all_languages().build()


def _has_letters(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def language_share(text: str | None, language: str) -> float:
    """Share of the text's characters in sentences detected as `language` (reasoning often switches mid-way)."""
    sentences = [s for s in _SENTENCE_BREAK.split(text or "") if _has_letters(s)]
    total = sum(len(s) for s in sentences)
    return sum(len(s) for s in sentences if detect_language(s) == language) / total if total else 0.0


_SENTENCE_BREAK = re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；：])|\n+")


def answer_is_correct(final: str | None, expected: dict) -> bool:
    """{"number": x}: some number in the answer equals x. {"accepted": [...]}: one spelling appears as a word."""
    if final is None:
        return False
    if "number" in expected:
        return any(math.isclose(v, expected["number"], rel_tol=1e-9, abs_tol=1e-9) for v in number_readings(final))
    text = _fold(final)
    return any(re.search(rf"(?<![a-z0-9]){re.escape(_fold(a))}(?![a-z0-9])", text) for a in expected["accepted"])


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


_NUMBER = re.compile(r"(?:(?<!\w)[-−])?\d+(?:[.,'’\u00a0\u202f ]\d+)*")


_SEPARATOR = re.compile(r"[.,'’\u00a0\u202f ]")


def _fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).casefold()


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
                         "stopped_thinking": _mean([i["stopped_thinking"] for i in group]),
                         "malformed": _mean([i["malformed"] for i in group])})
    return rows


def _mean(values: list):
    values = [float(v) for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def summary_table(rows: list) -> str:
    percent = lambda v: "–" if v is None else f"{100 * v:.0f}%"
    lines = ["| reasoning language | model | n | reasoning in language | share of reasoning in language | "
             "answer in language | answer correct | reasoning tokens | stopped thinking | no final answer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["reasoning_language"] for r in rows))  # each language's models on adjacent rows
    for r in sorted(rows, key=lambda r: order.index(r["reasoning_language"])):
        language = r["reasoning_language"] + ("" if r["reasoning_language"] in TRAINED_LANGUAGES + ("all",) else " *")
        tokens = "–" if r["reasoning_tokens"] is None else f"{r['reasoning_tokens']:.0f}"
        lines.append(f"| {language} | {r['model']} | {r['n']} | {percent(r['reasoning_language_match'])} | "
                     f"{percent(r['reasoning_language_share'])} | {percent(r['answer_language_match'])} | "
                     f"{percent(r['accuracy'])} | {tokens} | {percent(r['stopped_thinking'])} | "
                     f"{percent(r['malformed'])} |")
    if any(r["reasoning_language"] not in TRAINED_LANGUAGES + ("all",) for r in rows):
        lines.append("\n\\* not among Multilingual-Thinking's reasoning languages (unseen in training).")
    return "\n".join(lines)


def plot_match_rates(rows: list) -> bytes:
    """The match rate per language and model, as a PNG."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in rows))
    languages = list(dict.fromkeys(r["reasoning_language"] for r in rows))
    width = 0.8 / len(models)
    ax = Figure(figsize=(max(6, 1.1 * len(languages)), 4)).subplots()
    for k, model in enumerate(models):
        rate = {r["reasoning_language"]: r["reasoning_language_match"] or 0 for r in rows if r["model"] == model}
        ax.bar([i + (k - (len(models) - 1) / 2) * width for i in range(len(languages))],
               [100 * rate.get(lang, 0) for lang in languages], width, label=model)
    ax.set_xticks(range(len(languages)), languages, rotation=30)
    ax.set(ylabel="reasoning in the requested language (%)", ylim=(0, 105),
           title="Reasoning-language match per requested language")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    ax.figure.tight_layout()
    png = io.BytesIO()
    ax.figure.savefig(png, format="png", dpi=120)
    return png.getvalue()


# -----------------------------------------------------------------------------
# GRPO: a second stage that teaches a reasoning language from prompts alone (reinforcement learning with TRL's
# GRPOTrainer, rewarded for the reasoning's language); the defaults' sources and measurements are in NOTES.md


@dataclass(frozen=True)
class GrpoSettings:
    """prompts and rewards ({readers})"""
    dataset: str = setting("HuggingFaceH4/Multilingual-Thinking", "prompts: a hub dataset's user turns or a local "
                                                                  ".jsonl/.json/.parquet/.csv with 'user'")
    dataset_split: str = setting("train", "split of a hub dataset")
    reasoning_languages: list[str] | None = setting(None, "ask each prompt in each of these languages (default: the "
                                                          "row's reasoning_language)")
    max_samples: int | None = setting(None, "only the first N prompts, before they are asked in each language",
                                      "limit", check="positive")
    language_reward: float = setting(1.0, "weight of the reasoning-language reward", check="not_negative")
    format_reward: float = setting(0.5, "weight of the format reward (analysis and final answer, both closed)",
                                   check="not_negative")
    correctness_reward: float = setting(1.0, "weight of the answer check, on rows with an 'answer'",
                                        check="not_negative")
    answer_language_reward: float = setting(0.5, "weight of the answer's language, on rows with an 'answer_language'",
                                            check="not_negative")
    num_generations: int = setting(8, "completions per prompt, each scored against the others", check="positive",
                                   section="reinforcement learning")
    max_completion_length: int = setting(1024, "tokens per completion at most", check="positive")
    temperature: float = setting(1.0, "sampling temperature of the completions", check="above_zero")
    beta: float = setting(0.0, "KL penalty towards the starting model (0: none, and no reference model in memory)",
                          check="not_negative")
    loss_type: Literal["dr_grpo", "grpo", "dapo", "bnpo"] = setting("dr_grpo", "TRL's GRPO loss")
    scale_rewards: Literal["none", "group", "batch"] = setting(
        "none", "divide the advantages by the rewards' std within each prompt's group or the batch (Dr. GRPO: none)")
    epsilon_high: float = setting(0.28, "upper clip of the probability ratio (clip-higher)", check="above_zero")
    learning_rate: float = setting(1e-5, "peak learning rate", check="above_zero")
    batch_size: int = setting(8, "completions per device per micro-batch", "per_device_train_batch_size",
                              check="positive")
    gradient_accumulation_steps: int = setting(4, "micro-batches per optimizer step", check="positive")
    num_train_epochs: float = setting(1.0, "passes over the prompts", check="above_zero")
    max_steps: int | None = setting(None, "stop after N optimizer steps", check="positive")
    resume: bool = setting(False, "continue from the newest complete checkpoint in --output_dir")
    logging_steps: int = setting(1, "log every N optimizer steps", check="positive")
    save_steps: int = setting(50, "checkpoint every N optimizer steps", check="positive")
    report_to: Literal["trackio", "wandb", "tensorboard", "none"] = setting(
        "trackio", "experiment tracking (trackio logs stay local)")


@dataclass(frozen=True)
class GrpoRun(PreflightSettings, GrpoSettings, ModelSettings, CommonSettings):
    """--mode grpo"""


@register
class Grpo(ModelMode):
    """--mode grpo: the given adapter (or a new one on the base) trained further with GRPO, rewarded for reasoning
    in the language the system prompt names."""

    name, settings, during = "grpo", GrpoRun, "GRPO training"
    summary = "grpo (teach a reasoning language from prompts)"
    output_help = "grpo gpt-oss-20b-grpo, demo demo_grpo_output"
    outputs = TRAINER_OUTPUTS + r"|speed\.json|reward_curve\.png"
    demo_defaults = dict(learning_rate=3e-3, num_generations=8, max_completion_length=160, batch_size=32,
                         gradient_accumulation_steps=1, max_steps=40, max_samples=40, save_steps=10,
                         reasoning_languages=["Polish", "French", "German", "Spanish", "Italian"])
    every_rank = resumes = True

    def run(self, cfg, runtime):
        return run_grpo(cfg, runtime)

    def output_dir(self, cfg, adapter):
        return "demo_grpo_output" if cfg.demo else "gpt-oss-20b-grpo"

    def derive(self, cfg):
        if cfg.allow_any_language:  # before the names are read: their error would advise this very flag
            raise UsageError("--allow-any-language: grpo rewards the reasoning's language with the language detector, "
                             "which knows only its 75 languages; drop it")
        return dict(reasoning_languages=language_names(cfg.reasoning_languages, "--reasoning-languages",
                                                       self.any_language(cfg), detected=True))

    def any_language(self, cfg):
        return False  # the reward reads the reasoning's language with the detector: it must know the language

    def check(self, cfg):
        if (cfg.language_reward or cfg.answer_language_reward) and importlib.util.find_spec("lingua") is None:
            raise UsageError("--mode grpo rewards the reasoning's language with lingua: pip install "
                             "lingua-language-detector (or --language_reward 0 --answer_language_reward 0)")
        if cfg.num_generations < 2:
            raise UsageError("--num_generations must be at least 2: GRPO scores each completion against the others "
                             "of its prompt")
        completions = cfg.batch_size * cfg.gradient_accumulation_steps * world_size()
        if completions % cfg.num_generations:
            raise UsageError(f"--num_generations {cfg.num_generations} must divide the completions of one optimizer "
                             f"step ({cfg.batch_size} x {cfg.gradient_accumulation_steps} x {world_size()} "
                             f"process{'es' * (world_size() > 1)} = {completions}), so each prompt's completions are "
                             "scored together")
        if not any(weight for weight in reward_weights(cfg).values()):
            raise UsageError("every reward weight is 0: nothing to learn from (--language_reward is 1 by default)")
        check_training_run(cfg)
        if cfg.adapter and not (cfg.demo and demo_adapter_pending(cfg.adapter)):
            read_lora_adapter(cfg.adapter)  # one line here, not PEFT's traceback (the demo trains its own first)

    def inputs(self, cfg):
        return {} if cfg.synthetic_data else {"the prompts": cfg.dataset}

    def strategy(self, cfg, world_size):
        return "ddp" if world_size > 1 else "single"

    def use_less_memory(self, cfg):
        return (f"To use less: --num_generations {max(cfg.num_generations // 2, 2)} --batch_size "
                f"{max(cfg.batch_size // 2, 1)}, --max_completion_length {max(cfg.max_completion_length // 2, 64)}"
                + ("" if cfg.use_4bit else ", --use_4bit (experts in MXFP4: 14 GB of weights instead of 42)") + ".")

    def hub_repos(self, cfg):
        return [] if cfg.synthetic_data or Path(cfg.dataset).expanduser().exists() else [cfg.dataset]

    def after_demo(self, cfg, runtime):
        if runtime.rank == 0 and not (cfg.random_init or cfg.synthetic_data):  # a preflight ends with its numbers
            grpo_demo_table(cfg)


def run_grpo(cfg: GrpoRun, runtime: Runtime | None = None):
    """Prompts asked in each language, completions sampled and scored by the rewards, the adapter updated (TRL's
    GRPOTrainer); the adapter, run_summary.json, speed.json, reward_curve.png and a model card, as train writes them."""
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    runtime = runtime or find_runtime(cfg)
    check_output_dir(cfg)
    prompts = grpo_prompts(cfg)
    tokenizer = load_tokenizer(tokenizer_source(cfg.model, cfg.adapter))
    config = load_model_config(cfg.model)
    trainable_here(cfg.model, config, runtime.on_cuda)
    attention = resolve_attention(cfg.attn_implementation, runtime.on_cuda)  # what loading would refuse, checked
    check_loadable(cfg.model, config, cfg.use_4bit, cfg.random_init)  # before the folder is claimed
    asked = [p["reasoning_language"] for p in prompts]
    print(f"prompts: {len(prompts)} ({', '.join(f'{asked.count(lang)} in {lang}' for lang in dict.fromkeys(asked))}), "
          f"{cfg.num_generations} completions each")
    steps_per_run = optimizer_steps_per_run(cfg, len(prompts) * cfg.num_generations, runtime.world_size)  # completions
    if finished_run(cfg, steps_per_run):
        return None
    if runtime.rank == 0:
        claim_output_dir(Path(cfg.output_dir), "grpo", replace_own=not cfg.resume, settings=run_settings(cfg))
    model = load_model(cfg.model, config, runtime.dtype, attention, runtime.device, runtime.device_map,
                       use_4bit=cfg.use_4bit, random_init=cfg.random_init, seed=cfg.seed, training=True)
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    meter, rollouts = make_speed_meter(model, runtime, warmup_steps=1), []  # rollouts: (seconds, tokens) per generation
    callbacks = [meter, make_nonfinite_guard(cfg.output_dir), make_sigterm_stop()] + [
        make_checkpoint_recorder(cfg.output_dir)] * (runtime.rank == 0)

    class QuietGRPOTrainer(GRPOTrainer):
        def create_model_card(self, *args, **kwargs):
            """Nothing: TRL's card would land in the output folder at each checkpoint, outside the record."""

        # private: GRPOTrainer._generate_single_turn, checked against TRL 1.16.0 (its own timer reports to trackers only)
        def _generate_single_turn(self, *args, **kwargs):
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            rollouts.append((time.perf_counter() - start, sum(map(len, completion_ids))))
            return completion_ids, logprobs

    weighted = {name: fn for name, fn in grpo_reward_functions(cfg, tokenizer).items() if reward_weights(cfg)[name]}
    trainer = QuietGRPOTrainer(model=model, reward_funcs=list(weighted.values()),
                               args=grpo_config(cfg, runtime), train_dataset=Dataset.from_list(prompts),
                               processing_class=tokenizer, callbacks=callbacks,
                               peft_config=None if cfg.adapter else build_lora_config(TrainRun()))  # train's LoRA
    if runtime.on_cuda:
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, trainer, meter, steps_per_run)  # train's loop: resume, Ctrl-C, SIGTERM, NaN, out of memory
    speed = grpo_speed(cfg, runtime, meter.summary(steps_per_run), rollouts, attention)
    summary = save_grpo_run(cfg, runtime, trainer, result, prompts, speed)
    if runtime.rank == 0:
        rewards = summary["reward_first"], summary["reward_last"]
        print(f"saved adapter, model card (README.md), run_summary.json, speed.json and reward_curve.png to "
              f"{cfg.output_dir}/ (mean reward {rewards[0]:.3f} -> {rewards[1]:.3f} over {summary['optimizer_steps']} "
              "steps)")
        print(json.dumps(speed))  # also in speed.json, which bench/benchmark.sh reads
    return trainer


def grpo_speed(cfg: GrpoRun, runtime: Runtime, measured: dict, rollouts: list, attention: str) -> dict:
    """speed.json of a GRPO run: train's step time and peak memory (the first step, with its warm-up, not counted)
    and the rollouts' completion tokens per second, counted on each process alike."""
    timed = rollouts[1:] or rollouts
    seconds, tokens = sum(t[0] for t in timed), sum(t[1] for t in timed) * runtime.world_size
    keep = ("gpu", "processes", "steps_measured", "step_seconds", "peak_memory_gib", "optimizer_steps_per_run",
            "projected_run_minutes")
    return {**{k: measured[k] for k in keep},
            "rollout_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "rollout_seconds": round(seconds / len(timed), 3) if timed else None,
            "completion_tokens_per_step": round(tokens / len(timed), 1) if timed else None,
            **{name: getattr(cfg, name) for name in ("num_generations", "max_completion_length", "batch_size",
                                                     "gradient_accumulation_steps", "use_4bit")},
            "attn_implementation": attention}


def grpo_prompts(cfg: GrpoRun) -> list:
    """One dataset row per prompt and reasoning language: the chat as infer builds it, and what the rewards check."""
    rows = (synthetic_rows(cfg.synthetic_data, cfg.seed) if cfg.synthetic_data
            else read_rows(cfg.dataset, cfg.dataset_split))[:cfg.max_samples]
    prompts = []
    for number, row in enumerate(rows, 1):
        where = f"prompt row {number}"
        user = row.get("user")
        if not isinstance(user, str) or not user.strip():
            raise UsageError(f"{where} has no 'user' text (the question): each row needs one, e.g. "
                             '{"user": "What is 7 x 8?", "answer": 56}')
        answer = row.get("answer")
        try:  # an empty cell (a .csv's) is no answer
            expected = _expected_answer(None if isinstance(answer, str) and not answer.strip() else answer, where)
        except UsageError as e:
            raise UsageError(str(e).replace("'expected'", "'answer'")) from None
        answer_language = row.get("answer_language") and language_name(row["answer_language"],
                                                                        f"{where}: 'answer_language'", detected=True)
        own = row.get("reasoning_language")
        languages = cfg.reasoning_languages or (
            [language_name(own, f"{where}: 'reasoning_language'", detected=True)] if own else None)
        if not languages:
            raise UsageError(f"{where} has no 'reasoning_language': give --reasoning-languages to ask each prompt "
                             "in those languages")
        prompts += [{"prompt": build_chat(user, language, answer_language), "reasoning_language": language,
                     "answer": json.dumps(expected) if expected else "", "answer_language": answer_language or ""}
                    for language in languages]
    if not prompts:
        raise UsageError(f"{cfg.dataset} holds no prompts")
    return prompts


def grpo_config(cfg: GrpoRun, runtime: Runtime):
    from trl import GRPOConfig

    settings = asdict(cfg)
    return GRPOConfig(
        **{name: settings[name] for name in (  # the settings GRPOConfig takes under the same name
            "output_dir", "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "num_generations",
            "max_completion_length", "temperature", "beta", "loss_type", "scale_rewards", "epsilon_high", "logging_steps",
            "save_steps", "seed")},
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps or -1,
        reward_weights=[weight for weight in reward_weights(cfg).values() if weight],  # the rewards run_grpo passes
        router_aux_loss_coef=0.0,  # as train: TRL would add 0.9 x the router's load-balancing loss to the policy's
        chat_template_kwargs={"reasoning_effort": cfg.reasoning_effort},  # the system prompt as infer renders it
        activation_checkpointing=runtime.on_cuda,  # transformers 5.23's name for gradient checkpointing
        bf16=runtime.on_cuda,
        use_cpu=not runtime.on_cuda,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, so the guard stops the run on it
        save_strategy="steps",
        save_total_limit=2,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        project="gpt-oss-20b-grpo",
        run_name=f"{Path(cfg.output_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}",
        trackio_space_id=None,  # trackio logs stay on this machine
        push_to_hub=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if runtime.strategy == "ddp" else None,
    )


def reward_weights(cfg: GrpoRun) -> dict:
    """Each reward's weight, by the names grpo_reward_functions gives the rewards."""
    return {"language": cfg.language_reward, "format": cfg.format_reward, "correctness": cfg.correctness_reward,
            "answer_language": cfg.answer_language_reward}


# Reasoning with fewer letters than this (after numbers and formulas are removed) is too short to tell its language:
# it earns no language reward, or a model would learn to say nothing ("Okay." or "56")
MIN_REASONING_LETTERS = 20


def language_reward(analysis: str | None, language: str) -> float:
    """The share of the reasoning written in `language` (eval's detector, sentence by sentence), after words without a
    letter (numbers, formulas) are removed; 0 for reasoning too short to judge. The final answer is not read: an
    answer in the language must not hide reasoning in another."""
    kept = "\n".join(" ".join(w for w in line.split() if _has_letters(w)) for line in (analysis or "").splitlines())
    if sum(ch.isalpha() for ch in kept) < MIN_REASONING_LETTERS:
        return 0.0
    return language_share(kept, language)


def format_reward(messages: list) -> float:
    """1 for an analysis message and a final answer, each closed (harmony's <|end|> / <|return|>), else 0."""
    closed = {name for name, _, done in messages if done}
    names = [name for name, _, _ in messages]
    return float({"analysis", "final"} <= closed and all(done for _, _, done in messages) and names[-1] == "final")


def correctness_reward(final: str | None, answer: dict | None) -> float | None:
    """1 for a final answer that holds the expected one (eval's check), 0 otherwise; None where the row has none."""
    return None if answer is None else float(answer_is_correct(final, answer))


def answer_language_reward(final: str | None, language: str | None) -> float | None:
    """1 for a final answer detected in the asked language; None where the row asks for none."""
    return None if not language else float(final is not None and detect_language(final) == language)


def grpo_reward_functions(cfg: GrpoRun, tokenizer) -> dict:
    """The four rewards as TRL calls them (completion_ids and the dataset's columns), by reward_weights' names. The
    language reward also logs, per language, its mean and the mean reasoning length: a reward won by shortening the
    reasoning shows."""
    def parts(completion_ids):  # each completion read as infer reads its output
        readers = [read_harmony(ids, tokenizer) for ids in completion_ids]
        channels = [reader.channels() for reader in readers]
        return [r.messages for r in readers], [c["analysis"] for c in channels], [c["final"] for c in channels]

    def language(completion_ids, reasoning_language, log_metric=None, **_):
        _, analysis, _ = parts(completion_ids)
        scores = [language_reward(a, lang) for a, lang in zip(analysis, reasoning_language)]
        for lang in sorted(set(reasoning_language)):
            mine = [i for i, other in enumerate(reasoning_language) if other == lang]
            if log_metric:
                log_metric(f"language_reward/{lang}", sum(scores[i] for i in mine) / len(mine))
                log_metric(f"reasoning_tokens/{lang}", sum(len(tokenizer(analysis[i], add_special_tokens=False)
                                                               ["input_ids"]) for i in mine) / len(mine))
        return scores

    def format(completion_ids, **_):  # noqa: A001 (TRL logs a reward by its function's name)
        return [format_reward(m) for m in parts(completion_ids)[0]]

    def correctness(completion_ids, answer, **_):
        return [correctness_reward(f, json.loads(a) if a else None) for f, a in zip(parts(completion_ids)[2], answer)]

    def answer_language(completion_ids, answer_language, **_):
        return [answer_language_reward(f, lang) for f, lang in zip(parts(completion_ids)[2], answer_language)]

    return {"language": language, "format": format, "correctness": correctness, "answer_language": answer_language}


def save_grpo_run(cfg: GrpoRun, runtime: Runtime, trainer, result, prompts: list, speed: dict) -> dict:
    """The adapter and its record, staged and moved in with adapter_config.json last (as train saves)."""
    out, staging = Path(cfg.output_dir), Path(cfg.output_dir) / ".final.tmp"
    if runtime.rank == 0:
        record(out, staging, pending=True)
    if "ref" in trainer.model.peft_config:  # TRL 1.16's copy of --adapter for --beta's KL: PEFT would save it as ref/
        trainer.model.delete_adapter("ref")  # beside the adapter (checkpoints keep it: transformers reloads it on resume)
    trainer.save_model(str(staging))
    if runtime.rank:
        return {}
    logs = [e for e in trainer.state.log_history if "reward" in e and "step" in e]
    languages = sorted({p["reasoning_language"] for p in prompts})
    summary = {
        "config": asdict(cfg),
        "versions": library_versions(),
        "device": runtime.device_name if runtime.on_cuda else f"cpu ({platform.processor() or platform.machine()})",
        "started_from": cfg.adapter or f"a new LoRA adapter on {cfg.model}",
        "reasoning_languages": languages,
        "prompts": len(prompts),
        "optimizer_steps": trainer.state.global_step,
        "reward_first": logs[0]["reward"] if logs else None,
        "reward_last": logs[-1]["reward"] if logs else None,
        "per_step": [{k: v for k, v in e.items() if k == "step" or k == "reward" or "/" in k} for e in logs],
        "runtime_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
        "peak_gpu_memory_gib": speed["peak_memory_gib"]["allocated"],
        "speed": speed,
    }
    plot_rewards(logs, languages, staging / "reward_curve.png")
    (staging / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (staging / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    (staging / "README.md").write_text(
        f"---\nbase_model: {cfg.model}\nlibrary_name: peft\ntags: [gpt-oss, grpo, trl, lora]\n---\n\n"
        f"# {out.name}\n\nLoRA adapter for {cfg.model}, trained with GRPO (TRL) by gpt_oss_20b_sft.py from "
        f"{summary['started_from']}, rewarded for reasoning in the language the system prompt names "
        f"(`reasoning language: X`): {', '.join(languages)}. {len(prompts)} prompts, {cfg.num_generations} completions "
        f"each, {summary['optimizer_steps']} optimizer steps; mean reward {summary['reward_first']} -> "
        f"{summary['reward_last']}. The settings are in run_summary.json.\n")
    move_staged_into_place(staging, out)
    return summary


def plot_rewards(logs: list, languages: list, path: Path):
    """The language reward and the mean reasoning length per language over the steps, side by side."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    reward, length = figure.subplots(1, 2)
    for language in languages:
        for ax, key in ((reward, "language_reward"), (length, "reasoning_tokens")):
            points = [(e["step"], e[f"{key}/{language}"]) for e in logs if f"{key}/{language}" in e]
            if points:
                ax.plot(*zip(*points), label=language)
    reward.set(xlabel="optimizer step", ylabel="language reward (mean)", ylim=(-0.05, 1.05))
    length.set(xlabel="optimizer step", ylabel="reasoning tokens (mean)")
    for ax in (reward, length):
        ax.grid(alpha=0.3)
        if ax.lines:  # none where the language reward did not run (--language_reward 0)
            ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def grpo_demo_table(cfg: GrpoRun):
    """After the demo's GRPO run: base, SFT and GRPO side by side on the demo's held-out questions (eval's table)."""
    print(f"\nThe base, the SFT adapter ({cfg.adapter}) and the GRPO adapter ({cfg.output_dir}) on questions neither run "
          "trained on:")
    run_eval(parse_config(["--mode", "eval", "--demo", "--adapter", cfg.output_dir, "--compare-adapter", cfg.adapter,
                           "--model", cfg.model, "--reasoning-languages", ",".join(["English", *cfg.reasoning_languages]),
                           "--output_dir", str(Path(cfg.output_dir) / "eval")]))


# -----------------------------------------------------------------------------
# Merge: the adapter folded into the base, one standard checkpoint that serving stacks load without PEFT


@dataclass(frozen=True)
class MergeSettings:
    """merging ({readers})"""
    merge_format: Literal["mxfp4", "bf16", "gguf"] = setting(
        "mxfp4", "mxfp4 writes the base's own format (MXFP4 experts copied byte for byte, ~13 GB); bf16 dequantizes "
                 "them (~42 GB; chosen by itself for an adapter on expert tensors); gguf writes one model.gguf for "
                 "llama.cpp and Ollama (MXFP4 experts repacked)")
    merge_logits_check: bool = setting(True, "also compare base+adapter and merged logits where the model fits in "
                                             "memory (the tensor check always runs)")


@dataclass(frozen=True)
class MergeRun(MergeSettings, CommonSettings):
    """--mode merge"""


@register
class Merge(Mode):
    """--mode merge: the adapter folded into its base, streamed tensor by tensor."""

    name, settings, during = "merge", MergeRun, "merging"
    summary = "merge it into its base"
    output_help = "merge <adapter>-merged"
    outputs = (r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|"
               r"generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|chat_template\.jinja|"
               r"merge_check\.json")
    streams_model = True

    def run(self, cfg, runtime):
        return run_merge(cfg, runtime)

    def output_dir(self, cfg, adapter):
        return f"{Path(adapter)}-merged" if adapter else None

    def check(self, cfg):
        if not cfg.adapter:
            raise UsageError("--mode merge needs --adapter (the output_dir of a train run)")

    def use_less_memory(self, cfg):
        return ("The merge itself streams the checkpoint; its logits check holds the whole model in bf16 "
                "(about 42 GB for gpt-oss-20b): run it on a card with more free memory, or with "
                "CUDA_VISIBLE_DEVICES= in front of the command (on a CPU with less than about 50 GB of RAM the "
                "logits check is skipped and the tensor check runs alone).")


def run_merge(cfg: MergeRun, runtime: Runtime | None = None) -> dict:
    """The adapter folded into its base without loading the model: the base's safetensors are read tensor by tensor,
    the adapted weights rewritten and every other tensor copied (MXFP4 experts byte for byte), so the result has
    the base's format and size; bf16 output dequantizes the experts one tensor at a time."""
    runtime = runtime or find_runtime(cfg)
    check_output_dir(cfg)
    if cfg.merge_format == "gguf" and importlib.util.find_spec("gguf") is None:
        raise UsageError("--merge-format gguf needs the gguf package: pip install -r requirements-serve.txt")
    out = Path(cfg.output_dir)
    adapter_config, pairs = read_lora_adapter(cfg.adapter)
    config = load_model_config(cfg.model)
    base_dir = checkpoint_dir(cfg.model)
    layout = checkpoint_layout(checkpoint_files(str(base_dir)))
    updates = plan_updates(layout, adapter_config, pairs, cfg.adapter, cfg.model)
    tokenizer = load_tokenizer(tokenizer_source(cfg.model, cfg.adapter))
    quantized = sorted({n.split(".mlp.")[-1] for n in updates if n not in layout})
    as_gguf = cfg.merge_format == "gguf"
    to_bf16 = cfg.merge_format == "bf16" or bool(quantized)  # gguf: the experts only, the rest as the base stores it
    if as_gguf:
        gguf_pre_tokenizer(tokenizer)  # a tokenizer llama.cpp cannot split like this one is refused before writing
    if quantized and cfg.merge_format != "bf16":
        print(f"note: this adapter changes MXFP4 expert weights ({', '.join(quantized)}), which would need "
              "re-quantizing: writing bf16 " + ("experts" if as_gguf else "instead (--merge-format bf16, about 3x the "
                                                                         "size)"))
    written = "bf16" if to_bf16 else "mxfp4" if any(n.endswith("_blocks") for n in layout) else "base dtypes"
    kept = {"mxfp4": "MXFP4 experts copied byte for byte", "base dtypes": "the base's dtypes"}.get(written, written)
    if as_gguf:
        written, kept = f"gguf ({written} experts)", f"one GGUF for llama.cpp, {kept.replace('copied', 'repacked')}"
    print(f"merging {cfg.adapter} into {cfg.model} ({kept}): {len(updates)} weights rewritten, streamed tensor by "
          f"tensor")
    skipped = ("transformers does not run a GGUF; the tests check it against llama.cpp" if as_gguf else
               logits_check_skipped(layout, runtime.on_cuda) if cfg.merge_logits_check
               else "turned off with --no-merge-logits-check")
    with staged_directory(out) as staging:  # out is empty, or holds an earlier merge that --overwrite replaces
        claim_output_dir(staging, "merge", replace_own=False)
        if as_gguf:
            write_gguf(config, layout, updates, staging / GGUF_FILE, tokenizer, to_bf16, out.name)
            read, weight_map = gguf_reader(staging / GGUF_FILE, layout, to_bf16, config.num_hidden_layers)
        else:
            weight_map, read = stream_merge(layout, updates, staging, to_bf16), None
            write_merge_configs(config, base_dir, staging, tokenizer, to_bf16)
        tensors = check_merged_tensors(staging, weight_map, layout, updates, to_bf16, read)
        if not tensors["passed"]:
            raise RunFailed(f"The merged tensors do not equal W + s·BA (worst error "
                            f"{tensors['worst_error_over_bound']:.2f}x the rounding bound, missing {tensors['missing']}), "
                            "so nothing was written.")
        print(f"checked: the {tensors['tensors']} merged weights equal W + s·BA rounded once (worst error "
              f"{tensors['worst_error_over_bound']:.2f}x the rounding bound) and every other tensor is there")
        logits = {"skipped": skipped} if skipped else compare_merged_logits(cfg, runtime, staging,
                                                                            exact=written == "base dtypes")
        if skipped:
            print(f"skipped the logits check: {skipped}; the tensor check above ran")
        else:
            numbers = (f"relative difference {logits['relative_error']:.2%} (at most "
                       f"{MERGE_TOLERANCE['relative_error']:.0%}), same top token at {logits['top1_agreement']:.1%} "
                       f"of {logits['positions']} positions (at least {MERGE_TOLERANCE['top1_agreement']:.0%}); the "
                       f"adapter moves the logits by {logits['adapter_effect']:.1%} and the merge keeps "
                       f"{logits['adapter_kept']:.0%} of that (at least {MERGE_TOLERANCE['adapter_kept']:.0%})")
            if not logits["passed"]:
                raise RunFailed(f"The merged model does not match base+adapter on {len(MERGE_CHECK_PROMPTS)} check "
                                f"prompts ({numbers}), so nothing was written. Serve the adapter unmerged instead "
                                "(vLLM and transformers load LoRA adapters), or train it further if its effect is "
                                "below bf16 rounding.")
            print(f"verified: merged logits equal base+adapter within bf16 tolerance on {len(MERGE_CHECK_PROMPTS)} "
                  f"prompts: {numbers}")
        checked = {"passed": True, "format": written, "base": cfg.model,
                   "adapter": cfg.adapter, "weights_rewritten": sorted(updates),
                   "checks_run": ["tensors"] + ([] if skipped else ["logits"]),
                   "tensor_check": tensors, "logits_check": logits}
        (staging / "merge_check.json").write_text(json.dumps(checked, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.glob("*.gguf" if as_gguf else "*.safetensors"))
    size = f"{size / 2**30:.2f} GiB" if size > 2**30 else f"{size / 2**20:.1f} MiB"
    print(f"wrote the merged model to {out}/ " + (f"({GGUF_FILE}, {size}, with its tokenizer and chat template; "
          "merge_check.json)" if as_gguf else f"({size} of safetensors, config, generation config, tokenizer, "
                                           "merge_check.json)"))
    return checked


def read_lora_adapter(adapter: str, flag: str = "--adapter") -> tuple:
    """(adapter_config, {PEFT module path: {"A": lora_A, "B": lora_B}}) of a train run's adapter. Anything the
    streaming merge cannot fold exactly (not LoRA, DoRA, trained biases or embeddings, extra saved modules) or cannot
    read (a missing or corrupt file) is one line, before anything is written."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(adapter)
    if not folder.is_dir() or not (folder / "adapter_config.json").is_file():
        raise UsageError(f"{flag} {adapter} " + ("does not exist" if not folder.exists() else "is a file"
                         if not folder.is_dir() else "holds no adapter_config.json: it is not a LoRA adapter folder")
                         + "; pass the --output_dir of a train or grpo run")
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise UsageError(f"{flag} {adapter}: adapter_config.json is not readable JSON (a damaged file?)")
    extras = [k for k in ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices") if config.get(k)]
    if config.get("peft_type") != "LORA" or extras:
        with_extras = f" with {', '.join(extras)}" if extras else ""
        raise UsageError(f"{flag} {adapter} is a {config.get('peft_type')} adapter{with_extras}; this tool takes plain "
                         "LoRA adapters (as train and grpo write them)")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{flag} {adapter} has no adapter_model.safetensors (a train run that did not finish?)")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{flag} {adapter}: adapter_model.safetensors is corrupt "
                         f"({str(e).splitlines()[0]})") from None
    pairs = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if not match or tensor.ndim != 2:
            raise UsageError(f"{flag} {adapter} holds {key}, which is no LoRA A/B matrix; merge folds plain LoRA "
                             "only")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            raise UsageError(f"{flag} {adapter}: {module} has no matching lora_A/lora_B pair; the file is damaged")
    return config, pairs


def checkpoint_layout(files: list) -> dict:
    """{tensor name: (file, shape, safetensors dtype)} of a checkpoint, from the shards' headers alone."""
    from safetensors import SafetensorError, safe_open

    layout = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as shard:
                for name in shard.keys():
                    view = shard.get_slice(name)
                    layout[name] = (file, tuple(view.get_shape()), view.get_dtype())
        except SafetensorError as e:
            raise UsageError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return layout


def plan_updates(layout: dict, adapter_config: dict, pairs: dict, adapter: str, model: str) -> dict:
    """{base weight name: (A, B, scale)}: each LoRA pair matched to the weight it adapts, by name and shape. Linear
    layers: W [out, in] += s·B@A. Expert tensors (PEFT's target_parameters, nested as base_layer): W [E, in, out]."""
    targets = adapter_config.get("target_parameters") or []
    updates = {}
    for key, pair in pairs.items():
        module = re.sub(r"(\.base_layer)+$", "", key)
        a_rows, in_features = pair["A"].shape
        out_features = pair["B"].shape[0]
        candidates = [f"{module}.weight"] + [f"{module}.{t.rsplit('.', 1)[-1]}" for t in targets
                                             if module.endswith(t.rsplit(".", 1)[0])]
        shapes = {c: stored_shape(layout, c) for c in candidates}
        fits = [c for c, shape in shapes.items() if shape and c not in updates and (
            shape == (out_features, in_features) if len(shape) == 2
            else len(shape) == 3 and a_rows % shape[0] == 0 and shape[1:] == (in_features, out_features))]
        if len(fits) != 1:
            found = ", ".join(f"{c} {list(s)}" for c, s in shapes.items() if s) or f"no {candidates[0]}"
            raise UsageError(f"--adapter {adapter} does not fit {model}: its {module} update is {out_features}x"
                             f"{in_features} and the model has {found}; was it trained on another base?")
        name = fits[0]
        experts = shapes[name][0] if len(shapes[name]) == 3 else 1
        alpha = adapter_config.get("lora_alpha", 8)
        for pattern, value in (adapter_config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = value
        rank = a_rows // experts
        scale = alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank
        updates[name] = (pair["A"], pair["B"], scale)
    return updates


def stored_shape(layout: dict, name: str) -> tuple | None:
    """The shape of a weight as the model holds it: MXFP4 blocks [E, out, in/32, 16] hold an [E, in, out] weight."""
    if name in layout:
        return layout[name][1]
    if f"{name}_blocks" in layout:
        experts, rows, groups, _ = layout[f"{name}_blocks"][1]
        return experts, groups * 32, rows
    return None


def gguf_pre_tokenizer(tokenizer) -> str:
    """The name llama.cpp gives the tokenizer's pre-tokenizer: gpt-4o for gpt-oss's (o200k's split, then byte-level);
    gpt-2 for a plain byte-level one (the demo's). Anything else is one line: llama.cpp would split text differently."""
    # private: transformers.integrations.gguf's GGUF_PRE_TOKENIZER_SPLITS; checked against transformers 5.23.0
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if [s.get("type") for s in steps] == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if [s.get("type") for s in steps] == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        names = [n for n, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == steps[0]["pattern"].get("Regex")]
        if names:
            return "gpt-4o" if "gpt-4o" in names else names[0]
    raise UsageError("--merge-format gguf: this tokenizer's pre-tokenizer is not one llama.cpp knows (gpt-oss's "
                     "o200k split or plain byte-level); use --merge-format mxfp4 or bf16")


def logits_check_skipped(layout: dict, on_cuda: bool) -> str | None:
    """Why the logits check cannot run here, or None: it holds the model in bf16 with its experts dequantized, once
    with the adapter and once merged (one after the other), and wants a fifth more for activations."""
    values = sum(math.prod(shape) * (2 if name.endswith("_blocks") else 0 if name.endswith("_scales") else 1)
                 for name, (_, shape, _) in layout.items())
    need, free = 2 * values * 1.2, free_memory(on_cuda)
    if need <= free:
        return None
    where = "on the GPU" if on_cuda else "of RAM"
    return (f"it holds the model in bf16 ({need / 1.2 / 2**30:.1f} GiB, {need / 2**30:.1f} GiB with activations) and "
            f"this machine has {free / 2**30:.1f} GiB free {where}")


def free_memory(on_cuda: bool) -> int:
    """Bytes free where the logits check would load the model: the GPU's, or the machine's available RAM."""
    import psutil
    import torch

    return torch.cuda.mem_get_info()[0] if on_cuda else psutil.virtual_memory().available


def stream_merge(layout: dict, updates: dict, staging: Path, to_bf16: bool) -> dict:
    """Write the merged checkpoint into staging, one output shard at a time, reading the base tensor by tensor
    through safetensors' memory map (closed after each shard, so its pages leave memory). Returns the weight map."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, nbytes in output_tensors(layout, to_bf16):
        if shards[-1] and size + nbytes > MERGE_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    weight_map = {}
    for file, names in zip(files, shards):
        with contextlib.ExitStack() as stack:
            get = base_tensors(layout, stack)
            tensors = {name: merged_tensor(get, name, name in layout, updates, to_bf16) for name in names}
            save_file(tensors, str(staging / file), metadata={"format": "pt"})
            del tensors
        weight_map.update(dict.fromkeys(names, file))
    if len(files) > 1:
        total = sum(nbytes for _, nbytes in output_tensors(layout, to_bf16))
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return weight_map


MERGE_SHARD_BYTES = 2 * 2**30  # output shards of at most this size: the merge holds about one shard in memory


def output_tensors(layout: dict, to_bf16: bool) -> list:
    """(output name, bytes) in the base's order. bf16 output: each MXFP4 blocks+scales pair becomes one bf16 weight."""
    items = []
    for name, (_, shape, dtype) in layout.items():
        if to_bf16 and name.endswith("_scales") and f"{name[:-7]}_blocks" in layout:
            continue
        if to_bf16 and name.endswith("_blocks") and f"{name[:-7]}_scales" in layout:
            items.append((name[:-7], 2 * 2 * math.prod(shape)))  # two 4-bit values a byte, two bytes each
        else:
            size = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(dtype, 2)
            items.append((name, math.prod(shape) * (2 if to_bf16 and dtype in ("F64", "F32") else size)))
    return items


def base_tensors(layout: dict, stack: contextlib.ExitStack):
    """get(name): a base tensor, read through safetensors' memory map, each shard opened once and closed with stack."""
    from safetensors import safe_open

    opened = {}

    def get(name):
        file = layout[name][0]
        if file not in opened:
            opened[file] = stack.enter_context(safe_open(str(file), "pt"))
        return opened[file].get_tensor(name)

    return get


def merged_tensor(get, name: str, stored: bool, updates: dict, to_bf16: bool):
    """One output tensor: W + s·BA computed in fp32 and rounded once (to bf16, or to the dtype the base stores);
    with to_bf16 an MXFP4 weight is dequantized by transformers' dequantizer first; any other tensor as stored."""
    import torch
    # private: transformers.integrations.mxfp4's convert_moe_packed_tensors; checked against transformers 5.23.0
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    update = updates.get(name)
    if not stored:  # stored as MXFP4 blocks and scales
        weight = convert_moe_packed_tensors(get(f"{name}_blocks"), get(f"{name}_scales"),
                                            dtype=torch.float32 if update else torch.bfloat16,
                                            rows_per_chunk=MXFP4_ROWS_PER_CHUNK)
        target = torch.bfloat16
    else:
        weight = get(name)
        target = torch.bfloat16 if to_bf16 and weight.is_floating_point() else weight.dtype
    if update:
        weight = weight.float() + lora_delta(*update, tuple(weight.shape))
    return weight.to(target).contiguous()


def lora_delta(a, b, scale: float, shape: tuple, dtype=None):
    """s·B@A in the weight's shape (fp32 unless dtype says otherwise). Experts, as PEFT's ParamWrapper computes it:
    A [E·r, in] and B [out, r·E] give one [in, out] update per expert."""
    import torch

    a, b = a.to(dtype or torch.float32), b.to(dtype or torch.float32)
    if len(shape) == 2:
        return (b @ a) * scale
    experts = shape[0]
    rank = a.shape[0] // experts
    b, a = b.reshape(b.shape[0], rank, experts), a.reshape(experts, rank, a.shape[-1])
    return torch.einsum("ore,eri->eio", b, a) * scale


def write_merge_configs(config, base_dir: Path, staging: Path, tokenizer, to_bf16: bool):
    """config.json as the base's (its quantization_config kept) or, for bf16, without it; generation_config.json
    stopping on <|return|> and <|call|>; the tokenizer."""
    import torch
    from transformers import GenerationConfig

    if to_bf16:
        config = unquantized_config(config)
        config.dtype = torch.bfloat16
        config.save_pretrained(staging)
    else:
        shutil.copyfile(base_dir / "config.json", staging / "config.json")
    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    generation.eos_token_id = [e for e in dict.fromkeys([*eos, *tokenizer.convert_tokens_to_ids(STOP_TOKENS)])
                               if e is not None]
    generation.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


# --merge-format gguf: one file for llama.cpp and the apps built on it (Ollama, LM Studio), written with gguf, llama.cpp's
# own writer library, in the layout its converter (convert_hf_to_gguf.py, GptOssModel) gives gpt-oss: MXFP4 experts
# repacked without touching a value, the fused gate_up tensor split by rows (even rows gate, odd rows up), vectors,
# biases and the router in F32, every other weight in the dtype the base stores it.
GGUF_FILE = "model.gguf"


def write_gguf(config, layout: dict, updates: dict, path: Path, tokenizer, experts_bf16: bool, title: str):
    """The merged model as one GGUF, streamed: every tensor's name and size first, then the data one tensor at a time
    (gguf's add_tensor would hold them all). The metadata is what llama.cpp's gpt-oss loader reads; the tokenizer's
    merges, special ids and chat template come from gguf's SpecialVocab."""
    import tempfile

    import gguf
    import numpy as np

    pre = gguf_pre_tokenizer(tokenizer)
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    mxfp4 = any(n.endswith("_blocks") for n in layout) and not experts_bf16
    plan = gguf_plan(layout, experts_bf16, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(title)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", None)))
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if mxfp4 else gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types = gguf_vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as saved:  # SpecialVocab reads the tokenizer's files
        tokenizer.save_pretrained(saved)
        gguf.SpecialVocab(saved, load_merges=True, n_vocab=config.vocab_size).add_to_gguf(writer, quiet=True)
    for name, ggml_type, shape, _, _ in plan:
        writer.add_tensor_info(name, shape, np.uint8, math.prod(shape), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with contextlib.ExitStack() as stack:
        get = base_tensors(layout, stack)
        for entry in plan:
            writer.write_tensor_data(gguf_tensor(get, entry, layout, updates))
    writer.close()


def gguf_vocabulary(tokenizer, vocab_size: int) -> tuple:
    """(tokens, token types) over the model's whole vocabulary, as llama.cpp's converter lists them (gguf's own
    vocabulary readers do not pad to the embedding's rows): ids without a token are [PAD<id>], unused."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = added[i].special or re.fullmatch(r"<\|.*\|>", token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def gguf_plan(layout: dict, experts_bf16: bool, layers: int) -> list:
    """[(GGUF name, GGML type, byte shape, base tensor, row parity or None)] in the base's order, from the headers
    alone: the writer needs every tensor's name and size before the first byte of data."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, layers)
    kind = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16}
    size = {"F32": 4, "F16": 2}
    plan = []

    def add(hf_name, ggml_type, shape, source, part=None):
        plan.append((names.get_name(hf_name, try_suffixes=(".weight", ".bias")), ggml_type, shape, source, part))

    for name, (_, shape, dtype) in layout.items():
        weight = name.removesuffix("_blocks")
        if name.endswith("_scales") and f"{name[:-7]}_blocks" in layout:
            continue
        expert = weight.rsplit(".", 1)[-1] in MXFP4_TENSORS
        if expert:  # [E, in, out] (or MXFP4 [E, out, groups, 16]) -> ggml's [E, out, in], gate_up split by rows
            stem = weight.rsplit(".", 1)[0]
            if name.endswith("_blocks") and not experts_bf16:
                ggml_type, (experts, rows, row_bytes) = gguf.GGMLQuantizationType.MXFP4, (shape[0], shape[1],
                                                                                         shape[2] * 17)
            else:
                experts, cols, rows = stored_shape(layout, weight)
                stored_bf16 = name.endswith("_blocks") or dtype == "BF16"
                ggml_type = gguf.GGMLQuantizationType.BF16 if stored_bf16 else kind.get(dtype)
                row_bytes = cols * (2 if stored_bf16 else size.get(dtype, 0))
            if weight.endswith("gate_up_proj"):
                add(f"{stem}.gate_proj.weight", ggml_type, (experts, rows // 2, row_bytes), weight, 0)
                add(f"{stem}.up_proj.weight", ggml_type, (experts, rows // 2, row_bytes), weight, 1)
            else:
                add(f"{stem}.down_proj.weight", ggml_type, (experts, rows, row_bytes), weight)
        elif name.endswith("gate_up_proj_bias"):
            stem = name.rsplit(".", 1)[0]
            for part, half in enumerate(("gate", "up")):
                add(f"{stem}.{half}_proj.bias", gguf.GGMLQuantizationType.F32, (shape[0], shape[1] // 2 * 4), name,
                    part)
        else:  # llama.cpp wants vectors (norms, biases, sinks) and the router in F32, as its converter writes them
            f32 = len(shape) == 1 or name.endswith("_bias") or ".router." in name
            gguf_name = name.replace("down_proj_bias", "down_proj.bias") + (".weight" if name.endswith("sinks") else "")
            ggml_type = gguf.GGMLQuantizationType.F32 if f32 else kind.get(dtype, gguf.GGMLQuantizationType.BF16)
            width = 4 if f32 else size.get(dtype, 2)
            add(gguf_name, ggml_type, (*shape[:-1], shape[-1] * width), name)
    return plan


def gguf_tensor(get, entry: tuple, layout: dict, updates: dict):
    """One planned tensor's bytes: W + s·BA where the adapter changes W (merged_tensor), then ggml's layout."""
    import gguf
    import torch

    _, ggml_type, _, source, part = entry
    rows = slice(part, None, 2) if part is not None else slice(None)
    if ggml_type == gguf.GGMLQuantizationType.MXFP4:
        data = ggml_mxfp4(get(f"{source}_blocks")[:, rows], get(f"{source}_scales")[:, rows])
    elif source.rsplit(".", 1)[-1] in MXFP4_TENSORS:
        data = merged_tensor(get, source, source in layout, updates, to_bf16=False).transpose(1, 2)[:, rows]
    else:
        data = merged_tensor(get, source, True, updates, to_bf16=False)
        data = data[..., rows] if part is not None else data
        data = data.float() if ggml_type == gguf.GGMLQuantizationType.F32 else data
    return data.contiguous().view(torch.uint8).numpy()


def ggml_mxfp4(blocks, scales):
    """The checkpoint's MXFP4 as ggml's block_mxfp4 bytes, every value kept: per block of 32, its scale byte, then 16
    bytes whose byte j holds value j (low nibble) and value j+16 (high); the checkpoint packs values 2j, 2j+1 in
    byte j. [..., groups, 16] blocks and [..., groups] scales -> [..., groups * 17] bytes."""
    import torch

    # by hand: gguf quantizes floats afresh (choosing its own scales); the checkpoint's bytes are kept as they are
    values = torch.stack((blocks & 15, blocks >> 4), -1).flatten(-2)  # [..., groups, 32] in order
    packed = values[..., :16] | (values[..., 16:] << 4)
    return torch.cat((scales.unsqueeze(-1), packed), -1).flatten(-2)


def gguf_reader(path: Path, layout: dict, experts_bf16: bool, layers: int) -> tuple:
    """For the tensor check, from the written file: (read, {base tensor: file} for each base tensor whose GGUF tensors
    are all there). read(base tensor name) gives it as written, back in the base's layout (gate and up rows
    interleaved again, experts transposed back)."""
    import gguf
    import torch

    data = {t.name: t for t in gguf.GGUFReader(path).tensors}
    plan = gguf_plan(layout, experts_bf16, layers)
    found = {source for *_, source, _ in plan} - {source for name, *_, source, _ in plan if name not in data}
    weight_map = {name: path.name for name, _ in output_tensors(layout, experts_bf16)
                  if name in found or name.removesuffix("_blocks").removesuffix("_scales") in found}
    dtypes = {gguf.GGMLQuantizationType.BF16: torch.bfloat16, gguf.GGMLQuantizationType.F16: torch.float16,
              gguf.GGMLQuantizationType.F32: torch.float32}

    def read(name):
        parts = [(data[n], t) for n, t, _, source, _ in plan if source == name]
        halves = [torch.from_numpy(tensor.data.copy()).view(torch.uint8).view(dtypes[t]) for tensor, t in parts]
        if len(halves) == 2:  # rows 0, 2, 4, ... came from the first, 1, 3, 5, ... from the second
            halves = [torch.stack(halves, 2).flatten(1, 2)]
        return halves[0].transpose(1, 2) if name.rsplit(".", 1)[-1] in MXFP4_TENSORS else halves[0]

    return read, weight_map


def check_merged_tensors(staging: Path, weight_map: dict, layout: dict, updates: dict, to_bf16: bool,
                         read=None) -> dict:
    """Every merged tensor as written against W + s·BA recomputed in fp64: off by no more than rounding the exact
    sum once to the stored dtype (plus fp32's error in s·BA), and every base tensor present in the output. read(name)
    gives a written tensor in the base's layout (default: from the safetensors shards)."""
    import torch
    from safetensors import safe_open
    # private: transformers.integrations.mxfp4's convert_moe_packed_tensors; checked against transformers 5.23.0
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    missing = [n for n, _ in output_tensors(layout, to_bf16) if n not in weight_map]
    worst = 0.0
    for name, (a, b, scale) in updates.items():
        if read:
            written = read(name)
        else:
            with safe_open(str(staging / weight_map[name]), "pt") as f:
                written = f.get_tensor(name)
        with contextlib.ExitStack() as stack:
            open_base = lambda n: stack.enter_context(safe_open(str(layout[n][0]), "pt")).get_tensor(n)
            base = (open_base(name) if name in layout else convert_moe_packed_tensors(
                open_base(f"{name}_blocks"), open_base(f"{name}_scales"), dtype=torch.float32,
                rows_per_chunk=MXFP4_ROWS_PER_CHUNK)).double()
        delta = lora_delta(a, b, scale, tuple(base.shape), torch.float64)
        exact = base + delta
        magnitude = base.abs() + lora_delta(a.abs(), b.abs(), abs(scale), tuple(base.shape), torch.float64)
        bound = (torch.finfo(written.dtype).eps * exact.abs() + (a.shape[0] + 2) * torch.finfo(torch.float32).eps
                 * magnitude).clamp(min=torch.finfo(written.dtype).tiny)
        worst = max(worst, float(((written.double() - exact).abs() / bound).max()))
        del written, base, delta, exact, magnitude, bound
    return {"tensors": len(updates), "worst_error_over_bound": worst, "missing": missing[:5],
            "passed": worst <= 1.0 and not missing}


def compare_merged_logits(cfg: MergeRun, runtime: Runtime, staging: Path, exact: bool = False) -> dict:
    """Today's check on the written files: base+adapter (PEFT) against the merged directory as transformers loads it,
    on MERGE_CHECK_PROMPTS; one model in memory at a time. Both in bf16, as they are served, unless the merge kept
    the base's own dtypes (exact: a float32 test model on CPU is compared in float32, not rounded twice to bf16)."""
    import gc

    import torch

    dtype = runtime.dtype if exact else torch.bfloat16

    def load(source: str):  # the MXFP4 experts dequantized, attention as this machine runs it
        return load_model(source, load_model_config(source), dtype, resolve_attention("auto", runtime.on_cuda),
                          runtime.device, runtime.device_map)

    model = with_adapter(load(cfg.model), cfg.adapter)
    tokenizer = load_tokenizer(tokenizer_source(cfg.model, cfg.adapter))
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template([build_chat(prompt, language) for prompt, language in MERGE_CHECK_PROMPTS],
                                          add_generation_prompt=True, padding=True, return_tensors="pt",
                                          return_dict=True).to(model.device)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        tuned = model(**batch).logits.float()[real]
        with model.disable_adapter():
            base = model(**batch).logits.float()[real]
    del model
    gc.collect()
    merged = load(str(staging)).eval()
    with torch.no_grad():
        after = merged(**batch.to(merged.device)).logits.float()[real]
    del merged
    gc.collect()
    return merge_agreement(tuned, base, after)


MERGE_CHECK_PROMPTS = (("What is 7 x 8?", "German"), ("Quelle est la capitale de l'Australie ?", "French"),
                       ("How many days are there in a leap year?", "Chinese"))


def merge_agreement(tuned, base, merged) -> dict:
    """How closely the merged model's logits follow base+adapter. Storing W + BA in bf16 rounds every weight by up
    to 2**-9 of itself: on the demo model (64 wide, its logits often near ties) that moves the logits by up to 5.4%
    (relative L2) and changes the top token at up to 2.1% of positions (NOTES.md). An adapter whose changes are
    smaller than that rounding is erased by it, as one dropped by an MXFP4 base is, so the merged logits must also
    sit much nearer the tuned model's than the base's."""
    relative = lambda a, b: float((a - b).norm() / b.norm())
    check = {"relative_error": relative(merged, tuned), "top1_agreement": float((merged.argmax(-1) == tuned.argmax(-1))
                                                                               .float().mean()),
             "adapter_effect": relative(tuned, base), "positions": tuned.shape[0]}
    check["adapter_kept"] = 1 - float((merged - tuned).norm() / max(float((tuned - base).norm()), 1e-30))
    check["passed"] = (check["relative_error"] <= MERGE_TOLERANCE["relative_error"]
                       and check["top1_agreement"] >= MERGE_TOLERANCE["top1_agreement"]
                       and check["adapter_kept"] >= MERGE_TOLERANCE["adapter_kept"])
    return check


MERGE_TOLERANCE = {"relative_error": 0.08, "top1_agreement": 0.95, "adapter_kept": 0.5}


# -----------------------------------------------------------------------------
# The offline demo: a tiny gpt-oss with a small tokenizer (the harmony tokens, the real template), pre-trained once to
# think in English whatever the system prompt names, as gpt-oss does; and the same model written as gpt-oss ships
# (experts in MXFP4) for --demo --use_4bit

HARMONY_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                          "<|start|>", "<|end|>", "<|message|>", "<|call|>", "<|endofprompt|>"]


DEMO_BASE_RECIPE = 3  # raised whenever the build itself changes (steps, tokenizer, sizes): a new folder in the cache


@functools.lru_cache(maxsize=None)
def demo_base_key() -> str:
    """The cached base's name: the build's recipe and its pre-training data, so that a cache made from older data or
    by an older build is not used (it stays where it is, beside the new one)."""
    return f"v{DEMO_BASE_RECIPE}-{hashlib.sha256(DEMO_PRETRAIN.read_bytes()).hexdigest()[:10]}"


def demo_model_dir(use_4bit: bool = False) -> Path:
    return CACHE / f"tiny-gpt-oss{'-mxfp4' if use_4bit else ''}-{demo_base_key()}"


def build_demo_model(directory: Path | None = None) -> Path:
    """Write (once) a tiny gpt-oss checkpoint: 2 layers, 4 experts, a 1k byte-level BPE trained on the demo's texts,
    pre-trained to think in English whatever language the system prompt names (gpt-oss's own situation)."""
    directory = directory or demo_model_dir()
    built = lambda: (directory / "config.json").exists() and (directory / "tokenizer.json").exists()  # noqa: E731
    if built():
        return directory
    from filelock import FileLock  # huggingface_hub's dependency

    with FileLock(f"{directory}.lock"):  # two demos started at once on an empty cache: one builds, the other waits
        if not built():
            write_demo_model(directory)
    return directory


def write_demo_model(directory: Path):
    """The build itself, seeded and on one thread, written into directory by one rename."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast
    # private: trl.chat_template_utils' gptoss_chat_template (trl does not export it); checked against trl 1.16.0
    from trl.chat_template_utils import gptoss_chat_template

    texts = [row["text"] if "text" in row else demo_chat_text(row) for row in read_rows(str(DEMO_PRETRAIN))]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread sums in one order: the same tensors on every machine, whatever its load
    try:
        torch.manual_seed(0)
        model = GptOssForCausalLM(config)
        pretrain_demo_model(model, [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts],
                            tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    with staged_directory(directory) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def demo_chat_text(row: dict) -> str:
    """A pre-training chat as training renders it, all tokens learned; the template stamps today's date, pinned here
    so that the base is the same whatever day it is built."""
    # private: trl.chat_template_utils' gptoss_training_chat_template, transformers' render_jinja_template; checked
    # against trl 1.16.0 and transformers 5.23.0
    from transformers.utils.chat_template_utils import render_jinja_template
    from trl.chat_template_utils import gptoss_training_chat_template

    rendered, _ = render_jinja_template([row_to_messages(row)], chat_template=gptoss_training_chat_template)
    return re.sub(r"Current date: \d{4}-\d{2}-\d{2}", "Current date: 2025-08-05", rendered[0])


def pretrain_demo_model(model, texts: list, pad_id: int, steps: int = 250, batch_size: int = 32,
                        micro_batch_size: int = 8):
    """Full training on data/demo_pretrain.jsonl's token ids: harmony chats that reason in English whatever
    language their system prompt names, and plain "reasoning language: X" documents in the five languages and in
    Polish, which no chat reasons in. The base then writes harmony, knows the languages, and ignores the instruction,
    as gpt-oss does before the LoRA run; Polish is what the GRPO demo teaches."""
    import torch

    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = sorted((texts[order[(step * batch_size + k) % len(order)]] for k in range(batch_size)), key=len)
        predicted = sum(len(b) - 1 for b in batch)  # each micro-batch's loss is summed over them: one batch's gradient
        # micro-batches of similar lengths: less padding, and tensors small enough for malloc to reuse (the whole
        # batch at once spent half its time in the kernel mapping fresh pages)
        for start in range(0, batch_size, micro_batch_size):
            micro = batch[start:start + micro_batch_size]
            width = max(map(len, micro))
            ids = torch.tensor([b + [pad_id] * (width - len(b)) for b in micro])
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in micro])
            model(input_ids=ids, attention_mask=mask, labels=torch.where(mask == 1, ids, -100),
                  num_items_in_batch=predicted).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def quantize_to_mxfp4(weight):
    """(blocks, scales) of a [experts, in, out] weight in the checkpoint's layout: the nearest e2m1 value of each
    entry after dividing its block of 32 by the smallest power of two that fits the block's largest into +-6.
    Written by hand because transformers' quantizer needs triton kernels from the Hub; used to build test and demo
    checkpoints only."""
    import torch
    # private: transformers.integrations.mxfp4's FP4_VALUES; checked against transformers 5.23.0
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


def ensure_demo_model(cfg: CommonSettings):
    """The demo's setup: the process on one thread, and the tiny model it runs on, built once into the cache (and
    written as MXFP4 for --use_4bit). An output folder the run would refuse is refused first, not after the minute
    the build takes."""
    import torch

    torch.set_num_threads(1)  # the demo on one thread sums in one order: the same numbers whatever the core count
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # or accelerate 1.x's state sets the cores again (CPU, several ranks)
    if cfg.output_dir and MODES[cfg.mode].outputs:
        check_output_dir(cfg)
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise
        raise UsageError(f"the demo's cache {CACHE} cannot be made ({(e.strerror or str(e)).lower()}); set "
                         "GPT_OSS_SFT_CACHE to a folder you can write") from None
    tiny = build_demo_model()
    if cfg.model == str(demo_model_dir(use_4bit=True)):
        write_mxfp4_checkpoint(tiny, demo_model_dir(use_4bit=True))


def demo_adapter_pending(adapter: str | None) -> bool:
    """Whether `adapter` is the demo's own, not trained yet: the demo trains it before the mode runs."""
    return adapter == DEMO_OUTPUT_DIR and not (Path(DEMO_OUTPUT_DIR) / "adapter_config.json").is_file()


def ensure_demo_adapter(cfg: CommonSettings):
    """The step before infer, chat, eval or merge runs in the demo: its adapter, trained into demo_output with the
    demo's own train settings (none of this run's), when there is none yet. The mode's output folder was checked
    before (ensure_demo_model), so a folder it would refuse is refused before anything is written."""
    if not demo_adapter_pending(cfg.adapter):
        return
    # not tracked: this run's flags cannot reach the step, and it must run where no tracker is installed
    run_train(parse_config(["--mode", "train", "--demo", "--report_to", "none"]))
    print()


def demo_answer(cfg: TrainRun):
    """After the demo's training: its adapter answers the demo's question, then the eval code measures base against
    tuned on questions the run did not train on, into <output_dir>/eval. Infer's and eval's demo settings are resolved
    as those modes resolve them, on the model and with the model settings the adapter was trained with."""
    same_model = ["--demo", "--adapter", cfg.output_dir, "--model", cfg.model, "--attn-implementation",
                  cfg.attn_implementation, "--reasoning-effort", cfg.reasoning_effort, "--seed", str(cfg.seed)
                  ] + ["--use_4bit"] * cfg.use_4bit
    infer = parse_config(["--mode", "infer", "--prompt", DEMO_QUESTION, *same_model])
    print(f"\n> {infer.prompt}  [reasoning language: {infer.reasoning_language}]")
    run_infer(infer)
    if importlib.util.find_spec("lingua") is None:
        print("\nnote: the base-vs-tuned table detects languages with lingua: pip install lingua-language-detector, "
              f"then: python gpt_oss_20b_sft.py --mode eval --demo --adapter {cfg.output_dir}")
        return
    print("\nDid the LoRA run teach the toy model to reason in the language asked for? Base (adapter off) against "
          "tuned, on questions it did not train on (a toy: NOTES.md says what it shows and what not):")
    run_eval(parse_config(["--mode", "eval", *same_model]))


# -----------------------------------------------------------------------------
# Errors, processes and files


class UsageError(Exception):
    """A problem with what the user asked for: one line on stderr, exit code 2, nothing written."""


class RunFailed(Exception):
    """The run started and could not finish (out of memory, NaN loss, a failed merge check): a paragraph, exit 1."""


NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file size limit: RunFailed's kind
# What torch.save (RuntimeError "unexpected pos N vs M", PyTorchStreamWriter), safetensors (SafetensorError "I/O
# error: No space left on device (os error 28)") and numpy's tofile under gguf's writer (OSError "N requested and M
# written") say of such a write: they keep no errno (torch 2.13, safetensors 0.8, numpy 2.4)
NO_ROOM_TEXT = re.compile(r"unexpected pos \d+ vs \d+|file write failed|os error (28|122|27)\b|No space left on device|"
                          r"\d+ requested and \d+ written")


def error_chain(error: BaseException | None):
    """The error and each one it came from."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def out_of_room(error: BaseException) -> bool:
    """Whether an error, or one it came from, is a write that found no room, whatever raised it."""
    return any(isinstance(e, OSError) and e.errno in NO_ROOM or NO_ROOM_TEXT.search(str(e)) for e in error_chain(error))


def no_room_reason(error: BaseException) -> str:
    """What the system said of a write that found no room, in its words where an errno is at hand."""
    for e in error_chain(error):
        if isinstance(e, OSError) and e.errno in NO_ROOM:
            return os.strerror(e.errno).lower()
        code = re.search(r"os error (\d+)", str(e))
        if code:
            return os.strerror(int(code.group(1))).lower()
    return "no space left: a write came up short"


def human_size(size: int) -> str:
    for power, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 2**power:
            return f"{size / 2**power:.1f} {unit}"
    return f"{size} bytes"


class Interrupted(Exception):
    """Ctrl-C: one line saying where the run stopped and how to go on, exit code 130 (as a shell reports SIGINT)."""


class Terminated(BaseException):
    """SIGTERM: one line, exit code 143 (as a shell reports it). A BaseException, as KeyboardInterrupt is, so that no
    handler of errors keeps the process alive, and not a KeyboardInterrupt, which the chat's prompt catches."""


TRAINING, TERMINATED = threading.Event(), threading.Event()  # a Trainer is running; SIGTERM came while it ran


def on_sigterm(signum, frame):
    """Training finishes its step and saves a checkpoint first (make_sigterm_stop); anything else stops at once,
    its staged files removed as on Ctrl-C."""
    if TRAINING.is_set():
        TERMINATED.set()
    else:
        raise Terminated("terminated (SIGTERM); nothing half-written was left behind")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def end_process_group():
    """Leave the launcher's process group before exit: a live gloo/NCCL group can abort at interpreter exit
    ("terminate called without an active exception", seen with torch 2.13 under accelerate launch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int):
    """Exit with code. A process of a multi-process run leaves without the interpreter's teardown: a model wrapped in
    DDP keeps the process group and its threads alive past destroy_process_group (pytorch issue 72366; gloo, torch
    2.13), and freeing them in that teardown aborts one rank now and then ("terminate called without an active
    exception")."""
    if world_size() > 1:
        atexit._run_exitfuncs()  # the exit handlers the teardown would run (CPython's private name, 3.11)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def quiet_library_warnings(on_cuda: bool):
    """Deprecation notices raised inside the libraries, by calls this script does not make: the user cannot act."""
    for message in (r"`is_gradient_checkpointing` is deprecated",  # read by TRL 1.16 and PEFT 0.21 (transformers 5.23)
                    r"`gradient_checkpointing_(enable|disable)` is deprecated",  # called by PEFT 0.21
                    r"_compile flag on create_block_mask",  # transformers 5.23's flex masks (torch >= 2.11)
                    r"`torch.jit.script_method` is deprecated"):  # torch 2.13, at a library's import
        warnings.filterwarnings("ignore", message=message)
    if not on_cuda:  # deepspeed (imported by accelerate) otherwise warns that it found no GPU, at every run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def write_atomically(path: Path, data: str | bytes):
    """Write beside the target, then rename: a reader never sees half a file, a crash never leaves one."""
    write_files_atomically(path.parent, {path.name: data})


def write_files_atomically(folder: Path, files: dict):
    """Write each file beside its target, then rename them all: no reader sees half a file or half of the set, and a
    write that fails (a full disk) leaves none of them."""
    staged, name = {}, next(iter(files))
    try:
        for name, data in files.items():
            staged[name] = folder / f".{name}.tmp{os.getpid()}"
            staged[name].write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        for name, staging in staged.items():
            os.replace(staging, folder / name)
    except OSError as e:
        e.filename = e.filename or str(folder / name)  # a failed write names no file: the message should
        raise
    finally:
        for staging in staged.values():
            staging.unlink(missing_ok=True)  # what a failed write left


def read_text_file(path: Path, what: str) -> str:
    """A text file the user gave, as UTF-8 (a byte-order mark is skipped); every failure is one line naming it."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise UsageError(f"{what} {path}: {(e.strerror or str(e)).lower()}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{what} {path} line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); save it as UTF-8, "
                         "e.g. iconv -f latin1 -t utf-8") from None


@contextlib.contextmanager
def staged_directory(target: Path):
    """A directory to write into on target's own file system: beside target, which it becomes by one rename when the
    block ends without error, or, where target exists (a mount point, a volume), inside it, its entries then moving
    out one by one (swap_in). So no rename crosses a file system, target never holds half of it, and a file that
    appeared in target meanwhile stays."""
    import psutil  # accelerate's, peft's and trl's dependency

    target = Path(os.path.realpath(target))  # the real folder: a link to another disk still renames
    staging = (target if target.is_dir() else target.parent) / f".{target.name}.tmp{os.getpid()}"
    for stale in (p for folder in (target.parent, target) if folder.is_dir()
                  for p in folder.glob(f".{target.name}.tmp*")):
        pid = stale.name.rsplit(".tmp", 1)[1]
        if stale != staging and pid.isdigit() and owner_of(stale) and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's scratch folder, marked by this tool when made
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise
        raise UsageError(f"{target} cannot be made: {(e.strerror or str(e)).lower()}") from None
    try:
        yield staging
        if owner_of(staging):
            record(staging, *(p for p in staging.iterdir() if p.name != OWNER_FILE))
        if target.is_dir():
            lock_folder(target)
            if owner_of(staging) and read_marker(target) is None:  # there before, empty (check_output_dir refused
                claim_output_dir(target, owner_of(staging), replace_own=False)  # anything else): the record follows
            swap_in(staging, target, owner_of(staging), replace_all=True)
            shutil.rmtree(staging)  # left: its marker only
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


OWNER_FILE = ".gpt_oss_sft.json"  # written first into every folder this tool fills: its mode and what it wrote there
_LOCKED = {}  # folder -> open descriptor holding its lock, for as long as this process writes there


def read_marker(folder: Path) -> dict | None:
    """The folder's record, or None where there is none or it is not one (damaged, or edited into another shape)."""
    try:
        marker = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    state = lambda v: v in ("dir", "link") or (isinstance(v, list) and len(v) == 2 and type(v[1]) is int  # noqa: E731
                                                and (v[0] == "pending" or type(v[0]) is int))
    valid = (isinstance(marker, dict) and isinstance(marker.get("mode"), str)
             and isinstance(marker.get("written", {}), dict) and all(map(state, marker.get("written", {}).values()))
             and isinstance(marker.get("settings", {}), dict))
    return marker if valid else None


def owner_of(folder: Path) -> str | None:
    """The mode that filled this folder, from the file it wrote there first; None for a folder the tool did not fill."""
    return (read_marker(folder) or {}).get("mode")


def entry_state(path: Path):
    """What the record keeps of an entry: "dir", or a file's [size, mtime in ns] (a change to either shows)."""
    st = path.lstat()
    return "dir" if stat.S_ISDIR(st.st_mode) else [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else "link"


def record(folder: Path, *paths: Path, since: int | None = None, pending: bool = False):
    """Add entries to folder's record as they are now; a folder with the files in it modified since `since` (ns),
    or, pending, as a folder being written from now on (a run killed meanwhile leaves it so)."""
    marker = read_marker(folder)
    if marker is None:  # not a folder this tool marked as its own
        return
    written = marker.setdefault("written", {})
    for path in paths:
        inside = [] if pending or not path.is_dir() else [p for p in sorted(path.rglob("*"))
                                                         if since is None or p.lstat().st_mtime_ns >= since]
        for p in (path, *inside):
            written[p.relative_to(folder).as_posix()] = ["pending", time.time_ns() - 10**9] if pending else entry_state(p)
    marker["written"] = {k: v for k, v in written.items() if v[:1] == ["pending"] or os.path.lexists(folder / k)}
    write_atomically(folder / OWNER_FILE, json.dumps(marker) + "\n")


def sort_outputs(folder: Path, mode: str) -> tuple:
    """(this mode's earlier outputs, entries this tool did not write), as paths, a folder before its contents. Own:
    in the record and unchanged since; in a folder recorded as being written, or one of an older version, a file of
    a known name (the mode's outputs) from after it began: older versions kept no record. Another output folder of the tool inside, e.g. <adapter>/eval,
    is neither: it stays as it is."""
    marker = read_marker(folder)
    written = (marker or {}).get("written", {}) if owner_of(folder) == mode else {}
    own, foreign = [], []

    def visit(directory: Path, since: int | None):
        for entry in sorted(directory.iterdir()):
            if entry.name == OWNER_FILE and directory == folder or entry.is_dir() and owner_of(entry):
                continue
            state, was = entry_state(entry), written.get(entry.relative_to(folder).as_posix())
            if since is not None:
                mine = state != "link" and bool(re.fullmatch(MODES[mode].outputs, entry.name)) and (
                    state == "dir" or state[1] >= since)
            else:
                mine = was == state or state == "dir" and isinstance(was, list) and was[0] == "pending"
            (own if mine else foreign).append(entry)
            if mine and state == "dir":
                visit(entry, was[1] if isinstance(was, list) else since)

    if folder.is_dir():
        visit(folder, 0 if marker and "written" not in marker and owner_of(folder) == mode else None)
    return own, foreign


def remove_outputs(folder: Path, entries: list):
    """Delete entries of sort_outputs' own list, contents before folders; a folder something appeared in stays."""
    for entry in reversed(entries):
        with contextlib.suppress(FileNotFoundError, OSError):
            entry.rmdir() if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def remove_unfinished(folder: Path):
    """What a run was writing into folder when it stopped: the entries its record holds as being written (a
    checkpoint, the staged adapter), this tool's files in them, removed."""
    marker = read_marker(folder)
    if not marker:
        return
    pending = [folder / name for name, state in marker.get("written", {}).items() if state[:1] == ["pending"]]
    own = sort_outputs(folder, marker["mode"])[0]
    remove_outputs(folder, [p for p in own if any(p == q or q in p.parents for q in pending)])
    record(folder)  # the record forgets what is gone


def remove_output_folder(folder: Path):
    """An output folder of the tool: its outputs the record says it wrote, unchanged, then the record and the folder
    if nothing else is left in it."""
    if not owner_of(folder):
        return
    remove_outputs(folder, sort_outputs(folder, owner_of(folder))[0])
    if [p.name for p in folder.iterdir()] == [OWNER_FILE]:
        (folder / OWNER_FILE).unlink()
        folder.rmdir()


def swap_in(staging: Path, out: Path, mode: str, last: str | None = None, replace_all: bool = False):
    """Move the entries of staging into out, `last` at the end, each recorded as it lands. Only entries of out this
    tool wrote, unchanged, are replaced (with replace_all, the others of them removed); anything else stays, and
    where it is in the way the run stops with the new files kept in staging."""
    own, foreign = sort_outputs(out, mode)
    new = sorted((p for p in staging.iterdir() if p.name != OWNER_FILE), key=lambda p: p.name == last)
    clash = [p.name for p in new if out / p.name in foreign]
    if clash:
        raise RunFailed(f"{out / clash[0]} appeared during the run and is not this tool's, so it was left as it is; "
                        f"the new outputs are in {staging}: move them in yourself")
    if replace_all:
        remove_outputs(out, [p for p in own if p.relative_to(out).parts[0] not in {n.name for n in new}])
    if last:
        (out / last).unlink(missing_ok=True)  # a folder holding `last` holds a complete result
    for path in new:
        os.replace(path, out / path.name)
        record(out, out / path.name)


def move_staged_into_place(staging: Path, out: Path, last: str = "adapter_config.json"):
    """The finished files of staging (a folder inside out) moved into out by swap_in, adapter_config.json last: a
    folder holding it holds a complete adapter (PEFT and infer look for that file)."""
    swap_in(staging, out, owner_of(out), last)
    staging.rmdir()


def protected_folder(out: Path, cfg) -> str | None:
    """Why out must never be an output folder, or None: folders that hold the user's work."""
    target, here = out.expanduser().resolve(), Path.cwd().resolve()
    if target == here:
        return "is the folder you are in"
    if target in here.parents or target == Path.home().resolve():
        return "holds the folder you are in" if target in here.parents else "is your home folder"
    inputs = {**MODES[cfg.mode].inputs(cfg), "this script": __file__, "--adapter": cfg.adapter}
    for what, path in inputs.items():
        given = Path(path).expanduser().resolve() if path and Path(path).expanduser().exists() else None
        if given and target == given:
            return f"is {what}"
        if given and target in given.parents:
            return f"holds {what}"
    return None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a checkpoint without it was
    cut short (e.g. the process was killed while saving) and is skipped; so is one missing a file the folder's
    record says was saved in it (an optimizer.pt deleted would restart the optimizer and the schedule)."""
    written = (read_marker(out) or {}).get("written", {})
    complete = [c for c in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", c.name)
                and (c / "trainer_state.json").is_file()
                and all(os.path.lexists(out / name) for name, state in written.items()
                        if name.startswith(f"{c.name}/") and state[:1] != ["pending"])]
    return max(complete, key=lambda c: int(c.name.split("-")[1]), default=None)


def trained_steps(out: Path) -> int:
    """Optimizer steps behind the newest complete checkpoint (0 without one)."""
    last = latest_checkpoint(out)
    return json.loads((last / "trainer_state.json").read_text())["global_step"] if last else 0


def lock_folder(folder: Path):
    """Hold folder while this process writes there: a second run into it is refused. An flock, which the kernel drops
    when the process ends however it ends, so a killed run leaves no stale lock."""
    import fcntl

    key = os.path.realpath(folder)
    if key in _LOCKED:
        return
    descriptor = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise UsageError(f"--output_dir {folder} is in use by another run of this tool (pid "
                         f"{(read_marker(folder) or {}).get('pid', 'unknown')}); wait for it to end or pick another "
                         "folder") from None
    _LOCKED[key] = descriptor


def release_folders():
    while _LOCKED:
        os.close(_LOCKED.popitem()[1])


def check_output_dir(cfg):
    """Refuse, before anything is loaded, an output folder this run could not fill without touching the user's
    files, and hold it. The tool replaces only what its record says it wrote there, unchanged (sort_outputs)."""
    out = Path(cfg.output_dir)
    existing = next(p for p in (out.expanduser().absolute(), *out.expanduser().absolute().parents) if os.path.exists(p))
    longest = max(out.expanduser().parts, key=lambda part: len(os.fsencode(part)), default="")
    if existing.is_dir() and len(os.fsencode(longest)) > os.pathconf(existing, "PC_NAME_MAX"):
        raise UsageError(f"--output_dir {out}: the name {longest[:40]}... is longer than the "
                         f"{os.pathconf(existing, 'PC_NAME_MAX')} bytes the file system allows")
    mode, reason = MODES[cfg.mode], protected_folder(out, cfg)
    elsewhere = f"--output_dir {mode.output_dir(cfg, cfg.adapter) or cfg.mode + '_output'}"
    if reason:
        raise UsageError(f"--output_dir {out} {reason}; outputs go into a folder of their own, e.g. {elsewhere}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; pick a directory")
    if not existing.is_dir():
        raise UsageError(f"--output_dir {out}: {existing} is a file, so no folder can be made in it")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise UsageError(f"--output_dir {out}: {existing} is on a file system mounted read-only (permissions will not "
                         "help): pick a folder on a writable disk")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"--output_dir {out}: {existing} is not writable (permission denied)")
    if out.is_dir() and is_main_process():  # rank 0 writes; the other ranks of a launch share its folder
        lock_folder(out)
    if (out / OWNER_FILE).is_file() and read_marker(out) is None:
        raise UsageError(f"--output_dir {out}: its record of what this tool wrote there ({OWNER_FILE}) is damaged, so "
                         "its files cannot be told from yours: move out what you want to keep and delete the folder, "
                         "or pick another folder")
    own, foreign = sort_outputs(out, cfg.mode)
    if foreign and owner_of(out) not in (None, cfg.mode):
        raise UsageError(f"--output_dir {out} holds a {owner_of(out)} run's outputs; --mode {cfg.mode} writes into a "
                         f"folder of its own, e.g. {elsewhere}")
    resume = mode.resumes and cfg.resume
    # A resumed run writes only its own names and deletes only checkpoint-* folders (transformers 5.23's
    # rotate_checkpoints), so a file of the user's beside them stays as it is.
    if resume:
        foreign = [e for e in foreign if e.parent != out or e.is_symlink() or not e.is_file()
                   or re.fullmatch(mode.outputs, e.name)]
    if foreign:
        names = ", ".join(e.relative_to(out).as_posix() + ("/" if e.is_dir() else "") for e in foreign[:3]) + (
            ", ..." if len(foreign) > 3 else "")
        written = (read_marker(out) or {}).get("written", {})

        def retimed(entry):  # a file the record holds with this very size: only its time differs
            was, now = written.get(entry.relative_to(out).as_posix()), entry_state(entry)
            return isinstance(was, list) and isinstance(now, list) and was[0] == now[0]

        if all(map(retimed, foreign)):
            raise UsageError(f"--output_dir {out} holds files of the sizes this tool wrote but with other times "
                             f"({names}): a copy that did not keep the times (cp -r) looks changed; copy a run with "
                             "cp -a or rsync -a (the tool only ever replaces its own outputs, unchanged)")
        raise UsageError(f"--output_dir {out} holds files this tool did not write ({names}), or changed since it "
                         "wrote them; it only ever replaces its own outputs, unchanged: move them or pick another "
                         "folder")
    if resume and latest_checkpoint(out) is None:
        raise UsageError(f"--resume: {out} holds no complete checkpoint to resume from; drop --resume to start afresh")
    if resume:
        check_resumed_settings(cfg, out)
    if own and not (cfg.overwrite or resume or cfg.demo):  # the demo replaces its own outputs
        raise UsageError(f"--output_dir {out} holds an earlier {cfg.mode} run's outputs; pass --overwrite to replace "
                         "them" + (" or --resume to continue" if mode.resumes else ""))


# What a resumed run may change: when it saves and reports, and the speed machinery that the equivalence tests hold
# to the same maths. Any other setting changed on --resume is refused (the checkpoint's optimizer and schedule would
# go on with the old values while run_summary.json recorded the new ones).
RESUME_MAY_CHANGE = {"mode", "demo", "print_config", "json", "local_rank", "output_dir", "overwrite", "resume",
                     "logging_steps", "save_steps", "save_total_limit", "report_to", "trackio_project", "run_name",
                     "push_to_hub", "hub_model_id", "gradient_checkpointing", "recompute_every_nth_layer", "compile",
                     "chunked_loss", "attn_implementation"}


def run_settings(cfg) -> dict:
    """The settings that make a training run's maths, as JSON keeps them (recorded when the run starts): local paths
    resolved, LoRA targets in order, and a local dataset's bytes as their sha256 (rows edited in place change the run)."""
    settings = normal_settings({k: v for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE})
    data = Path(settings.get("dataset") or "")
    if data.is_file() and not settings.get("synthetic_data"):
        with data.open("rb") as f:
            settings["dataset_sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return settings


def normal_settings(settings: dict) -> dict:
    """Settings as compared on --resume: a path that exists here resolved (./data.jsonl and its absolute path are one
    file), the LoRA targets sorted (a set to PEFT)."""
    settings = json.loads(json.dumps(settings, default=str))
    for key in PATHS:
        if isinstance(settings.get(key), str) and Path(settings[key]).expanduser().exists():
            settings[key] = str(Path(settings[key]).expanduser().resolve())
    for key in ("target_modules", "target_parameters"):
        if isinstance(settings.get(key), list):
            settings[key] = sorted(settings[key])
    return settings


def check_resumed_settings(cfg, out: Path):
    """--resume with settings other than the run's own: one line naming each change, before anything loads."""
    recorded = (read_marker(out) or {}).get("settings")
    now = run_settings(cfg)
    if recorded is None:  # a run started by an older version of the tool: its checkpoint's LoRA shape at least
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            lora = json.loads((latest_checkpoint(out) / "adapter_config.json").read_text())
            recorded = {"lora_r": lora["r"], "lora_alpha": lora["lora_alpha"],
                        "target_modules": sorted(lora["target_modules"] or [])}
    recorded = normal_settings(recorded or {})
    shown = lambda v: "unset" if v is None else ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    changed = [f"the rows of --dataset {cfg.dataset} (edited since the run started)" if k == "dataset_sha256" else
               f"--{k} {shown(now.get(k))} (the run's: {shown(recorded.get(k))})"
               for k in sorted(recorded) if k in now and now.get(k) != recorded.get(k)]
    if changed:
        raise UsageError(f"--resume: {out} was started with other settings, and these change the run's maths: "
                         f"{'; '.join(changed)}. Resume with the run's settings, or start a new run (another "
                         "--output_dir, or --overwrite)")


def claim_output_dir(out: Path, mode: str, replace_own: bool, settings: dict | None = None):
    """Create out, hold it and mark it as this mode's, with a record of the earlier outputs kept; with replace_own,
    first delete this mode's earlier outputs (only those: check_output_dir has refused a folder holding more). A
    training run's settings go into the record when it starts; one that continues (not replace_own) keeps those."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise
        raise UsageError(f"--output_dir {out} cannot be made: {(e.strerror or str(e)).lower()}") from None
    lock_folder(out)
    marker = read_marker(out) or {}
    before, own = marker.get("written", {}), sort_outputs(out, mode)[0]
    settings = settings if replace_own else marker.get("settings")  # a run continued keeps what it started with
    if replace_own:
        remove_outputs(out, own)
    kept = {p.relative_to(out).as_posix(): p for p in own if not replace_own and os.path.lexists(p)}
    write_atomically(out / OWNER_FILE, json.dumps({"mode": mode, "tool": "gpt_oss_20b_sft.py", "pid": os.getpid(),
                                                   "written": {k: before.get(k) or entry_state(p)
                                                               for k, p in kept.items()},
                                                   **({"settings": settings} if settings else {})}) + "\n")


def gpu_memory_state() -> tuple:
    """(peak GiB allocated, GiB on the card, card name) for the out-of-memory message."""
    import torch

    return (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.get_device_properties(0).total_memory / 2**30,
            torch.cuda.get_device_name())


def out_of_memory_advice(cfg, peak_gib: float, total_gib: float, device: str) -> str:
    """One paragraph: what was measured, and the flags that make this model use less memory in this mode."""
    mode = MODES[cfg.mode]
    return (f"CUDA ran out of memory during {mode.during} (peak {peak_gib:.1f} GiB allocated of {total_gib:.1f} GiB on "
            f"{device}). " + mode.use_less_memory(cfg))


@contextlib.contextmanager
def out_of_memory_is_a_message(cfg):
    """Turn CUDA out-of-memory into the one-paragraph RunFailed instead of a long traceback."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        raise RunFailed(out_of_memory_advice(cfg, *gpu_memory_state())) from e


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_repos(cfg) -> list:
    """The Hub repos this run reads or writes; local paths (and the demo's files) need no Hub."""
    needed = [cfg.model] if cfg.model and not Path(cfg.model).expanduser().exists() else []
    return needed + MODES[cfg.mode].hub_repos(cfg)


def decide_offline(cfg):
    """Once, at start-up, before any Hugging Face library is imported (huggingface_hub reads HF_HUB_OFFLINE when
    imported): when the Hub cannot be reached, go offline, so loading uses the local cache instead of retrying for
    half a minute. What a mode would need from the Hub later is checked here too (check_hub)."""
    if cfg.demo:
        os.environ["HF_HUB_OFFLINE"] = "1"
    needed = hub_repos(cfg)
    if needed and not hub_offline():
        host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
        try:
            socket.create_connection((host.split(":")[0], int((host.split(":") + ["443"])[1])), timeout=3).close()
        except (OSError, ValueError):
            os.environ["HF_HUB_OFFLINE"] = "1"
    MODES[cfg.mode].check_hub(cfg, bool(needed))


def _hub_error(source: str, error: Exception) -> UsageError:
    if hub_offline():
        return UsageError(f"{source!r} is not a local directory and not in the Hugging Face cache, and the Hub is "
                          "offline; connect to the Hub once or pass a local directory")
    return UsageError(f"could not load {source!r}: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    leave(main())
