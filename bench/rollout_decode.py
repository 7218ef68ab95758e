"""Native rollout engine vs transformers `generate`: rollout tokens/s on the same model, prompts and batch.

    OMP_NUM_THREADS=1 python bench/rollout_decode.py --prompts 16 --samples 8 --batch 16 --max-tokens 64

Both sample (temperature 1, seeded) from the real SmolLM2-135M-Instruct on chat-wrapped
reasoning-gym prompts, stopping at EOS, so output lengths are mixed. `--samples` is GRPO's group
size: each prompt is answered `--samples` times, as an RL step asks of its engine.
- transformers: `generate(num_return_sequences=samples)` over `batch / samples` prompts at a time
  (left-padded), so every call decodes `--batch` rows until its longest sequence ends. It copies
  each prompt `samples` times before the prefill (what TRL's GRPOTrainer does without vLLM).
- native engine (keel/rl/engines/native.py): `--batch` decode slots; each prompt is prefilled once
  for all its samples, and a finished slot takes the next waiting sample at once.
Reported per dtype (`--dtypes`): generated tokens / wall seconds for each and their ratio. On CPU the
native engine decodes with one intra-op thread (NativeEngine.cpu_threads; see its docstring for
why); transformers uses torch's setting, which OMP_NUM_THREADS sets: run with OMP_NUM_THREADS=1
for a like-for-like comparison. bfloat16 is only worth measuring on a CPU with native bf16
(AVX512-BF16/AMX; keel warns otherwise) or a GPU.
"""
import argparse
import copy
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_generate_rate(hf, tok, prompts, args) -> tuple[int, float]:
    """(tokens, seconds) of transformers `generate` over calls of batch / samples prompts."""
    tok.hf.padding_side = "left"
    torch.manual_seed(0)
    hf_tokens, hf_s = 0, 0.0
    per_call = max(1, args.batch // args.samples)
    for i in range(0, len(prompts), per_call):
        chunk = prompts[i:i + per_call]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_id] * (width - len(c)) + c for c in chunk], device=args.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens, do_sample=True,
                              num_return_sequences=args.samples, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        hf_s += time.perf_counter() - t0
        for row in out[:, width:].tolist():  # count real tokens up to and including EOS
            hf_tokens += next((j + 1 for j, t in enumerate(row) if t == tok.eos_id), len(row))
    return hf_tokens, hf_s


def native_rate(policy, dtype, prompts, params, args) -> tuple[int, float, list[int], int]:
    """(tokens, seconds, sorted lengths, prompts prefilled) of the native engine."""
    from keel.rl.engines import SamplingParams
    from keel.rl.engines.native import NativeEngine

    engine = NativeEngine(copy.deepcopy(policy).to(dtype), args.batch)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
    engine.prefills = 0
    t0 = time.perf_counter()
    rollouts = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    lengths = sorted(len(r.tokens) for r in rollouts)
    return sum(lengths), seconds, lengths, engine.prefills


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8, help="answers per prompt (GRPO's group size)")
    p.add_argument("--batch", type=int, default=16, help="rows decoded at once, by both")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from keel.data.assets import asset_path
    from keel.rl.engines import SamplingParams
    from keel.rl.prompts import load_prompts
    from keel.rl.run import load_policy

    policy, tok = load_policy("smollm2", args.device)
    items = load_prompts({"source": "reasoning_gym", "name": "basic_arithmetic", "size": args.prompts, "seed": 7,
                          "instruction": "none"})
    prompts = [tok.encode(tok.hf.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False,
                                                     add_generation_prompt=True)) for it in items]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, stop_ids=(tok.eos_id,), seed=0,
                            n=args.samples)
    print(f"device {args.device}, torch threads {torch.get_num_threads()} | {len(prompts)} prompts x {args.samples} "
          f"samples, batch {args.batch} rows, max_tokens {args.max_tokens}, prompt tokens "
          f"{min(map(len, prompts))}-{max(map(len, prompts))}", flush=True)
    for name in args.dtypes:
        dtype = DTYPES[name]
        tokens, seconds, lengths, prefills = native_rate(policy, dtype, prompts, params, args)
        hf = AutoModelForCausalLM.from_pretrained(asset_path("smollm2"), dtype=dtype).to(args.device).eval()
        hf_tokens, hf_seconds = hf_generate_rate(hf, tok, prompts, args)
        native, reference = tokens / seconds, hf_tokens / hf_seconds
        print(f"{name}: native engine {tokens} tokens in {seconds:.1f} s = {native:.1f} tok/s ({prefills} prefills; "
              f"lengths min/median/max {lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}) | transformers "
              f"generate {hf_tokens} tokens in {hf_seconds:.1f} s = {reference:.1f} tok/s | native / transformers "
              f"{native / reference:.2f}x", flush=True)


if __name__ == "__main__":
    main()
