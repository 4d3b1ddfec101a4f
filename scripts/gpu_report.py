"""The markdown summary of a `make gpu-check` report (scripts/gpu_check.py): one table of the steps with their
status, time and headline figure, the machine's facts above it. The JSON report beside it has everything."""

from __future__ import annotations


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


def _pct(value: float | None) -> str:
    return "" if value is None else f" ({value:.1f}%)"


def _tests(record: dict) -> str:
    t = record.get("tests")
    if t is None:
        return ""
    return f"{t['tests']} tests, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"


def _token_logprobs(r: dict) -> str:
    return (f"fwd {_fmt(r['fwd_gbs'], ' GB/s')}{_pct(r['fwd_pct_bandwidth'])}, "
            f"fwd+bwd {_fmt(r['fwd_bwd_gbs'], ' GB/s')}{_pct(r['fwd_bwd_pct_bandwidth'])} of bandwidth")  # fmt: skip


def _linear(r: dict) -> str:
    ours = f"{_fmt(r['tflops'], ' TFLOP/s')}{_pct(r['pct_bf16_peak'])}"
    liger = r["liger"]
    theirs = liger if isinstance(liger, str) else f"{_fmt(liger['tflops'], ' TFLOP/s')}{_pct(liger['pct_bf16_peak'])}"
    return f"fwd+bwd {ours} of bf16 peak; Liger {theirs}"


def _mcq(r: dict) -> str:
    backends = [f"{b} {_fmt(r[b]['ms'], ' ms', 3)}" for b in ("triton", "cuda", "cpu") if b in r]
    vocab = [f"{b} {_fmt(r[b + '_vocab']['ms'], ' ms', 3)}" for b in ("triton", "cuda", "cpu") if b + "_vocab" in r]
    full = f"; full-vocab projection {_fmt(r['full_vocab_projection_ms'], ' ms', 3)}"
    return ", ".join(backends) + full + (f"; vocab mode {', '.join(vocab)}" if vocab else "")


def _decode(r: dict) -> str:
    parts = []
    for key in sorted(k for k in r if k.startswith("batch_")):
        b = r[key]
        parts.append(f"B={key.removeprefix('batch_')}: engine {_fmt(b['engine']['decode_tokens_per_s'], ' tok/s', 0)}"
                     f", HF {_fmt(b['hf_generate']['decode_tokens_per_s'], ' tok/s', 0)}, roofline "
                     f"{_fmt(b['roofline']['tokens_per_s'], ' tok/s', 0)}{_pct(b['engine_pct_roofline'])}")  # fmt: skip
    return "; ".join(parts)


def _train(r: dict) -> str:
    last = r["steps"][-1] if r["steps"] else {}
    split = ", ".join(f"{k.removeprefix('time_')} {_fmt(last.get(k), ' s', 3)}"
                      for k in ("time_rollout", "time_reward", "time_update"))  # fmt: skip
    return f"{len(r['steps'])} steps; last step {_fmt(last.get('time_step'), ' s', 3)} ({split})"


def _kernels(r: dict) -> str:
    return f"{r['backend']}: " + ", ".join(r["kernels_s"])


HEADLINES = {"bench_token_logprobs": _token_logprobs, "bench_linear_token_logprobs": _linear,
             "bench_mcq_rewards": _mcq, "bench_decode": _decode, "train": _train}  # fmt: skip


def headline(record: dict) -> str:
    """The one-line figure of a step: its test counts, its benchmark figures, or the kernels it ran."""
    if "collected" in record:
        return f"{record['collected']} tests collected (dry run: collected, not run)"
    if "tests" in record:
        return _tests(record)
    result = record.get("result")
    if result is None:
        return ""
    if record["name"] in HEADLINES:
        return HEADLINES[record["name"]](result)
    return _kernels(result) if "kernels_s" in result else ""


def _facts(report: dict) -> list[str]:
    facts = next((r.get("result") for r in report["steps"] if r["name"] == "facts"), None) or {}
    peaks = facts.get("peaks") or {}
    return [f"- GPU: {facts.get('gpu', 'none')}, driver {facts.get('driver')}, CUDA {facts.get('torch_cuda')}",
            f"- torch {facts.get('torch')}, triton {facts.get('triton')}, transformers {facts.get('transformers')}",
            f"- peaks: {_fmt(peaks.get('bandwidth_gbs'), ' GB/s', 0)}, "
            f"{_fmt(peaks.get('bf16_tflops'), ' bf16 TFLOP/s', 0)} ({peaks.get('source')})",
            "- tools: " + ", ".join(f"{k} {v}" for k, v in (facts.get("tools") or {}).items())]  # fmt: skip


def summary_markdown(report: dict) -> str:
    verdict = "PASSED" if report["passed"] else f"FAILED ({', '.join(report['failed_steps'])})"
    lines = [f"# gpu-check {report['started']}{' (dry run)' if report['dry_run'] else ''}: {verdict}", "",
             f"Total {report['seconds']} s.", "", *_facts(report), "",
             "| step | status | s | figures |", "|---|---|---|---|"]  # fmt: skip
    for r in report["steps"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {headline(r).replace('|', '/')} |")
    return "\n".join(lines) + "\n"
