"""Prefill-server side of the early first token: stream a PD request's first token from the prefill.

A PD prefill server samples each request's first token and, in stock SGLang, tells its client only
once the KV has reached a decoder; the client's first token then comes from the decoder, after the
routing decision, the decoder's admission and the whole KV transfer. The ELDR router instead asks
(``sampling_params.custom_params["eldr_early_first_token"]``, which SGLang carries to the
scheduler's ``Req`` untouched) for that token at once, and this AFTER hook on
``process_batch_result_disagg_prefill`` hands it to SGLang's own output streamer as soon as the
batch result is processed. Detokenisation, stop-string holding, logprobs and the OpenAI chunk
format are therefore SGLang's, exactly as a stock server streams its first token; the router
forwards those chunks and drops what the decoder's stream repeats.

Only when the first token cannot end the request: a request that could finish on it (an EOS or
stop token, stop strings or regexes, a pending abort) is left to the decoder, because SGLang trims
what matched a stop only when it finishes, and a token already shown cannot be taken back.
"""

from __future__ import annotations

from typing import Any

from sglang_eldr.wire import EARLY_FIELD

T_DISAGG_PREFILL_RESULT = (
    "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin.process_batch_result_disagg_prefill"
)


def _asked(req: Any) -> bool:
    cp = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    return isinstance(cp, dict) and cp.get(EARLY_FIELD) is True


def _stop_tokens(req: Any) -> set[int]:
    sp = req.sampling_params
    ids = set(sp.stop_token_ids or ()) | set(getattr(req, "eos_token_ids", None) or ())
    tok = getattr(req, "tokenizer", None)
    if tok is not None:
        if tok.eos_token_id is not None:
            ids.add(tok.eos_token_id)
        ids |= set(getattr(tok, "additional_stop_token_ids", None) or ())
    return ids


def can_stream_first(req: Any) -> bool:
    """The request's first token has been sampled here, is still unsent, and cannot end it."""
    if (not getattr(req, "stream", False) or getattr(req, "_eldr_early_sent", False) or len(req.output_ids) != 1
            or req.finished() or getattr(req, "to_finish", None) is not None
            or getattr(req, "inflight_middle_chunks", 0) > 0):
        return False
    sp = req.sampling_params
    if sp.stop_strs or getattr(sp, "stop_regex_strs", None):
        return False
    token = req.output_ids[0]
    vocab = getattr(req, "vocab_size", None)
    if token < 0 or (vocab is not None and token >= vocab):
        return False
    return sp.ignore_eos or token not in _stop_tokens(req)


def prefill_result_after(result: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    reqs = [r for r in batch.reqs if _asked(r) and can_stream_first(r)]
    if not reqs:
        return None
    for r in reqs:
        r._eldr_early_sent = True
    scheduler.output_streamer.stream_output(reqs, any(r.return_logprob for r in reqs))
    return None


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(T_DISAGG_PREFILL_RESULT, prefill_result_after, HookType.AFTER)
