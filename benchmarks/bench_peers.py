"""loramux against llama.cpp's ``llama-server`` on the same OpenAI-API workload, in alternating rounds (issue 13).

Not part of CI: the first run builds llama.cpp (~15 min on 2 cores), cached afterwards.

1. Build: ``pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`` (the sdist vendors llama.cpp),
   then ``cmake -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF`` (without them it tries to
   download a web UI) and ``--target llama-server``; all under ``$LORAMUX_HOME/peers/``.
2. Convert with the vendored scripts: the default base model (loramux's cached safetensors copy of the
   embedded SmolLM2-135M-Instruct) to an F32 GGUF with ``convert_hf_to_gguf.py``, and the 4 bundled adapters
   with ``convert_lora_to_gguf.py``. llama.cpp's Q4_1 row uses the embedded GGUF file itself.
3. Serve: ``loramux serve --preload-adapters`` (bundled adapters, loaded at start-up) and ``llama-server -m BASE --lora a,b,c,d`` (one comma list:
   several ``--lora`` flags keep only the last), each alone on the machine, 2 threads, 16 parallel slots.
   Requests select an adapter by ``model`` (loramux) and by ``lora: [{id, scale}]`` (llama.cpp). On CPUs with
   AMX, Q4_1 runs with ``--no-repack`` (see ``llama_server``).
4. Workload per scenario: C concurrent clients, each sending R completions of 64 tokens (``ignore_eos``,
   temperature 0) over fixed prompts; throughput = completion tokens / wall time. Scenarios: 16 clients
   base only, 16 clients over 4 adapters (mixed), 1 client. Rounds alternate which server runs first.

    .venv/bin/python benchmarks/bench_peers.py                  # build if needed, 3 rounds, write BENCHMARKS.md
    .venv/bin/python benchmarks/bench_peers.py --rounds 1 --no-write
    .venv/bin/python benchmarks/bench_peers.py --build-only
    .venv/bin/python benchmarks/bench_peers.py --smoke          # 1 round of a few 16-token requests, prints only
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench_common import has_cpu_flag, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
ADAPTERS = ["json", "sql", "reverse", "date"]
START, END = "<!-- peers:start -->", "<!-- peers:end -->"
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.",
           "List five facts about the moon.", "Describe a busy market in the morning."]


def home() -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from loramux.base import loramux_home

    return loramux_home() / "peers"


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---------------------------------------------------------------------------- build and convert
def build_llama_server(root: Path) -> tuple[Path, Path]:
    """(llama-server binary, vendored llama.cpp source dir); built once into ``root``."""
    binary = root / "build" / "bin" / "llama-server"
    src = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if binary.is_file() and src.is_dir():
        return binary, src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", root])
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    run(["cmake", "-S", src, "-B", root / "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_UI=OFF",
         "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DGGML_NATIVE=ON"])
    run(["cmake", "--build", root / "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)])
    return binary, src


def convert(src: Path, root: Path) -> tuple[Path, dict[str, Path], Path]:
    """(base F32 GGUF, adapter name -> LoRA GGUF, embedded Q4_1 GGUF) for llama.cpp, converted once."""
    from loramux.base import _cached_gguf, default_gguf_path

    q4_1 = default_gguf_path()
    hf_dir = _cached_gguf(q4_1, progress=False)  # loramux's safetensors copy of the default base
    base = root / "smollm2-135m-f32.gguf"
    if not base.is_file():  # written under a temporary name: a failed conversion leaves no file that looks done
        run([sys.executable, src / "convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", _partial(base)])
        _partial(base).rename(base)
    adapters = {}
    for name in ADAPTERS:
        out = root / f"lora-{name}-f32.gguf"
        if not out.is_file():
            run([sys.executable, src / "convert_lora_to_gguf.py", "--base", hf_dir, "--outtype", "f32", "--outfile",
                 _partial(out), ROOT / "src" / "loramux" / "adapters" / name])
            _partial(out).rename(out)
        adapters[name] = out
    return base, adapters, q4_1


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


# ---------------------------------------------------------------------------- servers
class Server:
    def __init__(self, label: str, cmd: list, port: int, env: dict | None = None) -> None:
        self.label, self.cmd, self.port, self.env = label, [str(c) for c in cmd], port, env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + 600  # the first loramux start may convert the default model
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.label} did not become healthy in 600 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def loramux_server(port: int, dtype: str | None) -> Server:
    # --preload-adapters: the bundled adapters load at start-up, as llama-server's --lora loads its adapters
    cmd = [ROOT / ".venv" / "bin" / "loramux", "serve", "--port", port, "--threads", THREADS, "--max-running", 16,
           "--served-model-name", "base", "--preload-adapters"]
    return Server("loramux" + (f" {dtype}" if dtype else ""), cmd + (["--base-dtype", dtype] if dtype else []), port)


def llama_server(binary: Path, model: Path, adapters: dict[str, Path], port: int, label: str,
                 repack: bool = True) -> Server:
    """``llama-server`` on ``model`` with the 4 adapters loaded (off until a request asks). ``repack=False`` passes
    ``--no-repack``: on an AMX Xeon, this build's repacked (AMX) Q4_1 weights crash the server as it starts
    (segfault after its thread pool starts, with and without ``--lora``; seen 2026-12-02); F32 is not repacked."""
    cmd = [binary, "-m", model, "--lora", ",".join(str(adapters[n]) for n in ADAPTERS), "--lora-init-without-apply",
           "--port", port, "-t", THREADS, "-tb", THREADS, "-np", 16, "-c", 16 * 512, "--no-webui",
           *([] if repack else ["--no-repack"])]
    return Server(label, cmd, port)


# ---------------------------------------------------------------------------- workload
def request_body(kind: str, adapter: str | None, prompt: str, tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    if kind == "loramux":
        body["model"] = adapter or "base"
    else:  # llama.cpp: per-request LoRA scales, every loaded adapter listed (0 = off)
        body["model"] = "base"
        body["lora"] = [{"id": i, "scale": 1.0 if name == adapter else 0.0} for i, name in enumerate(ADAPTERS)]
    return body


def drive(kind: str, port: int, clients: int, per_client: int, adapters: list[str | None], tokens: int = 64) -> float:
    """Completion tokens per second of ``clients`` concurrent clients, each ``per_client`` requests."""
    import httpx

    def client(c: int) -> int:
        done = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            for r in range(per_client):
                body = request_body(kind, adapters[c % len(adapters)], PROMPTS[(c + r) % len(PROMPTS)], tokens)
                resp = http.post("/v1/completions", json=body)
                resp.raise_for_status()
                done += resp.json()["usage"]["completion_tokens"]
        return done

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total / (time.perf_counter() - t0)


SCENARIOS = {"16 clients, 4 adapters mixed": (16, 2, ADAPTERS), "16 clients, base only": (16, 2, [None]),
             "1 client": (1, 4, [None])}


SMOKE = {"4 clients, 4 adapters mixed": (4, 1, ADAPTERS), "4 clients, base only": (4, 1, [None]), "1 client": (1, 1, [None])}


def bench(servers: dict, rounds: int, scenarios: dict = SCENARIOS, tokens: int = 64) -> dict:
    """tok/s per (server label, scenario), median over rounds; the order of servers alternates per round."""
    results: dict = {label: {s: [] for s in scenarios} for label in servers}
    labels = list(servers)
    for r in range(rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        for label in order:
            kind, make = servers[label]
            with make() as server:
                drive(kind, server.port, 2, 1, [None], tokens=16)  # warm-up
                for scenario, (clients, per_client, adapters) in scenarios.items():
                    tps = drive(kind, server.port, clients, per_client, adapters, tokens)
                    results[label][scenario].append(tps)
                    print(f"round {r + 1} {label:22s} {scenario:30s} {tps:6.1f} tok/s", flush=True)
    return results


def markdown(results: dict, rounds: int, load: tuple[float, float], tokens: int = 64) -> str:
    out = [START, "## Peers: llama.cpp llama-server", "",
           f"Command: `.venv/bin/python benchmarks/bench_peers.py{''.join(' ' + a for a in sys.argv[1:])}`; run {datetime.datetime.now():%Y-%m-%d %H:%M}; "
           f"{machine()}; llama.cpp vendored in llama-cpp-python {LLAMA_CPP_PYTHON}"
           f"{' (Q4_1 with --no-repack: its AMX repacking crashes on this CPU)' if has_cpu_flag('amx_tile') else ''}; {THREADS} threads each, 16 parallel slots; "
           f"completions of {tokens} tokens (ignore_eos, temperature 0); medians of {rounds} alternating rounds (tok/s); "
           f"1-min load average {load[0]:.1f} at start, {load[1]:.1f} at end.", "",
           "| server | " + " | ".join(next(iter(results.values()))) + " |", "|---" * (len(next(iter(results.values()))) + 1) + "|"]
    for label, per in results.items():
        out.append(f"| {label} | " + " | ".join(f"{statistics.median(v):.1f}" for v in per.values()) + " |")
    return "\n".join(out + [END]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--int8", action="store_true", help="also loramux --base-dtype int8")
    parser.add_argument("--smoke", action="store_true",
                        help="one round of 1-4 short requests per scenario: checks that everything runs (implies --no-write)")
    parser.add_argument("--only", nargs="+", default=None, help="servers whose label contains one of these words")
    args = parser.parse_args()
    if shutil.which("cmake") is None:
        print("cmake is needed to build llama.cpp", file=sys.stderr)
        return 2
    root = home()
    binary, src = build_llama_server(root)
    base, adapters, q4_1 = convert(src, root)
    if args.build_only:
        print(f"llama-server: {binary}\nbase: {base}\nadapters: {adapters}")
        return 0
    servers = {"loramux fp32": ("loramux", lambda: loramux_server(8401, None)),
               "llama.cpp F32 GGUF": ("llama", lambda: llama_server(binary, base, adapters, 8402, "llama.cpp F32")),
               "llama.cpp Q4_1 GGUF": ("llama", lambda: llama_server(binary, q4_1, adapters, 8403, "llama.cpp Q4_1",
                                                                             repack=not has_cpu_flag("amx_tile")))}
    if args.int8:
        servers["loramux int8"] = ("loramux", lambda: loramux_server(8404, "int8"))
    if args.only:
        servers = {k: v for k, v in servers.items() if any(w in k for w in args.only)}
    load0 = os.getloadavg()[0]
    if args.smoke:
        results = bench(servers, 1, SMOKE, tokens=16)
        print(markdown(results, 1, (load0, os.getloadavg()[0]), tokens=16))
        return 0
    results = bench(servers, args.rounds)
    text = markdown(results, args.rounds, (load0, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_section(START, END, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
