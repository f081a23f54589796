"""Decoder LM speed, dense vs MLP-pruned: prefill tokens/s at batch x sequence sizes and decode tokens/s (KV cache).

Speed does not depend on the weights' values, so the model is a random-init Llama of a chosen
shape (default: a scaled-down Llama-2, hidden 512, gated MLP 1536, 8 query / 2 K/V heads,
6 layers, vocabulary 8192), saved as a Hugging Face folder, calibrated on random token
windows and pruned at --sparsity with `corp prune`; then `corp benchmark PRUNED` times it
beside the dense folder (its default reference). Prints the command and a side-by-side table.
Timing figures need a quiet machine.

    python scripts/bench_llm_speed.py [--sparsity 0.5] [--hidden 512 --intermediate 1536 --layers 6]
        [--batch-sizes 1,8] [--seq-lens 128,512] [--new-tokens 32] [--device cpu] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(folder: Path, args: argparse.Namespace) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, max(int(s) for s in args.seq_lens.split(",")) + args.new_tokens),
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)


def prune(dense: Path, out: Path, sparsity: float) -> None:
    import torch

    from corp_cli import api
    from corp_cli.loading import load_dense

    loaded = load_dense(dense)
    gen = torch.Generator().manual_seed(0)
    vocab = int(loaded.model.config.vocab_size)
    batches = [{"input_ids": (ids := torch.randint(3, vocab, (4, 128), generator=gen)),
                "attention_mask": torch.ones_like(ids)} for _ in range(4)]
    stats = api.calibrate(loaded, batches)
    api.save_pruned(api.prune(loaded, stats, target="mlp", sparsity=sparsity, round_to=64), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dense, pruned = Path(tmp) / "dense", Path(tmp) / "pruned"
        build(dense, args)
        prune(dense, pruned, args.sparsity)
        cmd = ["corp", "benchmark", str(pruned), "--batch-sizes", args.batch_sizes, "--seq-lens", args.seq_lens,
               "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--device", args.device,
               "--dtype", args.dtype, "--json", "-"]
        exe = [sys.executable, "-c", "from corp_cli.cli import main; main()"]
        res = subprocess.run(exe + cmd[1:], capture_output=True, text=True, check=False)
        if res.returncode:
            sys.exit(res.stderr)
        report = json.loads(res.stdout)
    m, r = report["model"], report["reference"]
    kept = m["architecture"]["blocks"][0]["mlp_hidden"]
    print(f"random-init Llama, hidden {args.hidden}, MLP {args.intermediate} -> {kept} units ({args.sparsity:.0%} "
          f"removed, rounded to 64), {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}; "
          f"{args.dtype} on {report['environment']['device']}")
    print(f"params {r['params']:,} -> {m['params']:,}; GFLOPs per {m['tokens']}-token sequence "
          f"{r['flops_per_item'] / 1e9:.2f} -> {m['flops_per_item'] / 1e9:.2f}\n")
    print("| batch | seq | prefill tok/s dense | prefill tok/s pruned | speed-up |")
    print("|---|---|---|---|---|")
    for a, b in zip(m["runs"], r["runs"]):
        print(f"| {a['batch_size']} | {a['seq_len']} | {b['tokens_per_s']:,.0f} | {a['tokens_per_s']:,.0f} | "
              f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x |")
    print(f"\n| batch | decode tok/s dense | decode tok/s pruned | speed-up |  ({args.new_tokens} new tokens after "
          f"{report['settings']['prompt_tokens']})")
    print("|---|---|---|---|")
    for a, b in zip(m["decode"], r["decode"]):
        print(f"| {a['batch_size']} | {b['decode_tokens_per_s']:,.1f} | {a['decode_tokens_per_s']:,.1f} | "
              f"{a['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}x |")
    print("\ncommand: " + " ".join(cmd[:-2]).replace(str(pruned), "PRUNED"))


if __name__ == "__main__":
    main()
