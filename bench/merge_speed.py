"""Benchmark: `evolve merge` vs mergekit 0.1.5's `mergekit-yaml` on three ~336M-parameter bf16 Llamas, and the
in-memory re-merge (`Materializer.apply`) against a memory-bandwidth bound.

    .venv/bin/python bench/merge_speed.py [--methods linear ties dare_ties] [--repeats 2] [--skip-mergekit]
    .venv/bin/python bench/merge_speed.py --in-memory-only [--methods ...]     # step 3 alone
    .venv/bin/python bench/merge_speed.py ... --baseline-rev REV   # step 3 also with merge_core as of git REV

1. Builds (once, cached under --work) a random base and two noisy "fine-tunes" of it.
2. Per method, one recipe YAML fed to both CLIs; each run is a subprocess timed by wall clock, its peak RSS
   from wait4's rusage (file-backed mmap pages included); `--repeats` runs each, interleaved, min reported.
   The two outputs are compared tensor by tensor (linear, ties: max |difference|; dare_ties: names and shapes,
   since both draw random masks).
3. In memory: one Materializer per method, then `apply` of a few candidates into a live model, against
   (resident + cache bytes read + output bytes written) / copy bandwidth (torch `copy_` of a 1 GiB float32 buffer);
   the first apply (it fills the cache) apart, and the worker's peak anonymous RSS above its RSS before the build
   against the memory plan's prediction (merge_core.memplan).
4. Prints the tables and writes them into the "## Merge speed" and "## In-memory re-merge" sections of
   bench/RESULTS.md.

mergekit lives in its own venv, bench/_work/mk-venv (created on first use with torch pinned to 2.13.0, the local
CPU wheel; checked CPU-only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors import safe_open  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WARM_INDUCTOR_ENV = "MERGE_SPEED_INDUCTOR_CACHE"  # set by --inductor-cache
BASELINE_ENV = "MERGE_SPEED_BASELINE"  # set in a worker that times an earlier commit's merge_core (--baseline-rev)
sys.path.insert(0, os.environ.get(BASELINE_ENV) or str(REPO))
if os.environ.get(BASELINE_ENV):
    sys.path.insert(1, str(REPO))

from results import RESULTS, write_section  # noqa: E402  (bench/ is on sys.path: scripts run from it)

from merge_core.materialize import Materializer  # noqa: E402
from merge_core.recipe import MergeRecipe  # noqa: E402
from zoo.synthetic import make_tiny_checkpoint  # noqa: E402

SECTION = "Merge speed"
INMEM_SECTION = "In-memory re-merge (Materializer.apply)"
MERGEKIT = "mergekit==0.1.5"
# Installed with mergekit so a CPU machine takes the local CPU wheel, not a CUDA build (requirements.lock: 2.13.0).
TORCH_PIN = "torch==2.13.0"
MK_VENV = REPO / "bench" / "_work" / "mk-venv"
# Llama-like proportions: GQA (16 heads, 4 KV heads), a 32000-token vocabulary (Llama-2's), untied head.
SIZES: dict[str, Any] = dict(
    hidden_size=1024, num_layers=24, intermediate_size=2816, num_heads=16, num_kv_heads=4, vocab_size=32000
)
WEIGHTS, DENSITY = (0.6, 0.4), 0.5
# In-memory candidates: (weight_a, weight_b, density_a, density_b); density ignored by linear.
CANDIDATES = [(0.6, 0.4, 0.5, 0.5), (0.3, 0.7, 0.4, 0.6), (0.5, 0.5, 0.7, 0.3), (0.8, 0.2, 0.5, 0.5)]
TARGETS = {"linear": 1.0, "task_arithmetic": 1.0, "ties": 0.5, "dare_ties": 0.5}  # our wall / mergekit's, at most
INMEM_TARGET = 2.0  # apply time / bandwidth bound, at most
FIRST_APPLY_TARGET = 10.0  # seconds for the first apply of ties (fills the magnitude-key cache), at most
PLAN_TOLERANCE = 0.10  # |measured peak / plan - 1|, at most
MIB = 2**20


# ---- inputs -----------------------------------------------------------------------------------


def ensure_checkpoints(work: Path) -> dict[str, Path]:
    """base, ft_a, ft_b under work/models (built once; a stamp records the sizes they were built with)."""
    root = work / "models"
    stamp = root / "sizes.json"
    paths = {name: root / name for name in ("base", "ft_a", "ft_b")}
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == SIZES
        and all((p / "config.json").is_file() for p in paths.values())
    ):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    make_tiny_checkpoint(paths["base"], "llama", seed=0, dtype=torch.bfloat16, **SIZES)
    for seed, name in ((1, "ft_a"), (2, "ft_b")):
        make_tiny_checkpoint(paths[name], seed=seed, dtype=torch.bfloat16, from_checkpoint=paths["base"], noise=0.02)
    stamp.write_text(json.dumps(SIZES))
    print(f"built 3 checkpoints in {time.perf_counter() - t0:.0f}s under {root}", flush=True)
    return paths


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def recipe_dict(method: str, models: dict[str, Path], weights=WEIGHTS, densities=(DENSITY, DENSITY)) -> dict[str, Any]:
    """The mergekit YAML both tools read: linear over the two fine-tunes; the others on the base (densities:
    ties, dare_ties)."""
    entries = []
    for (name, w), d in zip(zip(("ft_a", "ft_b"), weights), densities):
        params: dict[str, Any] = {"weight": w}
        if method not in ("linear", "task_arithmetic"):
            params["density"] = d
        entries.append({"model": str(models[name]), "parameters": params})
    recipe: dict[str, Any] = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(models["base"])
    recipe["models"] = entries
    recipe["dtype"] = "bfloat16"
    return recipe


# ---- timed subprocesses -----------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    peak_rss_mib: float


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS (wait4's ru_maxrss: the child and its waited-for descendants) of one command."""
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n--- {log} ---\n{log.read_text()[-3000:]}")
    return Run(seconds, usage.ru_maxrss / 1024)


def ensure_mergekit(python: str | None) -> Path:
    """The python of a venv with mergekit 0.1.5 and the CPU torch wheel (bench/_work/mk-venv, created on first use)."""
    if python:
        return Path(python)
    venv = MK_VENV
    py = venv / "bin" / "python"
    if not py.is_file():
        print(f"creating {venv} with {MERGEKIT} (about a minute)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", TORCH_PIN, MERGEKIT], check=True)
    listing = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    cuda = [line.split()[0] for line in listing.splitlines() if re.match(r"(nvidia-|triton|cuda)", line, re.I)]
    torch_line = next((line for line in listing.splitlines() if line.split()[:1] == ["torch"]), "torch ?")
    if cuda or "+cpu" not in torch_line:
        sys.exit(f"{venv}: expected a CPU-only torch; found {torch_line!r} and {cuda}")
    return py


def package_version(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def compare_outputs(ours: Path, theirs: Path, exact: bool) -> str:
    """linear/ties: max |ours - mergekit| over all tensors and how many elements differ; else names and shapes."""
    a, b = checkpoint_shapes(ours), checkpoint_shapes(theirs)
    if a != b:
        only = sorted(set(a) ^ set(b))[:3]
        bad = [n for n in a if n in b and a[n] != b[n]][:3]
        return f"MISMATCH: names only in one {only}, shapes differ {bad}"
    if not exact:
        return f"{len(a)} tensors, names and shapes match"
    files_a = {n: f for f in ours.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()}
    files_b = {n: f for f in theirs.glob("*.safetensors") for n in safe_open(str(f), "pt").keys()}
    max_diff, differing, total = 0.0, 0, 0
    for name in a:
        with safe_open(str(files_a[name]), "pt") as fa, safe_open(str(files_b[name]), "pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        diff = (x - y).abs()
        max_diff = max(max_diff, float(diff.max()))
        differing += int(torch.count_nonzero(diff))
        total += x.numel()
    return f"max abs diff {max_diff:.3g}; {differing} of {total} elements differ ({100 * differing / total:.4f}%)"


# mergekit 0.1.5's own GTA code (merge_group of generalized_task_arithmetic.py, replicated line by line around its
# `magnitude` and `get_mask`) on a few tensors, run in the storage dtype (what mergekit does) and in float32
# (what we do).
GTA_REPLICA = r"""
import glob, json, sys, torch
from safetensors import safe_open
from mergekit.sparsify import magnitude
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
args = json.loads(sys.argv[1])
def load(directory, name):
    for f in glob.glob(directory + "/*.safetensors"):
        with safe_open(f, "pt") as h:
            if name in h.keys():
                return h.get_tensor(name)
def ties(base, sources, weights, densities):
    deltas = base.new_empty((len(sources), *base.shape))
    for i, s in enumerate(sources):
        deltas[i] = magnitude(s - base, density=densities[i])
    w = torch.tensor(weights, dtype=deltas.dtype)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    mask = get_mask(deltas, method="sum", mask_dtype=base.dtype)
    mixed, divisor = (deltas * mask).sum(dim=0), (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return (base + mixed / divisor).to(base.dtype)
def compare(x, y):
    d = (x.float() - y.float()).abs()
    return float(d.max()), int(torch.count_nonzero(d))
out = {"n": 0, "bf16_vs_mergekit": [0.0, 0], "f32_vs_ours": [0.0, 0], "f32_stable_vs_ours": [0.0, 0]}
for name in args["names"]:
    base, *sources = (load(args["models"][m], name) for m in ("base", "ft_a", "ft_b"))
    in_dtype = ties(base, sources, args["weights"], args["densities"])
    in_f32 = ties(base.float(), [s.float() for s in sources], args["weights"], args["densities"]).to(base.dtype)
    argsort = torch.argsort  # then with ties in |delta| broken by lower index, as ours does
    torch.argsort = lambda t, descending=False: argsort(t, descending=descending, stable=True)
    in_f32_stable = ties(base.float(), [s.float() for s in sources], args["weights"], args["densities"]).to(base.dtype)
    torch.argsort = argsort
    ours = load(args["ours"], name)
    for key, (x, y) in {"bf16_vs_mergekit": (in_dtype, load(args["mergekit"], name)),
                        "f32_vs_ours": (in_f32, ours), "f32_stable_vs_ours": (in_f32_stable, ours)}.items():
        m, c = compare(x, y)
        out[key] = [max(out[key][0], m), out[key][1] + c]
    out["n"] += base.numel()
print(json.dumps(out))
"""
REPLICA_TENSORS = [
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.11.self_attn.q_proj.weight",
    "model.norm.weight",
]


def ties_replica_check(mk_python: Path, models: dict[str, Path], ours: Path, theirs: Path) -> str:
    """Where ties outputs differ: mergekit's GTA code in bf16 vs its output, and in float32 vs ours."""
    args = dict(
        names=REPLICA_TENSORS,
        models={k: str(v) for k, v in models.items()},
        ours=str(ours),
        mergekit=str(theirs),
        weights=list(WEIGHTS),
        densities=[DENSITY, DENSITY],
    )
    done = subprocess.run([str(mk_python), "-c", GTA_REPLICA, json.dumps(args)], capture_output=True, text=True)
    if done.returncode != 0:
        return f"replica check failed: {done.stderr.strip().splitlines()[-1:]}"
    r = json.loads(done.stdout.strip().splitlines()[-1])
    pct = lambda c: 100 * c / r["n"]  # noqa: E731
    return (
        f"mergekit's own ties code on {len(REPLICA_TENSORS)} tensors ({r['n']:,} elements): run in bf16 it reproduces "
        f"mergekit's output (max diff {r['bf16_vs_mergekit'][0]:.3g}, {pct(r['bf16_vs_mergekit'][1]):.4f}% differ); "
        f"run in float32 it is within magnitude-tie order of ours (max diff {r['f32_vs_ours'][0]:.3g}, "
        f"{pct(r['f32_vs_ours'][1]):.4f}% differ), and with a stable argsort "
        "(equal |delta|: lower index first, as ours) "
        f"max diff {r['f32_stable_vs_ours'][0]:.3g}, {pct(r['f32_stable_vs_ours'][1]):.4f}% differ"
        + (
            ". So the gap is mergekit's GTA arithmetic in the storage dtype (bf16), where ours computes in float32"
            if r["bf16_vs_mergekit"][1] == 0 and r["f32_stable_vs_ours"][1] == 0
            else ""
        )
    )


# ---- in memory --------------------------------------------------------------------------------


def copy_bandwidth_gbs(repeats: int = 5) -> float:
    """(bytes read + bytes written) / s of `dst.copy_(src)` on a 1 GiB float32 buffer, best of `repeats`."""
    src = torch.ones(2**28, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


@dataclass
class InMemory:
    method: str
    resident_mib: float
    resident_kind: str
    build_s: float
    peak_rss_mib: float  # the worker process: build, live model and every apply
    apply_s: list[float]  # every apply after the first
    bound_s: float
    first_apply_s: float  # the first apply also fills the Materializer's cache (magnitude keys, DARE uniforms)
    cache_mib: float
    plan_mib: float  # the memory plan's prediction (merge_core.memplan), made before anything was loaded
    anon_peak_mib: float  # measured: peak anonymous RSS above the RSS before the Materializer was built
    plan_line: str
    kernels: str  # "compiled (N tensors)": merge_core.fused wrote them; else "eager"
    second_apply_s: float  # builds the key order where the plan keeps one (fused ties)


def rss_anon() -> int:
    """This process's anonymous resident bytes (RssAnon of /proc/self/status: no file-backed mmap pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    """Samples rss_anon() every `interval` seconds in the background; `peak` is the largest seen."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, rss_anon(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, rss_anon())


def kernels_used(mat: Materializer) -> str:
    if not hasattr(mat, "fused"):  # a --baseline-rev merge_core that predates merge_core.fused: eager
        return "eager"
    from merge_core.fused import describe

    return describe(mat.fused)


def cache_bytes(mat: Materializer) -> int:
    """Bytes held by the Materializer's cache (magnitude keys, their histograms and key orders, DARE draws, norms)."""
    total = 0
    for pre, _ in getattr(mat, "_precomputed", {}).values():
        keys = (pre.keys.keys, pre.keys.at_least, getattr(pre.keys, "order", None)) if pre.keys else ()
        total += sum(t.numel() * t.element_size() for t in (*keys, pre.uniform, pre.l1) if t is not None)
    return total


def cache_read_per_candidate(mat: Materializer) -> int:
    """Cache bytes a candidate reads: DARE draws and magnitude keys, but not the keys where a key order makes the
    threshold a slice (the key order itself is read only there)."""
    total = 0
    for pre, _ in getattr(mat, "_precomputed", {}).values():
        if pre.uniform is not None:
            total += pre.uniform.numel() * pre.uniform.element_size()
        if pre.keys is not None and getattr(pre.keys, "order", None) is None:
            total += pre.keys.keys.numel() * pre.keys.keys.element_size()
    return total


def in_memory_worker(method: str, models: dict[str, Path], repeats: int, out: Path) -> None:
    """(In a fresh process.) Build a Materializer once, then time `apply` of each candidate `repeats` times;
    the peak anonymous RSS above the RSS before the build is what the memory plan predicts."""
    template = MergeRecipe.from_dict(recipe_dict(method, models))
    baseline = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    mat = Materializer(template, device="cpu")
    model = mat.new_model()
    times = []
    for _ in range(repeats + 1):  # the first round includes filling the cache; reported apart
        for wa, wb, da, db in CANDIDATES:
            candidate = MergeRecipe.from_dict(recipe_dict(method, models, (wa, wb), (da, db)))
            t0 = time.perf_counter()
            mat.apply(candidate, model)
            times.append(time.perf_counter() - t0)
    out.write_text(
        json.dumps(
            dict(
                resident_bytes=mat.resident_bytes,
                output_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                kind="float32 task vectors + bf16 base" if mat.plan.resident == "task_vectors" else "bf16 sources",
                build_s=mat.build_seconds,
                first_apply_s=times[0],
                second_apply_s=times[1],
                apply_s=times[len(CANDIDATES) :],
                cache_bytes=cache_bytes(mat),
                read_cache_bytes=cache_read_per_candidate(mat),
                plan_bytes=mat.plan.total,
                plan_line=mat.plan.line(),
                anon_peak_bytes=sampler.stop() - baseline,
                kernels=kernels_used(mat),
            )
        )
    )


def in_memory(
    method: str, work: Path, repeats: int, bandwidth_gbs: float, env: dict[str, str], baseline: Path | None = None
) -> InMemory:
    """Run in_memory_worker in a fresh process (its peak RSS is the worker's alone); with ``baseline`` (a
    directory holding an earlier commit's merge_core), that code instead of this checkout's."""
    tag = f"{method}_baseline" if baseline else method
    out = work / f"in_memory_{tag}.json"
    inductor = env.get(WARM_INDUCTOR_ENV)  # --inductor-cache: kept between workers and runs
    if inductor is None:  # empty: a first apply that compiles pays the whole compile
        inductor = str(work / f"inductor_{tag}")
        shutil.rmtree(inductor, ignore_errors=True)
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": inductor}
    run = timed(
        [sys.executable, __file__, "--work", str(work), "--repeats", str(repeats), "--in-memory-worker", method,
         "--in-memory-out", str(out)],
        work / f"in_memory_{tag}.log",
        {**env, BASELINE_ENV: str(baseline)} if baseline else env,
    )  # fmt: skip
    r = json.loads(out.read_text())
    read = r.get("read_cache_bytes", r["cache_bytes"])
    bound = (r["resident_bytes"] + read + r["output_bytes"]) / (bandwidth_gbs * 1e9)
    return InMemory(
        method,
        r["resident_bytes"] / MIB,
        r["kind"],
        r["build_s"],
        run.peak_rss_mib,
        r["apply_s"],
        bound,
        r["first_apply_s"],
        r["cache_bytes"] / MIB,
        r["plan_bytes"] / MIB,
        r["anon_peak_bytes"] / MIB,
        r["plan_line"],
        r.get("kernels", "eager"),
        r.get("second_apply_s", float("nan")),
    )


def baseline_code(rev: str, work: Path) -> Path:
    """merge_core as of git revision ``rev``, extracted under ``work`` (once): the A of an A/B timing in one run."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True)
    if sha.returncode:
        raise SystemExit(f"--baseline-rev: {rev!r} is not a git revision of {REPO}")
    target = work / f"baseline-{sha.stdout.strip()}"
    if not (target / "merge_core").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha.stdout.strip(), "merge_core"],
                                 capture_output=True, check=True)  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


# ---- report -----------------------------------------------------------------------------------


def machine_facts(mergekit_version: str | None) -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    facts = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); Python {platform.python_version()}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the CPU is shared; each figure is "
        f"the min of its repeats)",
    ]
    if mergekit_version:
        facts.append(f"mergekit {mergekit_version} in its own venv, CLI defaults (`mergekit-yaml RECIPE OUT`)")
    return facts


def fmt_ratio(ours: float, theirs: float, target: float) -> str:
    ratio = ours / theirs
    return f"{ratio:.2f}× ({'met' if ratio <= target else 'MISSED'}, ≤ {target:g}×)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "_work" / "merge_speed")
    parser.add_argument("--methods", nargs="+", default=["linear", "ties", "dare_ties"], choices=sorted(TARGETS))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each timing (min reported)")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--mergekit-python", help="python of an existing venv with mergekit 0.1.5")
    parser.add_argument(
        "--threads", type=int, help="torch threads here and OMP/MKL threads of both CLIs (default: torch's)"
    )
    parser.add_argument("--in-memory-worker", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--in-memory-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline-rev",
        help="also time the in-memory re-merge with merge_core as of this git revision, each method's baseline "
        "worker right before this checkout's (a before/after ratio under the same load)",
    )
    parser.add_argument("--in-memory-only", action="store_true", help="only the in-memory re-merge (its own section)")
    parser.add_argument(
        "--inductor-cache",
        type=Path,
        help="inductor cache folder for the in-memory workers, kept (a second run's first apply finds the compiled "
        "kernels there); default: an empty one per worker",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    command = shlex.join(
        [
            os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable,
            os.path.relpath(__file__, REPO),
            *sys.argv[1:],
        ]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.inductor_cache:
        env[WARM_INDUCTOR_ENV] = str(args.inductor_cache.resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    facts_start = machine_facts(None)
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    models = ensure_checkpoints(work)
    if args.in_memory_worker:
        out = args.in_memory_out or work / f"in_memory_{args.in_memory_worker}.json"
        return in_memory_worker(args.in_memory_worker, models, args.repeats, out)
    shapes = checkpoint_shapes(models["base"])
    n_params = sum(numel(s) for s in shapes.values())
    print(f"{n_params:,} parameters per checkpoint ({len(shapes)} tensors, bf16)", flush=True)
    if args.in_memory_only:
        return in_memory_section(args, work, env, command, facts_start)

    mk_python = None if args.skip_mergekit else ensure_mergekit(args.mergekit_python)
    mk_version = package_version(mk_python, "mergekit") if mk_python else None

    rows, notes = [], []
    for method in args.methods:
        recipe = work / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_dict(method, models), sort_keys=False))
        ours_out, mk_out = work / "out" / f"evolve_{method}", work / "out" / f"mergekit_{method}"
        ours, theirs = [], []
        for rep in range(args.repeats):
            shutil.rmtree(ours_out, ignore_errors=True)
            ours.append(
                timed(
                    [
                        sys.executable,
                        "-m",
                        "evolve.cli",
                        "merge",
                        str(recipe),
                        "--out",
                        str(ours_out),
                        "--device",
                        "cpu",
                    ],
                    work / f"evolve_{method}.log",
                    env,
                )
            )
            print(
                f"{method} evolve merge #{rep + 1}: {ours[-1].seconds:.1f}s, peak RSS {ours[-1].peak_rss_mib:.0f} MiB",
                flush=True,
            )
            if mk_python:
                shutil.rmtree(mk_out, ignore_errors=True)
                theirs.append(
                    timed(
                        [str(mk_python.parent / "mergekit-yaml"), str(recipe), str(mk_out)],
                        work / f"mergekit_{method}.log",
                        env,
                    )
                )
                print(
                    f"{method} mergekit-yaml #{rep + 1}: {theirs[-1].seconds:.1f}s, "
                    f"peak RSS {theirs[-1].peak_rss_mib:.0f} MiB",
                    flush=True,
                )
        agreement = compare_outputs(ours_out, mk_out, exact=method != "dare_ties") if mk_python else "—"
        if mk_python and method == "ties":
            notes.append(f"ties outputs: {ties_replica_check(mk_python, models, ours_out, mk_out)}.")
        rows.append(
            (
                method,
                min(r.seconds for r in ours),
                max(r.peak_rss_mib for r in ours),
                min(r.seconds for r in theirs) if theirs else None,
                max(r.peak_rss_mib for r in theirs) if theirs else None,
                agreement,
            )
        )

    lines = [f"Command (from the repository root): `{command}`", ""]
    lines += [f"- {fact}" for fact in facts_start + ([machine_facts(mk_version)[-1]] if mk_version else [])]
    lines.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    lines += [
        f"- checkpoints: 3 random Llamas (base + two fine-tunes = base + 0.02·N(0,1)), {n_params:,} parameters "
        f"each ({len(shapes)} tensors, bf16, {n_params * 2 / 2**30:.2f} GiB): "
        + ", ".join(f"{k} {v}" for k, v in SIZES.items()),
        f"- recipe: weights {WEIGHTS[0]}/{WEIGHTS[1]}, density {DENSITY} (ties, dare_ties), "
        "dtype bfloat16; linear merges "
        "the two fine-tunes, ties/dare_ties use the base as base_model; the same YAML is fed to both tools",
        f"- wall time of the whole CLI process (imports included), min of {args.repeats}; peak RSS from wait4 "
        "(includes file-backed pages of memory-mapped inputs)",
        "",
    ]
    lines += [
        "| method | evolve merge (s) | mergekit-yaml (s) | ours / mergekit | evolve peak RSS (MiB) "
        "| mergekit peak RSS (MiB) | outputs agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, ours_s, ours_rss, mk_s, mk_rss, agreement in rows:
        ratio = fmt_ratio(ours_s, mk_s, TARGETS[method]) if mk_s else "—"
        lines.append(
            f"| {method} | {ours_s:.1f} | {f'{mk_s:.1f}' if mk_s else 'skipped'} | {ratio} | {ours_rss:.0f} | "
            f"{f'{mk_rss:.0f}' if mk_rss else '—'} | {agreement} |"
        )
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of {RESULTS}")
    in_memory_section(args, work, env, command, facts_start)


def in_memory_section(
    args: argparse.Namespace, work: Path, env: dict[str, str], command: str, facts: list[str]
) -> None:
    """The in-memory re-merge of each method in a fresh worker process, against the copy-bandwidth bound."""
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bandwidth:.1f} GB/s (read + write)", flush=True)
    inmem, baselines = [], {}
    baseline = baseline_code(args.baseline_rev, work) if args.baseline_rev else None
    for method in args.methods:
        if baseline:
            b = baselines[method] = in_memory(method, work, args.repeats, bandwidth, env, baseline)
            print(
                f"{method} in memory at {args.baseline_rev}: first apply {b.first_apply_s:.2f}s, "
                f"apply min {min(b.apply_s):.2f}s",
                flush=True,
            )
        r = in_memory(method, work, args.repeats, bandwidth, env)
        inmem.append(r)
        print(
            f"{method} in memory: build {r.build_s:.1f}s, first apply {r.first_apply_s:.2f}s, "
            f"apply min {min(r.apply_s):.2f}s, "
            f"bound {r.bound_s:.2f}s, plan {r.plan_mib:.0f} MiB, measured {r.anon_peak_mib:.0f} MiB",
            flush=True,
        )
    cache_note = "empty inductor cache"
    if args.inductor_cache:
        cache_note = f"inductor cache {args.inductor_cache} kept from earlier runs"
    lines = [f"Command (from the repository root): `{command}`", ""]
    lines += [f"- {fact}" for fact in facts]
    lines.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    lines += [
        "",
        f"`Materializer.apply` into a live bf16 model, one fresh worker process per method, on the checkpoints of "
        f"the Merge speed section; {len(CANDIDATES)} candidates (varying weights and densities) applied once to fill "
        f"the cache and compile the kernels (merge_core.fused, {cache_note}; the first apply is "
        f"reported apart), then {args.repeats} more rounds = "
        f"{len(CANDIDATES) * args.repeats} timed applies; the second apply builds the key order where the plan keeps "
        f"one (fused ties). Bound = (resident bytes + the cache bytes a candidate reads (DARE draws; magnitude keys, "
        f"unless a key order makes each threshold a slice), all read once per candidate, + output bytes written) / "
        f"copy bandwidth {bandwidth:.1f} GB/s (torch `copy_` of a 1 GiB float32 buffer, read + write bytes counted).",
        "",
        "Memory: the plan (merge_core.memplan, decided from the shapes before loading) against the worker's "
        "measured peak anonymous RSS above its RSS before the build (RssAnon sampled every 2 ms: no file-backed "
        "pages of the memory-mapped inputs, no Python/torch runtime); worker peak RSS is wait4's ru_maxrss of the "
        f"whole process (runtime and mapped file pages included). Targets: first apply of ties ≤ "
        f"{FIRST_APPLY_TARGET:g} s, measured peak within {PLAN_TOLERANCE:.0%} of the plan.",
        "",
        "| method | kernels | resident (MiB, what) | cache (MiB) | build (s) | first apply (s) | second apply (s) "
        "| plan (MiB) "
        "| measured peak above baseline (MiB) | measured / plan | worker peak RSS (MiB) "
        "| apply min / median (s) | bound (s) | apply / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in inmem:
        ratio = min(r.apply_s) / r.bound_s
        verdict = "met" if ratio <= INMEM_TARGET else "MISSED"
        first = f"{r.first_apply_s:.2f}"
        if r.method == "ties":
            first += f" ({'met' if r.first_apply_s <= FIRST_APPLY_TARGET else 'MISSED'}, ≤ {FIRST_APPLY_TARGET:g} s)"
        mem = r.anon_peak_mib / r.plan_mib
        mem_verdict = "met" if abs(mem - 1) <= PLAN_TOLERANCE else "MISSED"
        lines.append(
            f"| {r.method} | {r.kernels} | {r.resident_mib:.0f} ({r.resident_kind}) | {r.cache_mib:.0f} | "
            f"{r.build_s:.1f} | {first} | {r.second_apply_s:.2f} | {r.plan_mib:.0f} | {r.anon_peak_mib:.0f} | "
            f"{mem:.2f} ({mem_verdict}) | "
            f"{r.peak_rss_mib:.0f} | "
            f"{min(r.apply_s):.2f} / {statistics.median(r.apply_s):.2f} | "
            f"{r.bound_s:.2f} | {ratio:.1f}× ({verdict}, ≤ {INMEM_TARGET:g}×) |"
        )
    if baselines:
        lines += [
            "",
            f"Before / after in this run: each method's worker with merge_core as of `{args.baseline_rev}` "
            "(`--baseline-rev`), right before this checkout's, same checkpoints, candidates and load.",
            "",
            f"| method | first apply at {args.baseline_rev} (s) | first apply now (s) | now / before "
            f"| apply min at {args.baseline_rev} (s) | apply min now (s) | now / before |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in inmem:
            b = baselines[r.method]
            lines.append(
                f"| {r.method} | {b.first_apply_s:.2f} | {r.first_apply_s:.2f} | "
                f"{r.first_apply_s / b.first_apply_s:.2f} | {min(b.apply_s):.2f} | {min(r.apply_s):.2f} | "
                f"{min(r.apply_s) / min(b.apply_s):.2f} |"
            )
    lines += ["", "Plan log lines:", ""] + [f"- {r.method}: `{r.plan_line}`" for r in inmem]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        write_section(INMEM_SECTION, text)
        print(f"wrote the '{INMEM_SECTION}' section of {RESULTS}")


if __name__ == "__main__":
    main()
