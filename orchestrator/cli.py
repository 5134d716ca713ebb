"""The `orchestrator` command line.

Exit codes: 0 success, 2 bad input (one clear message, no traceback), 1 a
failure during the run.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags (`run r.yaml --overwrite a=b`); anything else is an error
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from orchestrator.errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # bad flags: exit 2 with one line, as argparse does, plus a hint
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="orchestrator", description="Compress Hugging Face models on Ray; measure; log to MLflow.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    r = sub.add_parser("run", help="compress a model as a recipe says")
    r.add_argument("recipe", help="recipe YAML file")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. cluster.workers=4")
    r.add_argument("--overwrite", action="store_true", help="replace a complete run folder of the same name")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    ref = sub.add_parser("reference", help="the built-in reference models")
    ref_sub = ref.add_subparsers(dest="action", required=True, parser_class=Parser)
    b = ref_sub.add_parser("build", help="train (or find cached) a reference model; prints its folder")
    b.add_argument("name", nargs="?", default="tiny-lm")
    b.set_defaults(func=cmd_reference_build)
    ls = ref_sub.add_parser("list", help="list the reference models")
    ls.set_defaults(func=cmd_reference_list)

    e = sub.add_parser("eval", help="measure a model folder (dense or compressed): held-out perplexity")
    e.add_argument("model_dir", help="a Hugging Face model folder, e.g. RUN/model")
    e.add_argument("--source", default="reference", help="held-out text: 'reference' or a .txt file (default: %(default)s)")
    e.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: %(default)s)")
    e.add_argument("--max-windows", type=int, default=64, help="windows evaluated, 0 = all (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over the run store")
    ui.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow backend store (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return p


def cmd_run(args) -> int:
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # all recipe checks, before anything heavy
    from orchestrator.driver import ShardFailed, make_plan, run
    from orchestrator.report import summary_table

    plan = make_plan(recipe, overwrite=args.overwrite, progress=not args.quiet)
    print(f"run {recipe.run_name}: {plan.partition.architecture}, {plan.partition.num_blocks} blocks in "
          f"{len(plan.partition.shards)} shards, {recipe.config.cluster.workers} workers", file=sys.stderr)
    try:
        data = run(plan, progress=not args.quiet)
    except ShardFailed as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    print(summary_table(data))
    return 0


def cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from orchestrator.errors import UserError
    from orchestrator.partition import CAUSAL_LM, load_config, task_of
    from orchestrator.recipe import EvalDataConfig

    model_dir = Path(args.model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model_dir: {model_dir} has no config.json (not a Hugging Face model folder)")
    if task_of(load_config(model_dir, False)) != CAUSAL_LM:
        raise UserError(f"model_dir: {model_dir} is not a causal LM; perplexity needs one")
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value < 1:
            raise UserError(f"{flag}: must be >= 1, got {value}")
    cfg = EvalDataConfig(source=args.source, seq_len=args.seq_len, max_windows=args.max_windows,
                         batch_size=args.batch_size)
    from orchestrator.evaluate import perplexity

    result = perplexity(model_dir, cfg, threads=args.threads)
    if args.json:
        print(json.dumps({"model_dir": str(model_dir), **result.summary()}, indent=2))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} windows of "
              f"{cfg.seq_len}) in {result.seconds:.1f} s")
    return 0


def cmd_reference_build(args) -> int:
    from orchestrator.errors import UserError
    from orchestrator.reference import resolve_reference

    try:
        print(resolve_reference(args.name, progress=True))
    except KeyError as e:
        raise UserError(str(e.args[0])) from None
    return 0


def cmd_reference_list(args) -> int:
    from orchestrator.reference import PACKAGED_MODELS, REFERENCE_MODELS

    for name, spec in REFERENCE_MODELS.items():
        print(f"reference:{name}  {spec}")
    for name, (package, _) in PACKAGED_MODELS.items():
        print(f"reference:{name}  pretrained, from the {package} package")
    return 0


def cmd_ui(args) -> int:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.uri, "--host", args.host, "--port", str(args.port),
           "--workers", "1"]
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
