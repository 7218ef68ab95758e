"""Native rollout engine vs transformers `generate`: decode tokens/s on the same model and prompts.

    KEEL_HOME=/root/.cache/keel OMP_NUM_THREADS=1 python bench/rollout_decode.py --prompts 32 --batch 16 --max-tokens 64

Both sample (temperature 1, seeded) from the real SmolLM2-135M-Instruct on chat-wrapped
reasoning-gym prompts, stopping at EOS, so output lengths are mixed: transformers decodes each
batch of `--batch` prompts until its longest sequence ends; the native engine refills finished
slots with waiting prompts. Reported: generated tokens / wall seconds for each, the native engine
and transformers both in float32 and in bfloat16 (`rl.engine_dtype: bfloat16`).
On CPU the native engine decodes with one intra-op thread (NativeEngine.cpu_threads; see
keel/rl/engines/native.py for why); transformers uses torch's setting, which OMP_NUM_THREADS sets.
"""
import argparse
import copy
import time

import torch


def hf_generate_rate(hf, tok, prompts, args) -> float:
    """transformers `generate` tokens/s over batches of `args.batch` prompts (left-padded)."""
    tok.hf.padding_side = "left"
    torch.manual_seed(0)
    hf_tokens, hf_s = 0, 0.0
    for i in range(0, len(prompts), args.batch):
        chunk = prompts[i:i + args.batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_id] * (width - len(c)) + c for c in chunk], device=args.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens, do_sample=True,
                              temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        hf_s += time.perf_counter() - t0
        for row in out[:, width:].tolist():  # count real tokens up to and including EOS
            hf_tokens += next((j + 1 for j, t in enumerate(row) if t == tok.eos_id), len(row))
    return hf_tokens / hf_s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from keel.data.assets import asset_path
    from keel.rl.engines import SamplingParams
    from keel.rl.engines.native import NativeEngine
    from keel.rl.prompts import load_prompts
    from keel.rl.run import load_policy

    policy, tok = load_policy("smollm2", args.device)
    items = load_prompts({"source": "reasoning_gym", "name": "basic_arithmetic", "size": args.prompts, "seed": 7,
                          "instruction": "none"})
    prompts = [tok.encode(tok.hf.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False,
                                                     add_generation_prompt=True)) for it in items]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, stop_ids=(tok.eos_id,), seed=0)
    native = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = NativeEngine(copy.deepcopy(policy).to(dtype), args.batch)
        engine.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        t0 = time.perf_counter()
        rollouts = engine.generate(prompts, params)
        native[dtype] = (sum(len(r.tokens) for r in rollouts), time.perf_counter() - t0)

    hf_rates = {dtype: hf_generate_rate(AutoModelForCausalLM.from_pretrained(asset_path("smollm2"), dtype=dtype)
                                        .to(args.device).eval(), tok, prompts, args)
                for dtype in (torch.float32, torch.bfloat16)}
    lengths = sorted(len(r.tokens) for r in rollouts)
    print(f"device {args.device}, torch threads {torch.get_num_threads()} | {len(prompts)} prompts, batch "
          f"{args.batch}, max_tokens {args.max_tokens} | native bf16 lengths min/median/max "
          f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}")
    for dtype, (tokens, seconds) in native.items():
        name, hf_rate = str(dtype).removeprefix("torch."), hf_rates[dtype]
        print(f"{name}: native engine {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s | "
              f"transformers generate {hf_rate:.1f} tok/s | speed-up {tokens / seconds / hf_rate:.2f}x")


if __name__ == "__main__":
    main()
