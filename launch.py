"""verif-sweep command line: run a sweep, a discovery, a weight diff, a generate or compare job, re-log a run,
or check a configuration.

    python launch.py --sweep [--config FILE] [--set dotted.key=value ...] [--out DIR] [--resume]
    python launch.py --discover [--config FILE] [--set ...] [--out DIR] [--resume]   rank heads and neurons
    python launch.py --check [--config FILE] [--set ...]      validate everything, load no weights
    python launch.py --weight-diff --base A --tuned B [--config FILE] [--set ...] [--out DIR] [--resume]
    python launch.py --generate [--config FILE] [--set ...] [--out DIR] [--resume]   a model's chains of thought
    python launch.py --compare [--config FILE] [--set ...] [--out DIR] [--resume]   two models' mechanisms, same prompts
    python launch.py --relog OUT [--mode offline|online]       log a finished sweep folder to W&B again
    python launch.py --config-reference                        print the configuration reference

Without --out (and no `out` in the config) every run gets a new folder, runs/<name>, runs/<name>-2, ...
(`jobs.runs`: --generate's are runs/<name>-generate[-N], --weight-diff's runs/weight_diff[-N]), printed
first; runs/latest links to the latest, and --resume continues the latest run of that name.

The jobs are imported only once the configuration, the job's output folder and the files it reads are
checked (`jobs.inputs.check_job_inputs`): they pull in torch, transformers and Ray (seconds), and a typo
should cost a fraction of one. Bad input (`jobs.errors.InputError`, and a command line argparse refuses)
is one line on stderr and exit code 2; a traceback means a bug (`--debug` shows one for bad input too).
A job that stops early (SIGINT/SIGTERM: exit 128 + the signal; shards that failed on every attempt, or an
output folder that could not be written: exit 1) prints one line: what is on disk and the command that
continues it.
"""

from __future__ import annotations

import argparse
import re
import sys

from jobs import config, inputs, runs
from jobs.errors import InputError
from jobs.inputs import JOBS
from jobs.runtime.resumable import JobFailed, JobInterrupted

EXIT_INPUT = 2  # bad input, as argparse exits for a bad command line


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (the usage is in --help) like every input error."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch.py", description="verif-sweep: head-ablation verification studies")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sweep", action="store_true", help="run the sweep described by the config")
    mode.add_argument("--discover", action="store_true",
                      help="rank every head and MLP neuron by its effect on the verdict and test the top sets "
                           "against random ones (outputs in OUT/discovery)")
    mode.add_argument("--check", action="store_true", help="validate config, models, heads and prompts; run nothing")
    mode.add_argument("--weight-diff", action="store_true",
                      help="compare a fine-tune's weights with its base; the heads summarised as one group are "
                           "weight_diff.heads (target = ablation.target_heads of the config, study, none, or a "
                           "head list); without --config no config file is read")
    mode.add_argument("--generate", action="store_true",
                      help="generate chains of thought of model.path on Countdown problems (TinyZero's prompt) and "
                           "extract their attempts; writes to --out, default a new runs/<name>-generate[-N]")
    mode.add_argument("--compare", action="store_true",
                      help="run the sweep's prompts through the two models of model.path and compare them layer by "
                           "layer; writes OUT/compare/")
    mode.add_argument("--relog", metavar="OUT", help="log a finished sweep folder to W&B again (from its files)")
    mode.add_argument("--config-reference", action="store_true", help="print the configuration reference (Markdown)")
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set prompts.n=128 (repeatable)")
    p.add_argument("--out", help="output folder (default: config `out`, else a new folder per run: runs/<name>, "
                                 "runs/<name>-2, ...; runs/latest links to the latest)")
    p.add_argument("--resume", action="store_true",
                   help="continue the job in --out (without --out: the latest run of that name) with the config it "
                        "was started with: a sweep, discovery or generate job skips its finished shards, a compare "
                        "or weight diff is computed again")
    p.add_argument("--base", help="--weight-diff: base checkpoint (hub id or safetensors folder)")
    p.add_argument("--tuned", help="--weight-diff: fine-tuned checkpoint")
    p.add_argument("--mode", choices=("offline", "online"), help="--relog: override the run's wandb.mode")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    return p


def _fail(message: str) -> int:
    """One line on stderr (a message that quotes another, e.g. a library's, may hold line breaks)."""
    print("error: " + re.sub(r"\s*\n\s*", " ", message.strip()), file=sys.stderr)
    return EXIT_INPUT


def _weight_diff(args: argparse.Namespace) -> int:
    """The weight-diff job alone: the config file only when --config names one (see --help)."""
    if not (args.base and args.tuned):
        return _fail("--weight-diff needs --base and --tuned")
    overrides = [*args.overrides, f"weight_diff.base={args.base}", f"weight_diff.tuned={args.tuned}"]
    cfg = _config(args, ["name=weight-diff", *overrides], file_default=False)
    cfg, folder = runs.place(cfg, args.out, "weight-diff", args.resume)
    inputs.check_job_inputs(cfg, JOBS["weight-diff"], args.resume)  # before the seconds of imports below
    from jobs.weight_diff import weight_diff_job

    with runs.announced(folder):
        result, run = weight_diff_job(cfg, args.resume, args.config)
    print("\n".join(result.verdicts))
    print(f"wrote {', '.join(str(p) for p in result.files.values())} ({result.seconds:.1f} s)")
    print(f"W&B run: {run or 'disabled'}")
    return 0


def _command_line(argv: list[str] | None) -> list[str]:
    """The command as typed (program first), for the resume command an interrupted job prints."""
    return [sys.argv[0] if argv is None else "launch.py", *(sys.argv[1:] if argv is None else argv)]


def _config(args: argparse.Namespace, overrides: list[str], file_default: bool = True) -> config.Config:
    """The configuration; an unset `out` stays unset (the job's run folder is chosen by `jobs.runs.place`)."""
    return config.load_config(args.config, overrides, file_default=file_default, default_out=False)


def _generate(args: argparse.Namespace) -> int:
    """The generate job; its folder is --out, else a new runs/<name>-generate[-N] (never a sweep's)."""
    cfg, folder = runs.place(_config(args, args.overrides), args.out, "generate", args.resume)
    inputs.check_job_inputs(cfg, JOBS["generate"], args.resume)  # before the seconds of imports below
    from jobs.generate import run_generate

    with runs.announced(folder):
        report = run_generate(cfg, resume=args.resume)
    print("\n".join(report.lines()))
    return 0


def _compare(args: argparse.Namespace) -> int:
    cfg, folder = runs.place(_config(args, args.overrides), args.out, "compare", args.resume)
    inputs.check_job_inputs(cfg, JOBS["compare"], args.resume)  # OUT/compare; before the imports below
    from jobs.compare import run_compare

    with runs.announced(folder):
        report = run_compare(cfg, resume=args.resume, config_file=args.config)
    print("\n".join(report.lines()))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    cfg, folder = runs.place(_config(args, args.overrides), args.out, "sweep", args.resume)
    inputs.check_job_inputs(cfg, JOBS["sweep"], args.resume)  # before the seconds of imports below
    from jobs.sweep import prepare, run_sweep

    if args.check:
        plan = prepare(cfg)
        print(f"ok: {len(plan.sources)} model(s), {plan.prompts.height} prompts, "
              f"{len(plan.conditions)} conditions, {len(plan.shards)} shards")
        print("\n".join(plan.prompt_source.lines() + plan.fit))
        print(f"output folder: {cfg.out}" + (f" ({folder.why})" if folder else ""))
        return 0
    with runs.announced(folder):
        report = run_sweep(cfg, resume=args.resume, config_file=args.config)
    print("\n".join(report.lines()))
    return 0


def _discover(args: argparse.Namespace) -> int:
    cfg, folder = runs.place(_config(args, args.overrides), args.out, "discover", args.resume)
    inputs.check_job_inputs(cfg, JOBS["discover"], args.resume)  # OUT/discovery; before the imports below
    from jobs.discover.job import run_discovery

    with runs.announced(folder):
        report = run_discovery(cfg, resume=args.resume)
    print("\n".join(report.lines()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config_reference:
        print(config.reference_markdown())
        return 0
    try:
        if args.relog:
            from jobs.tracking import relog

            return 0 if relog(args.relog, args.mode) else 1
        if args.weight_diff:
            return _weight_diff(args)
        if args.discover:
            return _discover(args)
        if args.generate:
            return _generate(args)
        if args.compare:
            return _compare(args)
        return _sweep(args)
    except InputError as e:
        if args.debug:
            raise
        return _fail(str(e))
    except (JobInterrupted, JobFailed) as e:  # Ray is down, the shards on disk stay (jobs.runtime.resumable)
        print(e.line(_command_line(argv)), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
