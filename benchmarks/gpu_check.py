"""The GPU truth in one prepared command (issue 16): the gpu-marked tests and the pythia-1b-shaped rloo vs TRL
benchmark, on a GPU machine that has no package registry, finished in about 8 minutes.

    python benchmarks/gpu_check.py --fetch      # here, with PyPI: the wheels the GPU machine lacks, into .whl/
    python benchmarks/gpu_check.py --dry-run    # here: resolve, install, import, one CPU step of the benchmark
    python3 benchmarks/gpu_check.py --out "$OUT"   # there (device run, carry [".whl"]): tests, benchmark, summary

The GPU machine (this workplace's H100 / H200 image, as the device tool's KINDS.md lists it) has Python 3.12,
torch, transformers, accelerate, peft, pytest and most of rloo's needs; ``MACHINE`` below is that list.
``resolve`` takes rloo's requirements (pyproject.toml: the core, and trl and deepspeed for the benchmark and
the tests), keeps what the machine has in a version rloo accepts, and carries the rest with whatever they need
in turn, read from each wheel's metadata. Packages the machine has in another version than rloo was tested on
are carried too (``TESTED``). What travels must stay under the device tool's 64 MiB with the working tree;
a wheel larger than what is left (bitsandbytes) is left out, and only the tests that need it skip.

On the GPU each step runs under its own time limit, so one hang cannot eat the rest, and the summary
(gpu_summary.md, gpu_summary.json) is written under ``--out`` whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
LIMIT_BYTES = 64 * 2**20  # the device tool's working tree, wheels included
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                    "manylinux2014_x86_64", "manylinux1_x86_64") for arg in ("--platform", tag)]
# The GPU machine's Python packages (KINDS.md, read 2026-11-17; versions where a session saw them).
MACHINE = {canonicalize_name(name): (Version(v) if v else None) for name, _, v in (item.partition("==") for item in """
accelerate==1.15.0 aiohttp anyio attrs certifi charset-normalizer click filelock fsspec h11 hf-xet httpcore httpx
huggingface-hub==1.33.0 idna jinja2 markdown-it-py markupsafe matplotlib mdurl msgpack networkx ninja numpy==2.5.2
nvidia-ml-py packaging pandas peft pillow pip pluggy protobuf psutil py-cpuinfo pyarrow pygments pytest pyyaml regex
requests rich safetensors==0.8.0 scipy setuptools six sympy tensorboard tokenizers==0.23.2 torch==2.11.0 tqdm
transformers==5.17.0 triton==3.6.0 typing-extensions urllib3 wheel xxhash yarl zipp einops absl-py joblib
multidict frozenlist aiosignal propcache aiohappyeyeballs python-dateutil sentencepiece tiktoken typer shellingham
""".split())}
# Versions rloo is tested with, carried where the machine has another (transformers' 5.19 internals).
TESTED = {"transformers": "5.19.0", "peft": "0.21.2", "trl": "1.16.0", "deepspeed": "0.19.8"}
EXTRA_NEEDS = ["trl==1.16.0", "deepspeed>=0.19.8,<0.20", "peft>=0.21,<0.22"]  # the benchmark and the gpu tests
TOO_LARGE = ("bitsandbytes",)  # ~100 MB wheels: over the limit with the rest; the QLoRA test skips without it
STEPS = {  # name -> (seconds, command); run in order on the GPU
    "gpu-marked tests": (300, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                               "no:cacheprovider", "-o", "addopts=", "-rA"]),
    "rloo vs TRL, pythia-1b shape": (300, [sys.executable, "benchmarks/compare_trl.py", "--gpu", "--steps", "6",
                                           "--configs", "2x16", "4x8"]),
}


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + EXTRA_NEEDS]


def carry_set(needs: list[Requirement], metadata=None) -> dict[str, str]:
    """name -> the pin to carry: each need the machine lacks, has in a version outside the need's range, or has
    in another version than ``TESTED``; then their own needs (``metadata(name) -> [Requirement]``, from the
    fetched wheels), the same way, until nothing new comes."""
    carry: dict[str, str] = {}
    queue = list(needs)
    while queue:
        need = queue.pop(0)
        name = canonicalize_name(need.name)
        if name in carry or name in TOO_LARGE or (need.marker is not None and not need.marker.evaluate(
                {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux", "extra": ""})):
            continue
        have = MACHINE.get(name, False)
        tested = TESTED.get(name)
        if have is not False and (have is None or have in need.specifier) and (tested is None or have == Version(tested)):
            continue  # the machine's own (an unknown version is checked there: ``versions_there``)
        carry[name] = f"{name}=={tested}" if tested else f"{name}{need.specifier}" if str(need.specifier) else name
        queue += metadata(name) if metadata else []
    return carry


def wheel_requirements(name: str) -> list[Requirement]:
    """The needs a fetched wheel declares (Requires-Dist without an extra)."""
    found = [w for w in WHEELS.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name]
    if not found:
        return []
    with zipfile.ZipFile(found[0]) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    needs = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    return [need for need in needs if need.marker is None or "extra" not in str(need.marker)]


def fetch() -> dict[str, str]:
    """Download (or build, for source-only packages) one wheel per carried package into .whl/, for CPython 3.12
    on x86-64 Linux; repeat until the carry set stops growing."""
    WHEELS.mkdir(exist_ok=True)
    done: set[str] = set()
    while True:
        carry = carry_set(requirements(), wheel_requirements)
        todo = [pin for name, pin in carry.items() if name not in done]
        if not todo:
            return carry
        for pin in todo:
            name = canonicalize_name(Requirement(pin).name)
            done.add(name)
            if any(canonicalize_name(w.name.split("-")[0]) == name for w in WHEELS.glob("*.whl")):
                continue
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM, "-d",
                                  str(WHEELS), pin], capture_output=True, text=True)
            if got.returncode != 0:  # only a source distribution: build a wheel (pure Python ones are universal)
                subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), pin],
                               check=True, env=dict(os.environ, DS_BUILD_OPS="0"))


def travelling_bytes() -> int:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / name.decode()).stat().st_size for name in tracked if name and (ROOT / name.decode()).is_file())
    return tree + sum(w.stat().st_size for w in WHEELS.glob("*.whl"))


def install(target: Path, foreign: bool) -> None:
    """The carried wheels into ``target``: for CPython 3.12 on Linux (``foreign``: checked from here), else as
    the GPU machine's own Python installs them."""
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *(PLATFORM if foreign else []), *wheels]
    subprocess.run(command, check=True)


def versions_there() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for need in requirements():
        try:
            found[need.name] = version(need.name)
        except PackageNotFoundError:
            found[need.name] = "missing"
    return found


def run_steps(out: Path, env: dict) -> list[dict]:
    results = []
    for name, (seconds, command) in STEPS.items():
        start = time.monotonic()
        log = out / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".log")
        with open(log, "w") as sink:
            try:
                rc = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    timeout=seconds).returncode
            except subprocess.TimeoutExpired:
                rc = "timed out"
        tail = log.read_text(errors="replace").splitlines()[-40:]
        results.append({"step": name, "limit_s": seconds, "seconds": round(time.monotonic() - start, 1), "rc": rc,
                        "tail": tail})
        print(f"{name}: rc {rc} in {results[-1]['seconds']} s", flush=True)
    return results


def summary(out: Path, results: list[dict], extra: dict) -> None:
    (out / "gpu_summary.json").write_text(json.dumps({"steps": results, **extra}, indent=2))
    lines = ["| step | limit s | seconds | result |", "|---|---:|---:|---|"]
    lines += [f"| {r['step']} | {r['limit_s']} | {r['seconds']} | {r['rc']} |" for r in results]
    for r in results:
        lines += ["", f"### {r['step']} (last lines)", "", "```", *r["tail"], "```"]
    (out / "gpu_summary.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--fetch", action="store_true", help="Download the wheels the GPU machine lacks into .whl/.")
    mode.add_argument("--dry-run", action="store_true", help="Resolve, install, import and run one CPU step here.")
    mode.add_argument("--out", type=Path, help="On the GPU machine: run every step, the summary into this folder.")
    mode.add_argument("--versions", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fetch:
        carry = fetch()
        size = travelling_bytes()
        print(f"carried: {', '.join(sorted(carry))}; {len(list(WHEELS.glob('*.whl')))} wheels; working tree + wheels "
              f"{size / 2**20:.1f} MiB of {LIMIT_BYTES / 2**20:.0f}")
        if size > LIMIT_BYTES:
            sys.exit("over the device tool's limit: carry less")
        return
    if args.dry_run:
        return dry_run()
    if args.versions:
        return print(json.dumps(versions_there()))
    args.out.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="rloo-site-"))
    install(site, foreign=False)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    found = subprocess.run([sys.executable, __file__, "--versions"], capture_output=True, text=True, env=env).stdout
    results = run_steps(args.out, env)
    summary(args.out, results, {"versions": json.loads(found or "{}"),
                                "carried": sorted(w.name for w in WHEELS.glob("*.whl")),
                                "left_out": list(TOO_LARGE)})


def dry_run() -> None:
    """Here, before any GPU time: the carry set is fetched and fits, installs for the GPU machine's Python,
    imports beside rloo (the pure-Python wheels; binary ones are the GPU machine's build, not this one's), the
    gpu-marked tests collect, and the benchmark's CPU path runs."""
    carry = carry_set(requirements(), wheel_requirements)
    fetched = {canonicalize_name(w.name.split("-")[0]) for w in WHEELS.glob("*.whl")}
    missing = sorted(set(carry) - fetched)
    if missing:
        sys.exit(f"not fetched: {', '.join(missing)}; run `python benchmarks/gpu_check.py --fetch` first")
    size = travelling_bytes()
    print(f"carry set: {', '.join(sorted(carry))} ({size / 2**20:.1f} MiB with the working tree, of "
          f"{LIMIT_BYTES / 2**20:.0f}); left out: {', '.join(TOO_LARGE)}", flush=True)
    if size > LIMIT_BYTES:
        sys.exit("over the device tool's limit: carry less")
    with tempfile.TemporaryDirectory(prefix="rloo-dry-") as tmp:
        install(Path(tmp) / "cp312", foreign=True)  # every wheel installs for CPython 3.12 on x86-64 Linux
        pure = Path(tmp) / "pure"
        wheels = [str(w) for w in WHEELS.glob("*-none-any.whl") if re.search(r"-(py3|py2\.py3)-none-any\.whl$", w.name)]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(pure),
                        *wheels], check=True)
        env = dict(os.environ, PYTHONPATH=f"{pure}{os.pathsep}{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}",
                   HF_HUB_OFFLINE="1")
        imports = "import rloo, rloo.trainer, trl, peft, deepspeed, transformers; print(transformers.__version__, " \
                  "trl.__version__, peft.__version__, deepspeed.__version__)"
        print("imports:", subprocess.run([sys.executable, "-c", imports], env=env, check=True, capture_output=True,
                                         text=True).stdout.strip(), flush=True)
        collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu",
                                    "tests/test_gpu.py", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                                   capture_output=True, text=True)
        print("gpu-marked tests:", (collected.stdout.strip().splitlines() or ["?"])[-1], flush=True)
        if collected.returncode != 0:
            sys.exit(collected.stdout[-3000:])
        bench = subprocess.run([sys.executable, "benchmarks/compare_trl.py", "--steps", "2", "--configs", "2x2"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if bench.returncode != 0:
            sys.exit(f"the benchmark's CPU path failed:\n{bench.stderr[-3000:]}")
        rows = [line for line in bench.stdout.splitlines() if line.startswith("{")]
        print("benchmark, CPU path (k 2 x 2 prompts, 2 steps):", rows[0] if rows else "no result", flush=True)


if __name__ == "__main__":
    main()
