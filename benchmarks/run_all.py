"""Runs every benchmark script, one after the other, and prints one summary.

    python benchmarks/run_all.py                 # all suites, on this machine
    python benchmarks/run_all.py --quick         # short smoke run
    python benchmarks/run_all.py --update-readme # also rewrite the README's tables
    python benchmarks/run_all.py --no-run --update-readme  # rebuild from saved results
    python benchmarks/run_all.py --save-baseline models    # freeze this machine's models.json

Results are kept per machine (DESIGN convention 15): each suite writes
benchmarks/results/<machine>/<suite>.{json,csv,png}, <machine> being the CPU
model and its best ISA (harness.machine_tag, e.g. amd-epyc-avx2). A summary
is built per machine folder, from files that all carry that folder's machine
tag: a file made on another machine is an error naming both (never mixed
into one table). benchmarks/results/<machine>/summary.md holds one machine's
summary; benchmarks/results/summary.md and the README (between its markers)
hold every machine seen, each with its own "Targets, as measured" table.
Nothing here is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from harness import MixedMachinesError, machine_of, markdown_table, this_machine  # noqa: E402

SUITES = ["peak", "attention", "int8_matmul", "preprocess", "models", "encoders", "gpt2_decode", "llm", "vision",
          "index", "server", "image_server", "transport", "functions", "train"]  # bench_<name>.py scripts
# Result files they write (bench_int8_matmul.py writes two suites).
RESULTS = ["peak", "attention", "int8_linear", "int8_matmul", "preprocess", "models", "encoders", "gpt2_decode", "llm",
           "vision", "index", "train"]


@dataclass(frozen=True)
class Target:
    """A speed target from an issue.

    kind "ratio": peer median / ours median over the cases matching `pattern`
    (the worst one counts); `peer` is a provider name, or a prefix ending in
    "*". kind "peak": ours' fraction of the register-only peak (rows'
    peak_fraction). kind "baseline": ours' throughput over the same case and
    provider in this machine's frozen baseline (results/<machine>/baseline/,
    written by --save-baseline). kind "fastest": as "ratio", against the
    fastest of the rows whose provider `peer` (a regular expression) matches
    in full, leaving out rows marked beyond their accuracy tolerance
    (accuracy_ok false). `where`: "" every machine; "avx2" AVX2-only
    machines (best ISA avx2: the peers run AVX2 too); "avx2-kernels" wherever
    tallow's kernels run AVX2 (also an AVX-512 machine under TALLOW_ISA=avx2);
    "amx" machines with AMX-INT8.
    """

    suite: str
    pattern: str
    ours: str
    peer: str
    target: float
    issue: str = ""
    where: str = ""
    kind: str = "ratio"


TARGETS = [
    Target("attention", r"prefill", "tallow", "torch_sdpa", 1.3),
    Target("attention", r"decode", "tallow", "torch_sdpa", 2.0),
    Target("int8_linear", r"M=(32|256|1024) ", "tallow QuantizedLinear", "torch fp32 F.linear", 2.5),
    Target("int8_linear", r"M=(32|256|1024) ", "tallow QuantizedLinear", "torch quantize_dynamic int8", 1.2),
    Target("int8_linear", r"M=1 ", "tallow QuantizedLinear", "torch fp32 F.linear", 2.0),
    Target("int8_matmul", r".", "tallow int8_matmul", "torch._int_mm*", 1.5),
    Target("preprocess", r"1 thr", "tallow-fast", "pil+numpy", 3.0),
    Target("models", r"bert-base", "tallow-fp32", "transformers-fp32", 1.1),
    Target("models", r"bert-base", "tallow-int8", "transformers-fp32", 2.0),
    Target("models", r"bert-base", "tallow-int8", "onnxruntime-int8", 1.0),
    Target("models", r"gpt2-124m b1 .*greedy", "tallow-fp32", "transformers-fp32", 1.1),
    Target("models", r"gpt2-124m b8 .*greedy", "tallow-fp32", "transformers-fp32", 2.0),
    Target("models", r"gpt2-124m b1 .*greedy", "tallow-int8", "transformers-fp32", 2.5),
    Target("models", r"resnet50 b", "tallow-fp32", "transformers-fp32", 1.0),
    Target("models", r"resnet50 b", "tallow-int8", "transformers-fp32", 1.3),
    # Issue 11: fast on every x86 CPU (AVX2 machines first).
    Target("int8_linear", r"M=(32|256|1024) ", "tallow QuantizedLinear", "torch quantize_dynamic int8", 1.2,
           "11", "avx2"),
    Target("int8_linear", r"M=(32|256|1024) ", "tallow QuantizedLinear", "torch fp32 F.linear", 1.5, "11", "avx2"),
    Target("int8_linear", r"M=1 ", "tallow QuantizedLinear", "torch fp32 F.linear", 2.0, "11", "avx2"),
    Target("int8_linear", r"M=256 ", "tallow QuantizedLinear", "int8 peak", 0.8, "11", "avx2-kernels", "peak"),
    Target("models", r"bert-base seq\d+ b(1|8)$", "tallow-int8", "onnxruntime-int8", 1.0, "11", "avx2"),
    Target("models", r"bert-base seq\d+ b(1|8)$", "tallow-int8", "onnxruntime-int8 default-threads", 1.0,
           "11", "avx2"),
    Target("models", r"minilm", "tallow-int8", "tallow-fp32", 1.5, "11", "avx2"),
    Target("models", r"resnet50 b(1|16) from tensors", "tallow-int8", "tallow-fp32", 1.3, "11"),
    Target("attention", r"gpt2 decode B=8 Lk=1024", "tallow-bf16-cache", "torch_sdpa", 1.8, "11", "avx2"),
    Target("models", r"gpt2-124m b8 .*greedy", "tallow-int8", "baseline", 1.3, "11", "avx2", "baseline"),
    Target("int8_matmul", r".", "tallow int8_matmul", "torch._int_mm*", 1.0, "11", "amx"),
    # Issue 12: the Trainer's overhead, samples/s against the plain PyTorch loops.
    Target("train", r"digits convnet", "tallow Trainer", "plain loop (tensor indexing)", 0.95, "12"),
    Target("train", r"digits convnet", "tallow Trainer", "plain loop (DataLoader)", 0.95, "12"),
    # Issue 22: whole encoders vs the faster of ONNX Runtime (plain or optimized graph) and CTranslate2,
    # same precision, each engine in its own process (bench_encoders.py).
    *(Target("encoders", r"^(minilm-l6|bert-base)-", f"tallow-{p}",
             f"onnxruntime-{p} (plain|optimized)|ctranslate2-{p}", 1.2, "22", kind="fastest")
      for p in ("fp32", "int8")),
    # Issue 22, item 4: GPT-2 124M decode steps (tokens/s, b1 and b8) vs CTranslate2's Generator at int8,
    # each engine in its own process (bench_gpt2_decode.py).
    Target("gpt2_decode", r"^gpt2-124m-b(1|8) .* decode step$", "tallow-int8", "ctranslate2-int8", 1.2, "22"),
    # Issue 23: SmolLM2-135M-Instruct (Q4_1 GGUF) vs llama.cpp on the same file, each engine in its
    # own process (bench_llm.py); tallow's INT8 path (the file is 4-bit: INT8 is tallow's nearest).
    Target("llm", r"^decode b1 ", "tallow-int8", "llama.cpp", 1.2, "23"),
    Target("llm", r"^prompt ", "tallow-int8", "llama.cpp", 1.2, "23"),
    # Issue 27: ResNet-50 features (b1, b8) vs ONNX Runtime, each engine in its own process
    # (bench_vision.py): fp32 vs ORT fp32; INT8 vs the faster of ORT fp32 and ORT static INT8 (QDQ, QOperator).
    Target("vision", r"^resnet50-b(1|8)$", "tallow-fp32", "onnxruntime-fp32", 1.2, "27", kind="fastest"),
    Target("vision", r"^resnet50-b(1|8)$", "tallow-int8", "onnxruntime-(fp32|int8 qdq|int8 qoperator)", 1.2, "27",
           kind="fastest"),
]
README_START = "<!-- bench-table:start -->"
README_END = "<!-- bench-table:end -->"


# ------------------------------------------------------------ result files

def machine_dirs(root: Path | None = None) -> list[Path]:
    """The machine folders under the results root (those holding any result
    JSON). A result JSON lying directly in the root (the old, unsorted
    layout) is an error naming the machine it belongs to."""
    root = root or harness.RESULTS_ROOT
    if not root.exists():
        return []
    for stray in sorted(root.glob("*.json")):
        try:
            tag = machine_of(json.loads(stray.read_text()).get("env", {}))
        except (ValueError, MixedMachinesError):
            tag = "unknown"
        raise MixedMachinesError(f"{stray} is not in a machine folder: move it to {root / tag}/ "
                                 f"(its machine tag: {tag})")
    return sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.json")))


def load(mdir: Path, name: str) -> dict | None:
    """results/<machine>/<name>.json, checked to come from that machine."""
    path = mdir / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    env = data.get("env") if isinstance(data, dict) else None
    if not env:
        raise MixedMachinesError(f"{path} carries no machine tag (env): cannot put it in the summary of "
                                 f"'{mdir.name}'")
    tag = machine_of(env)
    if tag != mdir.name:
        raise MixedMachinesError(f"{path} was made on machine '{tag}' but is in the results of '{mdir.name}': "
                                 f"refusing to mix machines in one summary")
    return data


def applies(t: Target, env: dict) -> bool:
    if t.where == "avx2":
        return (env.get("tallow_best_isa") or env.get("tallow_isa")) == "avx2"
    if t.where == "avx2-kernels":
        return env.get("tallow_isa") == "avx2"
    if t.where == "amx":
        return bool(env.get("amx_int8"))
    return True


def _peer_rows(rows: list[dict], case: str, peer: str) -> list[dict]:
    if peer.endswith("*"):
        return [r for r in rows if r["case"] == case and r["provider"].startswith(peer[:-1])]
    return [r for r in rows if r["case"] == case and r["provider"] == peer]


def measure_target(t: Target, mdir: Path) -> tuple[str, str, bool | None] | None:
    """(cases cell, measured cell, met) for one target on one machine; None
    when the target does not apply there or the suite never ran there."""
    data = load(mdir, t.suite)
    if data is None or not applies(t, data["env"]):
        return None
    rows = data["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows if re.search(t.pattern, r["case"])))
    found = []  # (value, case)
    missing = ""
    base_rows = None
    if t.kind == "baseline":
        base = mdir / "baseline" / f"{t.suite}.json"
        if base.exists():
            bdata = json.loads(base.read_text())
            btag = machine_of(bdata.get("env", {}))
            if btag != mdir.name:
                raise MixedMachinesError(f"{base} was made on machine '{btag}', not '{mdir.name}': "
                                         "refusing to compare across machines")
            base_rows = bdata["rows"]
        else:
            missing = (f"no baseline stored for this machine (`run_all.py --save-baseline {t.suite}` "
                       "on the code before the change)")
    for case in cases:
        mine = [r for r in rows if r["case"] == case and r["provider"] == t.ours]
        if not mine:
            continue
        if t.kind == "ratio":
            theirs = _peer_rows(rows, case, t.peer)
            if theirs:
                found.append((theirs[0]["median_ms"] / mine[0]["median_ms"], case))
        elif t.kind == "fastest":
            theirs = [r for r in rows if r["case"] == case and re.fullmatch(t.peer, r["provider"])
                      and r.get("accuracy_ok", True)]
            if theirs:
                best = min(theirs, key=lambda r: r["median_ms"])
                found.append((best["median_ms"] / mine[0]["median_ms"], f"{case} vs {best['provider']}"))
        elif t.kind == "peak":
            if mine[0].get("peak_fraction") is not None:
                found.append((mine[0]["peak_fraction"], case + f", of {mine[0]['peak_kind']}"))
        elif t.kind == "baseline" and base_rows is not None:
            then = [r for r in base_rows if r["case"] == case and r["provider"] == t.ours]
            if then:
                found.append((mine[0]["throughput"] / then[0]["throughput"],
                              case + f", baseline {then[0]['throughput']:.1f} {then[0]['unit']}"))
    shown = t.pattern.replace("|", "\\|")  # a bare | would split the markdown cell
    cases_cell = f"`{shown}` ({len(found)})"
    if not found:
        if t.kind == "ratio" and not any(r["provider"] == t.ours for r in rows):
            missing = missing or f"not measured: no provider '{t.ours}' in {t.suite}.json yet"
        return cases_cell, missing or "not measured", None
    worst, case = min(found)
    value = f"{worst:.0%}" if t.kind == "peak" else f"{worst:.2f}×"
    return cases_cell, f"{value} ({case})", worst >= t.target


def targets_table(mdir: Path) -> str:
    """One line per target that applies to this machine: the measured ratio
    (worst matching case) and whether it is met."""
    lines = ["| issue | suite | cases | tallow provider vs peer | target | measured (worst case) | met |",
             "|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        got = measure_target(t, mdir)
        if got is None:
            continue
        cases_cell, measured, met = got
        vs = {"ratio": f"{t.ours} vs {t.peer}", "fastest": f"{t.ours} vs the fastest of {t.peer.replace('|', ' or ')}", "peak": f"{t.ours}: fraction of the {t.peer}",
              "baseline": f"{t.ours} vs this machine's baseline (tokens/s)"}[t.kind]
        goal = f"≥ {t.target:.0%}" if t.kind == "peak" else f"≥ {t.target}×"
        where = {"avx2": " (AVX2)", "avx2-kernels": " (AVX2 kernels)", "amx": " (AMX)"}.get(t.where, "")
        lines.append(f"| {t.issue or '—'}{where} | {t.suite} | {cases_cell} | {vs} | {goal} | {measured} | "
                     f"{'—' if met is None else ('yes' if met else 'no')} |")
    lines += index_target_lines(mdir)
    lines += llm_target_lines(mdir)
    lines += functions_target_lines(mdir)
    lines += image_server_target_lines(mdir)
    server = load(mdir, "server")
    if server is not None and "targets" in server:  # bench_server with a baseline: its own targets list
        lines += server_target_lines(server)
    elif server is not None:  # an older server.json: the batching gains only
        for label, key in (("fp32", "batching_speedup"), ("int8", "batching_speedup_int8")):
            speed = server.get(key, {}).get("32")
            if speed is not None:
                lines.append(f"| — | server | /v1/embeddings, 32 clients ({label}) | batching on vs max_batch_size=1 "
                             f"(throughput) | ≥ 3.0× | {speed:.2f}× | {'yes' if speed >= 3.0 else 'no'} |")
    return "\n".join(lines)


def image_server_target_lines(mdir: Path) -> list[str]:
    """Issue 27, item 3: /v1/images/search with INT8 at 10 concurrent clients
    (distinct images), current vs the code before the issue, requests/s
    (bench_image_server.py's image_server.json)."""
    data = load(mdir, "image_server")
    if data is None:
        return []
    base = data.get("servers", {}).get("baseline", {}).get("commit") or data.get("baseline_rev")
    ratio, goal = data["ratio"], data["target_ratio"]
    return [f"| 27 | image_server | /v1/images/search INT8, {data['clients']} clients, distinct images | "
            f"current vs baseline {base} (requests/s) | ≥ {goal}× | {ratio:.2f}× | {'yes' if ratio >= goal else 'no'} |"]


def server_target_lines(server: dict) -> list[str]:
    """bench_server's targets (issue 15: current serving vs the baseline
    revision, and the batching gain), one line each, as server.json lists them;
    the baseline's own figures (its batching gain, its overload) stay in the
    server section: context, not targets."""
    from bench_server import format_target

    base = server.get("servers", {}).get("baseline", {}).get("commit")
    lines = []
    for t in server["targets"]:
        if t["name"].endswith("(baseline)"):
            continue
        goal, measured = format_target(t)
        vs = f"current vs baseline {base}" if base and "current / baseline" in t["name"] else "—"
        lines.append(f"| 15 | server | {t['name']} | {vs} | {goal} | {measured} | "
                     f"{'—' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
    return lines


HNSW_RECALL, HNSW_SPEEDUP, FILTER_RECALL = 0.95, 20.0, 0.95  # issue 4's targets


def index_target_lines(mdir: Path) -> list[str]:
    """Issue 4: HNSW recall@10 >= 0.95 at >= 20x the QPS of brute force at the
    largest size run (single-query and batched: the best speed-up among the ef
    values whose recall reaches 0.95), and filtered recall@10 >= 0.95 (worst
    filter). From results/<machine>/index.json as bench_index.py writes it."""
    data = load(mdir, "index")
    if data is None:
        return []
    rows = data["rows"]
    lines = []
    sweep = [r for r in rows if re.fullmatch(r"hnsw ef=\d+ (single|batch)", r["case"])]
    if sweep:
        n = max(r["param_n"] for r in sweep)
        for mode in ("single", "batch"):
            found = []  # (speed-up, ef, recall) per ef at the largest n
            for case in dict.fromkeys(r["case"] for r in sweep if r["case"].endswith(mode) and r["param_n"] == n):
                mine = [r for r in sweep if r["case"] == case and r["param_n"] == n and r["provider"] == "hnsw"]
                theirs = [r for r in sweep if r["case"] == case and r["param_n"] == n and r["provider"] == "brute-force"]
                if mine and theirs:
                    found.append((mine[0]["throughput"] / theirs[0]["throughput"], mine[0]["param_ef"],
                                  mine[0]["param_recall@10"]))
            if not found:
                continue
            ok = [f for f in found if f[2] >= HNSW_RECALL]
            if ok:
                speed, ef, recall = max(ok)
                shown, met = f"{speed:.2f}× (best ef with recall ≥ {HNSW_RECALL}: ef={ef}, recall {recall:.4f})", \
                    speed >= HNSW_SPEEDUP
            else:
                shown, met = f"no ef reaches recall {HNSW_RECALL} (best {max(f[2] for f in found):.4f})", False
            lines.append(f"| 4 | index | `hnsw ef=* {mode}` ({len(found)}), n={n} | hnsw vs brute-force (QPS) "
                         f"at recall@10 ≥ {HNSW_RECALL} | ≥ {HNSW_SPEEDUP:g}× | {shown} | {'yes' if met else 'no'} |")
    filt = [r for r in rows if r["case"].startswith("hnsw filter") and r["provider"] == "hnsw"]
    if filt:
        worst = min(filt, key=lambda r: r["param_recall@10"])
        recall = worst["param_recall@10"]
        lines.append(f"| 4 | index | `hnsw filter` ({len(filt)}) | filtered recall@10 vs exact | ≥ {FILTER_RECALL} | "
                     f"{recall:.4f} ({worst['case']}) | {'yes' if recall >= FILTER_RECALL else 'no'} |")
    return lines


LLM_PPL_REL = 0.01  # issue 23: perplexity within 1 % of llama.cpp's on the same file


def llm_target_lines(mdir: Path) -> list[str]:
    """Issue 23's quality targets from results/<machine>/llm.json (bench_llm.py):
    perplexity within 1 % of llama.cpp's, and greedy continuations equal to
    llama.cpp's (and, on the fp32 path, transformers') on most prompts."""
    data = load(mdir, "llm")
    q = (data or {}).get("quality")
    if not q:
        return []
    lines = []
    where = f"{q['ppl_tokens']:,} tokens, windows of {q['ppl_window']}"
    for name, rel in q.get("ppl_rel_diff_vs_llama.cpp", {}).items():
        if name.startswith("tallow"):
            lines.append(f"| 23 | llm | perplexity ({where}) | {name} vs llama.cpp | within ±{LLM_PPL_REL:.0%} | "
                         f"{rel:+.2%} ({q['ppl'][name]:.3f} vs {q['ppl']['llama.cpp']:.3f}) | "
                         f"{'yes' if abs(rel) <= LLM_PPL_REL else 'no'} |")
    n = q["greedy_prompts"]
    for pair, equal in q.get("greedy_equal", {}).items():
        if pair.startswith("tallow") and (pair.endswith("llama.cpp") or pair == "tallow-fp32 vs transformers-fp32"):
            lines.append(f"| 23 | llm | greedy continuations, {q['greedy_tokens']} tokens | {pair} (all tokens equal) "
                         f"| most of {n} | {equal}/{n} | {'yes' if equal > n / 2 else 'no'} |")
    return lines


def functions_target_lines(mdir: Path) -> list[str]:
    """Issue 13: from results/<machine>/functions.json as bench_functions.py writes it."""
    data = load(mdir, "functions")
    if data is None:
        return []
    t, h = data["targets"], data["http"]
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    tp = {r["path"]: r for r in h["throughput_8_clients"]}
    row = "| 13 | functions | {} | {} | {} | {} | {} |".format
    return [
        row("cold start from the compiled cache to the first response (in process)", "p50", "≤ 2 ms",
            f"{t['cold_start_ms']['value']:.2f} ms", yes(t["cold_start_ms"]["met"])),
        row("compiled-cache load vs compile (todo.wasm)", "speed-up", "≥ 50×",
            f"{t['cache_speedup']['value']:.0f}×", yes(t["cache_speedup"]["met"])),
        row("function route vs native Python route, same HTTP stack", "added p50", "≤ 1 ms",
            f"+{t['added_latency_p50_ms']['value']:.2f} ms", yes(t["added_latency_p50_ms"]["met"])),
        row("8 clients, function route (native route)", "throughput", "stated",
            f"{tp['/hello/x']['rps']:.0f} ({tp['/native/x']['rps']:.0f}) req/s", "—"),
        row("infinite loop → 504", "answer after the deadline", "≤ deadline + 50 ms",
            f"+{t['deadline_overshoot_ms']['value']:.1f} ms (worst of {h['deadline']['loops']})",
            yes(t["deadline_overshoot_ms"]["met"])),
        row("memory bomb (64 MiB limit) → 500, RSS bounded", "RSS growth", "bounded",
            f"+{t['memory_bomb']['value']:.0f} MB (2 concurrent)", yes(t["memory_bomb"]["met"])),
        row("/etc/passwd, sockets, environment", "denied", "all",
            "denied" if t["sandbox_denied"]["met"] else "NOT denied", yes(t["sandbox_denied"]["met"])),
        row("every KV limit", "named error", "all 5", ", ".join(h["kv_limits"].values()),
            yes(t["kv_named_errors"]["met"])),
        row("1,000 requests to a stateful guest", "leaks", "0", t["stateful_leaks"]["value"],
            yes(t["stateful_leaks"]["met"])),
    ]


def machine_title(mdir: Path) -> str:
    """'AMD EPYC, best ISA avx2 (`amd-epyc-avx2`)' from any result file there."""
    for name in RESULTS + ["server", "image_server", "functions"]:
        data = load(mdir, name)
        if data is not None:
            env = data["env"]
            isa = env.get("tallow_best_isa") or env.get("tallow_isa", "?")
            forced = "" if env.get("tallow_isa", isa) == isa else f", kernels forced to {env['tallow_isa']}"
            amx = " + AMX-INT8" if env.get("amx_int8") else ""
            return f"{env['cpu']}, best ISA {isa}{amx}{forced} (`benchmarks/results/{mdir.name}/`)"
    return f"`{mdir.name}`"


def suite_tables(mdir: Path, suites: list[str], level: str = "###") -> list[str]:
    parts = []
    for suite in suites:
        data = load(mdir, suite)
        if data is None:
            parts.append(f"{level} {suite}\n\n(no results on this machine: the suite did not run)\n")
            continue
        env = data["env"]
        quick = " — **smoke run (--quick): not the machine's figures**" if "--quick" in env.get("argv", []) else ""
        failed = ""
        if data.get("failed"):
            failed = "\n\n**Cases not timed, providers disagreed:**\n\n" + "\n".join(f"- {f}" for f in data["failed"])
        parts.append(
            f"{level} {suite}\n\n"
            f"{env['cpu']}, {env.get('tallow_threads', '?')} threads (tallow ISA {env.get('tallow_isa', '?')}), "
            f"torch {env['torch']} ({env['torch_threads']} threads), {env['time']}{quick}\n\n"
            f"{markdown_table(data['rows'])}{failed}\n"
        )
    rec = mdir / "index_recall.md"
    if "index" in suites and rec.exists():
        parts.append(f"{level} Vector search recall (index)\n\n" + rec.read_text().strip() + "\n")
    srv = mdir / "server.md"
    server = load(mdir, "server")
    if srv.exists() and server is not None:
        env = server["env"]
        quick = " (`--quick`: smoke-test sizes, not results)" if server.get("quick") else ""
        parts.append(f"{level} HTTP server (server)\n\n{env['cpu']}, {env['time']}; "
                     f"`python benchmarks/bench_server.py`{quick}\n\n" + srv.read_text().strip() + "\n")
    img = mdir / "image_server.md"
    image_server = load(mdir, "image_server")
    if img.exists() and image_server is not None:
        env = image_server["env"]
        parts.append(f"{level} Image search server (image_server)\n\n{env['cpu']}, {env['time']}; "
                     "`python benchmarks/bench_image_server.py`\n\n" + img.read_text().strip() + "\n")
    trn = mdir / "transport.md"
    transport = load(mdir, "transport")
    if trn.exists() and transport is not None:
        env = transport["env"]
        parts.append(f"{level} Server ↔ worker transport (transport)\n\n{env['cpu']}, {env['time']}; "
                     "`python benchmarks/bench_transport.py` (round trips server → worker → server, p50)\n\n"
                     + trn.read_text().strip() + "\n")
    fns = mdir / "functions.md"
    functions = load(mdir, "functions")
    if fns.exists() and functions is not None:
        env = functions["env"]
        parts.append(f"{level} WebAssembly functions (functions)\n\n{env['cpu']}, {env['time']}; "
                     "`python benchmarks/bench_functions.py` (read the interleaved differences and ratios)\n\n"
                     + fns.read_text().strip() + "\n")
    acc = load(mdir, "models_accuracy")
    if "models" in suites and acc is not None:
        report = {k: v for k, v in acc.items() if k != "env"}
        parts.append(f"{level} INT8 accuracy (models)\n\n```json\n" + json.dumps(report, indent=2) + "\n```\n")
    return parts


def summary(mdir: Path, command: str, level: str = "###") -> str:
    """One machine's summary: its targets table, then every suite's table."""
    head = (f"{command}; medians of interleaved runs.\n\n"
            f"{level} Targets (from the issues), as measured\n\n{targets_table(mdir)}\n\n")
    return head + "\n".join(suite_tables(mdir, RESULTS, level))


def all_machines(command: str, root: Path | None = None) -> str:
    """Every machine seen, one section each (README and results/summary.md):
    its own targets table, then its full tables folded."""
    parts = [f"{command}; medians of interleaved runs. Results are kept per machine and never mixed: "
             "one section per machine seen, each with its own targets table (the `issue` column: where "
             "a target came from, — for the earlier ones; (AVX2): set for AVX2-only machines; (AVX2 kernels): wherever "
             "the kernels run AVX2, TALLOW_ISA=avx2 included; (AMX): AMX machines)."]
    for mdir in machine_dirs(root):
        parts.append(f"### {machine_title(mdir)}\n\n#### Targets, as measured\n\n{targets_table(mdir)}\n\n"
                     f"<details><summary>All results on this machine</summary>\n\n"
                     + "\n".join(suite_tables(mdir, RESULTS, "####")) + "\n</details>\n")
    return "\n\n".join(parts)


def save_baseline(suite: str, mdir: Path, force: bool) -> Path:
    """Freezes this machine's latest <suite>.json as its baseline (the 'today'
    of targets such as issue 11's GPT-2 INT8 ≥ 1.3× today's tokens/s)."""
    if load(mdir, suite) is None:
        raise SystemExit(f"no {suite}.json in {mdir}: run the suite first")
    dest = mdir / "baseline" / f"{suite}.json"
    if dest.exists() and not force:
        raise SystemExit(f"{dest} exists (frozen); pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mdir / f"{suite}.json", dest)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="short smoke run of every suite")
    ap.add_argument("--only", nargs="*", choices=SUITES, help="run only these suites")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's benchmark tables")
    ap.add_argument("--no-run", action="store_true", help="only rebuild the summaries from the saved results")
    ap.add_argument("--machine", help="with --no-run: the machine folder to summarise (default: this machine)")
    ap.add_argument("--save-baseline", metavar="SUITE", help="freeze this machine's SUITE.json as its baseline")
    ap.add_argument("--force", action="store_true", help="with --save-baseline: replace an existing baseline")
    args = ap.parse_args()
    if args.machine and not args.no_run:
        ap.error("--machine needs --no-run: suites always run on (and write to) this machine")
    mdir = harness.RESULTS_ROOT / (args.machine or this_machine()["machine"])
    if args.save_baseline:
        print(f"baseline saved: {save_baseline(args.save_baseline, mdir, args.force)}")
        return 0
    suites = args.only or SUITES
    failed = []
    for suite in [] if args.no_run else suites:
        cmd = [sys.executable, str(HERE / f"bench_{suite}.py")] + (["--quick"] if args.quick else [])
        print(f"\n=== {suite}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(suite)
    if args.no_run or args.only:
        command = ("Measured with `make bench` (single suites rerun with `python benchmarks/run_all.py --only SUITE`: "
                   "each suite's time stamp says when it ran)")
    else:
        command = f"Measured with `{'make bench' if not args.quick else 'python benchmarks/run_all.py --quick'}`"
    # Each summary shows every suite's latest results on its machine (each
    # with its own time stamp), so rerunning one suite keeps the others.
    if mdir.exists():
        text = summary(mdir, command.strip())
        (mdir / "summary.md").write_text(text)
        print("\n" + text)
    everything = all_machines(command.strip())
    harness.RESULTS_ROOT.mkdir(parents=True, exist_ok=True)
    (harness.RESULTS_ROOT / "summary.md").write_text(everything + "\n")
    if args.update_readme:
        readme = ROOT / "README.md"
        content = readme.read_text()
        if README_START in content and README_END in content:
            head, rest = content.split(README_START, 1)
            _, tail = rest.split(README_END, 1)
            readme.write_text(f"{head}{README_START}\n{everything}\n{README_END}{tail}")
            print("README.md benchmark tables updated")
        else:
            print(f"README.md has no {README_START} / {README_END} markers; not updated")
    if failed:
        print(f"benchmark suites failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
