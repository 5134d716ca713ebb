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
    r.add_argument("recipe", nargs="?", help="recipe YAML file (not needed with --resume)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. cluster.workers=4")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a complete run folder of the same name, or discard an unfinished one's shards")
    r.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run (e.g. runs/NAME) with the "
                   "recipe it saved; a rerun of the same recipe and name resumes by itself")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)

    ref = sub.add_parser("reference", help="the built-in reference models")
    ref_sub = ref.add_subparsers(dest="action", required=True, parser_class=Parser)
    b = ref_sub.add_parser("build", help="train (or find cached) a reference model; prints its folder")
    b.add_argument("name", nargs="?", default="tiny-lm")
    b.set_defaults(func=cmd_reference_build)
    ls = ref_sub.add_parser("list", help="list the reference models")
    ls.set_defaults(func=cmd_reference_list)

    sm = sub.add_parser("submit", help="run a recipe as a job on a Ray cluster (Ray Jobs API)")
    sm.add_argument("recipe", help="recipe YAML file")
    sm.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    sm.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    sm.add_argument("--token", help="Ray auth token (default: $RAY_AUTH_TOKEN)")
    sm.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    sm.set_defaults(func=cmd_submit)

    jb = sub.add_parser("jobs", help="a submitted job: status, logs or stop")
    jb.add_argument("action", choices=["status", "logs", "stop"])
    jb.add_argument("job_id")
    jb.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    jb.add_argument("--token", help="Ray auth token (default: $RAY_AUTH_TOKEN)")
    jb.set_defaults(func=cmd_jobs)

    pl = sub.add_parser("plan", help="what a run will need (shards, memory per process, time), without running it")
    pl.add_argument("recipe", help="recipe YAML file")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="measure a model folder (dense or compressed), against a baseline if given")
    e.add_argument("model_dir", help="a Hugging Face model folder, e.g. RUN/model")
    e.add_argument("--baseline", help="the dense model folder: adds KL divergence / embedding fidelity, "
                                      "per-layer error and the compression ratio")
    e.add_argument("--source", default="reference", help="held-out text: 'reference' or a .txt file (default: %(default)s)")
    e.add_argument("--seq-len", type=int, default=128, help="tokens per window / sentence (default: %(default)s)")
    e.add_argument("--max-windows", type=int, default=64, help="windows evaluated, 0 = all (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--no-speed", action="store_true", help="skip the latency / throughput measurement")
    e.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    e.add_argument("--out", help="write the report (JSON) here")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default: %(default)s)")
    e.add_argument("--experiment", default="orchestrator", help="MLflow experiment (default: %(default)s)")
    e.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="runs side by side: a table and a size-versus-quality Pareto plot")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with report.json) or MLflow run ids")
    c.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store for run ids (default: %(default)s)")
    c.add_argument("--out", default="compare", help="folder for compare.md and pareto.png (default: %(default)s)")
    c.set_defaults(func=cmd_compare)

    sy = sub.add_parser("sync", help="log a run to MLflow that could not be logged when it ran")
    sy.add_argument("run_dir", help="the run folder (holding mlflow-pending.json)")
    sy.add_argument("--tracking-uri", help="MLflow to log to (default: the recipe's tracking.uri)")
    sy.set_defaults(func=cmd_sync)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over the run store")
    ui.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow backend store (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return p


def cmd_run(args) -> int:
    from pathlib import Path

    from orchestrator.driver import partial_dir
    from orchestrator.errors import UserError
    from orchestrator.recipe import load_recipe

    recipe_path, overrides = args.recipe, list(args.overrides)
    if args.resume:
        if recipe_path and "=" in recipe_path:  # `run --resume DIR key=value`: no recipe file given
            recipe_path, overrides = None, [recipe_path, *overrides]
        run_dir = Path(args.resume).expanduser().resolve()
        saved = partial_dir(run_dir) / "recipe.yaml"
        if recipe_path is None:
            if not saved.is_file():
                raise UserError(f"--resume: no unfinished run at {run_dir} ({saved} not found)")
            recipe_path = saved
        overrides = [f"output.dir={run_dir.parent}", f"output.name={run_dir.name}", *overrides]
    elif recipe_path is None:
        raise UserError("run: give a recipe file (or --resume RUN_DIR)")
    recipe = load_recipe(recipe_path, overrides)  # all recipe checks, before anything heavy
    from orchestrator.driver import make_plan

    plan = make_plan(recipe, overwrite=args.overwrite, progress=not args.quiet, lock=True)
    try:
        return run_plan(plan, args.quiet)
    finally:
        plan.lock.release()


def run_plan(plan, quiet: bool) -> int:
    from orchestrator.driver import run
    from orchestrator.errors import RunFailed
    from orchestrator.report import summary_table

    recipe = plan.recipe
    reusable = len(plan.store.committed()) if plan.store.reusable else 0
    print(f"run {recipe.run_name}: {plan.partition.architecture}, {plan.partition.num_blocks} blocks in "
          f"{len(plan.partition.shards)} shards, {recipe.config.cluster.workers} workers"
          + (f"; resuming: {reusable} committed files found in {plan.store.folder}" if reusable else ""),
          file=sys.stderr)
    try:
        data = run(plan, progress=not quiet)
    except RunFailed as e:
        print(f"run failed: {e}. Committed shards are kept in {plan.store.folder}; run again to resume.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopped: {len(plan.store.committed())} committed files kept in {plan.store.folder}; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    print(summary_table(data))
    return 0


def cmd_sync(args) -> int:
    from pathlib import Path

    from orchestrator import tracking
    from orchestrator.errors import UserError

    run_dir = Path(args.run_dir).expanduser()
    if not (run_dir / "report.json").is_file():
        raise UserError(f"run_dir: {run_dir} is not a finished run (no report.json)")
    if not (run_dir / tracking.PENDING).is_file():
        print(f"{run_dir}: nothing to sync (already logged, or tracking was off)", file=sys.stderr)
        return 0
    info = tracking.sync(run_dir, args.tracking_uri)
    print(f"logged {run_dir.name} to {info['uri']}: MLflow run {info['run_id']}")
    return 0


def cmd_submit(args) -> int:
    from orchestrator import jobs

    try:
        job_id = jobs.submit(args.recipe, args.overrides, args.address, args.token)
    except jobs.JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(job_id)
    if args.follow:
        final = jobs.follow(args.address, job_id, args.token)
        print(f"job {job_id}: {final}", file=sys.stderr)
        return 0 if final == "SUCCEEDED" else 1
    return 0


def cmd_jobs(args) -> int:
    from orchestrator import jobs

    if args.action == "status":
        print(jobs.status(args.address, args.job_id, args.token))
    elif args.action == "logs":
        return 0 if jobs.follow(args.address, args.job_id, args.token) == "SUCCEEDED" else 1
    else:
        print("stopping" if jobs.stop(args.address, args.job_id, args.token) else "already ended")
    return 0


def cmd_plan(args) -> int:
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from orchestrator.driver import make_plan
    from orchestrator.planner import describe

    plan = make_plan(recipe, overwrite=True, progress=True)  # refuses (exit 2) what cannot fit
    print(describe(plan.forecast, plan))
    return 0


def cmd_eval(args) -> int:
    import json
    import tempfile
    import time
    from pathlib import Path

    from orchestrator.errors import UserError
    from orchestrator.partition import CAUSAL_LM, block_linears, load_config, skeleton, task_of
    from orchestrator.recipe import EvalDataConfig

    folders = {"model_dir": Path(args.model_dir).expanduser()}
    if args.baseline:
        folders["--baseline"] = Path(args.baseline).expanduser()
    for key, folder in folders.items():
        if not (folder / "config.json").is_file():
            raise UserError(f"{key}: {folder} has no config.json (not a Hugging Face model folder)")
    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--threads", args.threads)):
        if value < 1:
            raise UserError(f"{flag}: must be >= 1, got {value}")
    model_dir, baseline = folders["model_dir"], folders.get("--baseline")
    config = load_config(model_dir)
    causal = task_of(config) == CAUSAL_LM
    if not causal and baseline is None:
        raise UserError("--baseline: an encoder's quality is its embedding fidelity to the dense model; "
                        "pass the dense folder")
    cfg = EvalDataConfig(source=args.source, seq_len=args.seq_len, max_windows=args.max_windows,
                         batch_size=args.batch_size, speed=not args.no_speed)
    if not causal:
        from orchestrator.evaluate import eval_sentences

        eval_sentences(cfg)  # bad data: exit 2 now
    from orchestrator import report, tracking
    from orchestrator.evaluate import evaluate_folders

    model = skeleton(config)
    start = time.perf_counter()
    result = evaluate_folders(model_dir, baseline, causal, cfg, args.threads, block_linears(model))
    data = report.build_eval(model_dir, baseline, cfg, sum(p.numel() for p in model.parameters()), result,
                             time.perf_counter() - start)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "eval-report.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    if not args.no_tracking:
        data["mlflow_run_id"] = tracking.log_eval(data, out, args.tracking_uri, args.experiment)
        out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2) if args.json else report.eval_table(data))
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from orchestrator.compare import compare

    table = compare(args.runs, args.tracking_uri, Path(args.out))
    print(table)
    print(f"\nwrote {Path(args.out) / 'compare.md'} and {Path(args.out) / 'pareto.png'}")
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
