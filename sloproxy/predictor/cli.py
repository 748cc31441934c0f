"""``sloproxy predictor train|eval``: build an artifact and measure it against the baselines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import Rows, holdout_ids, load_lengths, load_pairs


def _load_rows(args: argparse.Namespace) -> Rows:
    if getattr(args, "pairs", None):
        return load_pairs(args.pairs)
    if not (args.prompts and args.lengths):
        raise ValueError("give --prompts and --lengths, or --pairs")
    return load_lengths(args.prompts, args.lengths)


def _train(args: argparse.Namespace) -> int:
    from .artifact import save
    from .evaluate import report
    from .train import TrainConfig, fit

    rows = load_lengths(args.prompts, args.lengths)
    held: list[str] = []
    train_rows, test_rows = rows, None
    if args.holdout:
        hold = holdout_ids(rows.prompt_ids, args.holdout, args.seed)
        held = sorted(hold)
        train_rows = rows.subset_prompts(set(rows.prompt_ids) - hold)
        test_rows = rows.subset_prompts(hold)
    cfg = TrainConfig(seed=args.seed, rounds=args.rounds, num_threads=args.threads)
    bundle = fit(train_rows, cfg)
    bundle.meta["holdout"] = {"fraction": args.holdout or 0.0, "seed": args.seed, "prompt_ids": held}
    bundle.meta["sources"] = {"prompts": Path(args.prompts).name, "lengths": Path(args.lengths).name}
    out = save(bundle, args.out)
    summary: dict = {"out": str(out), "rows": bundle.meta["rows"], "prompts": bundle.meta["prompts"]}
    if test_rows is not None:
        summary["holdout_eval"] = report(bundle, test_rows)
    print(json.dumps(summary, indent=None if args.json else 1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .artifact import load
    from .evaluate import report

    bundle = load(args.model)
    rows = _load_rows(args)
    if args.holdout_only:
        held = set(bundle.meta.get("holdout", {}).get("prompt_ids") or ())
        if not held:
            raise ValueError(f"{args.model}: trained without --holdout, so it has no held-out prompts")
        if args.pairs:
            raise ValueError("--holdout-only needs --prompts/--lengths (pairs have no prompt ids)")
        rows = rows.subset_prompts(held)
    result = report(bundle, rows)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            if key != "baselines":
                print(f"{key:<{width}}  {value}")
        for name, figures in result["baselines"].items():
            print(f"baseline {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``predictor train`` and ``predictor eval`` to the ``sloproxy`` command."""
    predictor = commands.add_parser("predictor", help="response-length predictor: train and evaluate")
    sub = predictor.add_subparsers(dest="predictor_command", required=True)

    train = sub.add_parser("train", help="train an artifact from prompts + lengths")
    train.add_argument("--prompts", required=True, help="JSONL: prompt_id, instruction, prompt_tokens")
    train.add_argument("--lengths", required=True, help="CSV: prompt_id, generator, output_tokens")
    train.add_argument("--out", required=True, help="artifact directory to write")
    train.add_argument("--holdout", type=float, default=0.0, help="fraction of prompts held out (0: train on all)")
    train.add_argument("--seed", type=int, default=0, help="seeds the split and the trees")
    train.add_argument("--rounds", type=int, default=100, help="boosting rounds per quantile head")
    train.add_argument("--threads", type=int, default=2, help="LightGBM threads")
    train.add_argument("--json", action="store_true", help="one-line JSON summary")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate an artifact against the baselines")
    ev.add_argument("--model", required=True, help="artifact directory")
    ev.add_argument("--prompts", help="JSONL: prompt_id, instruction, prompt_tokens (with --lengths)")
    ev.add_argument("--lengths", help="CSV: prompt_id, generator, output_tokens (with --prompts)")
    ev.add_argument("--pairs", help='JSONL: {"prompt": str, "output_tokens": int, "model"?: str}')
    ev.add_argument("--holdout-only", action="store_true", help="only the prompts the artifact held out")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_eval)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - convenience entry point
    parser = argparse.ArgumentParser(prog="sloproxy")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
