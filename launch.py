"""verif-sweep command line: run a sweep, a weight diff, or check a configuration.

    python launch.py --sweep [--config FILE] [--set dotted.key=value ...] [--out DIR] [--resume]
    python launch.py --check [--config FILE] [--set ...]      validate everything, load no weights
    python launch.py --weight-diff --base A --tuned B [--out DIR]
    python launch.py --config-reference                        print the configuration reference
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="verif-sweep: head-ablation verification studies")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sweep", action="store_true", help="run the sweep described by the config")
    mode.add_argument("--check", action="store_true", help="validate config, models, heads and prompts; run nothing")
    mode.add_argument("--weight-diff", action="store_true", help="compare a fine-tune's weights with its base")
    mode.add_argument("--config-reference", action="store_true", help="print the configuration reference (Markdown)")
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set prompts.n=128 (repeatable)")
    p.add_argument("--out", help="output folder (default: config `out`, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out, skipping finished shards")
    p.add_argument("--base", help="--weight-diff: base checkpoint (hub id or safetensors folder)")
    p.add_argument("--tuned", help="--weight-diff: fine-tuned checkpoint")
    return p


def _weight_diff(args: argparse.Namespace, config) -> int:
    """The weight-diff job alone; target heads come from the config only when one names them."""
    if not (args.base and args.tuned):
        print("error: --weight-diff needs --base and --tuned", file=sys.stderr)
        return 2
    from jobs.weight_diff import main_weight_diff
    from verif.design.heads import parse_heads

    overrides = [*args.overrides, f"weight_diff.base={args.base}", f"weight_diff.tuned={args.tuned}", "name=weight-diff"]
    try:
        cfg = config.load_config(args.config, overrides, args.out or "runs/weight_diff")
        named = args.config or any(o.startswith("ablation.target_heads=") for o in args.overrides)
        heads = parse_heads(cfg["ablation"]["target_heads"] or []) if named else None
    except (config.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return main_weight_diff(cfg, heads or None)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from jobs import config

    if args.config_reference:
        print(config.reference_markdown())
        return 0
    if args.weight_diff:
        return _weight_diff(args, config)
    from jobs.sweep import SweepError, SweepInterrupted, prepare, run_sweep

    try:
        cfg = config.load_config(args.config, args.overrides, args.out)
        if args.check:
            plan = prepare(cfg)
            print(f"ok: {len(plan.sources)} model(s), {plan.prompts.height} prompts, "
                  f"{len(plan.conditions)} conditions, {len(plan.shards)} shards")
            return 0
        report = run_sweep(cfg, resume=args.resume)
    except (config.ConfigError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(f"interrupted: {e}; continue with --resume --out {cfg['out']}", file=sys.stderr)
        return 3
    from jobs.finalize import summary_lines

    print("\n".join(summary_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
