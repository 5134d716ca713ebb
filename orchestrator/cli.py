"""The `orchestrator` command line.

Exit codes: 0 success, 2 bad input (one clear message, no traceback), 1 a
failure during the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from orchestrator import defaults

log = logging.getLogger("orchestrator")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags (`run r.yaml --overwrite a=b`); anything else is an error
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    setup_logging(args.verbose - args.quiet)
    from orchestrator.errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


class LevelPrefix(logging.Formatter):
    """Messages as a user reads them: info plain, "warning: ..." and "error: ..." above; with --verbose,
    the time and the module in front."""

    def __init__(self, verbose: bool):
        super().__init__("%(asctime)s %(name)s: %(message)s" if verbose else "%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def setup_logging(verbosity: int) -> None:
    """One stderr handler for the package's loggers: -1 (--quiet) warnings and errors, 0 info, 1 (--verbose)
    debug. Other libraries' loggers are left as they are."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LevelPrefix(verbose=verbosity > 0))
    root = logging.getLogger("orchestrator")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0 else logging.WARNING)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # bad flags: exit 2 with one line, as argparse does, plus a hint
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # on every command's own parser: `run R --quiet`
    common.add_argument("-v", "--verbose", action="count", default=0, help="debug messages, with times and modules")
    common.add_argument("-q", "--quiet", action="count", default=0,
                        help="warnings and errors only, no progress bars (shown only on a terminal anyway)")
    p = Parser(prog="orchestrator", description="Compress Hugging Face models on Ray; measure; log to MLflow.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (add_run, add_reference, add_cluster_commands, add_plan, add_eval, add_compare, add_sync, add_ui):
        add(sub, [common])
    return p


def add_run(sub, parents) -> None:
    r = sub.add_parser("run", parents=parents, help="compress a model as a recipe says")
    r.add_argument("recipe", nargs="?", help="recipe YAML file (not needed with --resume)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. cluster.workers=4")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a complete run folder of the same name, or discard an unfinished one's shards")
    r.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run (e.g. runs/NAME) with the "
                   "recipe it saved; a rerun of the same recipe and name resumes by itself")
    r.set_defaults(func=cmd_run)


def add_reference(sub, parents) -> None:
    ref = sub.add_parser("reference", help="the built-in reference models")
    ref_sub = ref.add_subparsers(dest="action", required=True, parser_class=Parser)
    b = ref_sub.add_parser("build", parents=parents, help="train (or find cached) a reference model; prints its folder")
    b.add_argument("name", nargs="?", default="tiny-lm")
    b.set_defaults(func=cmd_reference_build)
    ls = ref_sub.add_parser("list", parents=parents, help="list the reference models")
    ls.set_defaults(func=cmd_reference_list)


def add_cluster_commands(sub, parents) -> None:
    sm = sub.add_parser("submit", parents=parents, help="run a recipe as a job on a Ray cluster (Ray Jobs API)")
    sm.add_argument("recipe", help="recipe YAML file")
    sm.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    sm.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    sm.set_defaults(func=cmd_submit)
    jb = sub.add_parser("jobs", parents=parents, help="a submitted job: status, logs or stop")
    jb.add_argument("action", choices=["status", "logs", "stop"])
    jb.add_argument("job_id")
    jb.set_defaults(func=cmd_jobs)
    for parser in (sm, jb):
        parser.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
        parser.add_argument("--token", help="Ray auth token (default: $RAY_AUTH_TOKEN)")


def add_plan(sub, parents) -> None:
    pl = sub.add_parser("plan", parents=parents,
                        help="what a run will need (shards, memory per process, time), without running it")
    pl.add_argument("recipe", help="recipe YAML file")
    pl.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    pl.set_defaults(func=cmd_plan)


def add_eval(sub, parents) -> None:
    e = sub.add_parser("eval", parents=parents,
                       help="measure a model folder (dense or compressed), against a baseline if given")
    e.add_argument("model_dir", help="a Hugging Face model folder, e.g. RUN/model")
    e.add_argument("--baseline", help="the dense model folder: adds KL divergence / embedding fidelity, "
                                      "per-layer error and the compression ratio")
    e.add_argument("--source", default=defaults.EVAL_SOURCE, help="held-out text: 'reference' or a .txt file (default: %(default)s)")
    e.add_argument("--seq-len", type=int, default=defaults.EVAL_SEQ_LEN, help="tokens per window / sentence (default: %(default)s)")
    e.add_argument("--max-windows", type=int, default=defaults.EVAL_MAX_WINDOWS, help="windows evaluated, 0 = all (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=defaults.EVAL_BATCH_SIZE)
    e.add_argument("--no-speed", action="store_true", help="skip the latency / throughput measurement")
    e.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    e.add_argument("--out", help="write the report (JSON) here")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--tracking-uri", default=defaults.TRACKING_URI, help="MLflow store (default: %(default)s)")
    e.add_argument("--experiment", default=defaults.EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    e.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    e.set_defaults(func=cmd_eval)


def add_compare(sub, parents) -> None:
    c = sub.add_parser("compare", parents=parents, help="runs side by side: a table and a size-versus-quality Pareto plot")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with report.json) or MLflow run ids")
    c.add_argument("--tracking-uri", default=defaults.TRACKING_URI, help="MLflow store for run ids (default: %(default)s)")
    c.add_argument("--out", default="compare", help="folder for compare.md and pareto.png (default: %(default)s)")
    c.set_defaults(func=cmd_compare)


def add_sync(sub, parents) -> None:
    sy = sub.add_parser("sync", parents=parents, help="log a run to MLflow that could not be logged when it ran")
    sy.add_argument("run_dir", help="the run folder (holding mlflow-pending.json)")
    sy.add_argument("--tracking-uri", help="MLflow to log to (default: the recipe's tracking.uri)")
    sy.set_defaults(func=cmd_sync)


def add_ui(sub, parents) -> None:
    ui = sub.add_parser("ui", parents=parents, help="start the MLflow UI on 127.0.0.1 over the run store")
    ui.add_argument("--uri", default=defaults.TRACKING_URI, help="MLflow backend store (default: %(default)s)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)


def cmd_run(args) -> int:
    from pathlib import Path

    from orchestrator.errors import UserError
    from orchestrator.plan import partial_dir
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
    from orchestrator.plan import make_plan

    progress = not args.quiet and sys.stderr.isatty()  # progress bars on a terminal, not in a log file
    plan = make_plan(recipe, overwrite=args.overwrite, progress=progress, lock=True)
    try:
        return run_plan(plan, progress)
    finally:
        plan.lock.release()


def run_plan(plan, progress: bool) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from orchestrator.driver import run
    from orchestrator.errors import RunFailed
    from orchestrator.report import summary_table

    recipe = plan.recipe
    reusable = len(plan.store.committed()) if plan.store.reusable else 0
    log.info("run %s: %s, %d blocks in %d shards, %d workers%s", recipe.run_name, plan.partition.architecture,
             plan.partition.num_blocks, len(plan.partition.shards), recipe.config.cluster.workers,
             f"; resuming: {reusable} committed files found in {plan.store.folder}" if reusable else "")
    try:
        with logging_redirect_tqdm(loggers=[log]):  # messages above the progress bar, not through it
            data = run(plan, progress=progress)
    except RunFailed as e:
        log.error("run failed: %s. Committed shards are kept in %s; run again to resume.", e, plan.store.folder)
        return 1
    except KeyboardInterrupt:
        log.error("stopped: %d committed files kept in %s; run the same command again to resume",
                  len(plan.store.committed()), plan.store.folder)
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
        log.info("%s: nothing to sync (already logged, or tracking was off)", run_dir)
        return 0
    info = tracking.sync(run_dir, args.tracking_uri)
    print(f"logged {run_dir.name} to {info['uri']}: MLflow run {info['run_id']}")
    return 0


def cmd_submit(args) -> int:
    from orchestrator import jobs

    try:
        job_id = jobs.submit(args.recipe, args.overrides, args.address, args.token)
    except jobs.JobError as e:
        log.error("%s", e)
        return 1
    print(job_id)
    if args.follow:
        final = jobs.follow(args.address, job_id, args.token)
        log.info("job %s: %s", job_id, final)
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
    from orchestrator.plan import make_plan
    from orchestrator.planner import check_fits, forecast_table

    plan = make_plan(recipe, overwrite=True, progress=True, need_weights=False, refuse=False)
    print(forecast_table(plan.forecast, plan))
    check_fits(plan.forecast, plan)  # printed first, then refused (exit 2) if it cannot fit
    return 0


def cmd_eval(args) -> int:
    import json
    import tempfile
    import time
    from pathlib import Path

    from orchestrator.errors import UserError
    from orchestrator.partition import CAUSAL_LM, block_linears, load_config, skeleton, task_of
    from orchestrator.recipe import EvalDataConfig, RecipeValueError

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
    try:
        cfg = EvalDataConfig(source=args.source, seq_len=args.seq_len, max_windows=args.max_windows,
                             batch_size=args.batch_size, speed=not args.no_speed)
    except RecipeValueError as e:  # the recipe's own range checks, named by the flag
        raise UserError(f"--{e.field_name.replace('_', '-')}: {e.why}, got {getattr(args, e.field_name)}") from None
    if not causal:
        from orchestrator.data import eval_sentences

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
    from orchestrator.reference import GGUF_MODELS, PACKAGED_MODELS, REFERENCE_MODELS

    for name, spec in REFERENCE_MODELS.items():
        print(f"reference:{name}  {spec}")
    for name, (package, _) in PACKAGED_MODELS.items():
        print(f"reference:{name}  pretrained, from the {package} package")
    for name, (package, fname) in GGUF_MODELS.items():
        print(f"reference:{name}  pretrained, from the {package} package's {fname} (converted on first use)")
    return 0


def cmd_ui(args) -> int:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.uri, "--host", args.host, "--port", str(args.port),
           "--workers", "1"]
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    log.info("MLflow UI on http://%s:%s (Ctrl-C to stop)", args.host, args.port)
    os.execvp(cmd[0], cmd)


def entry() -> None:
    """The `orchestrator` command: main(), then the process ends at once. Python's own teardown of the
    modules a run imports (torch, transformers, Ray) takes about a second here and does nothing a finished
    command needs: a run has stopped the Ray it started (a cluster it joined sees the driver leave), and
    stdout is flushed here (stderr, where the logging goes, is unbuffered)."""
    code = main()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
