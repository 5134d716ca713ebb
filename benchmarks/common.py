"""What every benchmark script shares: provenance, a load watch, running `orchestrator`, writing results.

A script measures inside ``with Bench() as bench:`` and ends each table with
``bench.write(path, title, table, data)``, which writes ``path`` (markdown: the
table and a line saying where it came from) and ``path`` with ``.json`` (the same
numbers, plus the provenance: commit, dirty files, machine, command line, start
time, and the load average before, at its highest and after). ``provisional`` is
true when the 1-minute load average went above the number of cores at any
sample while the script ran; ``others_cores`` is the mean number of cores used
by processes outside the script's own process tree (other agents' tests, say),
which tells whether that load was the benchmark's own or someone else's.

Scripts that run the orchestrator call ``run_recipe``, which runs the CLI in its
own process, as a user would, and returns the run's report.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
WORK = BENCH / ".work"
# this repository's orchestrator/, also where the venv's editable install points at another checkout (a git
# worktree shares the venv): the commit recorded in the provenance is then the code that ran, here and in the
# orchestrator processes clean_env starts
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))

# --smoke: the same code paths on the micro reference model with a few short windows (seconds, not minutes)
SMOKE_MODEL = "reference:micro-lm"
SMOKE_OVERRIDES = ["data.calibration.num_samples=16", "data.calibration.seq_len=64", "data.eval.seq_len=64",
                   "data.eval.max_windows=4", "data.eval.sentences=32", "data.eval.speed=false"]


def recipes_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options of a script that runs a list of recipes on a model: --model, --only, and add_args'."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="reference:tiny-lm")
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    add_args(parser, name)
    return parser


def add_args(parser: argparse.ArgumentParser, name: str) -> None:
    """--results DIR, --work DIR and --smoke, the same in every script."""
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the markdown tables and their JSON (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=WORK / name,
                        help="scratch folder for run folders and logs (default: %(default)s)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a quick check of the script: {SMOKE_MODEL}, {' '.join(SMOKE_OVERRIDES)}")


# ---------------------------------------------------------------- provenance

def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpus": _gpus(), "python": platform.python_version(), "torch": _version("torch"),
            "transformers": _version("transformers"), "ray": _version("ray")}


def command_line() -> str:
    def rel(p: str) -> str:
        try:
            return str(Path(os.path.abspath(p)).relative_to(ROOT))
        except ValueError:
            return p
    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def provenance() -> dict:
    dirty = [line[3:] for line in _git("status", "--porcelain").splitlines()  # modified and untracked,
             if not line[3:].startswith("benchmarks/results/")]  # but not the results being written
    return {"commit": _git("rev-parse", "HEAD").strip() or None, "dirty": bool(dirty), "dirty_files": dirty,
            "command": command_line(), "cwd": str(Path.cwd()), "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class LoadWatch:
    """Samples the 1-minute load average, and the CPU time of processes outside this process tree."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.before = os.getloadavg()
        self.max_1min = self.before[0]
        self.started = time.monotonic()
        self.others_cpu_s = 0.0
        self._seen: dict[int, float] = {}  # pid -> CPU seconds at the last sample
        self._stop = threading.Event()
        self._others()  # baseline
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _others(self) -> None:
        mine = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        seen = {}
        for p in psutil.process_iter(["cpu_times"]):
            t = p.info["cpu_times"]
            if p.pid in mine or t is None:
                continue
            seen[p.pid] = t.user + t.system
            if p.pid in self._seen:
                self.others_cpu_s += max(0.0, seen[p.pid] - self._seen[p.pid])
        self._seen = seen

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.max_1min = max(self.max_1min, os.getloadavg()[0])
            try:
                self._others()
            except psutil.Error:
                pass

    def snapshot(self) -> dict:
        cpus = os.cpu_count() or 1
        now = os.getloadavg()
        self.max_1min = max(self.max_1min, now[0])
        wall = time.monotonic() - self.started
        return {"load_before": [round(x, 2) for x in self.before], "load_after": [round(x, 2) for x in now],
                "load_1min_max": round(self.max_1min, 2), "others_cores": round(self.others_cpu_s / max(wall, 1e-9), 2),
                "wall_s": round(wall, 1), "provisional": self.max_1min > cpus}

    def stop(self) -> None:
        self._stop.set()


class Bench:
    """Provenance and a load watch for one script's run; write() puts a table and its JSON on disk."""

    def __enter__(self) -> "Bench":
        self.provenance = provenance()
        self.load = LoadWatch()
        return self

    def __exit__(self, *exc) -> None:
        self.load.stop()

    def write(self, path: Path, title: str, table: str, data, notes: str = "") -> dict:
        """path.md (title, notes, table, source line) and path.json ({provenance, data}); returns provenance."""
        path = Path(path).with_suffix(".md")
        path.parent.mkdir(parents=True, exist_ok=True)
        prov = {**self.provenance, **self.load.snapshot(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path.with_suffix(".json").write_text(json.dumps({"title": title, "provenance": prov, "data": data},
                                                        indent=2, default=str) + "\n")
        parts = [f"# {title}", notes.strip(), table.strip(), source_line(prov, path.with_suffix(".json").name)]
        path.write_text("\n\n".join(p for p in parts if p) + "\n")
        print(f"wrote {path} and {path.with_suffix('.json').name}", file=sys.stderr)
        return prov


def source_line(prov: dict, json_name: str) -> str:
    m = prov["machine"]
    commit = (prov["commit"] or "unknown")[:10] + (f" + {len(prov['dirty_files'])} uncommitted files"
                                                     if prov["dirty"] else "")
    load = (f"load average (1 min) {prov['load_before'][0]} before, {prov['load_1min_max']} at most, "
            f"{prov['load_after'][0]} after; other processes used {prov['others_cores']} cores on average")
    flag = (f" **Provisional: the load went above the {m['cpus']} cores during the run.**"
            if prov["provisional"] else "")
    return (f"Source: `{prov['command']}` ({json_name}), commit {commit}, started {prov['started']}, "
            f"{prov['wall_s']} s; {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB"
            f"{', GPUs: ' + '; '.join(m['gpus']) if m['gpus'] else ', no GPU'}; {load}.{flag}")


# ---------------------------------------------------------------- running the orchestrator

def clean_env() -> dict:
    """This environment, offline (nothing may be downloaded at run time), no venv leaking in; PYTHONPATH is
    this repository (its orchestrator/ whatever checkout the venv's editable install names)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def orchestrator_cmd() -> list[str]:
    """`python -m orchestrator.cli`, run from ROOT: this checkout's package, also in a git worktree whose
    venv's `orchestrator` entry point would import another checkout's."""
    return [sys.executable, "-m", "orchestrator.cli"]


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_cli(args: list[str], log: Path, check: bool = True) -> tuple[int, float]:
    """`orchestrator ARGS` in its own process, output to log; -> (exit code, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = orchestrator_cmd() + [str(a) for a in args]
    print(f"$ orchestrator {shlex.join(cmd[len(orchestrator_cmd()):])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=clean_env()).returncode
    wall = time.perf_counter() - t0
    if check and code != 0:
        raise SystemExit(f"orchestrator failed (exit {code}): {shlex.join(cmd)}\n{tail(log)}")
    return code, wall


def run_recipe(recipe: str, overrides: list[str], work: Path, name: str, quiet: bool = True) -> dict:
    """`orchestrator run recipes/RECIPE.yaml` into work/NAME (tracking off unless overridden, overwriting);
    -> its report.json,
    with bench.wall_s (the whole command), bench.command and bench.log added."""
    path = Path(recipe) if recipe.endswith(".yaml") else Path("recipes") / f"{recipe}.yaml"  # cwd: the repository
    args = ["run", path, "tracking.enabled=false", *overrides, f"output.dir={work}", f"output.name={name}",
            "--overwrite"] + (["--quiet"] if quiet else [])
    log = work / "logs" / f"{name}.log"
    _, wall = run_cli(args, log)
    report = json.loads((work / name / "report.json").read_text())
    report["bench"] = {"wall_s": round(wall, 2), "command": shlex.join(["orchestrator", *map(str, args)]),
                       "log": str(log)}
    return report


# ---------------------------------------------------------------- tables

def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def fmt(x, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def spread(values: list[float], nd: int = 1) -> str:
    """'median (min-max)', or the value alone when there is one."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    med = statistics.median(values)
    return fmt(med, nd) if len(values) == 1 else f"{fmt(med, nd)} ({fmt(min(values), nd)}-{fmt(max(values), nd)})"


def mb(n_bytes) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.0f} MB"


def brief(report: dict) -> dict:
    """report.json without the per-shard, per-layer records (kept in the run folder), for a results JSON."""
    return {k: v for k, v in report.items() if k != "shards"}


# ---------------------------------------------------------------- models

def resolve_model(spec: str) -> Path:
    """A model folder, or reference:NAME (built and cached on first use)."""
    from orchestrator.reference import resolve_reference

    if spec.startswith("reference:"):
        return resolve_reference(spec.split(":", 1)[1], progress=True)
    path = Path(spec).expanduser().resolve()
    if not (path / "config.json").exists():
        raise SystemExit(f"{spec}: not a Hugging Face model folder")
    return path


def random_llama(dest: Path, tokenizer_dir: Path, hidden: int, layers: int, ffn: int, heads: int,
                 vocab: int | None = None, max_shard_size: str = "1GB", experts: int = 0) -> tuple[Path, int]:
    """A random-initialised Llama (seed 0, float32) with the tokenizer of tokenizer_dir (and its vocabulary
    size unless vocab is given), saved in safetensors files of at most max_shard_size; cached under dest.
    experts > 0: a Mixtral instead (that many experts of width ffn per block, 2 chosen per token).
    -> (folder, parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MixtralConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = vocab or len(tok)
    family = f"mixtral-e{experts}" if experts else "llama"
    name = f"{family}-random-h{hidden}-l{layers}-f{ffn}-v{vocab}" + ("" if max_shard_size == "1GB" else f"-s{max_shard_size}")
    folder = dest / name
    if (folder / "config.json").exists():
        return folder, json.loads((folder / "params.json").read_text())["params"]
    torch.manual_seed(0)
    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                 tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, dtype="float32")
    cfg = MixtralConfig(num_local_experts=experts, num_experts_per_tok=2, **shape) if experts else LlamaConfig(**shape)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    tmp = dest / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)  # sharded, with an index, above max_shard_size
    tok.save_pretrained(tmp)
    (tmp / "params.json").write_text(json.dumps({"params": params}))
    tmp.rename(folder)
    return folder, params


def parse_shape(text: str) -> dict:
    """'hidden,layers,ffn,heads[,vocab[,max_shard_size]]' -> random_llama's keyword arguments."""
    parts = text.split(",")
    shape = dict(zip(("hidden", "layers", "ffn", "heads"), map(int, parts[:4])))
    if len(parts) > 4 and parts[4]:
        shape["vocab"] = int(parts[4])
    if len(parts) > 5:
        shape["max_shard_size"] = parts[5]
    return shape
