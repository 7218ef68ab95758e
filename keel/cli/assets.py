"""`keel data preprocess`, `keel fetch`, `keel import hf` and `keel export hf`: files in and out."""
from __future__ import annotations


def cmd_preprocess(args) -> None:
    from keel.data.preprocess import preprocess_main
    preprocess_main(args.inputs, args.out, args.tokenizer, args.text_key)


def cmd_import(args) -> None:
    import keel
    from keel.checkpoint.hf import import_hf
    keel.register_all()
    import_hf(args.src, args.out)


def cmd_export(args) -> None:
    import keel
    from keel.checkpoint.hf import export_hf
    keel.register_all()
    export_hf(args.checkpoint, args.out, args.format)


def cmd_export_fp8(args) -> None:
    import keel
    from keel.checkpoint.fp8 import export_fp8
    keel.register_all()
    if args.min_features < 0:
        from keel.errors import ConfigError
        raise ConfigError(f"--min-features: must be >= 0, got {args.min_features}")
    out, names = export_fp8(args.checkpoint, args.out, args.min_features)
    print(f"keel export fp8: {len(names)} block linears/experts as E4M3 per output channel -> {out}\n"
          f"load it with keel.checkpoint.fp8.load_fp8({str(out)!r})")


def cmd_fetch(args) -> None:
    from keel.data.assets import fetch
    fetch(args.names, force=args.force)


def add_parsers(sub, parser_class) -> None:
    d = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True,
                                                                parser_class=parser_class)
    pre = d.add_parser("preprocess", help="tokenize .txt/.jsonl into a megatron .bin/.idx dataset",
                       epilog="example:\n  keel data preprocess corpus/*.jsonl --out data/web --tokenizer smollm2",
                       formatter_class=parser_class.formatter)
    pre.add_argument("inputs", nargs="+", help=".txt / .jsonl files or folders of them")
    pre.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    pre.add_argument("--tokenizer", default="smollm2", help="`smollm2` or an HF tokenizer folder (default: smollm2)")
    pre.add_argument("--text-key", default="text", help="the jsonl field holding a document (default: text)")
    pre.set_defaults(fn=cmd_preprocess)

    for verb, fn, src, src_help, example in (
            ("import", cmd_import, "src", "HF folder, .gguf file, or 'smollm2'", "keel import hf smollm2 out/smollm2"),
            ("export", cmd_export, "checkpoint", "keel run directory or checkpoints/step_N folder",
             "keel export hf runs/lm-tiny out/lm-tiny-hf")):
        fmt = sub.add_parser(verb, help=f"{verb} Hugging Face checkpoints").add_subparsers(
            dest=f"{verb}_format", required=True, parser_class=parser_class)
        hf = fmt.add_parser("hf", help=f"{verb} a Hugging Face checkpoint (Llama, Qwen2/3; KSA exports remote code)",
                            epilog=f"example:\n  {example}", formatter_class=parser_class.formatter)
        hf.add_argument(src, help=src_help)
        hf.add_argument("out", help="a new (or empty) folder; never written over")
        if verb == "export":
            hf.add_argument("--format", default=None,
                            help="another layout the model family's adapter offers, e.g. `official` (default: its default)")
        hf.set_defaults(fn=fn)
        if verb == "export":
            f8 = fmt.add_parser("fp8", help="a serving copy with FP8 (E4M3) block weights, per output channel",
                                epilog="example:\n  keel export fp8 runs/onerec-tiny out/onerec-tiny-fp8",
                                formatter_class=parser_class.formatter)
            f8.add_argument("checkpoint", help=src_help)
            f8.add_argument("out", help="a new (or empty) folder; never written over")
            f8.add_argument("--min-features", type=int, default=0,
                            help="keep linears with fewer input or output features in their precision (default: 0)")
            f8.set_defaults(fn=cmd_export_fp8)

    f = sub.add_parser("fetch", help="fetch the real corpora and SmolLM2-135M onto this machine",
                       epilog="example:\n  keel fetch all", formatter_class=parser_class.formatter)
    f.add_argument("names", nargs="+", help="shakespeare, kjv, smollm2, or all")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    f.set_defaults(fn=cmd_fetch)
