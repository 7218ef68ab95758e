"""`keel sid build RECIPE` (the item -> semantic-ID table) and `keel recommend RUN` (top-K items per
user of a trained recommender, as JSON lines anyone can score)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import keel
from keel.cli.common import OVERRIDES_HELP
from keel.errors import CheckpointError, ConfigError


def _recsys_recipe(path, overrides):
    cfg = keel.load_recipe(path, overrides)
    if cfg.recsys is None:
        raise ConfigError(f"recsys: {path} has no recsys: section (see recipes/recsys/)")
    return cfg


def cmd_sid_build(args) -> None:
    from keel.model.rec_task import build_sid_table

    cfg = _recsys_recipe(args.recipe, args.overrides)
    sid = cfg.recsys.sid
    method = {"rq_kmeans": "RQ-KMeans", "rq_vae": f"RQ-VAE ({sid.vae.steps} steps)",
              "coba": f"CoBa RQ-VAE ({sid.vae.steps} steps, co-occurrence window {sid.vae.cooc_window})"}[sid.method]
    print(f"keel sid: {method} {sid.levels} x {sid.codebook} over {sid.embedding} item embeddings of "
          f"{cfg.recsys.dataset} (seed {sid.seed})", flush=True)
    table, path = build_sid_table(cfg.recsys)
    report = table.report
    print(f"  items {table.n_items}, levels {table.sid_levels}"
          + (" (last: de-duplication)" if sid.dedup else ""))
    print("  utilisation per level: " + ", ".join(f"{u:.3f}" for u in report["utilisation"]))
    print(f"  collision rate before de-duplication: {report['collision_rate']:.3f}; "
          f"relative reconstruction error: {report['recon_error']:.3f}"
          + (" (of the latent)" if "decoder_recon_error" in report else ""))
    if "decoder_recon_error" in report:  # RQ-VAE methods: how well the decoder rebuilds the embeddings
        print(f"  decoder reconstruction error: {report['decoder_recon_error']:.3f}; "
              f"final training loss: {report['final_loss']:.4f}")
    print(f"wrote {path.absolute()}\nnext: keel train {args.recipe}")


def cmd_recommend(args) -> None:
    from keel.checkpoint.files import resolve_checkpoint
    from keel.model.rec_task import RecommendationTask, recommend
    from keel.model.registry import get_model_spec

    if args.topk <= 0:
        raise ConfigError(f"--topk: must be > 0, got {args.topk}")
    run = Path(args.run)
    config = run / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{run}: not a keel run directory (no config.yaml); give the folder `keel train` wrote")
    ckpt = resolve_checkpoint(run)
    cfg = keel.load_recipe(config)
    task = get_model_spec(cfg.model.name).task(cfg)
    if not isinstance(task, RecommendationTask):
        raise ConfigError(f"model.name: {cfg.model.name} is not a recommender (keel recommend ranks items)")
    task.prepare()
    model = keel.load(ckpt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for user, items in recommend(task, model, args.split, args.topk, mask_known=not args.keep_known):
            f.write(json.dumps({"user": user, "items": items}) + "\n")
            n += 1
    os.replace(tmp, out)  # a reader never sees half a file
    print(f"keel recommend: {n} users x top {args.topk} ({args.split} split, {ckpt}) -> {out.absolute()}")


def add_parsers(sub, parser_class) -> None:
    s = sub.add_parser("sid", help="semantic IDs: `keel sid build RECIPE` writes the item -> SID table",
                       epilog="examples:\n  keel sid build recipes/recsys/onerec-tiny.yaml\n"
                              "  keel sid build recipes/recsys/onerec-tiny.yaml recsys.sid.embedding=content",
                       formatter_class=parser_class.formatter)
    s.add_argument("action", choices=["build"], help="build: build semantic IDs (recsys.sid.method) and write the table beside the data")
    s.add_argument("recipe", help="a recipe with a recsys: section (recipes/recsys/*.yaml)")
    s.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    s.set_defaults(fn=cmd_sid_build)

    r = sub.add_parser("recommend", help="top-K items per user from a trained recommender, as JSON lines",
                       epilog="examples:\n  keel recommend runs/onerec-tiny --split test --topk 10 --out recs.jsonl\n"
                              "each line: {\"user\": RAW_USER_ID, \"items\": [RAW_ITEM_ID, ...]} best first",
                       formatter_class=parser_class.formatter)
    r.add_argument("run", help="a run directory of a recommender (recipes/recsys/)")
    r.add_argument("--split", choices=["valid", "test"], default="test", help="whose held-out item to predict: valid or test (default: test)")
    r.add_argument("--topk", type=int, default=10, help="items per user (default: 10)")
    r.add_argument("--out", required=True, help="the .jsonl file to write")
    r.add_argument("--keep-known", action="store_true",
                   help="also rank items the user already interacted with (default: leave them out)")
    r.set_defaults(fn=cmd_recommend)
