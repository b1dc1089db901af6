"""``d2v`` command line: one sub-command per pipeline stage (the same words as dvc.yaml and the flows).

Each sub-command loads params.yaml (strictly), then calls one library function; the stage modules are
imported lazily so ``d2v --help`` stays fast. An expected failure (bad config, data or checkpoint: the
library raises a ValueError naming the file and what to do) is one line on stderr and exit code 2;
``--debug`` (before or after the sub-command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from d2v import timing
from d2v.config import ConfigError, load_params
from d2v.hostmem import retain_freed_memory
from d2v.modalities import JOINT, MODALITIES
from d2v.sweep import INITS, PRETRAINED

# stage name -> (module, function); each function takes (params: dict, args: argparse.Namespace)
STAGES: dict[str, tuple[str, str, str]] = {
    "prepare": ("d2v.data.stages", "cli_prepare", "materialise raw data for a modality"),
    "shard": ("d2v.data.stages", "cli_shard", "write WebDataset shards + manifest.json"),
    "pretrain": ("d2v.pretrain", "cli_pretrain", "data2vec pretraining on the pretrain shards"),
    "finetune": ("d2v.finetune", "cli_finetune", "fine-tune a pretrained (or fresh) encoder"),
    "evaluate": ("d2v.evaluate", "cli_evaluate", "evaluate a fine-tuned model; writes metrics"),
    "report": ("d2v.report", "cli_report", "render reports/benchmark.{md,html}"),
}


DEBUG_HELP = "show the traceback of an error instead of its one-line message"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="profile under 'profiles:' (e.g. smoke); default: file's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2v", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # after the sub-command too; SUPPRESS: a sub-parser without it leaves the global value alone
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, _, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, parents=[debug])
        _add_common(p)
        if name == "pretrain":  # joint: one Transformer for every modality (d2v.joint)
            p.add_argument("modality", choices=(*MODALITIES, JOINT))
        elif name != "report":
            p.add_argument("modality", choices=MODALITIES)
        if name == "shard":
            # Publishing is a flag of `shard`, not an `aws s3 sync` recipe: it checks every file's sha256
            # before uploading (a damaged shard is never published), uploads manifest.json last (a reader
            # that finds the manifest finds every object it lists; sync's order is its own), lists the
            # result as the loader will, works for any fsspec URL (gs://, az://) without the AWS CLI, and
            # takes the same root as paths.shards, so the printed line says what to set.
            p.add_argument(
                "--to",
                default=None,
                metavar="URL",
                help="publish <paths.shards>/<m> (written by `d2v shard <m>`) to URL/<m> instead of sharding: "
                "tars, side files, manifest.json last; then paths.shards: URL reads it (pip install 'd2v[s3]')",
            )
        if name in ("finetune", "evaluate"):
            p.add_argument("--budget", default=None, help="label budget: labels per class (int) or fraction")
            p.add_argument("--seed", type=int, default=None, help="fine-tuning seed (default: params seed)")
            p.add_argument(
                "--init",
                choices=INITS,
                default=PRETRAINED if name == "finetune" else None,  # evaluate: None = every init
                help="start from the pretrained encoder, random init (the from-scratch baseline), the "
                "published model (pretrain.<m>.init) or the modality's encoder of the joint model",
            )
    p = sub.add_parser(
        "embed",
        help="pooled features of raw items -> .npy",
        description="Pooled features [N, D] of raw items, preprocessed as the model's folder says (a d2v "
        "checkpoint: as its shards were made; an HF folder: its processor files), one row per item in order: "
        "the input files, then the --text strings. Default, for every modality: the mean over the last "
        "layer's tokens (padding and vision's CLS excluded); --layer and --pool choose another.",
        parents=[debug],
    )
    p.add_argument("checkpoint", help="a d2v checkpoint (run or step directory) or an HF data2vec folder")
    p.add_argument(
        "inputs",
        nargs="*",
        help="files to embed: audio, images, or text files (read whole as UTF-8). A missing path or a "
        "directory is an error, never text. '-' as the only input: read texts from stdin, one per line "
        "(row i = line i)",
    )
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="STRING",
        help="a literal text to embed (text encoders; repeatable; its rows follow the files' rows)",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        metavar="INT",
        help="pool this layer's output instead of the last layer's (after the final norm): 0 = the input to "
        "the first block, i = block i's output (1..depth; depth = the last block, before any final norm), "
        "negative = from the end (-1 = the last block)",
    )
    p.add_argument(
        "--pool",
        choices=("mean", "first"),  # d2v.modalities.base.POOLS (not imported: it needs torch)
        default="mean",
        help="mean: over the non-padding tokens, vision's CLS excluded (default); first: the first token "
        "(vision's CLS, text's <s>, speech's first frame)",
    )
    p.add_argument(
        "--modality",
        choices=MODALITIES,
        default=None,
        help="which encoder of a joint checkpoint (`d2v pretrain joint`); elsewhere a check of the model's",
    )
    p.add_argument("--out", required=True, help="output .npy path")
    p = sub.add_parser(
        "export-hf", help="write a Hugging Face data2vec directory from a d2v checkpoint", parents=[debug]
    )
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--modality", choices=MODALITIES, default=None,
                   help="which encoder of a joint checkpoint (`d2v pretrain joint`) to export")  # fmt: skip
    p = sub.add_parser("check-params", help="validate every section of params.yaml", parents=[debug])
    _add_common(p)
    p = sub.add_parser(
        "show-params",
        help="print every key of the resolved params (defaults included) as a params file",
        description="Print the configuration a run uses: params.yaml, -S overrides, the profile and every "
        "default the file leaves out, as YAML that `d2v check-params --params` accepts (profile applied, "
        "so `profile: default`). Meaning of each key: docs/params.md.",
        parents=[debug],
    )
    _add_common(p)
    p.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a key before the profile is applied, the value read as YAML, as `dvc exp run -S` "
        "(repeatable; e.g. -S pretrain.audio.steps=10)",
    )
    p.add_argument("--out", default=None, help="write to this file instead of stdout")
    p = sub.add_parser(
        "params-doc",
        help="write docs/params.md from the config dataclasses' docstrings",
        description="Write docs/params.md (every params.yaml key: type, default, meaning) from the config "
        "dataclasses' field docstrings; --check exits 1 if the file is out of date.",
        parents=[debug],
    )
    p.add_argument("--check", action="store_true", help="exit 1 if docs/params.md is out of date")
    p.add_argument("--out", default=None, help="file to write or check (default: docs/params.md)")
    return parser


def _call(module: str, func: str) -> Callable:
    return getattr(importlib.import_module(module), func)


def export_hf(checkpoint: str, out_dir: str, modality: str | None = None) -> int:
    """``d2v export-hf CHECKPOINT OUT_DIR [--modality M]``: a folder transformers' ``from_pretrained``
    loads; of a joint checkpoint, the encoder of ``modality``."""
    from d2v.hf import export_hf
    from d2v.load import load_encoder

    encoder = load_encoder(checkpoint, modality=modality)
    try:
        out = export_hf(encoder, out_dir)
    except ValueError as e:
        if modality is None:
            raise
        raise ValueError(f"{checkpoint}: its {modality} encoder cannot be exported: {e}") from None
    print(f"wrote {out}/config.json and model.safetensors ({encoder.modality})")
    return 0


def message(e: BaseException) -> str:
    """The error's own message: for one re-raised from a DataLoader worker (torch wraps it in the
    worker's traceback), its last line without the exception's class name."""
    text = str(e)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # every command's tensors: the same large blocks freed and allocated again
    try:
        if args.command in STAGES:
            params = load_params(args.params, args.profile)
            # the whole file, as `d2v check-params` does: a typo in another section or modality
            # (pretrain.imgae) fails every stage, not only the one that would read it
            _call("d2v.params_check", "check_all")(params, quiet=True)
            module, func, _ = STAGES[args.command]
            if args.command == "pretrain" and args.modality == JOINT:
                module, func = "d2v.joint", "cli_pretrain_joint"
            rc = _call(module, func)(params, args) or 0
            if rc == 0 and not getattr(args, "to", None):  # an upload's time is not the shard stage's
                stage = timing.stage_name(args.command, getattr(args, "modality", None),
                                          getattr(args, "budget", None), getattr(args, "seed", None),
                                          getattr(args, "init", None))  # fmt: skip
                timing.record(stage, timing.process_seconds())
            return rc
        if args.command == "embed":
            return _call("d2v.embed", "cli_embed")(args) or 0
        if args.command == "export-hf":
            return export_hf(args.checkpoint, args.out_dir, args.modality)
        if args.command == "check-params":
            return _call("d2v.params_check", "check_all")(load_params(args.params, args.profile)) or 0
        if args.command == "show-params":
            return _call("d2v.params_show", "cli_show")(args) or 0
        if args.command == "params-doc":
            return _call("d2v.params_doc", "run")(check=args.check, out=args.out)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"d2v {args.command}: error: {message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
