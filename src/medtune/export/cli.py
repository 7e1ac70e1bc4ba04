"""`medtune export gguf|ollama|card|push|adapter`: deployable artefacts from a run or a model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from medtune.errors import ConfigError


def _gguf_targets(args: argparse.Namespace) -> tuple[list[str], Path | None]:
    from medtune.export.runs import run_dir_of

    quants = args.quant
    run = run_dir_of(args.source)
    if not quants and run is not None:
        from medtune.export.runs import read_manifest

        recipe = read_manifest(run).get("recipe") or {}
        quants = ((recipe.get("export") or {}).get("gguf") or {}).get("quantizations")
    return quants or ["q4_k_m"], run


def cmd_gguf(args: argparse.Namespace) -> int:
    from medtune.export.gguf import export_gguf, export_ggufs, human_size

    quants, run = _gguf_targets(args)
    if args.out:
        if len(quants) != 1:
            raise ConfigError(
                f"--out names one file but {len(quants)} quantizations are asked; use --out-dir"
            )
        files = [export_gguf(args.source, args.out, quants[0])]
    else:
        source = Path(args.source)
        out_dir = (
            Path(args.out_dir)
            if args.out_dir
            else (run / "gguf" if run else source.resolve().parent / "gguf")
        )
        files = export_ggufs(args.source, out_dir, quants, name=args.name)
    for f in files:
        print(f"{f.quant:8s} {human_size(f.size_bytes):>9s}  {f.path}")
    return 0


def cmd_ollama(args: argparse.Namespace) -> int:
    from medtune.export.ollama import write_ollama

    system = Path(args.system_file).read_text(encoding="utf-8") if args.system_file else args.system
    template = Path(args.template).read_text(encoding="utf-8") if args.template else None
    export = write_ollama(args.source, args.out, name=args.name, quant=args.quant, system=system,
                          temperature=args.temperature, num_ctx=args.num_ctx, template=template)  # fmt: skip
    print(f"wrote {export.modelfile} (FROM {export.gguf})")
    print(export.create_command)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from medtune.export.cards import write_cards

    model, datasets = write_cards(args.run, args.out, repo_id=args.repo)
    print(f"model card:   {model}\ndataset card: {datasets}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from medtune.export.hub import dataset_plan, model_plan, push

    private = False if args.public else None
    if args.datasets:
        context = dataset_plan(args.run, repo_id=args.repo, private=private)
    else:
        gguf = [Path(p) for p in args.gguf] if args.gguf else None
        context = model_plan(
            args.run, repo_id=args.repo, adapter=args.adapter, gguf_files=gguf, private=private
        )
    with context as plan:
        print(("would upload " if args.dry_run else "uploading ") + plan.describe())
        if not args.dry_run:
            print(push(plan))
    return 0


def cmd_adapter(args: argparse.Namespace) -> int:
    from medtune.export.adapters import export_adapter, fuse_adapter
    from medtune.export.gguf import human_size

    if args.fuse:
        out = fuse_adapter(args.source, args.out, base=args.base, stage=args.stage)
        print(f"fused model: {out}")
    else:
        out = export_adapter(args.source, args.out, stage=args.stage)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"adapter: {out} ({human_size(size)})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="GGUF, Ollama, model/dataset cards, Hub push, adapters")
    ex = p.add_subparsers(dest="export_command", metavar="WHAT", required=True)

    g = ex.add_parser("gguf", help="convert to GGUF with llama.cpp's converter and quantizer")
    g.add_argument("source", help="run folder, model folder or adapter folder")
    g.add_argument("--quant", action="append", metavar="Q",
                   help="f16, bf16, f32, q8_0, q6_k, q5_k_m, q4_k_m (recommended), q4_0, ... (repeatable; "
                   "default: the recipe's export.gguf.quantizations, else q4_k_m)")  # fmt: skip
    g.add_argument("--out", help="output file (one quantization)")
    g.add_argument("--out-dir", help="output folder (default: <run>/gguf)")
    g.add_argument("--name", help="file name stem (default: <run>-<stage>)")
    g.set_defaults(func=cmd_gguf)

    o = ex.add_parser("ollama", help="an Ollama Modelfile (TEMPLATE, stops, SYSTEM) for a GGUF or a run")
    o.add_argument("source", help="a .gguf file, or a run/model folder (converted first)")
    o.add_argument("--out", required=True, help="folder for the Modelfile (and the GGUF when converting)")
    o.add_argument("--name", help="Ollama model name (default: from the file)")
    o.add_argument("--quant", default="q4_k_m", help="quantization when converting (default q4_k_m)")
    o.add_argument("--system", help="SYSTEM prompt (default: the recipe's or task's)")
    o.add_argument("--system-file", help="read the SYSTEM prompt from a file")
    o.add_argument("--temperature", type=float, help="default: the recipe's export.ollama.temperature")
    o.add_argument("--num-ctx", type=int, help="context length (default: the model's)")
    o.add_argument("--template", help="a Go TEMPLATE file, for chat templates medtune cannot translate")
    o.set_defaults(func=cmd_ollama)

    c = ex.add_parser("card", help="model card (README.md) and dataset card of a run")
    c.add_argument("run")
    c.add_argument("--out", required=True, help="folder: README.md and datasets/")
    c.add_argument("--repo", help="model repository id shown in the card")
    c.set_defaults(func=cmd_card)

    u = ex.add_parser("push", help="upload model (or adapter), GGUF files and cards, or datasets, to the Hub")
    u.add_argument("run")
    u.add_argument("--repo", help="OWNER/NAME (default: recipe export.hub.*_repo, else .env)")
    u.add_argument("--datasets", action="store_true", help="push the run's datasets and dataset card")
    u.add_argument("--adapter", help="push this adapter folder instead of the merged model")
    u.add_argument("--gguf", action="append", help="GGUF file(s) to include (default: <run>/gguf/*.gguf)")
    u.add_argument("--public", action="store_true", help="create a public repository (default: private)")
    u.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    u.set_defaults(func=cmd_push)

    a = ex.add_parser("adapter", help="export a run's LoRA adapter alone, or fuse an adapter into its base")
    a.add_argument("source", help="run folder or adapter folder")
    a.add_argument("--out", required=True)
    a.add_argument("--stage", help="run stage whose adapter to take (default: the last)")
    a.add_argument("--fuse", action="store_true", help="merge into the base: a standalone model folder")
    a.add_argument("--base", help="base model for --fuse (default: the one in adapter_config.json)")
    a.set_defaults(func=cmd_adapter)
