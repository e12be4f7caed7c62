"""`mixtune` — one entry point for every verb.

    mixtune train    [CONFIG.yaml] [--section.key VALUE ...] [--resume [auto|DIR]] [--json]
    mixtune prepare  [CONFIG.yaml] [...] [--json] [--dump-text FILE] [--dump-tokens FILE]
    mixtune eval     [CONFIG.yaml] [...] [--adapter DIR] [--json]
    mixtune merge    [CONFIG.yaml] [...] --adapter DIR [--out DIR] [--json]
    mixtune generate [CONFIG.yaml] [...] [--adapter DIR] [--raw | --chat] --prompt TEXT [--prompt TEXT ...] [--json]
    mixtune inspect  [CONFIG.yaml] [...] [--json]
    mixtune bench    [bench options]

Every verb reads the same typed config (`mixtune.config`): defaults < CONFIG.yaml < dotted overrides
(`--train.learning_rate 2e-5`, `--lora.targets q_proj,v_proj`). Short aliases: --model, --quant, --dtype,
--max-new-tokens, --greedy, --out, --output_dir. A user error (unknown key, bad value, clashing options,
missing file) exits with code 2 and one line `mixtune: error: ...` on stderr; so does a failure of the system
on a path (disk full, read-only or not permitted, a file or /dev/null where a directory belongs): the line names
the path and the cause. MIXTUNE_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys
from typing import Optional

from .config import ConfigError, config_help, load_config

VERBS = {
    "train": "fine-tune: LoRA/QLoRA training with eval, checkpoints, adapter, generations and a report",
    "prepare": "format, tokenize and pack the data; print statistics (optionally dump text / tokens)",
    "eval": "evaluation loss and perplexity of the base model or base + adapter",
    "merge": "fold an adapter into the 16-bit base weights and write an HF checkpoint",
    "generate": "generate from prompts with the base model or base + adapter (KV cache)",
    "inspect": "architecture, parameter counts, LoRA targets matched/unmatched, memory estimate",
    "bench": "training throughput benchmark (mixtune vs the stock stack)",
}

# verb options (not config keys): name -> (takes a value, verbs that accept it)
VERB_OPTIONS = {
    "--adapter": (True, {"eval", "merge", "generate"}),
    "--prompt": (True, {"generate"}),
    "--json": (False, {"train", "prepare", "eval", "merge", "generate", "inspect"}),
    "--raw": (False, {"generate"}),
    "--chat": (False, {"generate"}),
    "--dump-text": (True, {"prepare"}),
    "--dump-tokens": (True, {"prepare"}),
    "--resume": (None, {"train"}),  # optional value: bare --resume means auto
    "--nproc": (True, {"inspect"}),
}

# short aliases of config keys; a verb may map an alias to another key
ALIASES = {
    "--model": "model.name_or_path",
    "--quant": "model.quant",
    "--dtype": "model.dtype",
    "--max-new-tokens": "generate.max_new_tokens",
    "--max_new_tokens": "generate.max_new_tokens",
    "--greedy": "generate.greedy",
    "--out": "merge.out",
    "--output_dir": "train.output_dir",
    "--output-dir": "train.output_dir",
    "--seed": "train.seed",
}
_FLAG_ALIASES = {"--greedy"}  # may stand alone (= true)
_VERB_ALIAS_OVERRIDES = {"merge": {"--dtype": "merge.dtype"}}

_HELP_OPTIONS = """\
verb options:
  --adapter DIR         adapter directory (PEFT format, e.g. runs/tiny/adapter)       [eval, merge, generate]
  --prompt TEXT         prompt text; repeat for several                                 [generate]
  --raw                 no template: exactly bos (if the tokenizer has one) + the prompt  [generate]
  --chat                the prompt as a user turn through the model's chat template     [generate]
  --json                machine-readable output: one JSON object per line on stdout
  --dump-text FILE      write {"text": ...} per formatted example, source order        [prepare]
  --dump-tokens FILE    write {"input_ids": [...], "labels": [...]} per example         [prepare]
  --resume [auto|DIR]   continue a killed run from its latest (or the given) checkpoint [train]
  --nproc N             plan memory per GPU for N torchrun ranks (default: WORLD_SIZE or 1) [inspect]
short aliases:
  --model M             = --model.name_or_path M   (Hub id or local HF directory; empty: the tiny default)
  --quant nf4|none      = --model.quant
  --dtype D             = --model.dtype (merge: --merge.dtype, the written dtype)
  --max-new-tokens N    = --generate.max_new_tokens
  --greedy              = --generate.greedy true
  --out DIR             = --merge.out
  --output_dir DIR      = --train.output_dir (every file of the run goes under DIR)
  --seed N              = --train.seed
"""


class _Args:
    def __init__(self):
        self.config: Optional[str] = None
        self.adapter: Optional[str] = None
        self.prompts: list[str] = []
        self.json = False
        self.prompt_mode = "template"
        self.dump_text: Optional[str] = None
        self.dump_tokens: Optional[str] = None
        self.nproc: Optional[int] = None
        self.overrides: list[tuple[str, str]] = []
        self.help = False


def usage() -> str:
    lines = ["usage: mixtune VERB [CONFIG.yaml] [--section.key VALUE ...] [options]", "", "verbs:"]
    lines += [f"  {v:<9} {d}" for v, d in VERBS.items()]
    lines += ["", "`mixtune VERB --help` lists the verb's options and every config key.",
              "With no CONFIG, `mixtune train` runs the offline tiny default (configs/tiny.yaml)."]
    return "\n".join(lines)


def verb_help(verb: str) -> str:
    head = __doc__.split("\n\n")[1].splitlines()
    usage_line = next((ln.strip() for ln in head if ln.strip().startswith(f"mixtune {verb}")), f"mixtune {verb}")
    return (f"usage: {usage_line}\n\n{VERBS[verb]}\n\n{_HELP_OPTIONS}\nconfig keys (defaults = the offline tiny "
            f"run; CONFIG.yaml and --section.key VALUE override them):\n{config_help()}")


def parse_args(verb: str, argv: list[str]) -> _Args:
    """Split argv into the config path, verb options and (key, value) overrides; clashes raise ConfigError."""
    a = _Args()
    seen: dict[str, tuple[str, str]] = {}  # config key -> (spelling, value)

    def put(key: str, value: str, spelling: str) -> None:
        if key in seen and seen[key][1] != value:
            raise ConfigError(f"clashing options: {seen[key][0]} {seen[key][1]!r} and {spelling} {value!r} both "
                              f"set {key}")
        seen[key] = (spelling, value)
        a.overrides.append((key, value))

    def has_value(i: int) -> bool:
        return i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2)

    aliases = dict(ALIASES, **_VERB_ALIAS_OVERRIDES.get(verb, {}))
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            a.help = True
            i += 1
            continue
        if not tok.startswith("-"):
            if a.config is not None:
                raise ConfigError(f"unexpected argument {tok!r}: give one CONFIG.yaml, then --section.key VALUE")
            a.config = tok
            i += 1
            continue
        name, inline = (tok.split("=", 1) + [None])[:2] if "=" in tok else (tok, None)
        if name in VERB_OPTIONS:
            takes, verbs = VERB_OPTIONS[name]
            if verb not in verbs:
                raise ConfigError(f"{name} is not an option of `mixtune {verb}` (it applies to "
                                  f"{', '.join(sorted(verbs))})")
            if takes is False:
                if inline is not None:
                    raise ConfigError(f"{name} takes no value")
                value, i = None, i + 1
            elif inline is not None:
                value, i = inline, i + 1
            elif has_value(i) and not (takes is None and argv[i + 1].endswith((".yaml", ".yml"))):
                value, i = argv[i + 1], i + 2
            elif takes is None:  # bare --resume (also before a CONFIG.yaml)
                value, i = "auto", i + 1
            else:
                raise ConfigError(f"{name} needs a value")
            if name == "--adapter":
                if a.adapter is not None and a.adapter != value:
                    raise ConfigError(f"clashing options: --adapter given twice ({a.adapter!r}, {value!r})")
                a.adapter = value
            elif name == "--prompt":
                a.prompts.append(value)
            elif name == "--json":
                a.json = True
            elif name in ("--raw", "--chat"):
                if a.prompt_mode not in ("template", name[2:]):
                    raise ConfigError("clashing options: --raw and --chat (choose one prompt format)")
                a.prompt_mode = name[2:]
            elif name == "--dump-text":
                a.dump_text = value
            elif name == "--dump-tokens":
                a.dump_tokens = value
            elif name == "--nproc":
                if not value.isdigit() or int(value) < 1:
                    raise ConfigError(f"--nproc: {value!r} is not a number of ranks (an integer >= 1)")
                a.nproc = int(value)
            elif name == "--resume":
                put("train.resume", value, "--resume")
            continue
        if name in aliases:
            key = aliases[name]
            if inline is not None:
                value, i = inline, i + 1
            elif name in _FLAG_ALIASES and not (has_value(i) and argv[i + 1].lower() in ("true", "false")):
                value, i = "true", i + 1
            elif has_value(i):
                value, i = argv[i + 1], i + 2
            else:
                raise ConfigError(f"{name} needs a value")
            put(key, value, name)
            continue
        if name.startswith("--") and "." in name:
            key = name[2:]
            sec, _, field = key.partition(".")
            key = f"{sec}.{field.replace('-', '_')}"
            if inline is not None:
                value, i = inline, i + 1
            elif has_value(i):
                value, i = argv[i + 1], i + 2
            else:
                value, i = "true", i + 1  # a bare boolean flag
            put(key, value, name)
            continue
        import difflib
        known = list(VERB_OPTIONS) + list(aliases) + ["--help"]
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]}?)" if near else " (config keys look like --section.key VALUE)"
        raise ConfigError(f"unknown option {name}{hint}")
    return a


def _adapter_defaults(adapter: str, overrides: list) -> tuple[Optional[str], Optional[dict]]:
    """With --adapter and no CONFIG: the run's own resolved config (<adapter>/../config.yaml, written by
    `mixtune train`; for a checkpoint's adapter <run>/checkpoints/step-N/adapter, <run>/config.yaml) when it
    exists, so eval/merge/generate use the model and data settings the adapter was trained with; else the base
    model named in adapter_config.json. Explicit overrides still win."""
    parent = os.path.dirname(os.path.abspath(adapter))
    run_cfg = os.path.join(parent, "config.yaml")
    if not os.path.isfile(run_cfg) and os.path.basename(os.path.dirname(parent)) == "checkpoints":
        # a checkpoint's adapter: <run>/checkpoints/step-N/adapter -> <run>/config.yaml
        run_cfg = os.path.join(os.path.dirname(os.path.dirname(parent)), "config.yaml")
    if os.path.isfile(run_cfg):
        print(f"mixtune: using the training run's config {run_cfg}", file=sys.stderr)
        return run_cfg, None
    if any(k == "model.name_or_path" for k, _ in overrides):
        return None, None
    try:
        with open(os.path.join(adapter, "adapter_config.json")) as fh:
            adapter_cfg = json.load(fh)
    except (OSError, ValueError):
        return None, None
    name = adapter_cfg.get("base_model_name_or_path") or "" if isinstance(adapter_cfg, dict) else ""
    return None, ({"model": {"name_or_path": name}} if name else None)


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str), flush=True)


def run(verb: str, argv: list[str]) -> int:
    if verb == "bench":
        import importlib.util
        if importlib.util.find_spec("mixtune.bench") is None:
            raise ConfigError("`mixtune bench` is not available in this build (module mixtune.bench is missing); "
                              "see BENCHMARKS.md for the benchmark scripts")
        from .distributed import world_from_env
        if world_from_env()[0] > 1:  # under torchrun: ddp / fsdp steps on every rank
            from . import bench_dist
            return int(bench_dist.main(argv) or 0)
        from . import bench
        return int(bench.main(argv) or 0)
    args = parse_args(verb, argv)
    if args.help:
        print(verb_help(verb))
        return 0
    base = None
    if args.adapter and args.config is None:
        args.config, base = _adapter_defaults(args.adapter, args.overrides)
    cfg = load_config(args.config, args.overrides, base=base)
    command = shlex.join(["mixtune", verb] + list(argv))
    if verb == "train":
        from . import train
        previous = _sigterm_as_interrupt()
        try:
            result = train.main(cfg, command=command)
        finally:
            if previous is not None:
                import signal
                signal.signal(signal.SIGTERM, previous)
        if args.json:
            _print_json(result)
    elif verb == "prepare":
        from .data import prepare_main
        prepare_main(cfg, json_out=args.json, dump_text=args.dump_text, dump_tokens=args.dump_tokens)
    elif verb == "eval":
        from .evaluate import eval_main
        eval_main(cfg, adapter=args.adapter, json_out=args.json)
    elif verb == "merge":
        if not args.adapter:
            raise ConfigError("mixtune merge needs --adapter DIR (the adapter to fold into the base weights)")
        if not os.path.isdir(args.adapter):
            raise FileNotFoundError(f"--adapter: directory not found: {args.adapter}")
        from .merge import merge_main
        # default: next to the adapter (runs/x/adapter -> runs/x/merged); a checkpoint's adapter merges beside
        # the checkpoints, never inside one that save_total_limit may prune (.../step-N/adapter -> runs/x/merged-step-N)
        parent = os.path.dirname(os.path.abspath(args.adapter))
        default = os.path.join(parent, "merged")
        if os.path.basename(os.path.dirname(parent)) == "checkpoints":
            default = os.path.join(os.path.dirname(os.path.dirname(parent)), f"merged-{os.path.basename(parent)}")
        out_dir = cfg.merge.out or default
        result = merge_main(cfg, args.adapter, out_dir)
        if args.json:
            _print_json(result if result is not None else {"out": out_dir})
        else:
            print(f"merged checkpoint written to {out_dir}")
    elif verb == "generate":
        if not args.prompts:
            raise ConfigError("mixtune generate needs at least one --prompt TEXT")
        if args.adapter and not os.path.isdir(args.adapter):
            raise FileNotFoundError(f"--adapter: directory not found: {args.adapter}")
        from .generate import generate_main
        generate_main(cfg, args.prompts, args.adapter, args.json, mode=args.prompt_mode)
    elif verb == "inspect":
        from .inspect_model import inspect_main
        inspect_main(cfg, json_out=args.json, nproc=args.nproc)
    return 0


def _sigterm_as_interrupt():
    """A scheduler's SIGTERM stops training like Ctrl-C (one line, exit 130); the checkpoints stay resumable.
    Returns the previous handler (None when not on the main thread)."""
    import signal
    import threading

    def handler(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)
    return None


_CAUSES = {errno.ENOSPC: "no space left on device (disk full)", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory",
           errno.ENOENT: "no such file or directory", errno.EEXIST: "already exists"}


def _os_line(e: OSError, verb: str = "") -> str:
    """'PATH: cause' for a system failure on a path (its errno in words), plus what to do after a full disk."""
    cause = _CAUSES.get(e.errno) if e.errno != errno.ELOOP else None
    cause = cause or e.strerror or str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else ""
    line = f"{where}: {cause}" if where else cause
    if verb == "train" and e.errno in (errno.ENOSPC, errno.EDQUOT):
        line += "; the checkpoints already written stay resumable: free space, then rerun with --resume"
    return line


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return " ".join(part.strip() for part in msg.splitlines() if part.strip())


def _rank_tag() -> str:
    """' (rank r of N)' under torchrun (which rank failed, in a job whose ranks share one terminal), else ''."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    return f" (rank {rank} of {world})" if world.isdigit() and int(world) > 1 else ""


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `mixtune` and `python -m mixtune`; returns the exit code (0 ok, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"mixtune {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib
        near = difflib.get_close_matches(verb, list(VERBS), n=1)
        print(f"mixtune: error: unknown verb {verb!r}{f' (did you mean {near[0]}?)' if near else ''}; verbs: "
              f"{', '.join(VERBS)}", file=sys.stderr)
        return 2
    try:
        return run(verb, rest)
    except BrokenPipeError:  # `mixtune train --help | head`: the reader left; no traceback
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        except (OSError, ValueError):
            pass
        return 0
    except KeyboardInterrupt:
        hint = "; continue with the same command plus --resume" if verb == "train" else ""
        print(f"mixtune: interrupted{hint}", file=sys.stderr)
        return 130
    except ValueError as e:
        if os.environ.get("MIXTUNE_DEBUG"):
            raise
        print(f"mixtune: error{_rank_tag()}: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # OSError, or a Rust writer's "... (os error 28)": the path and the cause
        from ._fs import as_os_error
        err = e if isinstance(e, OSError) and e.errno is None else as_os_error(e, "")
        if err is None or os.environ.get("MIXTUNE_DEBUG"):
            raise
        line = _one_line(err) if err.errno is None else _os_line(err, verb)
        print(f"mixtune: error{_rank_tag()}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
