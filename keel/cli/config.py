"""`keel config keys [SECTION]` and `keel config show RECIPE`: the key reference, generated from the
registered schemas (each field's type, default and the comment beside it), and a resolved recipe
with its parallel layout."""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing

import yaml

import keel
from keel.cli.common import OVERRIDES_HELP
from keel.errors import ConfigError


def field_comments(cls) -> dict[str, str]:
    """name -> the comment on the field's line (or the comment lines right above it), for every
    dataclass in cls's MRO: the schema's own documentation."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        lines = source.splitlines()
        comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        for number, line in enumerate(lines, 1):
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(comments.get(number, ""))
                continue
            match = re.match(r"\s+(\w+)\s*:", line)
            if match and not stripped.startswith(("def ", "@", "return")):
                text = comments.get(number) or " ".join(above)
                if text:
                    out[match.group(1)] = text
            above = []
    return out


def _type_text(tp) -> str:
    from keel.config import _type_name
    return _type_name(tp)


def _dataclass_in(tp):
    """The dataclass inside `tp` (itself, or Optional[...] of one), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _shown(value) -> str:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def schema_keys(cls, prefix: str) -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) for every field of a section dataclass; nested sections
    (also optional ones, such as rl.dpo) are flattened into their own keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        key = f"{prefix}.{f.name}"
        nested = _dataclass_in(tp)
        if nested is not None:
            if default is None:  # an optional sub-section: absent unless given
                meaning = comments.get(f.name) or (nested.__doc__ or "").strip().splitlines()[0]
                rows.append((key, "a mapping, optional", "null", meaning))
            rows += schema_keys(nested, key)
            continue
        rows.append((key, _type_text(tp), _shown(default), comments.get(f.name, "")))
    return rows


def all_keys() -> list[tuple[str, str, str, str]]:
    """Every key of every registered section. `model.*` are the first family's (llama); a key another
    family adds or defaults differently is listed as `model[family].key`."""
    from keel.config import CANONICAL_ORDER, SECTIONS
    from keel.model.registry import MODELS
    from keel.rl.config import rl_schema

    keel.register_all()
    rows = []
    names = [n for n in CANONICAL_ORDER if n in SECTIONS] + [n for n in SECTIONS if n not in CANONICAL_ORDER]
    for name in names:
        if name == "model":
            base: dict = {}
            # The plain backbone's family first; the others list only what they add or change.
            for i, spec in enumerate(sorted(MODELS.values(), key=lambda spec: spec.name != "llama")):
                for row in schema_keys(spec.config_cls, "model"):
                    if i == 0:
                        base[row[0]] = row
                        rows.append(row)
                    elif row[0] not in base or (row[2] != base[row[0]][2] and row[0] != "model.name"):
                        rows.append((row[0].replace("model.", f"model[{spec.name}].", 1),) + row[1:])
        elif name == "rl":
            rows += schema_keys(rl_schema(), "rl")
        elif SECTIONS[name].schema is not None:
            rows += schema_keys(SECTIONS[name].schema, name)
    return rows


def keys_table(rows) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, meaning in rows:
        cell = lambda s: s.replace("|", "\\|")  # noqa: E731
        lines.append(f"| `{key}` | {cell(tp)} | `{cell(default)}` | {cell(meaning)} |")
    return "\n".join(lines)


def cmd_keys(args) -> None:
    rows = all_keys()
    if args.section:
        rows = [r for r in rows if r[0].split(".")[0].split("[")[0] == args.section]
        if not rows:
            sections = sorted({r[0].split(".")[0].split("[")[0] for r in all_keys()})
            raise ConfigError(f"{args.section}: unknown section; expected one of {sections}")
    if args.markdown:
        print(keys_table(rows))
        return
    width = max(len(r[0]) for r in rows)
    for key, tp, default, meaning in rows:
        print(f"{key:<{width}}  {tp} = {default}" + (f"\n{'':<{width}}  {meaning}" if meaning else ""))


def show_config(cfg, world: int) -> None:
    """The resolved recipe as YAML, then how `world` ranks would lay it out (checked first)."""
    from keel.train.parallel import resolve_parallel_dims

    dims = resolve_parallel_dims(cfg.parallel, world)
    lines = [f"# layout on {world} rank(s): pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard "
             f"{dims.dp_shard} x cp {dims.cp} x tp {dims.tp} (engine {cfg.parallel.engine})"]
    if cfg.parallel.ep > 1:
        if dims.dp % cfg.parallel.ep:
            raise ConfigError(f"parallel.ep: {cfg.parallel.ep} does not divide the {dims.dp} data-parallel ranks "
                              f"of {world} rank(s)")
        lines.append(f"# experts: ep {cfg.parallel.ep} (each expert group spans {cfg.parallel.ep} data-parallel "
                     f"ranks; {dims.dp // cfg.parallel.ep} replica group(s))")
    if cfg.rl is None:
        micro_total = cfg.train.micro_batch * dims.dp
        if cfg.train.global_batch % micro_total:
            raise ConfigError(f"train.global_batch: {cfg.train.global_batch} is not a multiple of "
                              f"train.micro_batch x data-parallel ranks = {micro_total} on {world} ranks")
        from keel.model.registry import get_model_spec
        step = get_model_spec(cfg.model.name).task(cfg).step_size(cfg.train.global_batch)
        lines.append(f"# per step: {step}; {cfg.train.global_batch // micro_total} "
                     f"micro-batch(es) of {cfg.train.micro_batch} per data-parallel rank")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    print("\n".join(lines))


def cmd_show(args) -> None:
    show_config(keel.load_recipe(args.recipe, args.overrides), args.world)


def add_parsers(sub, parser_class) -> None:
    c = sub.add_parser("config", help="the recipe key reference, and resolved recipes").add_subparsers(
        dest="config_command", required=True, parser_class=parser_class)
    k = c.add_parser("keys", help="every recipe key: type, default and meaning (from the schema)",
                     epilog="examples:\n  keel config keys\n  keel config keys optim\n  keel config keys --markdown",
                     formatter_class=parser_class.formatter)
    k.add_argument("section", nargs="?", help="only this section (run, model, data, train, optim, ...)")
    k.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    k.set_defaults(fn=cmd_keys)
    s = c.add_parser("show", help="a recipe resolved (extends, overrides, defaults) and its layout",
                     epilog="example:\n  keel config show recipes/lm/llama-1b-h100.yaml --world 64",
                     formatter_class=parser_class.formatter)
    s.add_argument("recipe", help="a YAML recipe")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.add_argument("--world", type=int, default=1, help="world size to lay out (default: 1)")
    s.set_defaults(fn=cmd_show)
