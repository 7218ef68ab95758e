"""`keel kelix generate RUN --prompt "a sneaker"` (images from a caption) and `keel kelix describe RUN
IMAGE.png` (a caption from an image), on a trained Kelix run (recipes/kelix/)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import keel
from keel.errors import CheckpointError, ConfigError, DataError


def _kelix_model(run: str):
    from keel.checkpoint.files import resolve_checkpoint

    path = Path(run)
    if not (path / "config.yaml").is_file() and not (path.parent.parent / "config.yaml").is_file():
        raise CheckpointError(f"{path}: not a keel run directory (no config.yaml); give the folder `keel train` wrote")
    ckpt = resolve_checkpoint(path)
    model = keel.load(ckpt)
    if model.config.name != "kelix":
        raise ConfigError(f"model.name: {run} is a {model.config.name} run; keel kelix needs a kelix run "
                          f"(recipes/kelix/)")
    return model, ckpt


def _save_png(pixels, path: Path) -> None:
    from PIL import Image

    Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().numpy(), mode="L").save(path)


def cmd_generate(args) -> None:
    import torch

    from keel.data.fashion_mnist import CLASS_NAMES, captions_for, class_from_prompt
    from keel.model.kelix_vocab import CaptionVocab

    if args.n <= 0:
        raise ConfigError(f"--n: must be > 0, got {args.n}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {args.temperature}")
    label = class_from_prompt(args.prompt)  # refuses anything but "a <class>"
    model, ckpt = _kelix_model(args.run)
    words = CaptionVocab.from_templates().encode(captions_for(label)[0])  # "a <name>", whatever alias was typed
    images = generate_images(model, words, args.n, args.temperature, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        _save_png(image[0], out / f"{i:03d}.png")
    cols = math.ceil(math.sqrt(len(images)))
    sheet = torch.zeros(math.ceil(len(images) / cols) * 30, cols * 30)  # 28-pixel images, 2-pixel gaps
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        sheet[r * 30:r * 30 + 28, c * 30:c * 30 + 28] = image[0]
    _save_png(sheet, out / "contact_sheet.png")
    (out / "prompt.json").write_text(json.dumps({"prompt": args.prompt, "class": CLASS_NAMES[label],
                                                 "checkpoint": str(ckpt), "temperature": args.temperature,
                                                 "seed": args.seed}))
    print(f"keel kelix: {len(images)} images for {args.prompt!r} ({ckpt}) -> {out.absolute()} "
          f"(contact_sheet.png)")


def generate_images(model, words: list[int], n: int, temperature: float, seed: int):
    """[n, 1, 28, 28] pixels: [bos] caption [boi], then the image's patch blocks drawn by the NBP head,
    decoded by the de-tokenizer."""
    import torch

    from keel.model.kelix_vocab import BOI, BOS, PAD, Q_EOS

    cfg = model.config
    prompt = torch.full((n, len(words) + 2, cfg.block_width), PAD, dtype=torch.long)
    prompt[:, :, 0] = torch.tensor([BOS, *words, BOI])
    prompt[:, :, 1] = Q_EOS
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        blocks = model.continue_blocks(prompt, ["image"] * cfg.tokenizer.num_patches, temperature, generator)
        codes = blocks[:, prompt.shape[1]:, :cfg.tokenizer.n_q] - model.code_offsets
        return model.detokenizer(model.tokenizer.fuse_codes(codes))


def read_image(path: Path, size: int):
    """A grey [1, 1, size, size] float image in [0, 1] from a PNG (or any format Pillow reads)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        image = Image.open(path).convert("L")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not an image Pillow can read ({e})") from None
    if image.size != (size, size):
        raise DataError(f"{path}: expected a {size}x{size} image (Fashion-MNIST's size), got "
                        f"{image.size[0]}x{image.size[1]}")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float().view(1, 1, size, size) / 255.0


def cmd_describe(args) -> None:
    from keel.model.kelix_vocab import CaptionVocab

    model, _ = _kelix_model(args.run)
    image = read_image(Path(args.image), model.config.tokenizer.image_size)
    caption, label, prob = describe_image(model, image)
    vocab = CaptionVocab.from_templates()
    print(f"{vocab.decode(caption)}   (likeliest class: {label}, p={prob:.2f})")


def describe_image(model, image, max_words: int = 12):
    """(caption word ids drawn greedily after [bos][boi] image [eoi], likeliest class name, its
    probability among the classes' "a <name>" captions)."""
    import torch

    from keel.data.fashion_mnist import CLASS_NAMES
    from keel.model.kelix_vocab import BOI, BOS, EOI, EOS, PAD, Q_EOS

    cfg = model.config
    patches = cfg.tokenizer.num_patches
    with torch.no_grad():
        codes = model.tokenizer.encode(image)
        prefix = torch.full((1, 2, cfg.block_width), PAD, dtype=torch.long)
        prefix[0, :, 0], prefix[0, :, 1] = torch.tensor([BOS, BOI]), Q_EOS
        eoi = prefix[:, :1].clone()
        eoi[0, 0, 0] = EOI
        blocks = torch.cat([prefix, model.visual_blocks(codes), eoi], 1)
        words = []
        for _ in range(max_words):
            blocks = model.continue_blocks(blocks, ["text"])
            token = int(blocks[0, -1, 0])
            if token == EOS:
                break
            words.append(token)
        scores = class_scores(model, image, codes, patches)
        probs = scores.softmax(-1)
    best = int(probs.argmax())
    return words, CLASS_NAMES[best], float(probs[best])


def class_scores(model, image, codes, patches: int):
    """log p("a <name>" [eos] | image) for each class, through the model's eval path."""
    import torch

    from keel.data.fashion_mnist import CLASS_NAMES
    from keel.model.kelix_task import CaptionedImages
    from keel.model.kelix_vocab import CaptionVocab

    data = CaptionedImages((image[0] * 255).round().byte(), torch.zeros(1, dtype=torch.long),
                           CaptionVocab.from_templates(), patches, model.config.block_width, 0.0, 0, fixed_caption=True)
    sample = data[0]
    batch = {k: v[None] for k, v in sample.items()}
    batch["images"] = image
    return model(batch, what="eval")["class_scores"][0, :len(CLASS_NAMES)]


def add_parsers(sub, parser_class) -> None:
    k = sub.add_parser("kelix", help="Kelix: `generate` images from a caption, `describe` an image",
                       epilog="examples:\n  keel kelix generate runs/kelix-3-detokenizer --prompt \"a sneaker\" --n 16 "
                              "--out gen/\n  keel kelix describe runs/kelix-3-detokenizer shoe.png",
                       formatter_class=parser_class.formatter)
    verbs = k.add_subparsers(dest="kelix_verb", required=True, parser_class=parser_class, metavar="ACTION")
    g = verbs.add_parser("generate", help="28x28 grey PNGs (and contact_sheet.png) for a prompt \"a <class>\"",
                         formatter_class=parser_class.formatter)
    g.add_argument("run", help="a Kelix run directory (a stage-3 run has the trained de-tokenizer)")
    g.add_argument("--prompt", required=True, help="\"a <class>\": any Fashion-MNIST class name, any case")
    g.add_argument("--n", type=int, default=16, help="images to generate (default: 16)")
    g.add_argument("--out", required=True, help="folder for 000.png ... and contact_sheet.png")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the codes; 0: greedy (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    g.set_defaults(fn=cmd_generate)
    d = verbs.add_parser("describe", help="a caption for a 28x28 grey image", formatter_class=parser_class.formatter)
    d.add_argument("run", help="a Kelix run directory")
    d.add_argument("image", help="a 28x28 grey image file (PNG)")
    d.set_defaults(fn=cmd_describe)
