"""`Engine`: batched sampling and prefill on the trainer's own model with a paged KV cache.

    engine = Engine(model, kv_cache_tokens=65536)
    outs = engine.generate([prompt_ids, {"input_ids": ..., "pixel_values": ..., "image_grid_thw": ...}],
                           SamplingParams(n=8, temperature=1.0, max_new_tokens=256))
    outs[i][j].token_ids, outs[i][j].logprobs, outs[i][j].finish_reason
    hidden = engine.prefill(reader_prompts)  # [P, H], last position, prefix cache shared across prompts

One step = one forward pass over a packed batch chosen by the `Scheduler`; the `BlockManager` maps every sequence's
tokens to cache slots; `step_inputs` packs the batch into model inputs; `ModelAdapter` runs the Hugging Face model
with the paged attention function; `requests` checks what the caller passes. The KV cache is allocated on first use
(sized by `cache_size`) and can be released between rollouts with `free_kv_cache()` (the trainer then gets the memory
back for its backward pass), or with `release_kv_cache(keep_prefix=header)`, which keeps a shared prefix's full blocks
(the reward's few-shot header) and puts them back into the next cache.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, fields

import torch

from caprl_core.sampler import cache_size, requests
from caprl_core.sampler.attention import select_backend
from caprl_core.sampler.block_manager import BlockManager
from caprl_core.sampler.kept_prefix import KeptPrefix
from caprl_core.sampler.model import ModelAdapter
from caprl_core.sampler.sampling import sample_rows
from caprl_core.sampler.scheduler import Scheduler
from caprl_core.sampler.sequence import Completion, SamplingParams, Sequence
from caprl_core.sampler.step_inputs import step_inputs

DEFAULT_MEMORY_FRACTION = {"cuda": 0.3, "cpu": 0.1}


@dataclass
class EngineStats:
    """Counters since the engine was made (or `reset_stats()`)."""

    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) tokens actually run through the model at prefill
    cached_tokens: int = 0  # prefix-cache hit tokens: prefill tokens taken from the cache instead
    shared_prefix_tokens: int = 0  # of prefill_tokens, those of a `prefill(shared_prefix=...)` computed alone
    decode_tokens: int = 0
    sampled_tokens: int = 0
    forks: int = 0  # samples made by forking a prefilled prompt
    preemptions: int = 0
    vision_calls: int = 0  # vision tower runs (one per image)
    peak_used_blocks: int = 0  # most KV blocks held at once (a block shared by forks counts once)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Engine:
    """Paged KV-cache sampler over a Hugging Face causal LM or Qwen2.5-VL model (used in place, never copied).

    Cache size: num_kv_blocks or kv_cache_tokens fix it. Otherwise it follows need, decided each time the cache is
    allocated (the first call, and the first call after `free_kv_cache()`): enough blocks for every sequence of
    that call at its maximum length with nothing shared (prompt + max_new_tokens per sample; prompt length for
    `prefill`), rounded up to a power of two so that calls of about the same size reuse it, and capped by
    kv_cache_memory_fraction (default 0.3 on CUDA, 0.1 on CPU) of the device memory free at that moment (on CPU,
    MemAvailable). A later call that needs more than the cache holds reallocates it while the cap allows, forgetting
    the prefix cache but the last `prefill(shared_prefix=...)`'s full blocks (copied over); past the cap the
    scheduler preempts. Sizing from free memory at construction gave the tiny models 297,870 blocks each (issue 15).
    At most one of the three may be given. max_batch_tokens caps the new tokens of a prefill batch (a single longer
    prompt still runs alone); max_num_seqs caps the sequences of a step.
    attn_backend: "triton", "flash_attn", "torch" or "reference"; None picks $CAPRL_ATTENTION_BACKEND, else Triton
    on CUDA and the PyTorch path on CPU (see caprl_core.sampler.attention). enable_prefix_caching=False makes every
    prompt compute all its tokens (for comparisons; forks still share their prompt's blocks).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_kv_blocks: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_memory_fraction: float | None = None,
        block_size: int = 16,
        max_batch_tokens: int = 8192,
        max_num_seqs: int = 256,
        attn_backend: str | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        for name, value in (("block_size", block_size), ("max_batch_tokens", max_batch_tokens),
                            ("max_num_seqs", max_num_seqs)):  # fmt: skip
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.adapter = ModelAdapter(model)
        self.block_size = block_size
        a = self.adapter
        self.attn_backend = select_backend(a.device, a.dtype, block_size, a.head_dim, attn_backend)
        self.fixed_kv_blocks = cache_size.fixed_blocks(
            num_kv_blocks, kv_cache_tokens, kv_cache_memory_fraction, block_size
        )
        if kv_cache_memory_fraction is None:
            kv_cache_memory_fraction = DEFAULT_MEMORY_FRACTION["cuda" if a.device.type == "cuda" else "cpu"]
        self.kv_cache_memory_fraction = kv_cache_memory_fraction
        # Blocks of the cache as allocated now (None: sized by need, not allocated yet).
        self.num_kv_blocks: int | None = self.fixed_kv_blocks
        self.block_manager = BlockManager(self.num_kv_blocks or 1, block_size, prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens)
        self.kv_cache: torch.Tensor | None = None
        # The shared prefix of the last `prefill(shared_prefix=...)`: the one prefix whose cached blocks are known to
        # be computed alone, so the one that may be kept across a release or a growth of the cache.
        self._shared_prefix: list[int] | None = None
        self._kept = KeptPrefix()  # its full blocks while out of the cache, until a prefill copies them back
        self.stats = EngineStats()
        self._next_seq_id = 0
        self._done: list[Sequence] = []
        self._hidden: dict[int, torch.Tensor] = {}

    # --- cache --------------------------------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        a = self.adapter
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * a.dtype.itemsize

    def max_kv_blocks(self) -> int:
        """The most blocks the cache may have now: the fixed size, else the memory fraction of what is free (the
        current cache counted as free, since growing it replaces it)."""
        if self.fixed_kv_blocks is not None:
            return self.fixed_kv_blocks
        free = cache_size.free_bytes(self.adapter.device)
        if self.kv_cache is not None:
            free += self.kv_cache.numel() * self.kv_cache.element_size()
        blocks = int(free * self.kv_cache_memory_fraction) // self.block_bytes
        if blocks < 1:
            raise ValueError(
                f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} of {free} free bytes holds no KV block"
            )
        return blocks

    def _ensure_cache(self, seqs: list[Sequence]) -> torch.Tensor:
        """Allocate the cache if there is none, or grow it when `seqs` need more and the cap allows (nothing is
        running between calls, so only the prefix cache is lost)."""
        if self.fixed_kv_blocks is not None:
            blocks = self.fixed_kv_blocks
        else:
            needed = cache_size.blocks_needed(seqs, self.block_size, self.adapter.max_length)
            need = 1 << max(needed - 1, 0).bit_length()  # the next power of two
            if self.kv_cache is not None and need <= self.num_kv_blocks:
                return self.kv_cache
            blocks = min(need, self.max_kv_blocks())
        if self.kv_cache is None or blocks > self.num_kv_blocks:
            a = self.adapter
            if self.kv_cache is not None and self._shared_prefix is not None:
                self._kept.keep(self._shared_prefix, self.kv_cache, self.block_manager)  # growing: into the new cache
            self.kv_cache = None  # release the old cache before allocating the new one
            shape = (2, a.num_layers, blocks, self.block_size, a.num_kv_heads, a.head_dim)
            # empty, not zeros: no page is touched before it is used (zeros would write the whole cache up front).
            # Never-written slots are never read: the Triton kernels mask them and the PyTorch path pads with a
            # real key (tests fill unused slots with NaN to check this).
            self.kv_cache = torch.empty(shape, dtype=a.dtype, device=a.device)
            self.num_kv_blocks = blocks
            self.block_manager.reset(blocks)
        return self.kv_cache

    def free_kv_cache(self) -> None:
        """Release the KV cache memory (and forget the prefix cache); it is allocated again on the next call."""
        self.release_kv_cache()

    def release_kv_cache(self, keep_prefix: SequenceABC[int] | None = None) -> None:
        """Release the KV cache memory and forget the prefix cache, except the full blocks of `keep_prefix` when it is
        the last `prefill(shared_prefix=...)`'s prefix and all cached: copied aside (`KeptPrefix`: those blocks'
        bytes only), the next `prefill(shared_prefix=keep_prefix)` copies them back instead of computing the prefix
        again, with the same bits. Nothing is kept with prefix caching off; `generate` never sees them."""
        prefix = None
        if keep_prefix is not None:
            prefix = requests.check_prefix(keep_prefix, self.adapter.vocab_size, name="keep_prefix")
        self._kept.forget_unless(prefix)
        if prefix is not None and self.kv_cache is not None and prefix == self._shared_prefix:
            self._kept.keep(prefix, self.kv_cache, self.block_manager)
        self.kv_cache = None
        self.num_kv_blocks = self.fixed_kv_blocks
        self.block_manager.reset()

    @property
    def held_kv_bytes(self) -> int:
        """Bytes of K/V the engine holds now: the cache, if allocated, and the prefix blocks kept aside."""
        cache = self.kv_cache.numel() * self.kv_cache.element_size() if self.kv_cache is not None else 0
        return cache + self._kept.nbytes

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    # --- public API ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompts: SequenceABC,
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        *,
        progress: bool = False,
    ) -> list[list[Completion]]:
        """Sample `params.n` completions for every prompt; result[i][j] is sample j of prompts[i].

        A prompt is a list (or 1-D tensor) of token ids, or a dict of model inputs: `input_ids` and, for
        Qwen2.5-VL, `pixel_values`, `image_grid_thw` (and optionally `mm_token_type_ids`). `params` is one
        SamplingParams for all prompts or one per prompt. progress=True shows a tqdm bar on stderr.
        """
        plist = requests.params_list(prompts, params)
        seqs, most = [], self.max_kv_blocks()
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            ids, mm = requests.prompt_ids(self.adapter, i, prompt)
            self._check_fits(i, len(ids), p, most)
            seq = Sequence(self._new_id(), ids, p, request_index=i, mm=mm)
            seq.generator = self._generator(p, i, 0)
            seqs.append(seq)
        self._run(seqs, progress=progress, total=sum(p.n for p in plist))
        results: list[list[Completion | None]] = [[None] * p.n for p in plist]
        for seq in self._done:
            results[seq.request_index][seq.sample_index] = seq.completion()
        self._done = []
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def prefill(
        self, prompts: SequenceABC, *, progress: bool = False, shared_prefix: SequenceABC[int] | None = None
    ) -> torch.Tensor:
        """Hidden states (after the final norm) at the last position of every prompt: [P, H] in the model's dtype.

        Prefill only, no sampling: the reward reader's path. Prompts sharing a prefix (a caption followed by
        different questions) compute it once; `stats.cached_tokens` counts what came from the cache.

        shared_prefix: token ids the prompts start with (the reward's few-shot header). The call first forgets every
        cached prefix except this one's full blocks, and computes those alone (a prefill of their own) whenever they
        are not all cached, unless `release_kv_cache(keep_prefix=...)` or a growth of the cache kept them: then their
        K/V is copied back. The result then depends on the prompts only, not on what earlier calls left in the
        cache (a resumed training run reproduces it bit for bit), and the prefix is computed once per cache instead
        of once per call. Ignored with prefix caching off.
        """
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of prompts")
        seqs, most = [], self.max_kv_blocks()
        for i, prompt in enumerate(prompts):
            ids, mm = requests.prompt_ids(self.adapter, i, prompt)
            self._check_fits(i, len(ids), None, most)
            seqs.append(Sequence(self._new_id(), ids, SamplingParams(), request_index=i, mm=mm, prefill_only=True))
        if shared_prefix is not None and self.block_manager.prefix_caching:
            self._keep_only_prefix(requests.check_prefix(shared_prefix, self.adapter.vocab_size), seqs)
        self._run(seqs, progress=progress, total=len(seqs))
        self._done = []
        hidden = torch.stack([self._hidden.pop(i) for i in range(len(prompts))])
        return hidden

    def _keep_only_prefix(self, prefix: list[int], seqs: list[Sequence]) -> None:
        """The prefix cache afterwards holds `prefix`'s full blocks and nothing else, computed by a prefill of the
        prefix alone (now, or by an earlier call)."""
        self._shared_prefix = prefix  # growing the cache keeps its full blocks (`_ensure_cache`)
        self._ensure_cache(seqs)  # sized for the whole call first: no copy of the prefix for a later growth
        bm, num_full = self.block_manager, len(prefix) // self.block_size
        blocks = bm.cached_prefix_blocks(prefix)
        if len(blocks) < num_full:
            bm.reset()  # partly cached is not enough: its K/V must come from the same computation every time
            blocks = self._kept.restore(prefix, self.kv_cache, bm)  # that computation's K/V, kept across a release
        if len(blocks) < num_full:
            before = self.stats.prefill_tokens
            self._run([Sequence(self._new_id(), prefix, SamplingParams(), request_index=-1, prefill_only=True)],
                      progress=False, total=1)  # fmt: skip
            self._hidden.pop(-1)
            self._done = []
            self.stats.shared_prefix_tokens += self.stats.prefill_tokens - before
            blocks = bm.cached_prefix_blocks(prefix)
        bm.forget_cached(keep=blocks)

    # --- ids and generators ---------------------------------------------------------------------------------------

    def _check_fits(self, index: int, length: int, params: SamplingParams | None, most: int) -> None:
        requests.check_fits(index, length, params, most, self.block_size, self.adapter.max_length)

    def _new_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def _generator(self, params: SamplingParams, request: int, sample_index: int) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        request = request if params.seed_index is None else params.seed_index
        key = hashlib.blake2b(f"{params.seed}/{request}/{sample_index}".encode(), digest_size=8).digest()
        return torch.Generator(device=self.adapter.device).manual_seed(int.from_bytes(key, "little") >> 1)

    # --- the loop -----------------------------------------------------------------------------------------------

    def _run(self, seqs: list[Sequence], *, progress: bool, total: int) -> None:
        self._ensure_cache(seqs)
        preemptions_before = self.scheduler.num_preemptions
        for seq in seqs:
            self.scheduler.add(seq)
        from tqdm import tqdm  # a dependency of transformers

        bar = tqdm(total=total, desc="sampler", unit="seq", file=sys.stderr, disable=not progress, mininterval=1.0,
                   dynamic_ncols=True)  # fmt: skip
        try:
            while not self.scheduler.is_finished:
                self._step()
                if progress:  # the decode loop is hot: nothing to do without a bar
                    bar.update(len(self._done) - bar.n)
                    bar.set_postfix(steps=self.stats.steps, refresh=False)
        except BaseException:
            # A step that died half way leaves blocks registered whose K/V was never written: forget it all.
            self.scheduler.waiting.clear()
            self.scheduler.running.clear()
            self.block_manager.reset()
            self._done, self._hidden = [], {}
            raise
        finally:
            bar.close()
        self.stats.preemptions += self.scheduler.num_preemptions - preemptions_before

    def _step(self) -> None:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            raise RuntimeError("scheduler returned an empty batch with work left (a bug: please report)")
        self._note_usage()
        inputs = step_inputs(batch, self.adapter, self.kv_cache, self.block_size, self.attn_backend, self._on_image)
        self._count_tokens(batch.is_prefill, inputs.spans)
        hidden = self.adapter.forward(
            inputs.ctx,
            inputs.positions,
            input_ids=inputs.input_ids,
            inputs_embeds=inputs.inputs_embeds,
            deepstack=inputs.deepstack,
        )  # [T, H]
        last = hidden[inputs.last_rows]  # [B, H]
        self.stats.steps += 1
        rows, targets = [], []
        for b, seq in enumerate(batch.seqs):
            if seq.prefill_only:
                self._hidden[seq.request_index] = last[b].clone()
                self._finish(seq, "prefill")
                continue
            group = [seq] if seq.forked else [seq, *self._fork(seq)]
            rows.extend([b] * len(group))
            targets.extend(group)
        if targets:
            self._note_usage()  # after the forks
            self._sample(last[torch.tensor(rows, device=last.device)], targets)

    def _count_tokens(self, is_prefill: bool, spans: list[tuple[int, int]]) -> None:
        if is_prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(e - s for s, e in spans)
            self.stats.cached_tokens += sum(s for s, _ in spans)
        else:
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(spans)

    def _on_image(self) -> None:
        self.stats.vision_calls += 1

    def _note_usage(self) -> None:
        used = self.num_kv_blocks - self.block_manager.num_free
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, used)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Samples 1..n-1 of a just-prefilled prompt: they share its full blocks; the partial one is copied."""
        children, copies = [], []
        for i in range(1, parent.params.n):
            child = parent.fork(self._new_id(), i)
            child.generator = self._generator(parent.params, parent.request_index, i)
            copy = self.block_manager.fork(parent, child)
            if copy is not None:
                copies.append(copy)
            self.scheduler.add_running(child)
            children.append(child)
        if copies:  # copy whole blocks: the slots past the prompt are never read before being written
            src = torch.tensor([c[0] for c in copies], device=self.kv_cache.device)
            dst = torch.tensor([c[1] for c in copies], device=self.kv_cache.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
        parent.forked = True
        self.stats.forks += len(children)
        return children

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence]) -> None:
        logits = self.adapter.logits(hidden)  # [S, V] fp32
        tokens, logprobs, policy_logprobs = sample_rows(
            logits, [s.params for s in seqs], [s.generator for s in seqs], [s.token_ids for s in seqs]
        )
        self.stats.sampled_tokens += len(seqs)
        max_len = self.adapter.max_length
        for seq, token, logprob, policy_logprob in zip(seqs, tokens.tolist(), logprobs.tolist(),
                                                       policy_logprobs.tolist(), strict=True):  # fmt: skip
            seq.append(token, logprob, policy_logprob)
            if token in seq.params.stop_token_ids:
                self._finish(seq, "stop")
            elif seq.num_completion_tokens >= seq.params.max_new_tokens or len(seq) >= max_len:
                self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._done.append(seq)
